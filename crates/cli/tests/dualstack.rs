//! Dual-stack pods over an IPv6-only underlay: two locations (location granularity),
//! nodes that have no IPv4 address on their network at all, pods with an IPv4 and an
//! IPv6 address; every pod reaches every other over both families, within its
//! location and across (through the leaders). (`wiremesh demo --check --underlay ipv6`
//! proves the same with three locations and a NAT66; its namespaces have fixed names,
//! so CI runs it as a step of its own, not as a test here.)

mod support;

use std::net::IpAddr;
use std::time::Duration;

use support::Mesh;
use wiremesh_testkit::{require_root, wait_until};

#[test]
fn dual_stack_pods_over_an_ipv6_underlay() {
    if !require_root() {
        return;
    }
    let mut mesh = Mesh::dual_stack_over_ipv6("location");
    let a1 = mesh.add_node("a1", "site-a", true);
    let a2 = mesh.add_node("a2", "site-a", true);
    let b1 = mesh.add_node("b1", "site-b", true);
    for i in [a1, a2, b1] {
        mesh.start(i);
    }
    let (snapshot, bad, _) = mesh.cluster().snapshot().expect("snapshot");
    assert!(bad.is_empty(), "{bad:?}");
    for node in &snapshot.nodes {
        let v6 = node
            .pod_cidr_v6
            .expect("a dual-stack node publishes pod_cidr_v6");
        assert!(
            node.public_endpoint.is_some_and(|e| e.is_ipv6()),
            "{} has an IPv6 endpoint",
            node.name
        );
        assert_eq!(v6.prefix_len(), 64, "{}", node.name);
    }
    let names = ["a1", "a2", "b1"];
    for from in [a1, a2, b1] {
        for to in [a1, a2, b1].into_iter().filter(|&t| t != from) {
            for dst in [IpAddr::V4(mesh.pod_ip(to)), IpAddr::V6(mesh.pod_ip6(to))] {
                assert!(
                    wait_until(Duration::from_secs(20), || mesh.ping_address(from, dst)),
                    "{}'s pod cannot reach {}'s pod at {dst}\nroutes of {}:\n{}\nlog:\n{}",
                    names[from],
                    names[to],
                    names[from],
                    mesh.routes(from),
                    mesh.log(from)
                );
            }
        }
    }
    // The IPv6 pod routes are the agent's (proto 52), towards the WireGuard interface.
    let routes = mesh.nodes[a2]
        .ns
        .exec_ok(&["ip", "-6", "route", "show", "proto", "52"]);
    let routes = routes.unwrap_or_default();
    let b1_v6 = snapshot
        .nodes
        .iter()
        .find(|n| n.name.as_str() == "b1")
        .and_then(|n| n.pod_cidr_v6)
        .expect("b1's IPv6 block");
    assert!(
        routes.contains(&format!("{b1_v6} dev {}", mesh.nodes[a2].ifname)),
        "a2 routes b1's IPv6 pods into WireGuard:\n{routes}"
    );
}
