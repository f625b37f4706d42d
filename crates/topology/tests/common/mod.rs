//! Shared fixtures for the topology tests: a cluster of three locations with two
//! nodes each, one of them behind NAT, and a compact text form of a topology that
//! table tests compare against.

#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;

use ipnet::IpNet;
use wiremesh_model::{ClusterSettings, ExternalPeer, Granularity, Node, PublicKey};
use wiremesh_topology::{Route, Snapshot, Topology};

/// `name location public private key-byte`; mesh IP and pod CIDR follow the key byte.
pub fn node(
    name: &str,
    location: &str,
    public: Option<&str>,
    private: Option<&str>,
    index: u8,
) -> Node {
    Node {
        name: name.parse().unwrap(),
        location: location.parse().unwrap(),
        public_key: PublicKey([index; 32]),
        public_endpoint: public.map(|s| s.parse().unwrap()),
        private_endpoint: private.map(|s| s.parse().unwrap()),
        pod_cidr: format!("10.42.{index}.0/24").parse().unwrap(),
        pod_cidr_v6: None,
        mesh_ip: format!("100.64.0.{index}").parse().unwrap(),
        persistent_keepalive: None,
        leader_preference: 0,
        observed_endpoints: BTreeMap::new(),
        suspected_leaders: Default::default(),
        unreachable_direct: Default::default(),
        relay_ports: Default::default(),
        last_seen: 0,
    }
}

pub fn laptop() -> ExternalPeer {
    ExternalPeer {
        name: "laptop".parse().unwrap(),
        public_key: PublicKey([200; 32]),
        allowed_ips: vec!["172.16.99.1/32".parse().unwrap()],
        endpoint: None,
        persistent_keepalive: Some(15),
    }
}

/// Three locations of two nodes: `cloud-a` and `cloud-b` with public endpoints,
/// `home` behind one NAT (h2 asks for a 10 s keepalive); a1 has observed h1's
/// NAT mapping. Plus one external peer, a laptop.
pub fn three_sites(granularity: Granularity) -> Snapshot {
    let mut nodes = vec![
        node(
            "a1",
            "cloud-a",
            Some("203.0.113.1:51820"),
            Some("10.1.0.1:51820"),
            1,
        ),
        node(
            "a2",
            "cloud-a",
            Some("203.0.113.2:51820"),
            Some("10.1.0.2:51820"),
            2,
        ),
        node(
            "b1",
            "cloud-b",
            Some("198.51.100.1:51820"),
            Some("10.2.0.1:51820"),
            3,
        ),
        node(
            "b2",
            "cloud-b",
            Some("198.51.100.2:51820"),
            Some("10.2.0.2:51820"),
            4,
        ),
        node("h1", "home", None, Some("192.168.1.1:51820"), 5),
        node("h2", "home", None, Some("192.168.1.2:51820"), 6),
    ];
    nodes[0]
        .observed_endpoints
        .insert("h1".parse().unwrap(), "198.18.0.7:40000".parse().unwrap());
    nodes[5].persistent_keepalive = Some(10);
    Snapshot {
        settings: ClusterSettings {
            granularity,
            ..ClusterSettings::default()
        },
        nodes,
        peers: vec![laptop()],
    }
}

/// One line per peer, then one per gateway route. Tunnel routes are checked here
/// (they must be exactly the peers' allowed IPs) rather than listed.
pub fn render(t: &Topology) -> String {
    let mut tunnel: Vec<IpNet> = t.peers.iter().flat_map(|p| p.allowed_ips.clone()).collect();
    tunnel.sort();
    tunnel.dedup();
    let listed: Vec<IpNet> = t
        .routes
        .iter()
        .filter_map(|r| {
            if let Route::Tunnel { dst } = r {
                Some(*dst)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(
        listed, tunnel,
        "tunnel routes must be the peers' allowed IPs"
    );

    let mut out = format!(
        "interface {} port {} mtu {}\n",
        t.interface.address, t.interface.listen_port, t.interface.mtu
    );
    let leaders: Vec<String> = t.leaders.iter().map(|(l, n)| format!("{l}={n}")).collect();
    let _ = writeln!(out, "leaders {}", leaders.join(" "));
    for p in &t.peers {
        let endpoint = p
            .endpoint
            .map_or("-".to_string(), |e: SocketAddr| e.to_string());
        let keepalive = p
            .persistent_keepalive
            .map_or("-".to_string(), |k| k.to_string());
        let allowed: Vec<String> = p.allowed_ips.iter().map(|n| n.to_string()).collect();
        let _ = writeln!(
            out,
            "peer {:?} {} endpoint {endpoint} keepalive {keepalive} allowed {}",
            p.kind,
            p.name,
            allowed.join(" ")
        );
    }
    for r in &t.routes {
        if let Route::Gateway { dst, via } = r {
            let _ = writeln!(out, "gateway {dst} via {via}");
        }
    }
    out
}
