//! The node's liveness, kept apart from the length of a reconcile.
//!
//! The loop's reconcile can be long (a tenant onboarding dozens of VPCs at once makes
//! namespaces, TUN devices, rulesets and DNS servers for each), and a heartbeat that
//! waited for it would let the lease lapse: peers would drop the node and its VPC
//! endpoints just when it is busiest. So a thread of its own heartbeats the
//! [`Membership`], every third of the TTL as the loop did.
//!
//! The lease must still mean "this agent works": the thread beats only while the
//! loop has shown [`Progress`] (started a pass, or took a VPC one step on) within
//! [`STALL`]. A wedged loop (a hung device or host command) loses the lease `STALL`
//! + TTL after its last step.
//!
//! [`Liveness`] is the membership the loop and its VPCs use: every call takes one
//! lock, held for that registry call only, and a publish is remembered so a
//! heartbeat that finds the lease gone rejoins with the node's latest record.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use wiremesh_model::Node;
use wiremesh_vpc::{Endpoint, Pod};

use crate::registry::{Membership, NodeStatus, RegistryError};

/// How long the loop may go without a step of progress before its lease is let go.
/// Far above the longest step (a pass without VPCs; one VPC's claim, namespace or
/// routes, ruleset and DNS server: well under a second here), far below
/// "forever": a wedged agent leaves the mesh within about a minute and its peers
/// route around it.
pub const STALL: Duration = Duration::from_secs(60);
/// A failed heartbeat, or one held back by a stall, is tried again this soon.
const RETRY: Duration = Duration::from_millis(500);

/// Whether the lease is kept: the loop last showed progress less than `stall` ago.
pub fn keeps_lease(last_progress: Instant, now: Instant, stall: Duration) -> bool {
    now.saturating_duration_since(last_progress) < stall
}

/// The registry membership and the node record a rejoin publishes.
struct Held {
    membership: Box<dyn Membership>,
    node: Node,
}

/// When the loop last made progress; clones share it.
#[derive(Clone)]
pub struct Progress(Arc<Mutex<Instant>>);

impl Progress {
    /// The loop is working: heartbeats go on for another [`STALL`].
    pub fn mark(&self) {
        *lock(&self.0) = Instant::now();
    }

    fn last(&self) -> Instant {
        *lock(&self.0)
    }
}

/// A [`Membership`] heartbeaten by a thread of its own while the loop progresses.
/// Dropping it stops the thread and lets the node expire, as a crash would.
pub struct Liveness {
    held: Arc<Mutex<Held>>,
    progress: Progress,
    heartbeats: Heartbeats,
}

/// The heartbeat thread, stopped and joined on Drop.
struct Heartbeats {
    /// Dropping it wakes the thread to end.
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Liveness {
    /// Starts heartbeating `membership` (joined as `node`) every third of `ttl`.
    pub fn start(
        membership: Box<dyn Membership>,
        node: &Node,
        ttl: Duration,
        stall: Duration,
    ) -> std::io::Result<Liveness> {
        let held = Arc::new(Mutex::new(Held {
            membership,
            node: node.clone(),
        }));
        let progress = Progress(Arc::new(Mutex::new(Instant::now())));
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new().name("heartbeat".into()).spawn({
            let (held, progress) = (held.clone(), progress.clone());
            move || {
                let mut wait = ttl / 3;
                let mut said_stalled = false;
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(wait) {
                    if !keeps_lease(progress.last(), Instant::now(), stall) {
                        if !said_stalled {
                            tracing::error!(
                                "the agent's loop made no progress for {stall:?}: letting the lease lapse"
                            );
                            said_stalled = true;
                        }
                        wait = RETRY;
                        continue;
                    }
                    said_stalled = false;
                    let mut held = lock(&held);
                    let Held { membership, node } = &mut *held;
                    wait = match membership.heartbeat(node) {
                        Ok(()) => ttl / 3,
                        Err(e) => {
                            tracing::warn!("heartbeat failed: {e}");
                            RETRY
                        }
                    };
                }
            }
        })?;
        Ok(Liveness {
            held,
            progress,
            heartbeats: Heartbeats {
                stop: Some(stop),
                thread: Some(thread),
            },
        })
    }

    /// Where the loop, and the work it hands on, mark progress.
    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }
}

impl Membership for Liveness {
    fn publish(&mut self, node: &Node) -> Result<(), RegistryError> {
        let mut held = lock(&self.held);
        held.membership.publish(node)?;
        held.node = node.clone();
        Ok(())
    }

    fn heartbeat(&mut self, node: &Node) -> Result<(), RegistryError> {
        lock(&self.held).membership.heartbeat(node)
    }

    fn report(&mut self, status: &NodeStatus) -> Result<(), RegistryError> {
        lock(&self.held).membership.report(status)
    }

    fn publish_endpoint(&mut self, endpoint: &Endpoint) -> Result<(), RegistryError> {
        lock(&self.held).membership.publish_endpoint(endpoint)
    }

    fn publish_pod(&mut self, pod: &Pod) -> Result<(), RegistryError> {
        lock(&self.held).membership.publish_pod(pod)
    }

    /// The thread stops first, so no heartbeat brings the node back after it left.
    fn leave(self: Box<Self>) -> Result<(), RegistryError> {
        let Liveness {
            held, heartbeats, ..
        } = *self;
        drop(heartbeats);
        let held = Arc::into_inner(held).expect("the heartbeat thread has ended");
        let held = held.into_inner().unwrap_or_else(PoisonError::into_inner);
        held.membership.leave()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_is_kept_only_while_the_loop_progressed_within_the_stall_bound() {
        let start = Instant::now();
        let stall = Duration::from_secs(60);
        let at = |secs| start + Duration::from_secs(secs);
        // A long reconcile (tens of seconds) keeps the lease.
        assert!(keeps_lease(start, at(0), stall));
        assert!(keeps_lease(start, at(45), stall));
        // A loop silent for the whole bound does not.
        assert!(!keeps_lease(start, at(60), stall));
        assert!(!keeps_lease(start, at(600), stall));
        // Progress marked after `now` was read (another thread) is progress.
        assert!(keeps_lease(at(5), at(4), stall));
    }
}
