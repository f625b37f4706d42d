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

    /// Whether packets pass with no delay of any kind (the hub then forwards them at
    /// once, without going through its scheduler).
    pub fn is_immediate(&self) -> bool {
        let i = &self.impairment;
        i.delay.is_zero() && i.jitter.is_zero() && i.rate_bps.is_none()
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
