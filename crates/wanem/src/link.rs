//! The per-direction link model: what happens to one packet on one directed link.
//!
//! Pure: no I/O, no clock. Time is a [`Duration`] since an epoch the caller picks (the
//! hub uses its start), and randomness comes from a ChaCha RNG seeded by the caller,
//! so the same seed and the same arrivals give the same decisions.
//!
//! A packet meets the impairments in this order, as on a real path whose bottleneck
//! sits at the sender:
//! 1. link down: dropped;
//! 2. loss: random (Bernoulli) or bursty (a Gilbert–Elliott chain that steps once per
//!    packet, then drops with its state's loss probability);
//! 3. rate limit: a FIFO serialiser at `rate_bps` (IP bytes) with a queue of
//!    `queue_packets` packets counting the one being sent; a packet that finds it full
//!    is tail-dropped;
//! 4. propagation: `delay` plus jitter drawn uniformly from `[-jitter, +jitter]`
//!    (never before the packet finished serialising). Without `reorder`, a packet
//!    never departs before the one ahead of it (its departure is pushed back), as
//!    netem behaves with jitter and no reordering.

use std::collections::VecDeque;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::WanemError;

/// The rate queue's length when [`Impairment::queue_packets`] is 0: netem's default
/// `limit`.
pub const DEFAULT_QUEUE_PACKETS: usize = 1000;

/// What one direction of a link does to packets. The default passes them untouched.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Impairment {
    /// One-way propagation delay.
    pub delay: Duration,
    /// Each packet's delay varies uniformly within `delay ± jitter` (never below 0).
    pub jitter: Duration,
    /// Whether jitter may reorder packets; without it departures never go backwards.
    pub reorder: bool,
    /// Random or bursty loss.
    pub loss: Loss,
    /// Serialisation rate in bits of IP packet per second; `None` = unlimited.
    pub rate_bps: Option<u64>,
    /// The rate queue's length in packets; 0 = [`DEFAULT_QUEUE_PACKETS`]. Only
    /// meaningful with `rate_bps`.
    pub queue_packets: usize,
    /// The link is down: every packet is dropped.
    pub down: bool,
}

/// Packet loss on a link.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Loss {
    /// No loss.
    #[default]
    None,
    /// Each packet is lost independently with `probability`.
    Random { probability: f64 },
    /// A two-state Markov chain stepped once per packet: good → bad with
    /// `p_good_to_bad`, bad → good with `p_bad_to_good`; a packet is then lost with its
    /// state's probability. Stationary loss:
    /// `(p_bad_to_good·loss_in_good + p_good_to_bad·loss_in_bad) / (p_good_to_bad + p_bad_to_good)`.
    GilbertElliott {
        p_good_to_bad: f64,
        p_bad_to_good: f64,
        loss_in_good: f64,
        loss_in_bad: f64,
    },
}

impl Loss {
    /// The long-run fraction of packets lost.
    pub fn stationary_loss(&self) -> f64 {
        match *self {
            Loss::None => 0.0,
            Loss::Random { probability } => probability,
            Loss::GilbertElliott {
                p_good_to_bad,
                p_bad_to_good,
                loss_in_good,
                loss_in_bad,
            } => {
                let moving = p_good_to_bad + p_bad_to_good;
                if moving == 0.0 {
                    // The chain never leaves its starting state, good.
                    loss_in_good
                } else {
                    (p_bad_to_good * loss_in_good + p_good_to_bad * loss_in_bad) / moving
                }
            }
        }
    }
}

impl Loss {
    /// The variance of how many of `packets` consecutive packets are lost, for
    /// confidence bounds. Random loss is binomial; the Gilbert–Elliott chain's losses
    /// are correlated (its second eigenvalue `λ = 1 − p_good_to_bad − p_bad_to_good`),
    /// which adds `2·(loss_in_bad − loss_in_good)²·π_good·π_bad·λ/(1−λ)` per packet
    /// (asymptotically, starting from the stationary state).
    pub fn count_variance(&self, packets: u64) -> f64 {
        let n = packets as f64;
        let q = self.stationary_loss();
        let independent = n * q * (1.0 - q);
        match *self {
            Loss::GilbertElliott {
                p_good_to_bad,
                p_bad_to_good,
                loss_in_good,
                loss_in_bad,
            } if p_good_to_bad + p_bad_to_good > 0.0 => {
                let moving = p_good_to_bad + p_bad_to_good;
                let (pi_good, pi_bad) = (p_bad_to_good / moving, p_good_to_bad / moving);
                let lambda = 1.0 - moving;
                let spread = (loss_in_bad - loss_in_good).powi(2);
                independent + n * 2.0 * spread * pi_good * pi_bad * lambda / (1.0 - lambda)
            }
            _ => independent,
        }
    }
}

impl Impairment {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), WanemError> {
        let probabilities: Vec<(&str, f64)> = match self.loss {
            Loss::None => vec![],
            Loss::Random { probability } => vec![("loss.probability", probability)],
            Loss::GilbertElliott {
                p_good_to_bad,
                p_bad_to_good,
                loss_in_good,
                loss_in_bad,
            } => vec![
                ("loss.p_good_to_bad", p_good_to_bad),
                ("loss.p_bad_to_good", p_bad_to_good),
                ("loss.loss_in_good", loss_in_good),
                ("loss.loss_in_bad", loss_in_bad),
            ],
        };
        for (field, p) in probabilities {
            if !(0.0..=1.0).contains(&p) {
                return Err(invalid(
                    field,
                    format!("{p} is not a probability in [0, 1]"),
                ));
            }
        }
        if self.rate_bps == Some(0) {
            return Err(invalid(
                "rate_bps",
                "must be positive (None = unlimited)".into(),
            ));
        }
        Ok(())
    }

    fn queue_limit(&self) -> usize {
        if self.queue_packets == 0 {
            DEFAULT_QUEUE_PACKETS
        } else {
            self.queue_packets
        }
    }
}

fn invalid(field: &str, reason: String) -> WanemError {
    WanemError::Invalid {
        field: field.to_owned(),
        reason,
    }
}

/// Why a link dropped a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    LinkDown,
    RandomLoss,
    /// Lost by the Gilbert–Elliott chain.
    BurstLoss,
    /// The rate queue was full (tail drop).
    QueueOverflow,
}

/// The fate of one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to the far end at this time (same epoch as the arrival time).
    Deliver {
        at: Duration,
    },
    Drop(DropReason),
}

/// One direction of a link: its impairment and the state the impairment needs.
#[derive(Clone, Debug)]
pub struct Link {
    impairment: Impairment,
    rng: ChaCha8Rng,
    /// The Gilbert–Elliott chain's state.
    in_bad_state: bool,
    /// When each packet in the rate queue finishes serialising, oldest first.
    rate_queue: VecDeque<Duration>,
    /// The latest departure handed out, so that without reordering none goes earlier.
    last_departure: Duration,
}

impl Link {
    /// A link with its own RNG stream: `seed` is the run's seed, `stream` tells links
    /// apart (the hub uses the directed link's index), so links do not share draws.
    pub fn new(impairment: Impairment, seed: u64, stream: u64) -> Result<Self, WanemError> {
        impairment.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        Ok(Self {
            impairment,
            rng,
            in_bad_state: false,
            rate_queue: VecDeque::new(),
            last_departure: Duration::ZERO,
        })
    }

    pub fn impairment(&self) -> &Impairment {
        &self.impairment
    }

    /// Replaces the impairment, keeping the RNG and the loss chain's state; packets
    /// already queued keep their departure times.
    pub fn set_impairment(&mut self, impairment: Impairment) -> Result<(), WanemError> {
        impairment.validate()?;
        self.impairment = impairment;
        Ok(())
    }

    /// Whether the link does nothing to packets (no delay, loss, rate or outage), so a
    /// batch of packets may pass it whole without a decision per packet.
    pub fn is_transparent(&self) -> bool {
        let i = &self.impairment;
        i.delay.is_zero()
            && i.jitter.is_zero()
            && i.loss == Loss::None
            && i.rate_bps.is_none()
            && !i.down
    }

    /// Decides the fate of a packet of `size` bytes arriving at `now`.
    pub fn handle_packet(&mut self, now: Duration, size: usize) -> Verdict {
        if self.impairment.down {
            return Verdict::Drop(DropReason::LinkDown);
        }
        if let Some(reason) = self.lose() {
            return Verdict::Drop(reason);
        }
        let mut ready = now;
        if let Some(rate_bps) = self.impairment.rate_bps {
            while self.rate_queue.front().is_some_and(|&done| done <= now) {
                self.rate_queue.pop_front();
            }
            if self.rate_queue.len() >= self.impairment.queue_limit() {
                return Verdict::Drop(DropReason::QueueOverflow);
            }
            let start = self.rate_queue.back().map_or(now, |&busy| busy.max(now));
            ready = start + transmission_time(size, rate_bps);
            self.rate_queue.push_back(ready);
        }
        let mut at = ready + self.impairment.delay;
        let jitter = self.impairment.jitter;
        if !jitter.is_zero() {
            let span = jitter.as_nanos() as i128;
            let offset = self.rng.random_range(-span..=span);
            let nanos = (at.as_nanos() as i128 + offset).max(ready.as_nanos() as i128);
            at = Duration::from_nanos(nanos as u64);
        }
        if !self.impairment.reorder {
            at = at.max(self.last_departure);
        }
        self.last_departure = self.last_departure.max(at);
        Verdict::Deliver { at }
    }

    fn lose(&mut self) -> Option<DropReason> {
        match self.impairment.loss {
            Loss::None => None,
            Loss::Random { probability } => {
                (self.rng.random::<f64>() < probability).then_some(DropReason::RandomLoss)
            }
            Loss::GilbertElliott {
                p_good_to_bad,
                p_bad_to_good,
                loss_in_good,
                loss_in_bad,
            } => {
                let flip = if self.in_bad_state {
                    p_bad_to_good
                } else {
                    p_good_to_bad
                };
                if self.rng.random::<f64>() < flip {
                    self.in_bad_state = !self.in_bad_state;
                }
                let loss = if self.in_bad_state {
                    loss_in_bad
                } else {
                    loss_in_good
                };
                (self.rng.random::<f64>() < loss).then_some(DropReason::BurstLoss)
            }
        }
    }
}

/// How long `size` bytes take at `rate_bps`.
pub fn transmission_time(size: usize, rate_bps: u64) -> Duration {
    let nanos = size as u128 * 8 * 1_000_000_000 / u128::from(rate_bps);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    fn link(impairment: Impairment) -> Link {
        Link::new(impairment, 7, 0).unwrap()
    }

    fn departures(link: &mut Link, arrivals: &[(Duration, usize)]) -> Vec<Verdict> {
        arrivals
            .iter()
            .map(|&(t, size)| link.handle_packet(t, size))
            .collect()
    }

    /// Whether `lost` of `n` is within `z` standard deviations of `loss`'s mean.
    fn within(loss: &Loss, n: u64, lost: u64, z: f64) -> bool {
        let mean = loss.stationary_loss() * n as f64;
        let sd = loss.count_variance(n).sqrt();
        (lost as f64 - mean).abs() <= z * sd + 1.0
    }

    fn count_lost(loss: Loss, seed: u64, n: u64) -> u64 {
        let mut l = Link::new(
            Impairment {
                loss,
                ..Impairment::default()
            },
            seed,
            3,
        )
        .unwrap();
        (0..n)
            .filter(|&i| matches!(l.handle_packet(i as u32 * MS, 100), Verdict::Drop(_)))
            .count() as u64
    }

    #[test]
    fn no_impairment_departs_on_arrival_and_delay_adds_exactly() {
        let mut plain = link(Impairment::default());
        assert_eq!(
            plain.handle_packet(5 * MS, 1500),
            Verdict::Deliver { at: 5 * MS }
        );
        let mut delayed = link(Impairment {
            delay: 20 * MS,
            ..Impairment::default()
        });
        assert_eq!(
            delayed.handle_packet(5 * MS, 1500),
            Verdict::Deliver { at: 25 * MS }
        );
    }

    #[test]
    fn only_the_default_impairment_is_transparent() {
        assert!(link(Impairment::default()).is_transparent());
        assert!(link(Impairment {
            reorder: true,
            queue_packets: 5,
            ..Impairment::default()
        })
        .is_transparent());
        for impairment in [
            Impairment {
                delay: MS,
                ..Impairment::default()
            },
            Impairment {
                jitter: MS,
                ..Impairment::default()
            },
            Impairment {
                loss: Loss::Random { probability: 0.0 },
                ..Impairment::default()
            },
            Impairment {
                rate_bps: Some(1),
                ..Impairment::default()
            },
            Impairment {
                down: true,
                ..Impairment::default()
            },
        ] {
            assert!(!link(impairment.clone()).is_transparent(), "{impairment:?}");
        }
    }

    #[test]
    fn a_down_link_drops_everything_and_comes_back() {
        let mut l = link(Impairment {
            down: true,
            ..Impairment::default()
        });
        assert_eq!(l.handle_packet(MS, 64), Verdict::Drop(DropReason::LinkDown));
        l.set_impairment(Impairment::default()).unwrap();
        assert_eq!(l.handle_packet(2 * MS, 64), Verdict::Deliver { at: 2 * MS });
    }

    #[test]
    fn a_full_rate_queue_tail_drops() {
        // 8 Mbit/s: a 1000-byte packet takes 1 ms; the queue holds 4.
        let mut l = link(Impairment {
            rate_bps: Some(8_000_000),
            queue_packets: 4,
            ..Impairment::default()
        });
        let burst: Vec<_> = (0..6).map(|_| (Duration::ZERO, 1000)).collect();
        let verdicts = departures(&mut l, &burst);
        let at = |ms: u32| Verdict::Deliver { at: ms * MS };
        let full = Verdict::Drop(DropReason::QueueOverflow);
        assert_eq!(verdicts, [at(1), at(2), at(3), at(4), full, full]);
        // Once the first has left there is room for one more, behind the rest.
        assert_eq!(l.handle_packet(MS, 1000), at(5));
    }

    #[test]
    fn bad_values_are_rejected_naming_the_field() {
        let check = |impairment: Impairment, field: &str| {
            let err = Link::new(impairment, 0, 0).unwrap_err();
            assert!(
                matches!(&err, WanemError::Invalid { field: f, .. } if f == field),
                "{err}"
            );
        };
        check(
            Impairment {
                loss: Loss::Random { probability: 1.5 },
                ..Impairment::default()
            },
            "loss.probability",
        );
        check(
            Impairment {
                loss: Loss::GilbertElliott {
                    p_good_to_bad: 0.1,
                    p_bad_to_good: f64::NAN,
                    loss_in_good: 0.0,
                    loss_in_bad: 1.0,
                },
                ..Impairment::default()
            },
            "loss.p_bad_to_good",
        );
        check(
            Impairment {
                rate_bps: Some(0),
                ..Impairment::default()
            },
            "rate_bps",
        );
    }

    #[test]
    fn gilbert_elliott_losses_come_in_bursts() {
        let loss = Loss::GilbertElliott {
            p_good_to_bad: 0.01,
            p_bad_to_good: 0.2,
            loss_in_good: 0.0,
            loss_in_bad: 1.0,
        };
        let mut l = link(Impairment {
            loss,
            ..Impairment::default()
        });
        let lost: Vec<bool> = (0..20_000)
            .map(|i| matches!(l.handle_packet(i * MS, 100), Verdict::Drop(_)))
            .collect();
        let runs = lost.windows(2).filter(|w| w[1] && !w[0]).count() as f64;
        let mean_burst = lost.iter().filter(|&&x| x).count() as f64 / runs;
        // Bursts last 1 / p_bad_to_good = 5 packets on average.
        assert!((4.0..6.0).contains(&mean_burst), "mean burst {mean_burst}");
    }

    fn arrivals() -> impl Strategy<Value = Vec<(Duration, usize)>> {
        prop::collection::vec((0u64..2_000_000, 40usize..1500), 1..300).prop_map(|gaps| {
            let mut t = Duration::ZERO;
            gaps.into_iter()
                .map(|(gap_ns, size)| {
                    t += Duration::from_nanos(gap_ns);
                    (t, size)
                })
                .collect()
        })
    }

    fn delivered(verdicts: &[Verdict]) -> Vec<Duration> {
        verdicts
            .iter()
            .filter_map(|v| match v {
                Verdict::Deliver { at } => Some(*at),
                Verdict::Drop(_) => None,
            })
            .collect()
    }

    proptest! {
        // Each case fails by chance with probability < 1e-6 (z = 5), so a run of
        // cases stays far from a flaky failure while a wrong loss rate still fails.
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn random_loss_is_binomial(seed: u64, probability in 0.0f64..=1.0) {
            let loss = Loss::Random { probability };
            let lost = count_lost(loss.clone(), seed, 20_000);
            prop_assert!(within(&loss, 20_000, lost, 5.0), "lost {lost} of 20000 at {probability}");
        }

        #[test]
        fn gilbert_elliott_loses_its_stationary_fraction(
            seed: u64,
            p_good_to_bad in 0.005f64..0.5,
            p_bad_to_good in 0.05f64..1.0,
            loss_in_good in 0.0f64..0.1,
            loss_in_bad in 0.2f64..=1.0,
        ) {
            let loss = Loss::GilbertElliott { p_good_to_bad, p_bad_to_good, loss_in_good, loss_in_bad };
            let lost = count_lost(loss.clone(), seed, 50_000);
            prop_assert!(
                within(&loss, 50_000, lost, 5.0),
                "lost {lost} of 50000, expected {}", loss.stationary_loss() * 50_000.0
            );
        }

        #[test]
        fn departures_never_go_backwards_without_reorder(
            seed: u64,
            arrivals in arrivals(),
            delay_us in 0u64..50_000,
            jitter_us in 0u64..50_000,
            rate_bps in prop::option::of(1_000_000u64..1_000_000_000),
        ) {
            let mut l = Link::new(Impairment {
                delay: Duration::from_micros(delay_us),
                jitter: Duration::from_micros(jitter_us),
                rate_bps,
                ..Impairment::default()
            }, seed, 0).unwrap();
            let verdicts = departures(&mut l, &arrivals);
            let at = delivered(&verdicts);
            prop_assert!(at.windows(2).all(|w| w[0] <= w[1]));
            for (&(arrival, _), v) in arrivals.iter().zip(&verdicts) {
                if let Verdict::Deliver { at } = v {
                    prop_assert!(*at >= arrival);
                }
            }
        }

        #[test]
        fn reorder_keeps_each_packet_within_its_jitter(
            seed: u64,
            arrivals in arrivals(),
            delay_us in 0u64..50_000,
            jitter_us in 1u64..50_000,
        ) {
            let (delay, jitter) = (Duration::from_micros(delay_us), Duration::from_micros(jitter_us));
            let mut l = Link::new(Impairment { delay, jitter, reorder: true, ..Impairment::default() }, seed, 0).unwrap();
            for &(arrival, size) in &arrivals {
                let Verdict::Deliver { at } = l.handle_packet(arrival, size) else {
                    return Err(TestCaseError::fail("dropped with no loss"));
                };
                prop_assert!(at >= arrival && at >= (arrival + delay).saturating_sub(jitter));
                prop_assert!(at <= arrival + delay + jitter);
            }
        }

        #[test]
        fn the_rate_is_never_exceeded(
            seed: u64,
            arrivals in arrivals(),
            rate_bps in 1_000_000u64..1_000_000_000,
            queue_packets in 0usize..50,
            delay_us in 0u64..50_000,
        ) {
            let mut l = Link::new(Impairment {
                rate_bps: Some(rate_bps),
                queue_packets,
                delay: Duration::from_micros(delay_us),
                ..Impairment::default()
            }, seed, 0).unwrap();
            let verdicts = departures(&mut l, &arrivals);
            // Consecutive departures are at least the later packet's transmission
            // time apart: no window carries more than the rate (plus one packet).
            let sent: Vec<(Duration, usize)> = arrivals.iter().zip(&verdicts)
                .filter_map(|(&(_, size), v)| match v {
                    Verdict::Deliver { at } => Some((*at, size)),
                    Verdict::Drop(_) => None,
                })
                .collect();
            for w in sent.windows(2) {
                prop_assert!(w[1].0 - w[0].0 >= transmission_time(w[1].1, rate_bps));
            }
        }

        #[test]
        fn identical_seeds_give_identical_decisions(
            seed: u64,
            arrivals in arrivals(),
            probability in 0.0f64..0.5,
            jitter_us in 0u64..10_000,
            reorder: bool,
        ) {
            let impairment = Impairment {
                delay: 5 * MS,
                jitter: Duration::from_micros(jitter_us),
                reorder,
                loss: Loss::Random { probability },
                rate_bps: Some(50_000_000),
                ..Impairment::default()
            };
            let mut a = Link::new(impairment.clone(), seed, 9).unwrap();
            let mut b = Link::new(impairment, seed, 9).unwrap();
            prop_assert_eq!(departures(&mut a, &arrivals), departures(&mut b, &arrivals));
        }
    }

    #[test]
    fn links_on_different_streams_draw_differently() {
        let loss = Loss::Random { probability: 0.5 };
        let decisions = |stream| {
            let mut l = Link::new(
                Impairment {
                    loss: loss.clone(),
                    ..Impairment::default()
                },
                1,
                stream,
            )
            .unwrap();
            (0..64u32)
                .map(|i| l.handle_packet(i * MS, 100))
                .collect::<Vec<_>>()
        };
        assert_eq!(decisions(0), decisions(0));
        assert_ne!(decisions(0), decisions(1));
    }
}
