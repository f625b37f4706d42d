//! Failover that watches the data plane: a node whose traffic to other locations
//! goes through its location's leader pings the other leaders through it; when
//! every probe fails a few times running, the node publishes the leader as
//! suspected, and a leader most of its location suspects loses the election
//! (`wiremesh_topology::leaders`). A leader whose agent still heartbeats but whose
//! forwarding died is replaced in seconds, not when its lease runs out.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use wiremesh_host::probe;
use wiremesh_model::NodeName;
use wiremesh_topology::ForwardingProbe;

/// One probe round this often.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// How long one echo request may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(400);
/// Failed rounds in a row that make a leader suspect (~1.5 s).
const FAILURES: u32 = 3;
/// Failures count once a probe of the current plan (leader and targets) got through,
/// so a leader is judged on forwarding that *stopped*, not on tunnels still coming
/// up; a plan that never got through counts as failing after this long.
const GRACE: Duration = Duration::from_secs(20);
/// How long a suspicion stands. Once the leader is replaced nothing routes through
/// it any more, so nothing can clear it sooner; after this it may lead again, and
/// is deposed again if it still does not forward.
const HOLD: Duration = Duration::from_secs(300);

/// The pure part: what the probe rounds so far say about the current plan.
#[derive(Debug, Default)]
struct Tracker {
    plan: Option<ForwardingProbe>,
    since: Option<Instant>,
    reached_once: bool,
    failures: u32,
    suspect: Option<(NodeName, Instant)>,
}

impl Tracker {
    fn set_plan(&mut self, plan: Option<ForwardingProbe>, now: Instant) {
        if plan != self.plan {
            self.plan = plan;
            self.since = Some(now);
            self.reached_once = false;
            self.failures = 0;
        }
    }

    /// Records one round's outcome for `plan` (ignored if the plan changed meanwhile).
    fn record(&mut self, plan: &ForwardingProbe, reached: bool, now: Instant) {
        if self.plan.as_ref() != Some(plan) {
            return;
        }
        if reached {
            if !self.reached_once {
                tracing::info!(leader = %plan.via, "probes through this location's leader are answered");
            }
            self.reached_once = true;
            self.failures = 0;
            return;
        }
        if !self.reached_once && self.since.is_some_and(|s| now.duration_since(s) < GRACE) {
            return;
        }
        self.failures += 1;
        if self.failures >= FAILURES {
            if self.suspect.as_ref().map(|(n, _)| n) != Some(&plan.via) {
                tracing::warn!(leader = %plan.via, "no probe through this location's leader got an answer; reporting it");
            }
            self.suspect = Some((plan.via.clone(), now));
        }
    }

    fn suspected(&self, now: Instant) -> BTreeSet<NodeName> {
        self.suspect
            .iter()
            .filter(|(_, at)| now.duration_since(*at) < HOLD)
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// The probing thread; stops when dropped.
pub struct Prober {
    tracker: Arc<Mutex<Tracker>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Prober {
    pub fn start() -> std::io::Result<Prober> {
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (Arc::clone(&tracker), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("forwarding-probe".into())
            .spawn(move || run(&t, &s))?;
        Ok(Prober {
            tracker,
            stop,
            thread: Some(thread),
        })
    }

    /// What to probe from now on (`None`: this node sends through no leader).
    pub fn set_plan(&self, plan: Option<ForwardingProbe>) {
        lock(&self.tracker).set_plan(plan, Instant::now());
    }

    /// The leaders this node currently reports as not forwarding.
    pub fn suspected(&self) -> BTreeSet<NodeName> {
        lock(&self.tracker).suspected(Instant::now())
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock(t: &Mutex<Tracker>) -> std::sync::MutexGuard<'_, Tracker> {
    t.lock().unwrap_or_else(PoisonError::into_inner)
}

fn run(tracker: &Mutex<Tracker>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let round = Instant::now();
        let plan = lock(tracker).plan.clone();
        if let Some(plan) = plan {
            // One answer from any other location proves the leader forwards.
            let reached = plan
                .targets
                .iter()
                .any(|t| probe::ping(*t, PROBE_TIMEOUT).is_ok());
            lock(tracker).record(&plan, reached, Instant::now());
        }
        // Pacing, not synchronisation: the next round starts PROBE_EVERY after this one.
        std::thread::sleep(PROBE_EVERY.saturating_sub(round.elapsed()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(via: &str) -> ForwardingProbe {
        ForwardingProbe {
            via: via.parse().unwrap(),
            targets: vec!["100.64.0.3".parse().unwrap()],
        }
    }

    #[test]
    fn a_leader_that_never_forwarded_is_suspected_after_the_grace_period() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        let p = plan("a1");
        t.set_plan(Some(p.clone()), t0);
        // Tunnels coming up: failures do not count yet.
        for _ in 0..10 {
            t.record(&p, false, t0 + Duration::from_secs(1));
        }
        assert!(t.suspected(t0 + Duration::from_secs(1)).is_empty());
        for _ in 0..FAILURES {
            t.record(&p, false, t0 + GRACE);
        }
        assert_eq!(t.suspected(t0 + GRACE).len(), 1);
    }

    #[test]
    fn a_leader_that_stops_forwarding_is_suspected_after_failures_in_a_row() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        let p = plan("a1");
        t.set_plan(Some(p.clone()), t0);
        let later = t0 + Duration::from_secs(2);
        t.record(&p, true, later);
        t.record(&p, false, later);
        t.record(&p, false, later);
        // One answer resets the count.
        t.record(&p, true, later);
        t.record(&p, false, later);
        t.record(&p, false, later);
        assert!(t.suspected(later).is_empty());
        t.record(&p, false, later);
        assert_eq!(t.suspected(later), BTreeSet::from(["a1".parse().unwrap()]));
        // The suspicion outlives the plan (a2 leads now and probes nothing) ...
        t.set_plan(None, later);
        assert_eq!(t.suspected(later + Duration::from_secs(10)).len(), 1);
        // ... until it has stood for HOLD.
        assert!(t.suspected(later + HOLD).is_empty());
    }

    #[test]
    fn rounds_for_an_old_plan_are_ignored() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        t.set_plan(Some(plan("a2")), t0);
        let old = plan("a1");
        for _ in 0..10 {
            t.record(&old, false, t0 + GRACE * 2);
        }
        assert!(t.suspected(t0 + GRACE * 2).is_empty());
    }
}
