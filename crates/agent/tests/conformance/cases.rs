//! The registry conformance suite: what every [`Registry`] backend must do, at the
//! level the agent and the CLI use it. Each case takes a [`Bed`] (a registry under
//! test and the few things only its backend can do) and panics on the first broken
//! promise. Waits are bounded polls; the only sleeps are where time passing is the
//! thing under test (liveness, and a quiet stream).

use std::collections::BTreeSet;
use std::thread;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use wiremesh_agent::{Change, Changes, NodeStatus, PeerStatus, Registry};
use wiremesh_model::{ExternalPeer, Node, NodeName, PeerName, PublicKey};
use wiremesh_topology::ipam;

/// A registry under test, as one backend provides it.
pub trait Bed: Sync {
    /// A new handle on the registry, as another process would get.
    fn open(&self) -> Box<dyn Registry>;
    /// Whether the registry allocates pod CIDRs itself (a store, by compare-and-swap)
    /// rather than reading the ones the platform assigned (Kubernetes).
    fn allocates(&self) -> bool;
    /// Makes `node` a machine of the cluster, assigned `pod_cidr` where the platform
    /// assigns them (Kubernetes: the Node object the kubelet and controller make).
    fn add_machine(&self, node: &NodeName, pod_cidr: IpNet);
    /// Writes, behind the registry's back, a record for `node` (a machine already)
    /// whose public key is malformed, as a live node; returns the field the error
    /// must name.
    fn write_malformed_node(&self, node: &NodeName, good: &Node) -> String;
    /// The same for an external peer with a malformed allowed IP.
    fn write_malformed_peer(&self, peer: &ExternalPeer) -> String;
}

/// How long a case waits for what should happen promptly.
const WAIT: Duration = Duration::from_secs(15);
/// Liveness for nodes that must not expire during a case.
const LONG_TTL: Duration = Duration::from_secs(60);

/// A case: it panics on the first broken promise.
pub type Case = fn(&dyn Bed);

/// Every case, by name, cheap first.
pub const CASES: &[(&str, Case)] = &[
    ("publish_read_back_leave", publish_read_back_leave),
    ("a_node_keeps_its_pod_cidr", a_node_keeps_its_pod_cidr),
    (
        "external_peers_put_list_delete",
        external_peers_put_list_delete,
    ),
    ("malformed_records_are_named", malformed_records_are_named),
    (
        "overlapping_pod_cidrs_are_reported",
        overlapping_pod_cidrs_are_reported,
    ),
    (
        "concurrent_claims_never_collide",
        concurrent_claims_never_collide,
    ),
    ("changes_in_order_none_missed", changes_in_order_none_missed),
    (
        "changes_from_concurrent_writers",
        changes_from_concurrent_writers,
    ),
    (
        "liveness_expiry_removes_a_node",
        liveness_expiry_removes_a_node,
    ),
];

/// One `#[test]` per case; `$bed` is evaluated afresh in each.
#[macro_export]
macro_rules! conformance_tests {
    ($bed:expr) => {
        $crate::conformance_tests!(@cases $bed; publish_read_back_leave,
            a_node_keeps_its_pod_cidr, external_peers_put_list_delete,
            malformed_records_are_named, overlapping_pod_cidrs_are_reported,
            concurrent_claims_never_collide, changes_in_order_none_missed,
            changes_from_concurrent_writers, liveness_expiry_removes_a_node);
    };
    (@cases $bed:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let bed = $bed;
                $crate::cases::$case(&bed);
            }
        )*

        #[test]
        fn conformance_macro_lists_every_case() {
            let listed = [$(stringify!($case)),*];
            let cases: Vec<&str> = $crate::cases::CASES.iter().map(|(name, _)| *name).collect();
            assert_eq!(listed.as_slice(), cases.as_slice());
        }
    };
}

fn name(s: &str) -> NodeName {
    s.parse().expect("a node name")
}

fn cidr(s: &str) -> IpNet {
    s.parse().expect("a CIDR")
}

/// A distinct public key per `n` (any 32 bytes will do for a record).
fn key(n: u8) -> PublicKey {
    PublicKey::from_hex(&format!("{:02x}", n.wrapping_add(1)).repeat(32)).expect("a key")
}

/// A node record for `block`, as an agent would publish it.
fn node(node: &NodeName, block: &ipam::NodeBlock, n: u8) -> Node {
    Node {
        name: node.clone(),
        location: "site-a".parse().expect("a location"),
        public_key: key(n),
        public_endpoint: Some(format!("203.0.113.{n}:51820").parse().expect("an endpoint")),
        private_endpoint: None,
        pod_cidr: block.pod_cidr,
        pod_cidr_v6: None,
        mesh_ip: block.mesh_ip,
        persistent_keepalive: None,
        leader_preference: 0,
        observed_endpoints: Default::default(),
        suspected_leaders: Default::default(),
        unreachable_direct: Default::default(),
        relay_ports: Default::default(),
        last_seen: 0,
    }
}

/// Makes `n` a machine with the `n`th /24 and claims its block.
fn machine(bed: &dyn Bed, registry: &dyn Registry, node: &NodeName, n: u8) -> ipam::NodeBlock {
    let assigned = cidr(&format!("10.42.{n}.0/24"));
    bed.add_machine(node, assigned);
    let settings = registry.settings().expect("settings");
    let block = registry
        .claim_block(node, &settings, None)
        .expect("claim a pod CIDR");
    if !bed.allocates() {
        assert_eq!(block.pod_cidr, assigned, "the CIDR the platform assigned");
    }
    block
}

fn peer(name: &str, n: u8) -> ExternalPeer {
    ExternalPeer {
        name: name.parse().expect("a peer name"),
        public_key: key(200 + n),
        allowed_ips: vec![cidr(&format!("10.99.0.{n}/32"))],
        endpoint: None,
        persistent_keepalive: Some(25),
    }
}

/// The nodes a registry lists, without `last_seen` (the registry's clock sets it).
fn nodes_of(registry: &dyn Registry) -> Vec<Node> {
    let (snapshot, _) = registry.snapshot().expect("snapshot");
    snapshot
        .nodes
        .into_iter()
        .map(|n| Node { last_seen: 0, ..n })
        .collect()
}

fn names_of(registry: &dyn Registry) -> BTreeSet<String> {
    nodes_of(registry)
        .iter()
        .map(|n| n.name.to_string())
        .collect()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?}: {what}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A node joins (a dotted name, as cloud providers name them), reads back as
/// published from another handle, republishes, reports, and leaves.
pub fn publish_read_back_leave(bed: &dyn Bed) {
    let registry = bed.open();
    let other = bed.open();
    let a1 = name("ip-10-0-0-1.ec2.internal");
    let block = machine(bed, &*registry, &a1, 1);
    let settings = registry.settings().expect("settings");
    assert!(settings.cluster_cidr.contains(&block.pod_cidr), "{block:?}");
    assert_eq!(
        ipam::mesh_ip_of(&settings, block.pod_cidr).unwrap(),
        block.mesh_ip
    );
    let mut me = node(&a1, &block, 1);
    assert!(!names_of(&*other).contains(a1.as_str()));
    let mut membership = registry.join(&me, LONG_TTL).expect("join");
    assert_eq!(nodes_of(&*other), [me.clone()]);

    me.private_endpoint = Some("10.0.0.1:51820".parse().unwrap());
    me.public_key = key(9);
    membership.publish(&me).expect("publish");
    assert_eq!(
        nodes_of(&*other),
        [me.clone()],
        "the new record replaces the old"
    );
    membership.heartbeat(&me).expect("heartbeat");
    assert_eq!(nodes_of(&*other), [me.clone()]);

    let status = NodeStatus {
        node: a1.to_string(),
        interface: "wiremesh0".into(),
        peers: vec![PeerStatus {
            name: "b1".into(),
            endpoint: Some("203.0.113.2:51820".parse().unwrap()),
            allowed_ips: vec![cidr("10.42.2.0/24")],
            last_handshake: 1_700_000_000,
            rx_bytes: 1,
            tx_bytes: 2,
        }],
        rejected: vec!["nodes/x: bad".into()],
        updated: 1_700_000_001,
    };
    membership.report(&status).expect("report");
    assert_eq!(other.statuses().expect("statuses"), [status]);

    membership.leave().expect("leave");
    assert_eq!(nodes_of(&*other), []);
    assert_eq!(other.statuses().expect("statuses"), []);
}

/// Claiming again, from another handle and with or without the previous CIDR, gives
/// a node the block it has.
pub fn a_node_keeps_its_pod_cidr(bed: &dyn Bed) {
    let registry = bed.open();
    let a1 = name("a1");
    let block = machine(bed, &*registry, &a1, 3);
    let settings = registry.settings().expect("settings");
    let other = bed.open();
    for previous in [Some(block.pod_cidr), None] {
        let again = other.claim_block(&a1, &settings, previous).expect("claim");
        assert_eq!(again, block, "previous {previous:?}");
    }
}

pub fn external_peers_put_list_delete(bed: &dyn Bed) {
    let registry = bed.open();
    let other = bed.open();
    let peers = |r: &dyn Registry| r.snapshot().expect("snapshot").0.peers;
    let (laptop, phone) = (peer("laptop", 1), peer("phone", 2));
    registry.put_peer(&phone).expect("put");
    registry.put_peer(&laptop).expect("put");
    assert_eq!(
        peers(&*other),
        [laptop.clone(), phone.clone()],
        "sorted by name"
    );
    let moved = ExternalPeer {
        endpoint: Some("198.51.100.2:51820".parse().unwrap()),
        allowed_ips: vec![cidr("10.99.1.0/24"), cidr("fd99::/64")],
        persistent_keepalive: None,
        ..laptop.clone()
    };
    registry.put_peer(&moved).expect("replace");
    assert_eq!(peers(&*other), [moved, phone.clone()]);
    let laptop_name: PeerName = "laptop".parse().unwrap();
    assert!(other.delete_peer(&laptop_name).expect("delete"));
    assert!(!other.delete_peer(&laptop_name).expect("delete again"));
    assert_eq!(peers(&*registry), [phone]);
}

/// A malformed node or peer record is left out and named with its field; the rest
/// of the mesh is unaffected.
pub fn malformed_records_are_named(bed: &dyn Bed) {
    let registry = bed.open();
    let good = name("good");
    let block = machine(bed, &*registry, &good, 4);
    let good_node = node(&good, &block, 4);
    let _membership = registry.join(&good_node, LONG_TTL).expect("join");
    let broken = name("broken");
    let broken_block = machine(bed, &*registry, &broken, 5);
    let node_field = bed.write_malformed_node(&broken, &node(&broken, &broken_block, 5));
    let peer_field = bed.write_malformed_peer(&peer("phone", 7));
    registry.put_peer(&peer("laptop", 1)).expect("put");

    let (snapshot, bad) = bed.open().snapshot().expect("snapshot");
    let names: Vec<&str> = snapshot.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["good"]);
    let peers: Vec<&str> = snapshot.peers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(peers, ["laptop"]);
    let named = |who: &str, field: &str| {
        bad.iter()
            .any(|b| b.key.ends_with(who) && b.error.field == field)
    };
    assert!(
        named("broken", &node_field),
        "want broken's {node_field}: {bad:?}"
    );
    assert!(
        named("phone", &peer_field),
        "want phone's {peer_field}: {bad:?}"
    );
    assert_eq!(bad.len(), 2, "{bad:?}");
}

/// Two live nodes whose pod CIDRs overlap (a stale or forged record, or a platform
/// that assigned one CIDR twice) are never both used: the later is reported.
pub fn overlapping_pod_cidrs_are_reported(bed: &dyn Bed) {
    let registry = bed.open();
    let settings = registry.settings().expect("settings");
    let shared = cidr("10.42.50.0/24");
    let block = ipam::NodeBlock {
        pod_cidr: shared,
        mesh_ip: ipam::mesh_ip_of(&settings, shared).unwrap(),
    };
    let mut memberships = Vec::new();
    for (n, who) in [(1, "x1"), (2, "x2")] {
        let who = name(who);
        bed.add_machine(&who, shared);
        memberships.push(
            registry
                .join(&node(&who, &block, n), LONG_TTL)
                .expect("join"),
        );
    }
    let (snapshot, bad) = bed.open().snapshot().expect("snapshot");
    let names: Vec<&str> = snapshot.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["x1"]);
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(bad[0].key.ends_with("x2"), "{bad:?}");
    assert_eq!(bad[0].error.field, "node x2.pod_cidr", "{bad:?}");
}

/// Nodes that claim and join at once, each through its own handle, get pod CIDRs
/// that do not overlap, and all of them are in the mesh.
pub fn concurrent_claims_never_collide(bed: &dyn Bed) {
    const NODES: u8 = 8;
    let blocks: Vec<ipam::NodeBlock> = thread::scope(|s| {
        let handles: Vec<_> = (0..NODES)
            .map(|i| {
                s.spawn(move || {
                    let registry = bed.open();
                    let who = name(&format!("c{i}"));
                    let block = machine(bed, &*registry, &who, 10 + i);
                    // Dropped at once: a long TTL keeps the node listed for the check.
                    drop(
                        registry
                            .join(&node(&who, &block, i), LONG_TTL)
                            .expect("join"),
                    );
                    block
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("claimer"))
            .collect()
    });
    for (i, a) in blocks.iter().enumerate() {
        for b in &blocks[i + 1..] {
            let overlap = a.pod_cidr.contains(&b.pod_cidr.network())
                || b.pod_cidr.contains(&a.pod_cidr.network());
            assert!(!overlap, "{a:?} and {b:?} collide");
        }
    }
    let (snapshot, bad) = bed.open().snapshot().expect("snapshot");
    assert_eq!(snapshot.nodes.len(), usize::from(NODES), "{bad:?}");
    assert!(bad.is_empty(), "{bad:?}");
}

/// Collects changes until `done` says so; bounded.
fn collect(changes: &mut dyn Changes, mut done: impl FnMut(&[Change]) -> bool) -> Vec<Change> {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    while !done(&seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out; saw {seen:?}");
        if let Some(change) = changes.recv_timeout(left).expect("change stream") {
            seen.push(change);
        }
    }
    seen
}

/// Reads changes until none arrives for half a second; bounded by `WAIT`.
fn settle(changes: &mut dyn Changes) {
    let deadline = Instant::now() + WAIT;
    while changes
        .recv_timeout(Duration::from_millis(500))
        .expect("change stream")
        .is_some()
    {
        assert!(Instant::now() < deadline, "the change stream never settled");
    }
}

/// The names of the nodes in `changes`, in the order each first appears.
fn first_seen_nodes(changes: &[Change]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for change in changes {
        if let Change::Node(n) = change {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    names
}

/// Writes after `changes()` returns are all reported, each node's in the order of
/// the writes; peers too; device reports and heartbeats never say the topology
/// changed; a leave is a change.
pub fn changes_in_order_none_missed(bed: &dyn Bed) {
    let writer = bed.open();
    let names: Vec<NodeName> = (0..5).map(|i| name(&format!("n{i}"))).collect();
    let blocks: Vec<_> = names
        .iter()
        .zip(20..)
        .map(|(who, n)| machine(bed, &*writer, who, n))
        .collect();
    let mut changes = bed.open().changes().expect("changes");
    let mut memberships: Vec<_> = names
        .iter()
        .zip(&blocks)
        .zip(0..)
        .map(|((who, block), n)| writer.join(&node(who, block, n), LONG_TTL).expect("join"))
        .collect();
    let want: Vec<String> = names.iter().map(ToString::to_string).collect();
    let seen = collect(&mut *changes, |seen| {
        first_seen_nodes(seen).len() >= want.len()
    });
    assert_eq!(first_seen_nodes(&seen), want, "{seen:?}");

    writer.put_peer(&peer("laptop", 1)).expect("put");
    collect(&mut *changes, |seen| {
        seen.contains(&Change::Peer("laptop".into()))
    });

    // A join may be several writes (a Kubernetes Node patch and its Lease arrive on
    // separate watches), so let the stream settle before judging what follows.
    settle(&mut *changes);

    // Quiet: what does not change the topology must not wake every agent.
    let me = node(&names[0], &blocks[0], 0);
    memberships[0].heartbeat(&me).expect("heartbeat");
    memberships[0]
        .report(&NodeStatus {
            node: names[0].to_string(),
            ..NodeStatus::default()
        })
        .expect("report");
    let quiet_until = Instant::now() + Duration::from_secs(1);
    while let Some(left) = quiet_until.checked_duration_since(Instant::now()) {
        if let Some(change) = changes.recv_timeout(left).expect("change stream") {
            assert!(
                !change.affects_topology(),
                "{change:?} after a heartbeat and a report"
            );
        }
    }

    memberships.remove(0).leave().expect("leave");
    collect(&mut *changes, |seen| {
        seen.contains(&Change::Node(want[0].clone()))
    });
}

/// Four writers joining three nodes each at once: the stream misses none of them.
pub fn changes_from_concurrent_writers(bed: &dyn Bed) {
    let setup = bed.open();
    let blocks: Vec<Vec<(NodeName, ipam::NodeBlock)>> = (0..4u8)
        .map(|w| {
            (0..3u8)
                .map(|i| {
                    let who = name(&format!("w{w}-{i}"));
                    let block = machine(bed, &*setup, &who, 30 + 3 * w + i);
                    (who, block)
                })
                .collect()
        })
        .collect();
    let mut changes = bed.open().changes().expect("changes");
    thread::scope(|s| {
        for (w, mine) in blocks.iter().enumerate() {
            s.spawn(move || {
                let registry = bed.open();
                for (i, (who, block)) in mine.iter().enumerate() {
                    let n = u8::try_from(3 * w + i).unwrap();
                    drop(registry.join(&node(who, block, n), LONG_TTL).expect("join"));
                }
            });
        }
    });
    let seen = collect(&mut *changes, |seen| first_seen_nodes(seen).len() >= 12);
    let mut names = first_seen_nodes(&seen);
    names.sort();
    let mut want: Vec<String> = blocks
        .iter()
        .flatten()
        .map(|(n, _)| n.to_string())
        .collect();
    want.sort();
    assert_eq!(names, want);
}

/// A node that stops its heartbeats leaves the snapshot once its TTL has passed;
/// one that keeps them stays; a heartbeat after expiry brings the node back.
pub fn liveness_expiry_removes_a_node(bed: &dyn Bed) {
    // etcd's shortest lease; Kubernetes Leases count whole seconds.
    const TTL: Duration = Duration::from_secs(2);
    let registry = bed.open();
    let other = bed.open();
    let (quiet, alive) = (name("quiet"), name("alive"));
    let quiet_node = node(&quiet, &machine(bed, &*registry, &quiet, 60), 60);
    let alive_node = node(&alive, &machine(bed, &*registry, &alive, 61), 61);
    let mut quiet_membership = registry.join(&quiet_node, TTL).expect("join");
    let mut alive_membership = registry.join(&alive_node, TTL).expect("join");
    let both: BTreeSet<String> = ["alive".into(), "quiet".into()].into();
    assert_eq!(names_of(&*other), both);
    let started = Instant::now();
    wait_until("the quiet node expires", || {
        alive_membership.heartbeat(&alive_node).expect("heartbeat");
        !names_of(&*other).contains("quiet")
    });
    assert!(
        started.elapsed() >= TTL / 2,
        "expired too early: {:?}",
        started.elapsed()
    );
    // The live one stays through more than a TTL of heartbeats.
    let until = Instant::now() + TTL + Duration::from_secs(1);
    while Instant::now() < until {
        alive_membership.heartbeat(&alive_node).expect("heartbeat");
        assert!(names_of(&*other).contains("alive"));
        thread::sleep(Duration::from_millis(300));
    }
    quiet_membership
        .heartbeat(&quiet_node)
        .expect("heartbeat after expiry");
    wait_until("the quiet node is back", || {
        names_of(&*other).contains("quiet")
    });
}
