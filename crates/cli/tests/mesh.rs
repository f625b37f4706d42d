//! The mesh end to end on a directory registry: nodes join and leave, a location's
//! leader fails over, a node behind NAT is reached, an agent restarts without loss,
//! malformed records are set aside. The test bed is in `support`.

mod support;

use std::time::Duration;

use support::{Mesh, Pinger};
use wiremesh_testkit::{require_root, wait_until};

#[test]
fn nodes_join_and_leave() {
    if !require_root() {
        return;
    }
    let mut mesh = Mesh::new("full", false);
    for name in ["n1", "n2", "n3"] {
        let i = mesh.add_node(name, "site", true);
        mesh.start(i);
    }
    for (a, b) in [(0, 1), (1, 2), (2, 0), (1, 0)] {
        assert!(
            mesh.eventually_pings(a, b, Duration::from_secs(20)),
            "n{} cannot reach n{}",
            a + 1,
            b + 1
        );
    }
    // A fourth node joins: everyone reaches it.
    let late = mesh.add_node("n4", "site", true);
    mesh.start(late);
    for a in 0..3 {
        assert!(
            mesh.eventually_pings(a, late, Duration::from_secs(20)),
            "n{} cannot reach the new node",
            a + 1
        );
    }
    // n3's agent dies without cleanup; its lease (3 s) ends and every node drops its routes.
    let gone_cidr = std::fs::read_to_string(mesh.state_dir(2).join("pod-cidr"))
        .unwrap()
        .trim()
        .to_owned();
    let mut agent = mesh.nodes[2].agent.take().unwrap();
    agent.kill().unwrap();
    agent.wait().unwrap();
    for i in [0, 1, 3] {
        assert!(
            wait_until(Duration::from_secs(15), || !mesh
                .routes(i)
                .contains(&gone_cidr)),
            "node {} still routes to the departed node's {gone_cidr}:\n{}",
            mesh.nodes[i].name,
            mesh.routes(i)
        );
    }
    assert!(mesh.ping(0, 1), "the remaining nodes still talk");
}

#[test]
fn leader_failover_restores_traffic_between_locations() {
    if !require_root() {
        return;
    }
    let (mut mesh, a1, a2, b1) = Mesh::two_sites();
    // The leader of site-a dies entirely (agent and device): a2 takes over.
    let leader = mesh.nodes.remove(a1);
    drop(leader);
    let (a2, b1) = (a2 - 1, b1 - 1);
    assert!(
        mesh.eventually_pings(a2, b1, Duration::from_secs(30)),
        "traffic between sites did not resume after the leader died"
    );
    assert_eq!(mesh.leader_of("site-a").as_deref(), Some("a2"));
}

#[test]
fn nodes_behind_two_cone_nats_reach_each_other_directly() {
    if !require_root() {
        return;
    }
    let mut mesh = Mesh::new("full", true);
    let second_nat = mesh.add_nat();
    let public = mesh.add_node("pub", "cloud", true);
    let x = mesh.add_node_at("x", "home-x", Some(0));
    let y = mesh.add_node_at("y", "home-y", Some(second_nat));
    for i in [public, x, y] {
        mesh.start(i);
    }
    // Neither can be dialled; the public node sees both NAT mappings and publishes
    // them, each dials the other's mapping, and the two NATs let the flows meet.
    assert!(
        mesh.eventually_pings(x, y, Duration::from_secs(30)),
        "x and y behind two NATs never reached each other\nx: {}\ny: {}",
        mesh.nodes[x]
            .ns
            .exec_ok(&["wg", "show", &mesh.nodes[x].ifname])
            .unwrap_or_default(),
        mesh.nodes[y]
            .ns
            .exec_ok(&["wg", "show", &mesh.nodes[y].ifname])
            .unwrap_or_default(),
    );
    assert!(mesh.eventually_pings(y, x, Duration::from_secs(10)));
    // Direct: x's tunnel to y ends at y's NAT router, not at the public node (in a
    // full mesh nothing relays, so the ping could only have gone this way).
    let endpoints = mesh.wg_endpoints(x);
    assert!(
        endpoints.contains("\t10.99.0.253:"),
        "x has no tunnel ending at y's NAT router (10.99.0.253):\n{endpoints}"
    );
    // And status says so, for both ends.
    for (from, to) in [(x, y), (y, x)] {
        let mut path = None;
        wait_until(Duration::from_secs(15), || {
            path = mesh.path_in_status(from, to);
            path.is_some()
        });
        assert_eq!(
            path.as_deref(),
            Some("direct"),
            "{}",
            String::from_utf8_lossy(&mesh.wiremesh(&["status"]).stdout)
        );
    }
}

#[test]
fn node_behind_nat_is_reached_through_its_discovered_endpoint() {
    if !require_root() {
        return;
    }
    let mut mesh = Mesh::new("full", true);
    let public = mesh.add_node("pub", "cloud", true);
    let edge = mesh.add_node("edge", "edge", false);
    // The public node has no address for the edge node; the edge node dials out
    // with keepalive, and the public node reaches it back through the NAT mapping.
    mesh.start_pair(public, edge);
    let cluster = mesh.cluster();
    let observed = wait_until(Duration::from_secs(15), || {
        let (snapshot, _, _) = cluster.snapshot().unwrap();
        snapshot.nodes.iter().any(|n| {
            n.name.as_str() == "pub"
                && n.observed_endpoints
                    .get(&"edge".parse().unwrap())
                    .map(|e| e.ip().to_string())
                    == Some("10.99.0.254".into())
        })
    });
    assert!(
        observed,
        "the public node did not publish the edge node's NAT address"
    );
}

#[test]
fn agent_restart_loses_no_packets_on_unchanged_tunnels() {
    if !require_root() {
        return;
    }
    let (mut mesh, n1, n2) = Mesh::pair();
    let pinger = Pinger::start(&mesh, n1, n2);
    mesh.stop(n1);
    mesh.start(n1);
    // Let the restarted agent run several reconciles while pings continue.
    let cluster = mesh.cluster();
    assert!(wait_until(Duration::from_secs(15), || cluster
        .statuses()
        .unwrap()
        .iter()
        .filter(|s| s.node == "n1")
        .count()
        == 1));
    let (before, _) = pinger.counts();
    assert!(wait_until(Duration::from_secs(10), || pinger.counts().0 > before + 50));
    let (sent, lost) = pinger.stop();
    assert_eq!(lost, 0, "pings lost across the restart (of {sent})");
    assert!(
        mesh.log(n1).contains("using the running WireGuard device"),
        "the restarted agent kept the device"
    );
}

#[test]
fn malformed_records_are_rejected_and_the_mesh_keeps_working() {
    if !require_root() {
        return;
    }
    let (mesh, n1, n2) = Mesh::pair();
    let cluster = mesh.cluster();
    let prefix = cluster.prefix();
    cluster
        .store
        .put(&format!("{prefix}nodes/garbage"), b"{not json", None)
        .unwrap();
    let bad_key = br#"{"name":"evil","location":"site","public_key":"AAAA","pod_cidr":"10.42.9.0/24","mesh_ip":"100.64.0.99"}"#;
    cluster
        .store
        .put(&format!("{prefix}nodes/evil"), bad_key, None)
        .unwrap();
    // The agents report the records, name the field, and keep forwarding.
    let reported = wait_until(Duration::from_secs(15), || {
        cluster.statuses().unwrap().iter().any(|s| {
            s.rejected
                .iter()
                .any(|r| r.contains("evil") && r.contains("public_key"))
        })
    });
    assert!(
        reported,
        "no agent reported the bad public_key; statuses: {:?}",
        cluster.statuses().unwrap()
    );
    assert!(
        mesh.ping(n1, n2) || mesh.eventually_pings(n1, n2, Duration::from_secs(3)),
        "the mesh stopped working"
    );
    let status = mesh.wiremesh(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("REJECTED RECORDS") && text.contains("public_key"),
        "{text}"
    );
}

/// A host with IPv6 switched off cannot take the mesh ULA routes the agent installs
/// for VPC traffic: the mesh's IPv4 must still come up whole, firewall included.
#[test]
fn a_node_without_ipv6_still_joins_the_mesh() {
    if !require_root() {
        return;
    }
    let (mut mesh, n1, n2) = Mesh::two_nodes();
    mesh.nodes[n2]
        .ns
        .exec_ok(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])
        .expect("switch IPv6 off");
    mesh.nodes[n2]
        .ns
        .exec_ok(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])
        .expect("switch IPv6 off");
    mesh.start(n1);
    mesh.start(n2);
    for (from, to) in [(n1, n2), (n2, n1)] {
        assert!(
            mesh.eventually_pings(from, to, Duration::from_secs(20)),
            "{from} -> {to} over IPv4 with IPv6 off on n2:\n{}",
            mesh.log(n2)
        );
    }
    // Its reconciles go through (the firewall is applied after the routes), and say
    // why the IPv6 routes are missing.
    assert!(
        wait_until(Duration::from_secs(10), || mesh.nodes[n2]
            .ns
            .exec_ok(&["nft", "list", "table", "inet", "wiremesh"])
            .is_ok()),
        "no firewall on n2:\n{}",
        mesh.log(n2)
    );
    let log = mesh.log(n2);
    assert!(log.contains("IPv6 is off"), "{log}");
    assert!(!log.contains("reconcile failed"), "{log}");
}
