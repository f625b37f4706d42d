//! The VPC `/64`s in the topology: with a mesh ULA every node's peers carry its
//! `<ula>:<node id>::/64` next to its pod CIDR (node id = pod-CIDR block index + 1),
//! routed like the pod CIDR in either granularity; without one, nothing changes.

mod common;

use common::three_sites;
use ipnet::IpNet;
use wiremesh_model::Granularity;
use wiremesh_topology::{compute, external_view, Snapshot};

const ULA: &str = "fd5e:1d2c:9a00::/48";

fn with_ula(granularity: Granularity) -> Snapshot {
    let mut s = three_sites(granularity);
    s.settings.mesh_ula = Some(ULA.parse().unwrap());
    s
}

/// `node: the /64s among its peers' allowed IPs, peer by peer`.
fn vpc_nets(snapshot: &Snapshot, node: &str) -> String {
    let t = compute(snapshot, &node.parse().unwrap()).unwrap();
    t.peers
        .iter()
        .map(|p| {
            let nets: Vec<String> = p
                .allowed_ips
                .iter()
                .filter(|n| matches!(n, IpNet::V6(_)))
                .map(ToString::to_string)
                .collect();
            format!("{} {}", p.name, nets.join(","))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn full_mesh_peers_carry_each_node_s_64() {
    // a1's pod CIDR is 10.42.1.0/24: block 1, node id 2.
    let expect = "\
laptop 
a2 fd5e:1d2c:9a00:3::/64
b1 fd5e:1d2c:9a00:4::/64
b2 fd5e:1d2c:9a00:5::/64
h1 fd5e:1d2c:9a00:6::/64
h2 fd5e:1d2c:9a00:7::/64";
    let text = vpc_nets(&with_ula(Granularity::Full), "a1");
    let mut got: Vec<&str> = text.lines().collect();
    let mut want: Vec<&str> = expect.lines().collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn location_granularity_sends_remote_64s_to_the_leader() {
    let s = with_ula(Granularity::Location);
    // a2 follows a1: its own location's node directly, everything remote via a1.
    let mut got: Vec<String> = vpc_nets(&s, "a2").lines().map(str::to_owned).collect();
    got.sort();
    assert_eq!(
        got,
        ["a1 fd5e:1d2c:9a00:2::/64,fd5e:1d2c:9a00:4::/64,fd5e:1d2c:9a00:5::/64,fd5e:1d2c:9a00:6::/64,fd5e:1d2c:9a00:7::/64"]
    );
    // The leader a1 sends each location's /64s to that location's leader.
    let mut got: Vec<String> = vpc_nets(&s, "a1").lines().map(str::to_owned).collect();
    got.sort();
    assert_eq!(
        got,
        [
            "a2 fd5e:1d2c:9a00:3::/64",
            "b1 fd5e:1d2c:9a00:4::/64,fd5e:1d2c:9a00:5::/64",
            "h1 fd5e:1d2c:9a00:6::/64,fd5e:1d2c:9a00:7::/64",
            "laptop ",
        ]
    );
}

#[test]
fn routes_cover_the_64s_and_external_peers_never_see_them() {
    let s = with_ula(Granularity::Full);
    let t = compute(&s, &"b1".parse().unwrap()).unwrap();
    let h2: IpNet = "fd5e:1d2c:9a00:7::/64".parse().unwrap();
    assert!(t
        .routes
        .iter()
        .any(|r| matches!(r, wiremesh_topology::Route::Tunnel { dst } if *dst == h2)));
    let view = external_view(&s, &"laptop".parse().unwrap()).unwrap();
    assert!(view
        .iter()
        .flat_map(|p| &p.allowed_ips)
        .all(|n| matches!(n, IpNet::V4(_))));
}

#[test]
fn without_a_mesh_ula_nothing_changes() {
    for g in [Granularity::Full, Granularity::Location] {
        let mut with = with_ula(g);
        with.settings.mesh_ula = None;
        assert_eq!(
            compute(&with, &"a1".parse().unwrap()),
            compute(&three_sites(g), &"a1".parse().unwrap())
        );
    }
}
