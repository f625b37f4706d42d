//! The external peer's view mirrors the nodes' view of it.

mod common;

use common::{laptop, three_sites};
use wiremesh_model::Granularity;
use wiremesh_topology::{compute, external_view, gateways};

#[test]
fn external_view_mirrors_the_nodes_that_peer_with_it() {
    for granularity in [Granularity::Full, Granularity::Location] {
        let snapshot = three_sites(granularity);
        let laptop = laptop();
        let view = external_view(&snapshot, &laptop.name).unwrap();
        // Exactly the nodes that list the laptop as their peer.
        let mut peering: Vec<String> = snapshot
            .nodes
            .iter()
            .filter(|n| {
                compute(&snapshot, &n.name)
                    .unwrap()
                    .peers
                    .iter()
                    .any(|p| p.public_key == laptop.public_key)
            })
            .map(|n| n.name.to_string())
            .collect();
        let mut listed: Vec<String> = view.iter().map(|p| p.name.clone()).collect();
        peering.sort();
        listed.sort();
        assert_eq!(listed, peering, "{granularity}");
        // Every node's pod CIDR is routed to exactly one of them.
        for n in &snapshot.nodes {
            let holders = view
                .iter()
                .filter(|p| p.allowed_ips.contains(&n.pod_cidr))
                .count();
            assert_eq!(
                holders, 1,
                "{granularity}: {} is carried by {holders} peers",
                n.pod_cidr
            );
        }
    }
}

#[test]
fn unknown_peer_is_an_error() {
    let snapshot = three_sites(Granularity::Full);
    assert!(external_view(&snapshot, &"nobody".parse().unwrap()).is_err());
}

/// Another cluster's nodes see this one as an external peer without a keepalive of
/// its own: the same gateways, and they are there with no external peer at all.
#[test]
fn gateways_are_the_external_view_for_any_outsider() {
    for granularity in [Granularity::Full, Granularity::Location] {
        let mut snapshot = three_sites(granularity);
        let view = external_view(&snapshot, &laptop().name).unwrap();
        snapshot.peers.clear();
        let gateways = gateways(&snapshot).unwrap();
        assert_eq!(gateways.len(), view.len(), "{granularity}");
        for (g, v) in gateways.iter().zip(&view) {
            assert_eq!(
                (&g.name, g.public_key, g.endpoint, &g.allowed_ips),
                (&v.name, v.public_key, v.endpoint, &v.allowed_ips),
                "{granularity}"
            );
            assert_eq!(g.persistent_keepalive, None);
            assert_eq!(v.persistent_keepalive, laptop().persistent_keepalive);
        }
    }
}
