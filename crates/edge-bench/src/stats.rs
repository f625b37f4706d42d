//! The numbers a run reports, computed from what the load generator recorded: latency
//! percentiles from an HDR histogram, the open-loop schedule (so latency counts from
//! the time a request *should* have been sent, correcting coordinated omission as
//! wrk2 does), and the median and min–max of a point's repetitions. Pure: no clock,
//! no I/O; times are arguments.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latencies are recorded in microseconds, from 1 µs to 10 minutes, 3 significant digits.
const HIGHEST_MICROS: u64 = 600_000_000;

/// Response times of the requests that succeeded.
#[derive(Clone)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Latencies(
            Histogram::new_with_bounds(1, HIGHEST_MICROS, 3).expect("constant histogram bounds"),
        )
    }
}

impl Latencies {
    pub fn record(&mut self, latency: Duration) {
        let micros = (latency.as_micros() as u64).clamp(1, HIGHEST_MICROS);
        self.0
            .record(micros)
            .expect("value clamped into the histogram's range");
    }

    pub fn merge(&mut self, other: &Latencies) {
        self.0
            .add(&other.0)
            .expect("histograms with the same bounds always merge");
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The `q` quantile (0..=1) in milliseconds; 0 when nothing was recorded.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.value_at_quantile(q) as f64 / 1e3
    }

    pub fn summary(&self) -> Percentiles {
        Percentiles {
            p50_ms: self.quantile_ms(0.50),
            p90_ms: self.quantile_ms(0.90),
            p99_ms: self.quantile_ms(0.99),
            p999_ms: self.quantile_ms(0.999),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
}

/// What one measurement (one repetition of one point) gave.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub ok: u64,
    /// Requests that failed: refused, reset, or a malformed answer.
    pub errors: u64,
    /// Requests without an answer within the timeout.
    pub timeouts: u64,
    pub seconds: f64,
    pub latency: Percentiles,
}

impl Sample {
    pub fn requests_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.ok as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Failed requests as a fraction of all requests sent (0 when none were).
    pub fn failure_rate(&self) -> f64 {
        let failed = self.errors + self.timeouts;
        let all = self.ok + failed;
        if all == 0 {
            0.0
        } else {
            failed as f64 / all as f64
        }
    }
}

/// When request `index` of connection `connection` (of `connections`) is due, after
/// the start of an open-loop run at `rate` requests/s over all connections: the
/// connections take turns, so the whole run sends at `rate` evenly.
///
/// A request sent late (its connection was still waiting for the previous answer)
/// has its latency counted from this time, not from when it left: the queueing a
/// slow server causes shows in the percentiles instead of hiding (coordinated
/// omission, as wrk2 corrects it).
pub fn due_time(connection: usize, connections: usize, index: u64, rate: f64) -> Duration {
    let slot = index as f64 * connections as f64 + connection as f64;
    Duration::from_secs_f64(slot / rate)
}

/// A request's latency: from when it was due (open loop) or sent (closed loop)
/// until its answer was complete.
pub fn latency(due: Duration, done: Duration) -> Duration {
    done.saturating_sub(due)
}

/// When an open-loop rate is more than the path carries.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    pub max_failure_rate: f64,
    pub max_p99_ms: f64,
}

impl Budget {
    pub fn holds(&self, s: &Sample) -> bool {
        s.failure_rate() <= self.max_failure_rate && s.latency.p99_ms <= self.max_p99_ms
    }
}

/// The median and the range of one quantity over a point's repetitions.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// `None` for no values; NaNs are left out. The median of an even count is the
    /// mean of the middle two.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

/// A point's repetitions, summarised quantity by quantity.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub requests_per_second: Spread,
    pub failure_rate: Spread,
    pub p50_ms: Spread,
    pub p90_ms: Spread,
    pub p99_ms: Spread,
    pub p999_ms: Spread,
}

impl Summary {
    pub fn of(samples: &[Sample]) -> Option<Summary> {
        let spread = |f: fn(&Sample) -> f64| Spread::of(&samples.iter().map(f).collect::<Vec<_>>());
        Some(Summary {
            requests_per_second: spread(Sample::requests_per_second)?,
            failure_rate: spread(Sample::failure_rate)?,
            p50_ms: spread(|s| s.latency.p50_ms)?,
            p90_ms: spread(|s| s.latency.p90_ms)?,
            p99_ms: spread(|s| s.latency.p99_ms)?,
            p999_ms: spread(|s| s.latency.p999_ms)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(x: u64) -> Duration {
        Duration::from_millis(x)
    }

    #[test]
    fn percentiles_of_one_to_a_thousand_ms() {
        let mut l = Latencies::default();
        for i in 1..=1000 {
            l.record(ms(i));
        }
        let p = l.summary();
        // 3 significant digits: within 0.1 %.
        for (got, want) in [
            (p.p50_ms, 500.0),
            (p.p90_ms, 900.0),
            (p.p99_ms, 990.0),
            (p.p999_ms, 999.0),
        ] {
            assert!((got - want).abs() <= want * 0.001, "{got} vs {want}");
        }
    }

    #[test]
    fn empty_latencies_are_zero_not_a_panic() {
        assert_eq!(Latencies::default().summary(), Percentiles::default());
    }

    #[test]
    fn merged_histograms_count_both() {
        let mut a = Latencies::default();
        let mut b = Latencies::default();
        a.record(ms(1));
        b.record(ms(100));
        b.record(ms(100));
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert!((a.quantile_ms(0.5) - 100.0).abs() < 0.1);
    }

    #[test]
    fn out_of_range_latencies_are_clamped() {
        let mut l = Latencies::default();
        l.record(Duration::ZERO);
        l.record(Duration::from_secs(3600));
        assert_eq!(l.count(), 2);
        assert!((l.quantile_ms(1.0) - 600_000.0).abs() < 600.0);
    }

    #[test]
    fn open_loop_connections_take_turns() {
        // 4 connections at 100/s: request slots every 10 ms, round robin.
        let times: Vec<Duration> = (0..2)
            .flat_map(|i| (0..4).map(move |c| due_time(c, 4, i, 100.0)))
            .collect();
        let want: Vec<Duration> = (0..8).map(|k| ms(10 * k)).collect();
        assert_eq!(times, want);
    }

    #[test]
    fn a_stalled_server_shows_in_corrected_latency() {
        // At 100/s on one connection, the server stalls 1 s on request 0; requests
        // 1..=100 queue behind it. Measured from their send time they would each
        // look ~0 ms; from their due time, they waited up to ~1 s.
        let mut corrected = Latencies::default();
        let mut naive = Latencies::default();
        let mut done = Duration::ZERO;
        for i in 0..200u64 {
            let due = due_time(0, 1, i, 100.0);
            let sent = due.max(done);
            done = sent + if i == 0 { ms(1000) } else { ms(1) };
            corrected.record(latency(due, done));
            naive.record(latency(sent, done));
        }
        // Request i (1..=111) is done at 1000 + i ms but was due at 10·i ms.
        assert!(naive.quantile_ms(0.9) < 2.0);
        assert!(corrected.quantile_ms(0.5) > 50.0);
        assert!(corrected.quantile_ms(0.9) > 500.0);
    }

    #[test]
    fn latency_never_negative() {
        assert_eq!(latency(ms(5), ms(3)), Duration::ZERO);
    }

    #[test]
    fn spread_of_odd_and_even_counts() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Spread::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(Spread::of(&[f64::NAN]), None);
    }

    #[test]
    fn sample_rates() {
        let s = Sample {
            ok: 90,
            errors: 4,
            timeouts: 6,
            seconds: 2.0,
            latency: Percentiles::default(),
        };
        assert_eq!(s.requests_per_second(), 45.0);
        assert!((s.failure_rate() - 0.1).abs() < 1e-12);
        assert_eq!(Sample::default().failure_rate(), 0.0);
        assert_eq!(Sample::default().requests_per_second(), 0.0);
    }

    #[test]
    fn budget_breaks_on_failures_or_p99() {
        let b = Budget {
            max_failure_rate: 0.01,
            max_p99_ms: 100.0,
        };
        let mut s = Sample {
            ok: 1000,
            ..Sample::default()
        };
        s.latency.p99_ms = 50.0;
        assert!(b.holds(&s));
        s.timeouts = 20;
        assert!(!b.holds(&s));
        s.timeouts = 0;
        s.latency.p99_ms = 150.0;
        assert!(!b.holds(&s));
    }

    #[test]
    fn summary_takes_each_quantity_separately() {
        let mk = |ok, p99| Sample {
            ok,
            seconds: 1.0,
            latency: Percentiles {
                p99_ms: p99,
                ..Percentiles::default()
            },
            ..Sample::default()
        };
        let s = Summary::of(&[mk(10, 3.0), mk(30, 1.0), mk(20, 2.0)]).unwrap();
        assert_eq!(s.requests_per_second.median, 20.0);
        assert_eq!((s.p99_ms.min, s.p99_ms.max), (1.0, 3.0));
        assert_eq!(Summary::of(&[]), None);
    }

    proptest! {
        #[test]
        fn spread_median_lies_in_its_range(v in proptest::collection::vec(-1e9f64..1e9, 1..50)) {
            let s = Spread::of(&v).unwrap();
            prop_assert!(s.min <= s.median && s.median <= s.max);
            prop_assert_eq!(s.min, v.iter().copied().fold(f64::INFINITY, f64::min));
        }

        #[test]
        fn quantiles_are_monotone(v in proptest::collection::vec(1u64..10_000_000, 1..200)) {
            let mut l = Latencies::default();
            for x in &v { l.record(Duration::from_micros(*x)); }
            let p = l.summary();
            prop_assert!(p.p50_ms <= p.p90_ms && p.p90_ms <= p.p99_ms && p.p99_ms <= p.p999_ms);
        }

        #[test]
        fn due_times_are_evenly_spaced(conns in 1usize..64, rate in 1.0f64..100_000.0, i in 0u64..1000) {
            let a = due_time(conns - 1, conns, i, rate);
            let b = due_time(0, conns, i + 1, rate);
            let gap = b.as_secs_f64() - a.as_secs_f64();
            prop_assert!((gap - 1.0 / rate).abs() < 1e-6);
        }
    }
}
