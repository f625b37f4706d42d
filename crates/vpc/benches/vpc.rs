//! Per-packet costs of the VPC wire format, and per-change costs of the services ruleset.
//!
//! A plain `main` (no benchmark framework): `cargo bench -p wiremesh-vpc --bench vpc`
//! prints a Markdown table of the median of several runs.
//! - `encapsulate` / `decapsulate` of a 1400-byte packet with 1 to 1,000 VPCs on the
//!   node: the VPC count must not change the per-packet cost (the target).
//! - `route` (the sender's member lookup) with 10 and 100 member nodes in the VPC.
//! - `plan` + `render` of a VPC with 1,000 services of 3 endpoints: per change, per node.

// The crate is pure and its clippy.toml forbids reading the clock; a benchmark has to.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use wiremesh_vpc::nft::plan;
use wiremesh_vpc::snapshot::{Mesh, Records};
use wiremesh_vpc::wire::{encapsulate, MemberTable, MeshPrefix, Verdict, HEADER_LEN};
use wiremesh_vpc::{
    EndpointRecord, LabelSelector, NodeId, ServiceRecord, VpcId, VpcMemberRecord, VpcRecord,
    VpcSnapshot,
};

const RUNS: usize = 7;
const MIN_TIME: Duration = Duration::from_millis(200);

/// Median time of one call of `f`, over `RUNS` runs of at least `MIN_TIME` each.
fn measure(mut f: impl FnMut()) -> Duration {
    let mut per_call: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            let mut n = 0u32;
            while start.elapsed() < MIN_TIME {
                f();
                n += 1;
            }
            start.elapsed() / n
        })
        .collect();
    per_call.sort();
    per_call[RUNS / 2]
}

fn prefix() -> MeshPrefix {
    "fd77:aa:bbcc::/48".parse().unwrap()
}

/// Node 1's table with `vpcs` VPCs of `nodes` member nodes each (node n: 10.10.n.0/24).
fn table(vpcs: u32, nodes: u16) -> MemberTable {
    MemberTable::new(
        prefix(),
        NodeId(1),
        (1..=vpcs).map(|v| {
            let members = (1..=nodes)
                .map(|n| {
                    let net = IpNet::new(Ipv4Addr::new(10, 10, n as u8, 0).into(), 24).unwrap();
                    (NodeId(n), net)
                })
                .collect();
            (VpcId(v), members)
        }),
    )
}

/// A 1400-byte IPv4 packet from node 2's pod to node 1's, behind 40 bytes of headroom.
fn frame() -> Vec<u8> {
    let mut f = vec![0u8; HEADER_LEN + 1400];
    let p = &mut f[HEADER_LEN..];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&1400u16.to_be_bytes());
    p[12..16].copy_from_slice(&[10, 10, 2, 5]);
    p[16..20].copy_from_slice(&[10, 10, 1, 5]);
    f
}

fn services(n: usize) -> VpcSnapshot {
    let vpc = serde_json::from_value::<VpcRecord>(serde_json::json!({
        "name": "blue", "id": 7, "pod_cidrs": ["10.10.0.0/16"],
        "service_cidr": "10.96.0.0/16", "dns_zone": "cluster.local"
    }))
    .unwrap();
    let member = VpcMemberRecord {
        vpc: "blue".into(),
        node: "n1".into(),
        pod_cidrs: vec!["10.10.0.0/17".into()],
    };
    let mut records = Records {
        vpcs: vec![vpc.try_into().unwrap()],
        members: vec![member.try_into().unwrap()],
        ..Records::default()
    };
    for i in 0..n {
        let svc = serde_json::from_value::<ServiceRecord>(serde_json::json!({
            "vpc": "blue", "namespace": "web", "name": format!("s{i}"),
            "cluster_ip": format!("10.96.{}.{}", i / 200, i % 200 + 20),
            "ports": [{"protocol": "TCP", "port": 80, "target_port": 8080}],
            "session_affinity": if i % 2 == 0 { "ClientIP" } else { "None" }
        }))
        .unwrap();
        records.services.push(svc.try_into().unwrap());
        for e in 0..3 {
            let ep = serde_json::from_value::<EndpointRecord>(serde_json::json!({
                "vpc": "blue", "namespace": "web", "service": format!("s{i}"),
                "address": format!("10.10.{}.{}", (i * 3 + e) / 250, (i * 3 + e) % 250 + 2),
                "node": "n1"
            }))
            .unwrap();
            records.endpoints.push(ep.try_into().unwrap());
        }
    }
    let nodes = BTreeMap::from([("n1".parse().unwrap(), NodeId(1))]);
    let (snap, bad) = VpcSnapshot::build(
        records,
        Mesh {
            prefix: prefix(),
            nodes: &nodes,
        },
    );
    assert!(bad.is_empty(), "{:?}", &bad[..1]);
    snap
}

fn main() {
    println!("| operation | time |\n|---|---|");
    let p = prefix();
    let (src, dst) = (
        p.vpc_address(NodeId(2), VpcId(1)),
        p.vpc_address(NodeId(1), VpcId(1)),
    );
    let mut f = frame();
    let t = measure(|| encapsulate(black_box(&mut f), src, dst).unwrap());
    println!("| encapsulate, 1400 B | {} ns |", t.as_nanos());
    for vpcs in [1, 10, 100, 1000] {
        let table = table(vpcs, 10);
        let t = measure(|| {
            let v = table.decapsulate(black_box(&f), NodeId(2));
            assert!(matches!(v, Verdict::Deliver { .. }));
        });
        println!(
            "| decapsulate, 1400 B, {vpcs} VPCs on the node | {} ns |",
            t.as_nanos()
        );
    }
    for nodes in [10, 100] {
        let table = table(10, nodes);
        let dst = IpAddr::V4(Ipv4Addr::new(10, 10, 9, 5));
        let t = measure(|| {
            black_box(table.route(VpcId(3), black_box(dst)));
        });
        println!("| route, {nodes} member nodes | {} ns |", t.as_nanos());
    }
    let snap = services(1000);
    let vpc = &snap.vpcs["blue"];
    let node = "n1".parse().unwrap();
    let no_pods = |_: &LabelSelector| Vec::<IpAddr>::new();
    let t = measure(|| {
        black_box(plan(vpc, &node, &no_pods));
    });
    println!(
        "| plan, 1000 services × 3 endpoints | {} µs |",
        t.as_micros()
    );
    let planned = plan(vpc, &node, &no_pods);
    let t = measure(|| {
        black_box(planned.render(Some(&planned)));
    });
    println!(
        "| render, 1000 services × 3 endpoints ({} KiB) | {} µs |",
        planned.render(None).len() / 1024,
        t.as_micros()
    );
}
