//! Failover that watches the data plane: a location leader whose agent still
//! heartbeats but whose forwarding died is replaced within seconds, because the
//! nodes behind it probe through it (issue 10's target: traffic between sites
//! resumes within 5 s; Kilo waits for a stale heartbeat).

mod support;

use std::time::{Duration, Instant};

use support::Mesh;
use wiremesh_host::probe;
use wiremesh_testkit::{require_root, wait_until};

/// How long after `start` a ping from `from`'s pod to `to`'s first gets an answer
/// (pings every 50 ms, each waiting up to 200 ms), and how many went unanswered;
/// `None` if none does within `limit`.
fn first_answer(
    mesh: &Mesh,
    from: usize,
    to: usize,
    start: Instant,
    limit: Duration,
) -> (Option<Duration>, u32) {
    let dst = mesh.pod_ip(to);
    mesh.nodes[from]
        .pod
        .run(move || {
            let mut lost = 0;
            while start.elapsed() < limit {
                if probe::ping(dst, Duration::from_millis(200)).is_ok() {
                    return (Some(start.elapsed()), lost);
                }
                lost += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            (None, lost)
        })
        .expect("probe in the pod's namespace")
}

#[test]
fn a_leader_that_stops_forwarding_is_replaced_within_seconds() {
    if !require_root() {
        return;
    }
    let (mesh, a1, a2, b1) = Mesh::two_sites();
    assert_eq!(mesh.leader_of("site-a").as_deref(), Some("a1"));
    // a2 judges a1 on forwarding that stops: wait until its probes through a1 work.
    assert!(
        wait_until(Duration::from_secs(10), || mesh
            .log(a2)
            .contains("probes through this location's leader are answered")),
        "a2 never got an answer through a1\n{}",
        mesh.log(a2)
    );

    // a1's agent and device stay up (its heartbeat goes on); only forwarding dies.
    let killed = Instant::now();
    mesh.nodes[a1]
        .ns
        .exec_ok(&[
            "nft",
            "add table inet wmt-broken; add chain inet wmt-broken forward { type filter hook forward priority -50; policy drop; }",
        ])
        .expect("nft");
    let (resumed, lost) = first_answer(&mesh, a2, b1, killed, Duration::from_secs(20));
    let resumed = resumed.unwrap_or_else(|| {
        panic!(
            "traffic between sites did not resume within 20 s of the leader's forwarding dying\n{}",
            mesh.log(a2)
        )
    });
    assert!(
        lost > 0,
        "the broken leader still forwarded: the test proves nothing"
    );
    assert!(
        resumed < Duration::from_secs(5),
        "traffic resumed only after {resumed:?} (target: 5 s)"
    );
    assert_eq!(mesh.leader_of("site-a").as_deref(), Some("a2"));
    eprintln!("traffic between sites resumed {resumed:?} after the leader stopped forwarding ({lost} pings lost)");
}
