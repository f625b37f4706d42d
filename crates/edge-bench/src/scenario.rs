//! What a run measures, as data: the configuration (every axis of the study, each
//! settable from the command line), the list of points it expands to, and the
//! impairment each point puts on the underlay. Pure, so the plan and its time
//! estimate (the progress bar's "time left") are tested without namespaces.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use wiremesh_wanem::{Impairment, Loss};

use crate::stats::Budget;

/// One measured point of a VPN (each repeated [`Config::repetitions`] times).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Scenario {
    /// Closed loop with this many concurrent connections.
    Load { connections: usize },
    /// Open loop at this many requests/s (the harness steps the rate up).
    Rate { rate: f64 },
    /// Loss on every underlay direction, in percent of packets.
    Loss { percent: f64, bursty: bool },
    /// Round-trip time added between every pair of hosts, with jitter.
    Latency { rtt_ms: u64 },
    /// The worker behind NAT: requests to its pod.
    Nat,
    /// A worker's underlay address changes: time until its pod answers again.
    AddressChange,
    /// The underlay goes down for this long: time from its return until every pod answers.
    Flap { down_ms: u64 },
}

impl Scenario {
    /// A short label for tables and file names.
    pub fn label(&self) -> String {
        match self {
            Scenario::Load { connections } => format!("load c={connections}"),
            Scenario::Rate { rate } => format!("rate {rate:.0}/s"),
            Scenario::Loss { percent, bursty } => {
                format!(
                    "loss {percent}% {}",
                    if *bursty { "bursty" } else { "random" }
                )
            }
            Scenario::Latency { rtt_ms } => format!("rtt {rtt_ms} ms"),
            Scenario::Nat => "behind NAT".into(),
            Scenario::AddressChange => "address change".into(),
            Scenario::Flap { down_ms } => format!("link down {:.0} s", *down_ms as f64 / 1e3),
        }
    }

    /// Whether the point measures a recovery time rather than a load.
    pub fn is_event(&self) -> bool {
        matches!(self, Scenario::AddressChange | Scenario::Flap { .. })
    }

    /// What the underlay does to every packet during this point.
    pub fn impairment(&self, jitter_fraction: f64) -> Impairment {
        match *self {
            Scenario::Loss { percent, bursty } => Impairment {
                loss: loss(percent / 100.0, bursty),
                ..Impairment::default()
            },
            Scenario::Latency { rtt_ms } => {
                let one_way = Duration::from_millis(rtt_ms) / 2;
                Impairment {
                    delay: one_way,
                    jitter: one_way.mul_f64(jitter_fraction),
                    ..Impairment::default()
                }
            }
            _ => Impairment::default(),
        }
    }
}

/// Mean burst length of bursty loss, in packets (the bad state's expected stay).
pub const MEAN_BURST_PACKETS: f64 = 4.0;

/// Loss of fraction `p`: independent, or Gilbert–Elliott bursts (every packet lost
/// in the bad state, none in the good) with the same long-run fraction.
pub fn loss(p: f64, bursty: bool) -> Loss {
    if p <= 0.0 {
        Loss::None
    } else if !bursty {
        Loss::Random { probability: p }
    } else {
        let p_bad_to_good = 1.0 / MEAN_BURST_PACKETS;
        Loss::GilbertElliott {
            // Stationary loss = g2b / (g2b + b2g) = p.
            p_good_to_bad: p * p_bad_to_good / (1.0 - p),
            p_bad_to_good,
            loss_in_good: 0.0,
            loss_in_bad: 1.0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpenLoop {
    pub start_rate: f64,
    /// Each step multiplies the rate by this.
    pub factor: f64,
    pub max_rate: f64,
    pub connections: usize,
    pub budget: Budget,
}

/// Which of a VPN's shapes to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shapes {
    /// The first shape the VPN lists (the study's hub and spoke where it has one).
    First,
    All,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    pub workers: usize,
    /// VPNs to run by name; empty = every one.
    pub vpns: Vec<String>,
    pub shapes: Shapes,
    pub response_bytes: usize,
    pub repetitions: usize,
    /// Length of one repetition of a load point.
    pub point: Duration,
    pub timeout: Duration,
    /// Closed-loop levels (concurrent connections).
    pub connections: Vec<usize>,
    /// A new connection for every request instead of keep-alive.
    pub new_connections: bool,
    pub open_loop: Option<OpenLoop>,
    /// Loss levels in percent, each run random and (with `bursty`) bursty.
    pub loss_percent: Vec<f64>,
    pub bursty: bool,
    pub rtt_ms: Vec<u64>,
    /// Jitter as a fraction of the one-way delay.
    pub jitter_fraction: f64,
    /// Connections for the loss, latency and NAT points.
    pub impaired_connections: usize,
    /// The NAT worker and the link flap.
    pub events: bool,
    /// The address-change event (slow: up to a keepalive interval, twice, a repetition).
    pub address_change: bool,
    pub flap: Duration,
    /// How long an event may take to recover before it counts as never.
    pub recovery_limit: Duration,
    pub seed: u64,
    pub out: PathBuf,
}

impl Config {
    /// The full study.
    pub fn full(out: PathBuf) -> Config {
        Config {
            workers: 7,
            vpns: Vec::new(),
            shapes: Shapes::First,
            response_bytes: 1024,
            repetitions: 3,
            point: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            connections: vec![1, 10, 100, 1000],
            new_connections: false,
            open_loop: Some(OpenLoop {
                start_rate: 250.0,
                factor: 2.0,
                max_rate: 64_000.0,
                connections: 64,
                budget: Budget {
                    max_failure_rate: 0.01,
                    max_p99_ms: 250.0,
                },
            }),
            loss_percent: vec![0.0, 1.0, 2.0, 5.0, 10.0],
            bursty: true,
            rtt_ms: vec![0, 10, 50, 100, 200],
            jitter_fraction: 0.1,
            impaired_connections: 10,
            events: true,
            address_change: true,
            flap: Duration::from_secs(5),
            recovery_limit: Duration::from_secs(20),
            seed: 9,
            out,
        }
    }

    /// A subset for CI, about 8 s a VPN with its bring-up and honesty check: two
    /// workers, one short point per axis repeated twice, a 0.5 s flap, no address
    /// change.
    pub fn quick(out: PathBuf) -> Config {
        Config {
            workers: 2,
            repetitions: 2,
            point: Duration::from_millis(300),
            connections: vec![10],
            open_loop: None,
            loss_percent: vec![5.0],
            bursty: false,
            rtt_ms: vec![50],
            address_change: false,
            flap: Duration::from_millis(500),
            ..Config::full(out)
        }
    }

    /// The points of one VPN, in the order they run; the harness steps the
    /// open-loop rates (see [`Config::open_loop`]) before the events. The
    /// `baseline` (no VPN) has no way past a NAT or to follow an address change:
    /// it skips those two events.
    pub fn points(&self, baseline: bool) -> Vec<Scenario> {
        let mut p: Vec<Scenario> = self
            .connections
            .iter()
            .map(|&connections| Scenario::Load { connections })
            .collect();
        for &percent in &self.loss_percent {
            p.push(Scenario::Loss {
                percent,
                bursty: false,
            });
            if self.bursty && percent > 0.0 {
                p.push(Scenario::Loss {
                    percent,
                    bursty: true,
                });
            }
        }
        p.extend(
            self.rtt_ms
                .iter()
                .map(|&rtt_ms| Scenario::Latency { rtt_ms }),
        );
        if self.events && !baseline {
            p.push(Scenario::Nat);
        }
        if self.events {
            p.push(Scenario::Flap {
                down_ms: self.flap.as_millis() as u64,
            });
        }
        // Last: a VPN that never finds the moved worker again would spoil every
        // point after it.
        if self.address_change && !baseline {
            p.push(Scenario::AddressChange);
        }
        p
    }

    /// A guess at how long one VPN's points take (for "time left"): load points
    /// their length, events their outage and a few seconds to recover, and the
    /// open-loop sweep its steps.
    pub fn estimate(&self, points: &[Scenario]) -> Duration {
        let reps = self.repetitions as u32;
        let per = |s: &Scenario| match s {
            Scenario::Flap { down_ms } => Duration::from_millis(*down_ms) + Duration::from_secs(1),
            Scenario::AddressChange => Duration::from_secs(4),
            _ => self.point,
        };
        let mut total: Duration = points.iter().map(|s| per(s) * reps).sum();
        if let Some(o) = &self.open_loop {
            let steps = ((o.max_rate / o.start_rate).ln() / o.factor.ln()).floor() as u32 + 1;
            // The sweep usually breaks half-way.
            total += self.point * reps * steps.div_ceil(2);
        }
        total
    }

    /// The open-loop rates to try, lowest first.
    pub fn rates(&self) -> Vec<f64> {
        let Some(o) = &self.open_loop else {
            return Vec::new();
        };
        let mut rates = Vec::new();
        let mut r = o.start_rate;
        while r <= o.max_rate && o.factor > 1.0 {
            rates.push(r);
            r *= o.factor;
        }
        rates
    }

    /// A clear error naming the first field that makes no sense.
    pub fn validate(&self) -> Result<(), crate::BenchError> {
        let bad =
            |field: &'static str, reason: String| Err(crate::BenchError::Invalid { field, reason });
        if self.repetitions == 0 {
            return bad("repetitions", "must be at least 1".into());
        }
        if self.connections.contains(&0) || self.impaired_connections == 0 {
            return bad("connections", "every level must be at least 1".into());
        }
        if let Some(p) = self
            .loss_percent
            .iter()
            .find(|p| !(0.0..100.0).contains(*p))
        {
            return bad("loss", format!("{p} is not a percentage below 100"));
        }
        if !(0.0..=1.0).contains(&self.jitter_fraction) {
            return bad(
                "jitter",
                format!("{} is not within 0..=1", self.jitter_fraction),
            );
        }
        if self.point.is_zero() || self.timeout.is_zero() {
            return bad("point-seconds / timeout", "must be above zero".into());
        }
        if let Some(o) = &self.open_loop {
            if o.start_rate <= 0.0 || o.factor <= 1.0 || o.connections == 0 {
                return bad(
                    "open-loop",
                    "the start rate must be above 0, the factor above 1, connections at least 1"
                        .into(),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursty_loss_has_the_asked_long_run_rate() {
        for p in [0.01, 0.02, 0.05, 0.1] {
            let l = loss(p, true);
            assert!((l.stationary_loss() - p).abs() < 1e-12, "{p}: {l:?}");
            assert_eq!(loss(p, false), Loss::Random { probability: p });
        }
        assert_eq!(loss(0.0, true), Loss::None);
    }

    #[test]
    fn latency_splits_the_rtt_over_both_directions() {
        let i = Scenario::Latency { rtt_ms: 100 }.impairment(0.1);
        assert_eq!(i.delay, Duration::from_millis(50));
        assert_eq!(i.jitter, Duration::from_millis(5));
        assert!(!i.reorder);
        assert_eq!(Scenario::Nat.impairment(0.1), Impairment::default());
    }

    #[test]
    fn full_plan_covers_every_axis_of_the_study() {
        let c = Config::full("/tmp/x".into());
        let points = c.points(false);
        assert_eq!(
            points
                .iter()
                .filter(|p| matches!(p, Scenario::Load { .. }))
                .count(),
            4
        );
        // 0 % once, 1/2/5/10 % random and bursty.
        assert_eq!(
            points
                .iter()
                .filter(|p| matches!(p, Scenario::Loss { .. }))
                .count(),
            9
        );
        assert_eq!(
            points
                .iter()
                .filter(|p| matches!(p, Scenario::Latency { .. }))
                .count(),
            5
        );
        assert!(points.contains(&Scenario::Nat));
        assert!(points.contains(&Scenario::Flap { down_ms: 5000 }));
        assert!(!c.points(true).contains(&Scenario::Nat));
        assert_eq!(points.last(), Some(&Scenario::AddressChange));
        assert_eq!(c.rates().first(), Some(&250.0));
        assert_eq!(c.rates().last(), Some(&64_000.0));
    }

    #[test]
    fn quick_plan_is_a_few_seconds_a_vpn() {
        let c = Config::quick("/tmp/x".into());
        let per_vpn = c.estimate(&c.points(false));
        assert!(per_vpn < Duration::from_secs(6), "{per_vpn:?}");
        assert!(c.validate().is_ok());
    }

    #[test]
    fn bad_settings_name_their_field() {
        let mut c = Config::quick("/tmp/x".into());
        c.loss_percent = vec![120.0];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("loss"), "{e}");
        let mut c = Config::quick("/tmp/x".into());
        c.repetitions = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("repetitions"));
    }

    #[test]
    fn labels_are_short_and_distinct() {
        let c = Config::full("/tmp/x".into());
        let labels: std::collections::BTreeSet<String> =
            c.points(false).iter().map(Scenario::label).collect();
        assert_eq!(labels.len(), c.points(false).len());
    }
}
