//! How long one node takes to compute its topology in a large cluster: `leaders` and
//! `compute` (for a leader and for a follower) on synthetic clusters of 1,000 and
//! 10,000 nodes, with full granularity and with 100 locations.
//!
//! A plain `main` (no benchmark framework): `cargo bench -p wiremesh-topology --bench
//! compute` prints a Markdown table of the median and the fastest of several runs.
//! Every agent runs `compute` once per reconcile, so these are per-node, per-change
//! costs; the cluster-wide cost is that times the number of nodes, spread over them.

// The crate is pure and its clippy.toml forbids reading the clock; a benchmark has to.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net};
use wiremesh_model::{ClusterSettings, Granularity, Node, NodeName, PublicKey};
use wiremesh_topology::{compute, leaders, Snapshot};

/// Cluster sizes to measure.
const SIZES: [usize; 2] = [1_000, 10_000];
/// Locations in the `location` granularity runs.
const LOCATIONS: usize = 100;
/// Each measurement runs at least this many times and for at least `MIN_TIME`.
const MIN_RUNS: usize = 5;
const MIN_TIME: Duration = Duration::from_millis(500);

/// Node `i` of a cluster spread over `locations`: every node has a public and a
/// private endpoint, a /24 of 10.0.0.0/8 (below 65,536 nodes) and an address in 100.64.0.0/10.
fn node(i: usize, locations: usize) -> Node {
    let n = u32::try_from(i + 1).expect("small cluster");
    let [_, a, b, c] = n.to_be_bytes();
    let mut key = [0x5a; 32];
    key[..4].copy_from_slice(&n.to_le_bytes());
    Node {
        name: format!("n{i:05}").parse().expect("valid name"),
        location: format!("loc{:03}", i % locations)
            .parse()
            .expect("valid location"),
        public_key: PublicKey(key),
        public_endpoint: Some(SocketAddr::from((Ipv4Addr::new(198, a, b, c), 51820))),
        private_endpoint: Some(SocketAddr::from((Ipv4Addr::new(172, 16 + a, b, c), 51820))),
        pod_cidr: IpNet::V4(Ipv4Net::new(Ipv4Addr::new(10, b, c, 0), 24).expect("prefix")),
        pod_cidr_v6: None,
        mesh_ip: Ipv4Addr::new(100, 64 + a, b, c).into(),
        persistent_keepalive: None,
        leader_preference: 0,
        observed_endpoints: BTreeMap::new(),
        suspected_leaders: Default::default(),
        unreachable_direct: Default::default(),
        relay_ports: Default::default(),
        last_seen: 0,
    }
}

fn cluster(size: usize, granularity: Granularity, locations: usize) -> Snapshot {
    Snapshot {
        settings: ClusterSettings {
            cluster_cidr: "10.0.0.0/8".parse().expect("constant"),
            mesh_cidr: "100.64.0.0/10".parse().expect("constant"),
            granularity,
            ..ClusterSettings::default()
        },
        nodes: (0..size).map(|i| node(i, locations)).collect(),
        peers: Vec::new(),
    }
}

/// Median and fastest of repeated runs of `f`.
fn time<T>(mut f: impl FnMut() -> T) -> (Duration, Duration) {
    let mut runs = Vec::new();
    let start = Instant::now();
    while runs.len() < MIN_RUNS || start.elapsed() < MIN_TIME {
        let t = Instant::now();
        black_box(f());
        runs.push(t.elapsed());
    }
    runs.sort();
    (runs[runs.len() / 2], runs[0])
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    println!("| nodes | granularity | what | peers | allowed IPs | median ms | min ms |");
    println!("|---:|---|---|---:|---:|---:|---:|");
    for size in SIZES {
        for (granularity, locations) in [(Granularity::Full, 1), (Granularity::Location, LOCATIONS)]
        {
            let label = match granularity {
                Granularity::Full => "full".to_owned(),
                Granularity::Location => format!("location ({locations})"),
            };
            let snapshot = cluster(size, granularity, locations);
            let (median, min) = time(|| leaders(&snapshot));
            println!(
                "| {size} | {label} | leaders | | | {} | {} |",
                ms(median),
                ms(min)
            );
            // With full granularity every node is alike; with locations a leader
            // carries the other locations' tunnels and a follower does not.
            let elected = leaders(&snapshot);
            let leader: NodeName = elected.values().next().expect("a leader").clone();
            let follower = snapshot
                .nodes
                .iter()
                .map(|n| &n.name)
                .find(|n| !elected.values().any(|l| l == *n));
            let subjects = match granularity {
                Granularity::Full => vec![("compute", leader)],
                Granularity::Location => {
                    let follower = follower.expect("locations have followers").clone();
                    vec![("compute, leader", leader), ("compute, follower", follower)]
                }
            };
            for (what, name) in subjects {
                let topology = compute(&snapshot, &name).expect("a consistent cluster");
                let allowed: usize = topology.peers.iter().map(|p| p.allowed_ips.len()).sum();
                let (median, min) = time(|| compute(&snapshot, &name));
                println!(
                    "| {size} | {label} | {what} | {} | {allowed} | {} | {} |",
                    topology.peers.len(),
                    ms(median),
                    ms(min)
                );
            }
        }
    }
}
