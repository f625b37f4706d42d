//! Multi-cluster (issue 10): two clusters with their own registries and address
//! plans, linked by `wiremesh cluster link --follow` run for each side, reach each
//! other's pods both ways; a node of one leaving is dropped by the other. Real
//! agents and devices in network namespaces on one shared underlay.

mod support;

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::Mesh;
use wiremesh_host::{netns, probe};
use wiremesh_testkit::{require_root, wait_until};

/// `wiremesh cluster link NAME --follow` importing `remote` into `local`, killed on Drop.
struct Link {
    child: Child,
}

impl Link {
    fn follow(local: &Mesh, name: &str, remote: &Mesh) -> Link {
        let log = std::fs::File::create(local.dir.path().join(format!("link-{name}.log")))
            .expect("link log");
        let child = Command::new(env!("CARGO_BIN_EXE_wiremesh"))
            .args(["cluster", "link", name, "--follow"])
            .args(["--registry", &local.registry(), "--cluster", &local.cluster])
            .args(["--remote-registry", &remote.registry()])
            .args(["--remote-cluster", &remote.cluster])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("wiremesh cluster link");
        Link { child }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the pod of `mesh`'s node `from` reaches `dst` (ICMP, one second).
fn pings(mesh: &Mesh, from: usize, dst: Ipv4Addr) -> bool {
    netns::enter(mesh.nodes[from].pod.name(), move || {
        probe::ping(dst, Duration::from_secs(1)).is_ok()
    })
    .unwrap_or(false)
}

fn peer_names(mesh: &Mesh) -> Vec<String> {
    let (snapshot, _, _) = mesh.cluster().snapshot().expect("snapshot");
    snapshot.peers.iter().map(|p| p.name.to_string()).collect()
}

#[test]
fn linked_full_clusters_reach_each_other_and_see_a_node_leave() {
    link_reach_leave_unlink("full");
}

/// Cluster A in location granularity: B imports only A's leader, which carries both
/// A nodes' prefixes; A's follower reaches B through it.
#[test]
fn a_location_cluster_links_through_its_leader() {
    link_reach_leave_unlink("location");
}

/// Links A (granularity `a_granularity`, one location) and B (full), checks pods
/// reach each other both ways, stops a B node and waits for A to drop it, then
/// unlinks A from B and checks that A's pods are cut off from B.
fn link_reach_leave_unlink(a_granularity: &str) {
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let mut a = Mesh::new(a_granularity, false);
    let mut b = Mesh::beside(
        &a,
        "full",
        &[
            "--cluster-cidr",
            "10.43.0.0/16",
            "--mesh-cidr",
            "100.65.0.0/16",
        ],
    );
    let a_nodes = [
        a.add_node("a1", "site", true),
        a.add_node("a2", "site", true),
    ];
    let b_nodes = [
        b.add_node("b1", "site", true),
        b.add_node("b2", "site", true),
    ];
    for i in a_nodes {
        a.start(i);
    }
    for i in b_nodes {
        b.start(i);
    }
    assert!(
        !pings(&a, a_nodes[0], b.pod_ip(b_nodes[0])),
        "the clusters reach each other before they are linked"
    );
    let a_imports_b = Link::follow(&a, "clb", &b);
    let _b_imports_a = Link::follow(&b, "cla", &a);

    for &i in &a_nodes {
        for &j in &b_nodes {
            let (to_b, to_a) = (b.pod_ip(j), a.pod_ip(i));
            assert!(
                wait_until(Duration::from_secs(20), || pings(&a, i, to_b)),
                "{}'s pod cannot reach {}'s pod {to_b}; A's peers: {:?}",
                a.nodes[i].name,
                b.nodes[j].name,
                peer_names(&a)
            );
            assert!(
                wait_until(Duration::from_secs(10), || pings(&b, j, to_a)),
                "{}'s pod cannot reach {}'s pod {to_a}; B's peers: {:?}",
                b.nodes[j].name,
                a.nodes[i].name,
                peer_names(&b)
            );
        }
    }

    // b2's agent stops without leaving: its lease (3 s) runs out, B's registry
    // drops it, the link sees that and removes clb-b2 from A, and A's agents
    // drop the peer and its routes.
    let [b1, b2] = b_nodes;
    let b2_pods = std::fs::read_to_string(b.state_dir(b2).join("pod-cidr")).unwrap();
    let b2_pods = b2_pods.trim().to_owned();
    b.stop(b2);
    assert!(
        wait_until(Duration::from_secs(20), || !peer_names(&a)
            .contains(&"clb-b2".to_owned())),
        "A still has clb-b2: {:?}",
        peer_names(&a)
    );
    for &i in &a_nodes {
        assert!(
            wait_until(Duration::from_secs(10), || !a.routes(i).contains(&b2_pods)),
            "{} still routes {b2_pods}:\n{}",
            a.nodes[i].name,
            a.routes(i)
        );
        assert!(
            pings(&a, i, b.pod_ip(b1)),
            "{} lost b1 when b2 left",
            a.nodes[i].name
        );
    }
    assert_eq!(peer_names(&a), ["clb-b1"]);

    // Unlinked (the follower stopped first, or it would import b1 again), A's
    // nodes drop b1 and A's pods no longer reach it.
    drop(a_imports_b);
    a.wiremesh_ok(&["cluster", "unlink", "clb"]);
    assert!(peer_names(&a).is_empty(), "{:?}", peer_names(&a));
    let b1_ip = b.pod_ip(b1);
    for &i in &a_nodes {
        assert!(
            wait_until(Duration::from_secs(10), || !pings(&a, i, b1_ip)),
            "{} still reaches b1 after the unlink",
            a.nodes[i].name
        );
    }
    println!(
        "multi-cluster test ({a_granularity}) took {:?}",
        started.elapsed()
    );
}

/// `wiremesh cluster link` once (no --follow) between two directory registries.
fn link_once(local: &Path, remote: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wiremesh"))
        .args(["cluster", "link", "other"])
        .arg(format!("--registry=dir:{}", local.display()))
        .arg(format!("--remote-registry=dir:{}", remote.display()))
        .output()
        .expect("wiremesh runs")
}

fn init(registry: &Path, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_wiremesh"))
        .arg("init")
        .arg(format!("--registry=dir:{}", registry.display()))
        .args(args)
        .output()
        .expect("wiremesh runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Clusters that cannot be linked are refused with the reason, before anything is
/// written: a remote without settings, and address plans that overlap.
#[test]
fn link_refuses_an_uninitialised_remote_and_overlapping_plans() {
    let dir = tempfile::tempdir().unwrap();
    let (local, remote) = (dir.path().join("local"), dir.path().join("remote"));
    init(&local, &[]);
    let out = link_once(&local, &remote);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("has no settings"),
        "{err}"
    );
    init(&remote, &["--mesh-cidr", "100.65.0.0/16"]);
    let out = link_once(&local, &remote);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(
                "remote cluster's cluster_cidr 10.42.0.0/16 overlaps this cluster's cluster_cidr"
            ),
        "{err}"
    );
}
