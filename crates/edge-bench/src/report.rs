//! What a run found, as data (written raw as JSON) and as the markdown tables a
//! reader compares VPNs with. Rendering is pure: [`Report`] in, text out.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::resources::Usage;
use crate::scenario::{Config, Scenario};
use crate::stats::{Sample, Spread, Summary};

/// One point of one VPN: its repetitions and their summary.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub vpn: String,
    pub shape: String,
    pub scenario: Scenario,
    /// Load points: one sample per repetition.
    pub samples: Vec<Sample>,
    pub summary: Option<Summary>,
    /// Event points: seconds until requests succeeded again, per repetition
    /// (`None`: not within the recovery limit).
    pub recovery_seconds: Vec<Option<f64>>,
    /// The VPN's processes during the point (CPU seconds used, wake-ups, peak RSS so
    /// far), and the whole machine's busy CPU and context switches.
    pub usage: Usage,
    /// Underlay bytes per successful request (both directions, all hosts).
    pub wire_bytes_per_request: Option<f64>,
}

impl Record {
    /// Median recovery over repetitions, counting a never-recovered one as `limit`.
    pub fn recovery(&self, limit: f64) -> Option<Spread> {
        let v: Vec<f64> = self
            .recovery_seconds
            .iter()
            .map(|r| r.unwrap_or(limit))
            .collect();
        Spread::of(&v)
    }
}

/// The proof, before measuring, that a VPN carries the pods' traffic.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Honesty {
    pub vpn: String,
    pub shape: String,
    /// Every directly reachable pod answered through the VPN.
    pub reached_pods: bool,
    /// Underlay packets that held the response body's plaintext marker.
    pub plaintext_packets: u64,
    /// No pod answered once the VPN was stopped.
    pub stopped_when_down: bool,
    /// Plaintext is allowed only for the no-VPN baseline.
    pub passed: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Skipped {
    pub vpn: String,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub command: String,
    pub machine: String,
    pub config: Config,
    pub skipped: Vec<Skipped>,
    pub honesty: Vec<Honesty>,
    pub records: Vec<Record>,
    /// Highest open-loop rate whose median repetition kept the budget, per VPN/shape.
    pub max_rates: Vec<(String, String, Option<f64>)>,
}

fn fmt_spread(s: &Spread, digits: usize) -> String {
    if (s.max - s.min).abs() < f64::EPSILON {
        format!("{:.*}", digits, s.median)
    } else {
        format!(
            "{:.*} ({:.*}–{:.*})",
            digits, s.median, digits, s.min, digits, s.max
        )
    }
}

/// The VPN/shape columns in run order.
fn runs(report: &Report) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for r in &report.records {
        let key = (r.vpn.clone(), r.shape.clone());
        if !out.contains(&key) {
            out.push(key);
        }
    }
    out
}

fn find<'a>(report: &'a Report, run: &(String, String), s: &Scenario) -> Option<&'a Record> {
    report
        .records
        .iter()
        .find(|r| r.vpn == run.0 && r.shape == run.1 && &r.scenario == s)
}

fn scenarios(report: &Report, pick: fn(&Scenario) -> bool) -> Vec<Scenario> {
    let mut out: Vec<Scenario> = Vec::new();
    for r in &report.records {
        if pick(&r.scenario) && !out.contains(&r.scenario) {
            out.push(r.scenario);
        }
    }
    out
}

/// One table: a row per VPN/shape, a column per scenario, `cell` per record.
fn table(
    out: &mut String,
    report: &Report,
    title: &str,
    columns: &[Scenario],
    cell: impl Fn(&Record) -> String,
) {
    if columns.is_empty() {
        return;
    }
    let _ = writeln!(out, "### {title}\n");
    let _ = write!(out, "| VPN (shape) |");
    for c in columns {
        let _ = write!(out, " {} |", c.label());
    }
    let _ = write!(out, "\n|---|");
    for _ in columns {
        let _ = write!(out, "---:|");
    }
    out.push('\n');
    for run in runs(report) {
        let _ = write!(out, "| {} ({}) |", run.0, run.1);
        for c in columns {
            let text = find(report, &run, c)
                .map(&cell)
                .unwrap_or_else(|| "–".into());
            let _ = write!(out, " {text} |");
        }
        out.push('\n');
    }
    out.push('\n');
}

/// The markdown a reader compares VPNs with: honesty, then a table per axis.
pub fn render_markdown(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## Results\n");
    let _ = writeln!(
        out,
        "Each cell: median over {} repetitions (min–max in brackets).\n",
        report.config.repetitions
    );
    if !report.skipped.is_empty() {
        for s in &report.skipped {
            let _ = writeln!(out, "- skipped **{}**: {}", s.vpn, s.reason);
        }
        out.push('\n');
    }
    let _ = writeln!(out, "### Honesty check (before measuring)\n");
    let _ = writeln!(
        out,
        "| VPN (shape) | pods reached | plaintext packets on the underlay | unreachable once stopped | passed |\n|---|---|---:|---|---|"
    );
    let yes = |b: bool| if b { "yes" } else { "**no**" };
    for h in &report.honesty {
        let _ = writeln!(
            out,
            "| {} ({}) | {} | {} | {} | {} |",
            h.vpn,
            h.shape,
            yes(h.reached_pods),
            h.plaintext_packets,
            yes(h.stopped_when_down),
            yes(h.passed)
        );
    }
    out.push('\n');
    let rps = |r: &Record| {
        r.summary
            .map(|s| fmt_spread(&s.requests_per_second, 0))
            .unwrap_or_else(|| "–".into())
    };
    let p99 = |r: &Record| {
        r.summary
            .map(|s| fmt_spread(&s.p99_ms, 1))
            .unwrap_or_else(|| "–".into())
    };
    let fail = |r: &Record| {
        r.summary
            .map(|s| {
                let pct = Spread {
                    median: s.failure_rate.median * 100.0,
                    min: s.failure_rate.min * 100.0,
                    max: s.failure_rate.max * 100.0,
                };
                format!("{} %", fmt_spread(&pct, 2))
            })
            .unwrap_or_else(|| "–".into())
    };
    let load = scenarios(report, |s| matches!(s, Scenario::Load { .. }));
    table(
        &mut out,
        report,
        "Requests/s, closed loop (concurrent connections)",
        &load,
        rps,
    );
    table(
        &mut out,
        report,
        "p99 response time (ms), closed loop",
        &load,
        p99,
    );
    table(&mut out, report, "Failure rate, closed loop", &load, fail);
    if !report.max_rates.is_empty() {
        let _ = writeln!(
            out,
            "### Open loop: highest rate within the budget (coordinated omission corrected)\n"
        );
        if let Some(o) = &report.config.open_loop {
            let _ = writeln!(
                out,
                "Budget: at most {:.1} % failures and p99 ≤ {} ms; rates from {} /s, ×{} a step.\n",
                o.budget.max_failure_rate * 100.0,
                o.budget.max_p99_ms,
                o.start_rate,
                o.factor
            );
        }
        let _ = writeln!(out, "| VPN (shape) | requests/s |\n|---|---:|");
        for (vpn, shape, rate) in &report.max_rates {
            let rate = rate.map_or("below the first step".into(), |r| format!("{r:.0}"));
            let _ = writeln!(out, "| {vpn} ({shape}) | {rate} |");
        }
        out.push('\n');
    }
    let loss = scenarios(report, |s| matches!(s, Scenario::Loss { .. }));
    table(
        &mut out,
        report,
        "Failure rate under packet loss",
        &loss,
        fail,
    );
    table(&mut out, report, "Requests/s under packet loss", &loss, rps);
    let latency = scenarios(report, |s| matches!(s, Scenario::Latency { .. }));
    table(
        &mut out,
        report,
        "p99 response time (ms) with added RTT (±10 % jitter)",
        &latency,
        p99,
    );
    let nat = scenarios(report, |s| matches!(s, Scenario::Nat));
    table(
        &mut out,
        report,
        "A worker behind NAT: requests/s to its pod",
        &nat,
        rps,
    );
    let limit = report.config.recovery_limit.as_secs_f64();
    let events = scenarios(report, Scenario::is_event);
    table(
        &mut out,
        report,
        &format!("Recovery time (s; {limit:.0} = not recovered)"),
        &events,
        |r| {
            r.recovery(limit)
                .map(|s| fmt_spread(&s, 2))
                .unwrap_or_else(|| "–".into())
        },
    );
    let _ = writeln!(out, "### Cost\n");
    let _ = writeln!(
        out,
        "CPU seconds of the VPN's processes (all hosts) per 1000 requests, their threads' wake-ups (voluntary context switches) per request, the same two for the whole machine (busy CPU, every context switch: what the VPN makes the load generator, servers and emulator do as well) and underlay bytes per request, at the highest closed-loop level; peak RSS summed over hosts.\n"
    );
    let _ = writeln!(
        out,
        "| VPN (shape) | CPU s / 1000 requests | wake-ups / request | machine CPU s / 1000 requests | machine context switches / request | bytes on the wire / request | peak RSS (MiB) |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    let top = load.last().copied();
    for run in runs(report) {
        let Some(r) = top.and_then(|s| find(report, &run, &s)) else {
            continue;
        };
        let ok: u64 = r.samples.iter().map(|s| s.ok).sum();
        let per_request = |x: f64, scale: f64, digits: usize| {
            if ok > 0 {
                format!("{:.digits$}", x * scale / ok as f64)
            } else {
                "–".into()
            }
        };
        let cpu = per_request(r.usage.cpu_seconds, 1000.0, 3);
        let wakeups = per_request(r.usage.wakeups as f64, 1.0, 1);
        let host_cpu = per_request(r.usage.host_cpu_seconds, 1000.0, 3);
        let host_switches = per_request(r.usage.host_switches as f64, 1.0, 1);
        let wire = r
            .wire_bytes_per_request
            .map_or("–".into(), |b| format!("{b:.0}"));
        let peak = report
            .records
            .iter()
            .filter(|x| x.vpn == run.0 && x.shape == run.1)
            .map(|x| x.usage.peak_rss_kib)
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            out,
            "| {} ({}) | {cpu} | {wakeups} | {host_cpu} | {host_switches} | {wire} | {:.1} |",
            run.0,
            run.1,
            peak as f64 / 1024.0
        );
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::stats::Percentiles;

    pub(crate) fn sample(ok: u64, timeouts: u64, p99: f64) -> Sample {
        Sample {
            ok,
            errors: 0,
            timeouts,
            seconds: 1.0,
            latency: Percentiles {
                p50_ms: p99 / 2.0,
                p90_ms: p99 / 1.5,
                p99_ms: p99,
                p999_ms: p99 * 1.2,
            },
        }
    }

    pub(crate) fn record(vpn: &str, scenario: Scenario, samples: Vec<Sample>) -> Record {
        Record {
            vpn: vpn.into(),
            shape: "mesh".into(),
            scenario,
            summary: Summary::of(&samples),
            samples,
            recovery_seconds: Vec::new(),
            usage: Usage {
                cpu_seconds: 1.5,
                peak_rss_kib: 2048,
                wakeups: 3000,
                host_cpu_seconds: 5.4,
                host_switches: 27000,
            },
            wire_bytes_per_request: Some(1234.0),
        }
    }

    pub(crate) fn report() -> Report {
        let load = Scenario::Load { connections: 10 };
        let loss = Scenario::Loss {
            percent: 5.0,
            bursty: false,
        };
        let mut flap = record("none", Scenario::Flap { down_ms: 5000 }, vec![]);
        flap.recovery_seconds = vec![Some(0.5), None, Some(0.7)];
        Report {
            command: "wiremesh bench edge --quick".into(),
            machine: "test".into(),
            config: Config::quick("/tmp/x".into()),
            skipped: vec![Skipped {
                vpn: "softether".into(),
                reason: "vpnserver not found".into(),
            }],
            honesty: vec![Honesty {
                vpn: "wiremesh".into(),
                shape: "mesh".into(),
                reached_pods: true,
                plaintext_packets: 0,
                stopped_when_down: true,
                passed: true,
            }],
            records: vec![
                record(
                    "none",
                    load,
                    vec![
                        sample(1000, 0, 2.0),
                        sample(1200, 0, 3.0),
                        sample(1100, 0, 2.5),
                    ],
                ),
                record("wiremesh", load, vec![sample(900, 0, 2.0); 3]),
                record("wiremesh", loss, vec![sample(900, 100, 20.0); 3]),
                flap,
            ],
            max_rates: vec![("none".into(), "mesh".into(), Some(4000.0))],
        }
    }

    #[test]
    fn markdown_has_every_table_and_value() {
        let md = render_markdown(&report());
        for want in [
            "- skipped **softether**: vpnserver not found",
            "| wiremesh (mesh) | yes | 0 | yes | yes |",
            "| none (mesh) | 1100 (1000–1200) |",
            "| wiremesh (mesh) | 900 |",
            "| wiremesh (mesh) | 10.00 % |",
            "| none (mesh) | 4000 |",
            // A repetition that never recovered counts as the limit (20 s in quick).
            "| none (mesh) | 0.70 (0.50–20.00) |",
            "| wiremesh (mesh) | 0.556 | 1.1 | 2.000 | 10.0 | 1234 | 2.0 |",
        ] {
            assert!(md.contains(want), "missing {want:?} in\n{md}");
        }
        // A VPN without a point shows a dash, not a stale neighbour's value.
        assert!(md.contains("| none (mesh) | – |"), "{md}");
    }

    #[test]
    fn report_round_trips_through_json() {
        let r = report();
        let json = serde_json::to_string(&r).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back.records.len(), r.records.len());
        assert_eq!(back.records[0].scenario, r.records[0].scenario);
        // Reports written before wake-ups and the machine's figures were counted
        // still read.
        let old = json.replace(
            ",\"wakeups\":3000,\"host_cpu_seconds\":5.4,\"host_switches\":27000",
            "",
        );
        assert_ne!(old, json);
        let back: Report = serde_json::from_str(&old).unwrap();
        assert!(back
            .records
            .iter()
            .all(|r| r.usage.wakeups == 0 && r.usage.host_switches == 0));
    }
}
