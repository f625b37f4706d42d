//! Table tests in the Kilo style: one cluster, seen from a leader and from a
//! follower, for each granularity, trusted mode and a leader failover. Each case is
//! the whole topology as text, so a change in behaviour shows as a readable diff.

mod common;

use common::{laptop, node, render, three_sites};
use wiremesh_model::{Granularity, NodeName};
use wiremesh_topology::{
    compute, forwarding_probe, leaders, render_dot, ForwardingProbe, Snapshot, TopologyError,
};

fn name(s: &str) -> NodeName {
    s.parse().unwrap()
}

#[track_caller]
fn check(snapshot: &Snapshot, this: &str, expect: &str) {
    let topology = compute(snapshot, &name(this)).unwrap();
    let got = render(&topology);
    let expect = expect
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    assert_eq!(got, expect, "topology of {this}:\n{got}");
}

#[test]
fn location_seen_from_a_leader() {
    check(
        &three_sites(Granularity::Location),
        "a1",
        "
        interface 100.64.0.1/16 port 51820 mtu 1420
        leaders cloud-a=a1 cloud-b=b1 home=h1
        peer Node a2 endpoint 10.1.0.2:51820 keepalive - allowed 10.42.2.0/24 100.64.0.2/32
        peer Node b1 endpoint 198.51.100.1:51820 keepalive - allowed 10.42.3.0/24 10.42.4.0/24 100.64.0.3/32 100.64.0.4/32
        peer Node h1 endpoint 198.18.0.7:40000 keepalive - allowed 10.42.5.0/24 10.42.6.0/24 100.64.0.5/32 100.64.0.6/32
        peer External laptop endpoint - keepalive 15 allowed 172.16.99.1/32
        ",
    );
}

#[test]
fn location_seen_from_a_follower() {
    check(
        &three_sites(Granularity::Location),
        "b2",
        "
        interface 100.64.0.4/16 port 51820 mtu 1420
        leaders cloud-a=a1 cloud-b=b1 home=h1
        peer Node b1 endpoint 10.2.0.1:51820 keepalive - allowed 10.42.1.0/24 10.42.2.0/24 10.42.3.0/24 10.42.5.0/24 10.42.6.0/24 100.64.0.1/32 100.64.0.2/32 100.64.0.3/32 100.64.0.5/32 100.64.0.6/32 172.16.99.1/32
        ",
    );
}

#[test]
fn location_seen_from_a_leader_behind_nat() {
    // h1 keeps its NAT mapping open towards other sites and the laptop (overriding
    // the laptop's own 15 s), but not towards h2 behind the same NAT.
    check(
        &three_sites(Granularity::Location),
        "h1",
        "
        interface 100.64.0.5/16 port 51820 mtu 1420
        leaders cloud-a=a1 cloud-b=b1 home=h1
        peer Node a1 endpoint 203.0.113.1:51820 keepalive 25 allowed 10.42.1.0/24 10.42.2.0/24 100.64.0.1/32 100.64.0.2/32
        peer Node b1 endpoint 198.51.100.1:51820 keepalive 25 allowed 10.42.3.0/24 10.42.4.0/24 100.64.0.3/32 100.64.0.4/32
        peer Node h2 endpoint 192.168.1.2:51820 keepalive - allowed 10.42.6.0/24 100.64.0.6/32
        peer External laptop endpoint - keepalive 25 allowed 172.16.99.1/32
        ",
    );
}

#[test]
fn location_seen_from_a_follower_behind_nat() {
    check(
        &three_sites(Granularity::Location),
        "h2",
        "
        interface 100.64.0.6/16 port 51820 mtu 1420
        leaders cloud-a=a1 cloud-b=b1 home=h1
        peer Node h1 endpoint 192.168.1.1:51820 keepalive - allowed 10.42.1.0/24 10.42.2.0/24 10.42.3.0/24 10.42.4.0/24 10.42.5.0/24 100.64.0.1/32 100.64.0.2/32 100.64.0.3/32 100.64.0.4/32 100.64.0.5/32 172.16.99.1/32
        ",
    );
}

#[test]
fn full_seen_from_a_node_behind_nat() {
    check(
        &three_sites(Granularity::Full),
        "h2",
        "
        interface 100.64.0.6/16 port 51820 mtu 1420
        leaders cloud-a=a1 cloud-b=b1 home=h1
        peer Node a1 endpoint 203.0.113.1:51820 keepalive 10 allowed 10.42.1.0/24 100.64.0.1/32
        peer Node a2 endpoint 203.0.113.2:51820 keepalive 10 allowed 10.42.2.0/24 100.64.0.2/32
        peer Node b1 endpoint 198.51.100.1:51820 keepalive 10 allowed 10.42.3.0/24 100.64.0.3/32
        peer Node b2 endpoint 198.51.100.2:51820 keepalive 10 allowed 10.42.4.0/24 100.64.0.4/32
        peer Node h1 endpoint 192.168.1.1:51820 keepalive - allowed 10.42.5.0/24 100.64.0.5/32
        peer External laptop endpoint - keepalive 10 allowed 172.16.99.1/32
        ",
    );
}

#[test]
fn full_seen_from_a_public_node() {
    // h1's endpoint is the one a1 observed; nobody has seen h2, so h2 dials in.
    check(
        &three_sites(Granularity::Full),
        "b1",
        "
        interface 100.64.0.3/16 port 51820 mtu 1420
        leaders cloud-a=a1 cloud-b=b1 home=h1
        peer Node a1 endpoint 203.0.113.1:51820 keepalive - allowed 10.42.1.0/24 100.64.0.1/32
        peer Node a2 endpoint 203.0.113.2:51820 keepalive - allowed 10.42.2.0/24 100.64.0.2/32
        peer Node b2 endpoint 10.2.0.2:51820 keepalive - allowed 10.42.4.0/24 100.64.0.4/32
        peer Node h1 endpoint 198.18.0.7:40000 keepalive - allowed 10.42.5.0/24 100.64.0.5/32
        peer Node h2 endpoint - keepalive - allowed 10.42.6.0/24 100.64.0.6/32
        peer External laptop endpoint - keepalive 15 allowed 172.16.99.1/32
        ",
    );
}

fn trusted() -> Snapshot {
    let mut s = three_sites(Granularity::Location);
    s.settings.trust_location_network = true;
    s
}

#[test]
fn trusted_seen_from_a_leader() {
    check(
        &trusted(),
        "a1",
        "
        interface 100.64.0.1/16 port 51820 mtu 1420
        leaders cloud-a=a1 cloud-b=b1 home=h1
        peer Node b1 endpoint 198.51.100.1:51820 keepalive - allowed 10.42.3.0/24 10.42.4.0/24 100.64.0.3/32 100.64.0.4/32
        peer Node h1 endpoint 198.18.0.7:40000 keepalive - allowed 10.42.5.0/24 10.42.6.0/24 100.64.0.5/32 100.64.0.6/32
        peer External laptop endpoint - keepalive 15 allowed 172.16.99.1/32
        gateway 10.42.2.0/24 via 10.1.0.2
        gateway 100.64.0.2/32 via 10.1.0.2
        ",
    );
}

#[test]
fn trusted_seen_from_a_follower() {
    // No WireGuard peer at all: everything goes over the site network to a1.
    check(
        &trusted(),
        "a2",
        "
        interface 100.64.0.2/16 port 51820 mtu 1420
        leaders cloud-a=a1 cloud-b=b1 home=h1
        gateway 10.42.1.0/24 via 10.1.0.1
        gateway 10.42.3.0/24 via 10.1.0.1
        gateway 10.42.4.0/24 via 10.1.0.1
        gateway 10.42.5.0/24 via 10.1.0.1
        gateway 10.42.6.0/24 via 10.1.0.1
        gateway 100.64.0.1/32 via 10.1.0.1
        gateway 100.64.0.3/32 via 10.1.0.1
        gateway 100.64.0.4/32 via 10.1.0.1
        gateway 100.64.0.5/32 via 10.1.0.1
        gateway 100.64.0.6/32 via 10.1.0.1
        gateway 172.16.99.1/32 via 10.1.0.1
        ",
    );
}

#[test]
fn trusted_needs_a_private_address_on_both_sides() {
    // b2 has no private address, so b1 and b2 stay WireGuard peers, both ways.
    let mut s = trusted();
    s.nodes[3].private_endpoint = None;
    check(
        &s,
        "b2",
        "
        interface 100.64.0.4/16 port 51820 mtu 1420
        leaders cloud-a=a1 cloud-b=b1 home=h1
        peer Node b1 endpoint 10.2.0.1:51820 keepalive - allowed 10.42.1.0/24 10.42.2.0/24 10.42.3.0/24 10.42.5.0/24 10.42.6.0/24 100.64.0.1/32 100.64.0.2/32 100.64.0.3/32 100.64.0.5/32 100.64.0.6/32 172.16.99.1/32
        ",
    );
    let b1 = compute(&s, &name("b1")).unwrap();
    let b2 = b1
        .peers
        .iter()
        .find(|p| p.name == "b2")
        .expect("b1 peers with b2");
    assert_eq!(
        b2.endpoint,
        Some("198.51.100.2:51820".parse().unwrap()),
        "falls back to the public endpoint"
    );
}

fn without_a1() -> Snapshot {
    let mut s = three_sites(Granularity::Location);
    s.nodes.retain(|n| n.name.as_str() != "a1");
    s
}

#[test]
fn failover_seen_from_the_new_leader() {
    // a1 observed h1's mapping; with a1 gone nobody knows it and h1 must dial in.
    check(
        &without_a1(),
        "a2",
        "
        interface 100.64.0.2/16 port 51820 mtu 1420
        leaders cloud-a=a2 cloud-b=b1 home=h1
        peer Node b1 endpoint 198.51.100.1:51820 keepalive - allowed 10.42.3.0/24 10.42.4.0/24 100.64.0.3/32 100.64.0.4/32
        peer Node h1 endpoint - keepalive - allowed 10.42.5.0/24 10.42.6.0/24 100.64.0.5/32 100.64.0.6/32
        peer External laptop endpoint - keepalive 15 allowed 172.16.99.1/32
        ",
    );
}

#[test]
fn failover_seen_from_another_leader() {
    check(
        &without_a1(),
        "h1",
        "
        interface 100.64.0.5/16 port 51820 mtu 1420
        leaders cloud-a=a2 cloud-b=b1 home=h1
        peer Node a2 endpoint 203.0.113.2:51820 keepalive 25 allowed 10.42.2.0/24 100.64.0.2/32
        peer Node b1 endpoint 198.51.100.1:51820 keepalive 25 allowed 10.42.3.0/24 10.42.4.0/24 100.64.0.3/32 100.64.0.4/32
        peer Node h2 endpoint 192.168.1.2:51820 keepalive - allowed 10.42.6.0/24 100.64.0.6/32
        peer External laptop endpoint - keepalive 25 allowed 172.16.99.1/32
        ",
    );
}

#[test]
fn election_order() {
    let mut s = three_sites(Granularity::Location);
    // Preference beats everything; a public endpoint beats the name.
    s.nodes[3].leader_preference = 1;
    s.nodes[0].public_endpoint = None;
    let got: Vec<String> = leaders(&s)
        .iter()
        .map(|(l, n)| format!("{l}={n}"))
        .collect();
    assert_eq!(got, ["cloud-a=a2", "cloud-b=b2", "home=h1"]);
    s.nodes[0].leader_preference = 2;
    assert_eq!(leaders(&s)[&"cloud-a".parse().unwrap()], name("a1"));
}

#[test]
fn a_leader_its_location_suspects_loses_the_election() {
    let mut s = three_sites(Granularity::Location);
    s.nodes[0].leader_preference = 5;
    let cloud_a = "cloud-a".parse().unwrap();
    assert_eq!(leaders(&s)[&cloud_a], name("a1"));
    // a2, the only other node of cloud-a, cannot forward through a1: a1 steps down,
    // whatever its preference.
    s.nodes[1].suspected_leaders.insert(name("a1"));
    assert_eq!(leaders(&s)[&cloud_a], name("a2"));
    // Suspicion from another location does not count.
    s.nodes[1].suspected_leaders.clear();
    s.nodes[2].suspected_leaders.insert(name("a1"));
    assert_eq!(leaders(&s)[&cloud_a], name("a1"));
    // With three nodes, one suspicion is not a majority; two are.
    let mut a3 = node("a3", "cloud-a", Some("203.0.113.3:51820"), None, 9);
    a3.suspected_leaders.insert(name("a1"));
    s.nodes.push(a3);
    assert_eq!(leaders(&s)[&cloud_a], name("a1"));
    s.nodes[1].suspected_leaders.insert(name("a1"));
    assert_eq!(leaders(&s)[&cloud_a], name("a2"));
    // Everyone suspected: the usual order decides.
    for i in [1, 6] {
        s.nodes[i].suspected_leaders.insert(name("a2"));
        s.nodes[i].suspected_leaders.insert(name("a3"));
    }
    s.nodes[0]
        .suspected_leaders
        .extend([name("a2"), name("a3")]);
    assert_eq!(leaders(&s)[&cloud_a], name("a1"));
}

#[test]
fn followers_probe_the_other_leaders_through_their_own() {
    let s = three_sites(Granularity::Location);
    // a2 follows a1; the other locations are led by b1 and h1.
    assert_eq!(
        forwarding_probe(&s, &name("a2")),
        Some(ForwardingProbe {
            via: name("a1"),
            targets: vec![s.nodes[2].mesh_ip, s.nodes[4].mesh_ip],
        })
    );
    // Leaders, and every node of a full mesh, send directly: nothing to probe.
    assert_eq!(forwarding_probe(&s, &name("a1")), None);
    assert_eq!(
        forwarding_probe(&three_sites(Granularity::Full), &name("a2")),
        None
    );
    // A single location has no one to reach through its leader.
    let mut one = three_sites(Granularity::Location);
    one.nodes.retain(|n| n.location.as_str() == "cloud-a");
    assert_eq!(forwarding_probe(&one, &name("a2")), None);
}

#[test]
fn errors_name_what_is_wrong() {
    let s = three_sites(Granularity::Location);
    assert_eq!(
        compute(&s, &name("zz")),
        Err(TopologyError::UnknownNode { name: name("zz") })
    );

    let mut dup = s.clone();
    dup.nodes.push(node("c1", "cloud-c", None, None, 1));
    dup.nodes[6].pod_cidr = "10.42.9.0/24".parse().unwrap();
    dup.nodes[6].mesh_ip = "100.64.0.9".parse().unwrap();
    let err = compute(&dup, &name("a1")).unwrap_err();
    assert!(
        matches!(err, TopologyError::DuplicatePublicKey { .. }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "public key {} is used by both node a1 and node c1",
            dup.nodes[0].public_key
        )
    );

    let mut overlap = s.clone();
    let mut greedy = laptop();
    greedy.name = "greedy".parse().unwrap();
    greedy.public_key = wiremesh_model::PublicKey([201; 32]);
    greedy.allowed_ips = vec!["10.42.0.0/16".parse().unwrap()];
    overlap.peers.push(greedy);
    let err = compute(&overlap, &name("a1")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "peer greedy's 10.42.0.0/16 overlaps node a1's 10.42.1.0/24"
    );

    let mut twice = s.clone();
    twice.nodes.push(s.nodes[0].clone());
    assert_eq!(
        compute(&twice, &name("b1")),
        Err(TopologyError::DuplicateNode { name: name("a1") })
    );
}

#[test]
fn serializes_for_status_json() {
    let t = compute(&three_sites(Granularity::Location), &name("b2")).unwrap();
    let json = serde_json::to_value(&t).unwrap();
    assert_eq!(json["this"], "b2");
    assert_eq!(json["leaders"]["home"], "h1");
    assert_eq!(json["peers"][0]["kind"], "node");
    assert_eq!(
        json["routes"][0],
        serde_json::json!({"kind": "tunnel", "dst": "10.42.1.0/24"})
    );
}

#[test]
fn dot_seen_whole() {
    let mut s = three_sites(Granularity::Location);
    s.settings.trust_location_network = true;
    s.nodes.retain(|n| n.location.as_str() != "cloud-b");
    let expect = r#"graph wiremesh {
  label="wiremesh: granularity location, cluster 10.42.0.0/16, mesh 100.64.0.0/16, trusted location networks";
  node [shape=box, style=rounded];
  subgraph "cluster_cloud-a" {
    label="cloud-a";
    "node/a1" [label="a1 (leader)\n10.42.1.0/24\n100.64.0.1\npublic 203.0.113.1:51820\nprivate 10.1.0.1:51820", style="rounded,bold", peripheries=2];
    "node/a2" [label="a2\n10.42.2.0/24\n100.64.0.2\npublic 203.0.113.2:51820\nprivate 10.1.0.2:51820"];
  }
  subgraph "cluster_home" {
    label="home";
    "node/h1" [label="h1 (leader)\n10.42.5.0/24\n100.64.0.5\nbehind NAT\nprivate 192.168.1.1:51820", style="rounded,bold", peripheries=2];
    "node/h2" [label="h2\n10.42.6.0/24\n100.64.0.6\nbehind NAT\nprivate 192.168.1.2:51820"];
  }
  "peer/laptop" [label="laptop (external)\n172.16.99.1/32", shape=ellipse];
  "node/a1" -- "node/h1";
  "node/a1" -- "peer/laptop";
  "node/h1" -- "peer/laptop";
  "node/a1" -- "node/a2" [style=dashed];
  "node/h1" -- "node/h2" [style=dashed];
}
"#;
    assert_eq!(render_dot(&s), expect, "{}", render_dot(&s));
    s.nodes.reverse();
    s.peers.reverse();
    assert_eq!(render_dot(&s), expect);
}

/// `three_sites` with dual-stack pods: each node's IPv6 block has the index of its
/// IPv4 block.
fn dual_stack(granularity: Granularity) -> Snapshot {
    let mut s = three_sites(granularity);
    s.settings.cluster_cidr_v6 = Some("fd42::/48".parse().unwrap());
    for n in &mut s.nodes {
        n.pod_cidr_v6 = wiremesh_topology::ipam::pod_cidr_v6(&s.settings, n.pod_cidr).unwrap();
    }
    s
}

#[test]
fn dual_stack_seen_from_a_leader() {
    check(
        &dual_stack(Granularity::Location),
        "a1",
        "
        interface 100.64.0.1/16 port 51820 mtu 1420
        leaders cloud-a=a1 cloud-b=b1 home=h1
        peer Node a2 endpoint 10.1.0.2:51820 keepalive - allowed 10.42.2.0/24 100.64.0.2/32 fd42:0:0:2::/64
        peer Node b1 endpoint 198.51.100.1:51820 keepalive - allowed 10.42.3.0/24 10.42.4.0/24 100.64.0.3/32 100.64.0.4/32 fd42:0:0:3::/64 fd42:0:0:4::/64
        peer Node h1 endpoint 198.18.0.7:40000 keepalive - allowed 10.42.5.0/24 10.42.6.0/24 100.64.0.5/32 100.64.0.6/32 fd42:0:0:5::/64 fd42:0:0:6::/64
        peer External laptop endpoint - keepalive 15 allowed 172.16.99.1/32
        ",
    );
}

#[test]
fn dual_stack_seen_from_a_follower() {
    check(
        &dual_stack(Granularity::Location),
        "b2",
        "
        interface 100.64.0.4/16 port 51820 mtu 1420
        leaders cloud-a=a1 cloud-b=b1 home=h1
        peer Node b1 endpoint 10.2.0.1:51820 keepalive - allowed 10.42.1.0/24 10.42.2.0/24 10.42.3.0/24 10.42.5.0/24 10.42.6.0/24 100.64.0.1/32 100.64.0.2/32 100.64.0.3/32 100.64.0.5/32 100.64.0.6/32 172.16.99.1/32 fd42:0:0:1::/64 fd42:0:0:2::/64 fd42:0:0:3::/64 fd42:0:0:5::/64 fd42:0:0:6::/64
        ",
    );
}

#[test]
fn dual_stack_trusted_over_an_ipv4_lan_tunnels_ipv6() {
    // The site network is IPv4: IPv4 prefixes take it in the clear, IPv6 pods a
    // tunnel to the same node (a1 sees a2 as a peer for a2's IPv6 block alone).
    let mut s = dual_stack(Granularity::Location);
    s.settings.trust_location_network = true;
    check(
        &s,
        "a1",
        "
        interface 100.64.0.1/16 port 51820 mtu 1420
        leaders cloud-a=a1 cloud-b=b1 home=h1
        peer Node a2 endpoint 10.1.0.2:51820 keepalive - allowed fd42:0:0:2::/64
        peer Node b1 endpoint 198.51.100.1:51820 keepalive - allowed 10.42.3.0/24 10.42.4.0/24 100.64.0.3/32 100.64.0.4/32 fd42:0:0:3::/64 fd42:0:0:4::/64
        peer Node h1 endpoint 198.18.0.7:40000 keepalive - allowed 10.42.5.0/24 10.42.6.0/24 100.64.0.5/32 100.64.0.6/32 fd42:0:0:5::/64 fd42:0:0:6::/64
        peer External laptop endpoint - keepalive 15 allowed 172.16.99.1/32
        gateway 10.42.2.0/24 via 10.1.0.2
        gateway 100.64.0.2/32 via 10.1.0.2
        ",
    );
    check(
        &s,
        "a2",
        "
        interface 100.64.0.2/16 port 51820 mtu 1420
        leaders cloud-a=a1 cloud-b=b1 home=h1
        peer Node a1 endpoint 10.1.0.1:51820 keepalive - allowed fd42:0:0:1::/64 fd42:0:0:3::/64 fd42:0:0:4::/64 fd42:0:0:5::/64 fd42:0:0:6::/64
        gateway 10.42.1.0/24 via 10.1.0.1
        gateway 10.42.3.0/24 via 10.1.0.1
        gateway 10.42.4.0/24 via 10.1.0.1
        gateway 10.42.5.0/24 via 10.1.0.1
        gateway 10.42.6.0/24 via 10.1.0.1
        gateway 100.64.0.1/32 via 10.1.0.1
        gateway 100.64.0.3/32 via 10.1.0.1
        gateway 100.64.0.4/32 via 10.1.0.1
        gateway 100.64.0.5/32 via 10.1.0.1
        gateway 100.64.0.6/32 via 10.1.0.1
        gateway 172.16.99.1/32 via 10.1.0.1
        ",
    );
}
