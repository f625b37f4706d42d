//! The load generator on the master, as the study's master ran it: HTTP `GET`s to
//! every worker's pod through the VPN, closed loop (C connections, each sending its
//! next request when the last answer is in) or open loop (a fixed rate, each request
//! due at its slot; latency counted from the slot, see [`stats::due_time`]).
//!
//! It runs on one thread that joined the master's network namespace, with a
//! single-threaded tokio runtime: the sockets it makes are the master's.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::http;
use crate::stats::{self, Latencies, Sample};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Pace {
    /// Each connection sends its next request as soon as the last one is answered.
    Closed,
    /// Requests are due at `rate` per second over all connections.
    Open { rate: f64 },
}

#[derive(Clone, Debug)]
pub struct Load {
    /// The pods' servers; connection `c` talks to `targets[c % len]`.
    pub targets: Vec<SocketAddr>,
    pub connections: usize,
    pub pace: Pace,
    /// Keep connections open across requests (`false`: a new connection per request).
    pub keep_alive: bool,
    pub duration: Duration,
    /// A request without a whole answer after this long counts as a timeout.
    pub timeout: Duration,
}

#[derive(Default)]
struct Tally {
    latencies: Latencies,
    ok: u64,
    errors: u64,
    timeouts: u64,
}

/// Runs `load` from inside network namespace `netns`.
pub fn run(netns: &str, load: Load) -> Result<Sample, wiremesh_host::HostError> {
    wiremesh_host::netns::enter(netns, move || runtime().block_on(generate(load)))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds")
}

async fn generate(load: Load) -> Sample {
    let start = Instant::now();
    let tasks: Vec<_> = (0..load.connections)
        .map(|c| tokio::spawn(connection(load.clone(), c, start)))
        .collect();
    let mut all = Tally::default();
    for t in tasks {
        if let Ok(t) = t.await {
            all.latencies.merge(&t.latencies);
            all.ok += t.ok;
            all.errors += t.errors;
            all.timeouts += t.timeouts;
        }
    }
    Sample {
        ok: all.ok,
        errors: all.errors,
        timeouts: all.timeouts,
        seconds: load.duration.as_secs_f64(),
        latency: all.latencies.summary(),
    }
}

async fn connection(load: Load, c: usize, start: Instant) -> Tally {
    let target = load.targets[c % load.targets.len()];
    let mut tally = Tally::default();
    let mut stream = None;
    for index in 0u64.. {
        let due = match load.pace {
            Pace::Closed => start.elapsed(),
            Pace::Open { rate } => stats::due_time(c, load.connections, index, rate),
        };
        if due >= load.duration {
            break;
        }
        tokio::time::sleep_until(start + due).await;
        let attempt = async {
            let s = match stream.take() {
                Some(s) => s,
                None => http::connect(target).await?,
            };
            let mut s = s;
            http::get(&mut s, !load.keep_alive).await?;
            Ok::<_, std::io::Error>(s)
        };
        match tokio::time::timeout(load.timeout, attempt).await {
            Ok(Ok(s)) => {
                tally.ok += 1;
                tally.latencies.record(stats::latency(due, start.elapsed()));
                if load.keep_alive {
                    stream = Some(s);
                }
            }
            Ok(Err(_)) => {
                tally.errors += 1;
                // A refused or unroutable request fails at once: do not spin on it.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => tally.timeouts += 1,
        }
    }
    tally
}

/// How often a probe starts a fresh attempt while earlier ones are still waiting.
pub const PROBE_SPACING: Duration = Duration::from_millis(100);

/// From inside `netns`, sends a fresh `GET` to each target every [`PROBE_SPACING`]
/// until one succeeds (each attempt may take `attempt_timeout`), for at most
/// `limit`; per target, how long after the call its first success came.
pub fn first_success(
    netns: &str,
    targets: Vec<SocketAddr>,
    attempt_timeout: Duration,
    limit: Duration,
) -> Result<Vec<Option<Duration>>, wiremesh_host::HostError> {
    wiremesh_host::netns::enter(netns, move || {
        runtime().block_on(async move {
            let start = Instant::now();
            let tasks: Vec<_> = targets
                .into_iter()
                .map(|target| tokio::spawn(answers_after(target, start, attempt_timeout, limit)))
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.ok().flatten());
            }
            out
        })
    })
}

/// How long after `start` a fresh `GET` to `target` first succeeded, if within
/// `limit`. Attempts overlap: one whose SYN was lost while the path was down
/// would hold a one-at-a-time probe for its whole timeout, and the recovery would
/// measure that timeout rather than the VPN.
async fn answers_after(
    target: SocketAddr,
    start: Instant,
    attempt_timeout: Duration,
    limit: Duration,
) -> Option<Duration> {
    let mut attempts = tokio::task::JoinSet::new();
    let mut next = start;
    loop {
        tokio::select! {
            Some(done) = attempts.join_next() => {
                if let Ok(Some(at)) = done {
                    return (at <= limit).then_some(at);
                }
            }
            _ = tokio::time::sleep_until(next), if next < start + limit => {
                attempts.spawn(async move {
                    let attempt = async {
                        let mut s = http::connect(target).await?;
                        http::get(&mut s, true).await
                    };
                    let ok = tokio::time::timeout(attempt_timeout, attempt).await;
                    matches!(ok, Ok(Ok(_))).then(|| start.elapsed())
                });
                next += PROBE_SPACING;
            }
            else => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn a_probe_sees_a_returning_path_without_waiting_out_a_lost_attempt() {
        runtime().block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let target = listener.local_addr().unwrap();
            // Until `open`, connections are accepted and never answered: the path of
            // a VPN that has not recovered yet.
            let open = Arc::new(AtomicBool::new(false));
            let server_open = open.clone();
            tokio::spawn(async move {
                let mut unanswered = Vec::new();
                while let Ok((mut s, _)) = listener.accept().await {
                    if !server_open.load(Ordering::Relaxed) {
                        unanswered.push(s);
                        continue;
                    }
                    tokio::spawn(async move {
                        let mut buf = [0u8; 1024];
                        let _ = s.read(&mut buf).await;
                        let _ = s.write_all(&http::response(16)).await;
                    });
                }
            });
            let attempt_timeout = Duration::from_secs(5);
            let probe = tokio::spawn(answers_after(
                target,
                Instant::now(),
                attempt_timeout,
                Duration::from_secs(20),
            ));
            // The outage: a fixed length by design.
            tokio::time::sleep(Duration::from_millis(300)).await;
            open.store(true, Ordering::Relaxed);
            let at = probe.await.unwrap().expect("the path came back");
            // One attempt at a time would have waited out the first one's 5 s.
            assert!(at < attempt_timeout / 2, "{at:?}");
        });
    }
}
