//! The plots, as SVG written by hand: a line chart (one line per VPN, a bar at each
//! point from min to max of the repetitions) and a bar chart (recovery times). No
//! fonts or libraries needed; generic `sans-serif` text renders anywhere. Pure:
//! data in, SVG text out, and the report's plots built from a [`Report`].

use std::fmt::Write;

use crate::report::Report;
use crate::scenario::Scenario;
use crate::stats::Spread;

const W: f64 = 820.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 250.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
/// Colour-blind-safe (Okabe–Ito) line colours.
const COLOURS: [&str; 8] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442",
];

pub struct Series {
    pub name: String,
    /// `(x, y)` in data units, sorted by x.
    pub points: Vec<(f64, Spread)>,
}

pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Logarithmic x axis (connections 1 → 1000).
    pub log_x: bool,
    pub series: Vec<Series>,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Roughly five round tick values covering `0..=max`.
pub fn ticks(max: f64) -> Vec<f64> {
    if max <= 0.0 || !max.is_finite() {
        return vec![0.0, 1.0];
    }
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let n = (max / step).ceil() as usize;
    (0..=n).map(|i| i as f64 * step).collect()
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 || (v.abs() >= 1.0 && v.fract() == 0.0) {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn header(out: &mut String, title: &str, y_label: &str, x_label: &str) {
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
         <text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">{}</text>\n",
        W / 2.0,
        escape(title),
        LEFT + (W - LEFT - RIGHT) / 2.0,
        H - 10.0,
        escape(x_label),
        TOP + (H - TOP - BOTTOM) / 2.0,
        TOP + (H - TOP - BOTTOM) / 2.0,
        escape(y_label),
    );
}

/// The y axis from 0 to the top tick, with grid lines; returns the scale's top.
fn y_axis(out: &mut String, max: f64) -> f64 {
    let ticks = ticks(max);
    let top = *ticks.last().unwrap_or(&1.0);
    for t in &ticks {
        let y = y_pos(*t, top);
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            fmt_tick(*t)
        );
    }
    top
}

fn y_pos(v: f64, top: f64) -> f64 {
    let plot = H - TOP - BOTTOM;
    H - BOTTOM - (v / top).clamp(0.0, 1.0) * plot
}

impl LineChart {
    pub fn render(&self) -> String {
        let mut out = String::new();
        header(&mut out, &self.title, &self.y_label, &self.x_label);
        let all: Vec<&(f64, Spread)> = self.series.iter().flat_map(|s| &s.points).collect();
        let max_y = all.iter().map(|(_, s)| s.max).fold(0.0, f64::max);
        let top = y_axis(&mut out, max_y);
        let tx = |x: f64| if self.log_x { x.max(1e-9).log10() } else { x };
        let mut xs: Vec<f64> = all.iter().map(|(x, _)| *x).collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        let (lo, hi) = match (xs.first(), xs.last()) {
            (Some(a), Some(b)) if tx(*b) > tx(*a) => (tx(*a), tx(*b)),
            (Some(a), _) => (tx(*a) - 1.0, tx(*a) + 1.0),
            _ => (0.0, 1.0),
        };
        let x_pos = |x: f64| LEFT + 10.0 + (tx(x) - lo) / (hi - lo) * (W - LEFT - RIGHT - 20.0);
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{}\" y2=\"{}\" stroke=\"#333\"/>",
            W - RIGHT,
            H - BOTTOM,
            H - BOTTOM
        );
        for x in &xs {
            let _ = writeln!(
                out,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                x_pos(*x),
                H - BOTTOM + 16.0,
                fmt_tick(*x)
            );
        }
        for (i, s) in self.series.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let path: Vec<String> = s
                .points
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", x_pos(*x), y_pos(y.median, top)))
                .collect();
            let _ = writeln!(
                out,
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
                path.join(" ")
            );
            for (x, y) in &s.points {
                let px = x_pos(*x);
                let _ = writeln!(
                    out,
                    "<line x1=\"{px:.1}\" x2=\"{px:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"{colour}\"/><circle cx=\"{px:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"/>",
                    y_pos(y.min, top),
                    y_pos(y.max, top),
                    y_pos(y.median, top)
                );
            }
            let ly = TOP + 10.0 + 18.0 * i as f64;
            let lx = W - RIGHT + 12.0;
            let _ = writeln!(
                out,
                "<line x1=\"{lx}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{colour}\" stroke-width=\"3\"/><text x=\"{}\" y=\"{}\">{}</text>",
                lx + 18.0,
                lx + 24.0,
                ly + 4.0,
                escape(&s.name)
            );
        }
        out.push_str("</svg>\n");
        out
    }
}

/// Horizontal bars with a min–max whisker, one row per `(label, value)`, the
/// median written at the bar's end; a value at or above `limit` reads "not
/// recovered".
pub fn bar_chart(title: &str, x_label: &str, bars: &[(String, Spread)], limit: f64) -> String {
    const LABELS: f64 = 300.0;
    const ROW: f64 = 24.0;
    let height = TOP + ROW * bars.len().max(1) as f64 + BOTTOM;
    let right = W - 90.0;
    let max = bars.iter().map(|(_, s)| s.max).fold(0.0, f64::max);
    let ticks = ticks(max);
    let top = *ticks.last().unwrap_or(&1.0);
    let x_pos = |v: f64| LABELS + (v / top).clamp(0.0, 1.0) * (right - LABELS);
    let mut out = String::new();
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{height}\" viewBox=\"0 0 {W} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"{W}\" height=\"{height}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
        W / 2.0,
        escape(title),
        (LABELS + right) / 2.0,
        height - 10.0,
        escape(x_label),
    );
    for t in &ticks {
        let x = x_pos(*t);
        let _ = writeln!(
            out,
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{TOP}\" y2=\"{}\" stroke=\"#ddd\"/><text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            height - BOTTOM,
            height - BOTTOM + 16.0,
            fmt_tick(*t)
        );
    }
    for (i, (label, s)) in bars.iter().enumerate() {
        let y = TOP + ROW * i as f64;
        let colour = COLOURS[i % COLOURS.len()];
        let value = if s.median >= limit {
            "not recovered".to_string()
        } else {
            format!("{:.2}", s.median)
        };
        let cy = y + ROW / 2.0;
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text><rect x=\"{LABELS}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{colour}\"/><line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{cy:.1}\" y2=\"{cy:.1}\" stroke=\"#333\"/><text x=\"{:.1}\" y=\"{:.1}\">{value}</text>",
            LABELS - 8.0,
            cy + 4.0,
            escape(label),
            y + 4.0,
            x_pos(s.median) - LABELS,
            ROW - 8.0,
            x_pos(s.min),
            x_pos(s.max),
            x_pos(s.max) + 6.0,
            cy + 4.0,
        );
    }
    out.push_str("</svg>\n");
    out
}

/// One line per VPN/shape through the records `x_of` accepts, `y_of` from each summary.
fn series(
    report: &Report,
    x_of: impl Fn(&Scenario) -> Option<f64>,
    y_of: impl Fn(&crate::stats::Summary) -> Spread,
) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for r in &report.records {
        let (Some(x), Some(summary)) = (x_of(&r.scenario), r.summary) else {
            continue;
        };
        let name = format!("{} ({})", r.vpn, r.shape);
        let point = (x, y_of(&summary));
        match out.iter_mut().find(|s| s.name == name) {
            Some(s) => s.points.push(point),
            None => out.push(Series {
                name,
                points: vec![point],
            }),
        }
    }
    for s in &mut out {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

fn percent(s: Spread) -> Spread {
    Spread {
        median: s.median * 100.0,
        min: s.min * 100.0,
        max: s.max * 100.0,
    }
}

/// The report's plots as `(file name, SVG)`; a plot without data is left out.
pub fn plots(report: &Report) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut line = |file: &str, chart: LineChart| {
        if !chart.series.is_empty() {
            out.push((file.to_string(), chart.render()));
        }
    };
    let connections = |s: &Scenario| match s {
        Scenario::Load { connections } => Some(*connections as f64),
        _ => None,
    };
    line(
        "response-time-vs-load.svg",
        LineChart {
            title: "Median response time vs concurrent connections".into(),
            x_label: "concurrent connections (closed loop)".into(),
            y_label: "p50 response time (ms)".into(),
            log_x: true,
            series: series(report, connections, |s| s.p50_ms),
        },
    );
    line(
        "requests-vs-load.svg",
        LineChart {
            title: "Requests/s vs concurrent connections".into(),
            x_label: "concurrent connections (closed loop)".into(),
            y_label: "requests/s".into(),
            log_x: true,
            series: series(report, connections, |s| s.requests_per_second),
        },
    );
    for (bursty, file, kind) in [
        (false, "failure-rate-vs-loss.svg", "random"),
        (true, "failure-rate-vs-bursty-loss.svg", "bursty"),
    ] {
        line(
            file,
            LineChart {
                title: format!("Failure rate vs {kind} packet loss"),
                x_label: "packet loss on every underlay direction (%)".into(),
                y_label: "failed requests (%)".into(),
                log_x: false,
                series: series(
                    report,
                    |s| match s {
                        Scenario::Loss { percent, bursty: b }
                            if *b == bursty || *percent == 0.0 =>
                        {
                            Some(*percent)
                        }
                        _ => None,
                    },
                    |s| percent(s.failure_rate),
                ),
            },
        );
    }
    line(
        "p99-vs-latency.svg",
        LineChart {
            title: "p99 response time vs added round-trip time".into(),
            x_label: "added RTT (ms, ±10 % jitter)".into(),
            y_label: "p99 response time (ms)".into(),
            log_x: false,
            series: series(
                report,
                |s| match s {
                    Scenario::Latency { rtt_ms } => Some(*rtt_ms as f64),
                    _ => None,
                },
                |s| s.p99_ms,
            ),
        },
    );
    let limit = report.config.recovery_limit.as_secs_f64();
    let bars: Vec<(String, Spread)> = report
        .records
        .iter()
        .filter(|r| r.scenario.is_event())
        .filter_map(|r| {
            let label = format!("{} ({}) {}", r.vpn, r.shape, r.scenario.label());
            Some((label, r.recovery(limit)?))
        })
        .collect();
    if !bars.is_empty() {
        out.push((
            "recovery-times.svg".into(),
            bar_chart(
                &format!("Recovery time after an event (tried for {limit:.0} s)"),
                "seconds until requests succeed again (median, min–max)",
                &bars,
                limit,
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spread(v: f64) -> Spread {
        Spread {
            median: v,
            min: v * 0.9,
            max: v * 1.1,
        }
    }

    #[test]
    fn ticks_are_round_and_cover_the_maximum() {
        assert_eq!(ticks(9.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(ticks(1000.0), vec![0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]);
        assert_eq!(ticks(0.0), vec![0.0, 1.0]);
        let t = ticks(0.037);
        assert!(*t.last().unwrap() >= 0.037 && t.len() <= 7, "{t:?}");
    }

    #[test]
    fn line_chart_draws_each_series_with_its_name_and_whiskers() {
        let chart = LineChart {
            title: "t <1>".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            log_x: true,
            series: vec![
                Series {
                    name: "a & b".into(),
                    points: vec![(1.0, spread(10.0)), (1000.0, spread(50.0))],
                },
                Series {
                    name: "c".into(),
                    points: vec![(10.0, spread(20.0))],
                },
            ],
        };
        let svg = chart.render();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(svg.contains("a &amp; b") && svg.contains("t &lt;1&gt;"));
        // Log axis: 1, 10, 1000 labelled.
        for x in [">1<", ">10<", ">1000<"] {
            assert!(svg.contains(x), "{x}");
        }
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn bar_chart_has_a_row_per_bar_and_says_not_recovered() {
        let svg = bar_chart(
            "t",
            "x",
            &[("a".into(), spread(1.0)), ("b".into(), spread(20.0))],
            20.0,
        );
        assert_eq!(svg.matches("<rect").count(), 3, "background and two bars");
        assert!(svg.contains(">1.00<") && svg.contains(">not recovered<"));
    }

    #[test]
    fn plots_from_a_report() {
        let report = crate::report::tests::report();
        let files: Vec<String> = plots(&report).into_iter().map(|(f, _)| f).collect();
        assert!(files.contains(&"response-time-vs-load.svg".into()));
        assert!(files.contains(&"failure-rate-vs-loss.svg".into()));
        assert!(files.contains(&"recovery-times.svg".into()));
        // No latency points in this report: no empty plot.
        assert!(!files.contains(&"p99-vs-latency.svg".into()));
        for (_, svg) in plots(&report) {
            assert!(!svg.contains("NaN") && !svg.contains("inf"));
        }
    }
}
