//! NAT-to-NAT relay end to end: two nodes behind symmetric NATs, which no
//! simultaneous open gets through, reach each other through a public node, and
//! `wiremesh status` says so. The test bed is in `support`.

mod support;

use std::time::Duration;

use support::{Mesh, Nat};
use wiremesh_testkit::{require_root, wait_until};

/// Datagrams the relay node received on its relay ports, by an nftables counter
/// in its namespace (the underlay's view, not the agent's own count).
fn relay_port_datagrams(mesh: &Mesh, relay: usize) -> u64 {
    let table = mesh.nodes[relay]
        .ns
        .exec_ok(&["nft", "list", "table", "inet", "relaywatch"])
        .expect("the counter table");
    let words: Vec<&str> = table.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "packets")
        .and_then(|w| w[1].parse().ok())
        .expect("a packet counter")
}

#[test]
fn nodes_behind_two_symmetric_nats_reach_each_other_through_a_relay() {
    if !require_root() {
        return;
    }
    let mut mesh = Mesh::new("full", false);
    let nat_x = mesh.add_nat_of(Nat::Symmetric);
    let nat_y = mesh.add_nat_of(Nat::Symmetric);
    let public = mesh.add_node("pub", "cloud", true);
    let x = mesh.add_node_at("x", "home-x", Some(nat_x));
    let y = mesh.add_node_at("y", "home-y", Some(nat_y));
    mesh.nodes[public]
        .ns
        .exec_ok(&[
            "nft",
            "add table inet relaywatch; add chain inet relaywatch in { type filter hook input priority filter; }; add rule inet relaywatch in udp dport 51900-51999 counter",
        ])
        .expect("a counter on the relay ports");
    for i in [public, x, y] {
        mesh.start(i);
    }
    let wg_show = |i: usize| {
        mesh.nodes[i]
            .ns
            .exec_ok(&["wg", "show", &mesh.nodes[i].ifname])
            .unwrap_or_default()
    };
    let started = std::time::Instant::now();
    assert!(
        mesh.eventually_pings(x, y, Duration::from_secs(60)),
        "x and y behind two symmetric NATs never reached each other\nx: {}\ny: {}",
        wg_show(x),
        wg_show(y)
    );
    println!("x reached y after {:?}", started.elapsed());
    assert!(mesh.eventually_pings(y, x, Duration::from_secs(10)));

    // Both ends say the pair goes through the public node.
    for (from, to) in [(x, y), (y, x)] {
        let relayed = wait_until(Duration::from_secs(20), || {
            mesh.path_in_status(from, to).as_deref() == Some("relayed via pub")
        });
        assert!(
            relayed,
            "status of {} -> {}: {:?}\n{}",
            mesh.nodes[from].name,
            mesh.nodes[to].name,
            mesh.path_in_status(from, to),
            String::from_utf8_lossy(&mesh.wiremesh(&["status"]).stdout)
        );
    }
    // x's tunnel to y ends at the public node, on a relay port.
    let endpoints = mesh.wg_endpoints(x);
    assert!(
        endpoints.contains("\t10.99.0.1:519"),
        "x has no tunnel ending at the relay (10.99.0.1:519xx):\n{endpoints}"
    );
    // And the pings really cross the relay: each request and each reply arrives
    // on one of its relay ports.
    let before = relay_port_datagrams(&mesh, public);
    let pings = 5;
    for _ in 0..pings {
        assert!(mesh.ping(x, y), "x -> y through the relay");
    }
    let crossed = relay_port_datagrams(&mesh, public) - before;
    println!("{pings} pings: {crossed} datagrams on the relay's ports");
    assert!(
        crossed >= 2 * pings,
        "{pings} pings, but only {crossed} datagrams reached the relay's ports"
    );
}
