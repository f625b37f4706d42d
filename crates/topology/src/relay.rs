//! NAT-to-NAT relay: which pairs of nodes cannot reach each other directly, who
//! carries their packets instead, and how a node finds out.
//!
//! Two nodes behind NAT first dial each other at the endpoints a public node
//! observed (simultaneous open); behind cone NATs that works. Behind symmetric NATs
//! it cannot, and no address test predicts which NAT is which, so the agent judges
//! by outcome ([`DirectWatch`]): an endpoint tried for [`DIRECT_ATTEMPT_SECS`] with
//! no handshake puts the peer in the node's [`Node::unreachable_direct`]. Every node
//! then derives the same relay for the pair from the snapshot ([`relayed_pairs`]).
//! The relay is a public node that forwards the pair's WireGuard datagrams between
//! two UDP ports of its own, one facing each end (published in its
//! [`Node::relay_ports`]), like a TURN server: the tunnel stays end to end, the relay
//! sees only ciphertext.
//!
//! A relayed pair stays relayed while both nodes are in the snapshot: there is no
//! upgrade back to the direct path yet.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use wiremesh_model::{Node, NodeName, NodePair};

use crate::{leaders, Snapshot};

/// How long a node tries a peer's direct endpoint before calling it unreachable:
/// three handshake attempts (REKEY_TIMEOUT is 5 s, whitepaper §6.4).
pub const DIRECT_ATTEMPT_SECS: u64 = 15;
/// A handshake younger than this means a live session (REJECT_AFTER_TIME,
/// whitepaper §6.1).
pub const SESSION_SECS: u64 = 180;

/// How the traffic between two nodes travels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Path {
    Direct,
    /// Through the relay node `via`.
    Relayed {
        via: NodeName,
    },
    /// A relay is wanted, but no node has a public endpoint: the pair stays direct.
    NoRelay,
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Direct => f.write_str("direct"),
            Path::Relayed { via } => write!(f, "relayed via {via}"),
            Path::NoRelay => f.write_str("direct (no relay available)"),
        }
    }
}

/// The path between nodes `a` and `b` in `snapshot`: relayed iff either reports
/// the other unreachable directly, through the node [`relay_for`] picks.
pub fn path(snapshot: &Snapshot, a: &NodeName, b: &NodeName) -> Path {
    let node = |name: &NodeName| snapshot.nodes.iter().find(|n| &n.name == name);
    let (Some(na), Some(nb)) = (node(a), node(b)) else {
        return Path::Direct;
    };
    if !wants_relay(na, nb) {
        return Path::Direct;
    }
    match relay_for(snapshot, &leaders(snapshot), na, nb) {
        Some(via) => Path::Relayed {
            via: via.name.clone(),
        },
        None => Path::NoRelay,
    }
}

/// Every relayed pair of the snapshot and its relay.
pub fn relayed_pairs(snapshot: &Snapshot) -> BTreeMap<NodePair, NodeName> {
    let leaders = leaders(snapshot);
    let mut pairs = BTreeMap::new();
    for a in &snapshot.nodes {
        for name in &a.unreachable_direct {
            let Some(b) = snapshot.nodes.iter().find(|n| &n.name == name) else {
                continue;
            };
            let Some(pair) = NodePair::new(a.name.clone(), b.name.clone()) else {
                continue;
            };
            if let Some(relay) = relay_for(snapshot, &leaders, a, b) {
                pairs.insert(pair, relay.name.clone());
            }
        }
    }
    pairs
}

/// The pairs `relay` serves.
pub fn served_by(snapshot: &Snapshot, relay: &NodeName) -> BTreeSet<NodePair> {
    relayed_pairs(snapshot)
        .into_iter()
        .filter(|(_, via)| via == relay)
        .map(|(pair, _)| pair)
        .collect()
}

/// Where `me` sends to `peer` when their pair is relayed and the relay has
/// published its ports: the relay's public address, at the port facing `me`.
pub(crate) fn relay_endpoint(
    relays: &BTreeMap<NodePair, NodeName>,
    nodes: &[&Node],
    me: &NodeName,
    peer: &NodeName,
) -> Option<SocketAddr> {
    let pair = NodePair::new(me.clone(), peer.clone())?;
    let relay = nodes.iter().find(|n| Some(&n.name) == relays.get(&pair))?;
    let ports = relay.relay_ports.get(&pair)?;
    let ip = relay.public_endpoint?.ip();
    Some(SocketAddr::new(ip, ports[pair.side_of(me)?]))
}

fn wants_relay(a: &Node, b: &Node) -> bool {
    a.unreachable_direct.contains(&b.name) || b.unreachable_direct.contains(&a.name)
}

/// The relay of `a` and `b`: a node with a public endpoint other than the two,
/// a leader of either's location first, then the lowest name.
fn relay_for<'a>(
    snapshot: &'a Snapshot,
    leaders: &BTreeMap<wiremesh_model::Location, NodeName>,
    a: &Node,
    b: &Node,
) -> Option<&'a Node> {
    let their_leaders = [&a.location, &b.location].map(|l| leaders.get(l));
    snapshot
        .nodes
        .iter()
        .filter(|n| !n.behind_nat() && n.name != a.name && n.name != b.name)
        .min_by_key(|n| (!their_leaders.contains(&Some(&n.name)), &n.name))
}

/// What the device says about one peer: where it sends, and its last handshake
/// (unix seconds, 0 for never).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectAttempt {
    pub endpoint: Option<SocketAddr>,
    pub last_handshake: u64,
}

/// Since when this node has been trying each NATed peer's direct endpoint without
/// a session: the failure-based detector behind [`Node::unreachable_direct`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirectWatch {
    since: BTreeMap<NodeName, (SocketAddr, u64)>,
}

impl DirectWatch {
    /// `me`'s next `unreachable_direct`, given what its device reports per peer
    /// (`device`, by node name) at unix second `now`. Only NATed nodes of other
    /// locations count, and only while `me` is behind NAT too: anyone can dial a
    /// public node. A peer stays in the set while it is in the snapshot.
    pub fn update(
        &mut self,
        snapshot: &Snapshot,
        me: &Node,
        device: &BTreeMap<NodeName, DirectAttempt>,
        now: u64,
    ) -> BTreeSet<NodeName> {
        let present: BTreeSet<&NodeName> = snapshot.nodes.iter().map(|n| &n.name).collect();
        let mut unreachable: BTreeSet<NodeName> = me
            .unreachable_direct
            .iter()
            .filter(|n| present.contains(n))
            .cloned()
            .collect();
        let candidates: Vec<&Node> = snapshot
            .nodes
            .iter()
            .filter(|n| {
                me.behind_nat()
                    && n.behind_nat()
                    && n.location != me.location
                    && !unreachable.contains(&n.name)
            })
            .collect();
        let mut since = BTreeMap::new();
        for n in candidates {
            let Some(attempt) = device.get(&n.name) else {
                continue;
            };
            let Some(endpoint) = attempt.endpoint else {
                continue;
            };
            let session = attempt.last_handshake > 0
                && now.saturating_sub(attempt.last_handshake) < SESSION_SECS;
            if session {
                continue;
            }
            let started = match self.since.get(&n.name) {
                Some(&(tried, started)) if tried == endpoint => started,
                _ => now,
            };
            if now.saturating_sub(started) >= DIRECT_ATTEMPT_SECS {
                unreachable.insert(n.name.clone());
            } else {
                since.insert(n.name.clone(), (endpoint, started));
            }
        }
        self.since = since;
        unreachable
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use wiremesh_model::{ClusterSettings, PublicKey};

    fn node(name: &str, location: &str, public: bool, index: u8) -> Node {
        Node {
            name: name.parse().unwrap(),
            location: location.parse().unwrap(),
            public_key: PublicKey([index; 32]),
            public_endpoint: public.then(|| format!("203.0.113.{index}:51820").parse().unwrap()),
            private_endpoint: None,
            pod_cidr: format!("10.42.{index}.0/24").parse().unwrap(),
            pod_cidr_v6: None,
            mesh_ip: format!("100.64.0.{index}").parse().unwrap(),
            persistent_keepalive: None,
            leader_preference: 0,
            observed_endpoints: BTreeMap::new(),
            suspected_leaders: BTreeSet::new(),
            unreachable_direct: BTreeSet::new(),
            relay_ports: BTreeMap::new(),
            last_seen: 0,
        }
    }

    fn snapshot(nodes: Vec<Node>) -> Snapshot {
        Snapshot {
            settings: ClusterSettings::default(),
            nodes,
            peers: Vec::new(),
        }
    }

    fn name(s: &str) -> NodeName {
        s.parse().unwrap()
    }

    /// x and y behind NAT at home; `cloud` has a public leader p2 and a public p3;
    /// p1 is public in a location of its own.
    fn cluster() -> Vec<Node> {
        let mut p2 = node("p2", "cloud", true, 3);
        p2.leader_preference = 1;
        vec![
            node("x", "home-x", false, 1),
            node("y", "cloud", false, 2),
            p2,
            node("p3", "cloud", true, 4),
            node("p1", "dc", true, 5),
        ]
    }

    #[test]
    fn a_pair_is_relayed_when_either_reports_the_other() {
        let mut nodes = cluster();
        let s = snapshot(nodes.clone());
        assert_eq!(path(&s, &name("x"), &name("y")), Path::Direct);
        nodes[1].unreachable_direct.insert(name("x"));
        let s = snapshot(nodes);
        // y's location's leader, p2, before the lower-named p1.
        let via = Path::Relayed { via: name("p2") };
        assert_eq!(path(&s, &name("x"), &name("y")), via);
        assert_eq!(path(&s, &name("y"), &name("x")), via);
        assert_eq!(via.to_string(), "relayed via p2");
        let pair = NodePair::new(name("x"), name("y")).unwrap();
        assert_eq!(
            relayed_pairs(&s),
            BTreeMap::from([(pair.clone(), name("p2"))])
        );
        assert_eq!(served_by(&s, &name("p2")), BTreeSet::from([pair]));
        assert!(served_by(&s, &name("p1")).is_empty());
    }

    #[test]
    fn without_a_public_leader_the_lowest_public_name_relays() {
        let mut nodes = cluster();
        nodes[0].unreachable_direct.insert(name("y"));
        nodes.retain(|n| n.name != name("p2") && n.name != name("p3"));
        nodes[1].location = "home-y".parse().unwrap();
        nodes.push(node("p0", "dc", true, 6));
        let s = snapshot(nodes.clone());
        assert_eq!(
            path(&s, &name("x"), &name("y")),
            Path::Relayed { via: name("p0") }
        );
        nodes.retain(|n| n.behind_nat());
        let s = snapshot(nodes);
        assert_eq!(path(&s, &name("x"), &name("y")), Path::NoRelay);
        assert!(relayed_pairs(&s).is_empty());
        assert_eq!(Path::NoRelay.to_string(), "direct (no relay available)");
    }

    #[test]
    fn each_end_sends_to_the_port_facing_it() {
        let mut nodes = cluster();
        nodes[0].unreachable_direct.insert(name("y"));
        let pair = NodePair::new(name("x"), name("y")).unwrap();
        let s = snapshot(nodes.clone());
        let relays = relayed_pairs(&s);
        let refs: Vec<&Node> = nodes.iter().collect();
        // Not published yet: no relay endpoint.
        assert_eq!(relay_endpoint(&relays, &refs, &name("x"), &name("y")), None);
        nodes[2].relay_ports.insert(pair, [51901, 51902]);
        let refs: Vec<&Node> = nodes.iter().collect();
        let at = |port: u16| Some(SocketAddr::from(([203, 0, 113, 3], port)));
        assert_eq!(
            relay_endpoint(&relays, &refs, &name("x"), &name("y")),
            at(51901)
        );
        assert_eq!(
            relay_endpoint(&relays, &refs, &name("y"), &name("x")),
            at(51902)
        );
        assert_eq!(
            relay_endpoint(&relays, &refs, &name("x"), &name("p1")),
            None
        );
    }

    #[test]
    fn the_watch_reports_an_endpoint_without_handshake_after_the_bound() {
        let mut nodes = cluster();
        nodes[1].location = "home-y".parse().unwrap();
        let s = snapshot(nodes.clone());
        let mut watch = DirectWatch::default();
        let tried = |endpoint: &str, last_handshake| {
            BTreeMap::from([(
                name("y"),
                DirectAttempt {
                    endpoint: Some(endpoint.parse().unwrap()),
                    last_handshake,
                },
            )])
        };
        let first = tried("198.51.100.9:4000", 0);
        assert!(watch.update(&s, &nodes[0], &first, 100).is_empty());
        assert!(watch.update(&s, &nodes[0], &first, 114).is_empty());
        // A new endpoint starts a new attempt.
        let second = tried("198.51.100.9:4001", 0);
        assert!(watch.update(&s, &nodes[0], &second, 114).is_empty());
        assert!(watch.update(&s, &nodes[0], &second, 128).is_empty());
        let unreachable = watch.update(&s, &nodes[0], &second, 129);
        assert_eq!(unreachable, BTreeSet::from([name("y")]));
        // Sticky: the relay's session does not take it back.
        nodes[0].unreachable_direct = unreachable;
        let relayed = tried("203.0.113.3:51901", 129);
        assert_eq!(
            watch.update(&s, &nodes[0], &relayed, 400),
            BTreeSet::from([name("y")])
        );
        // Until y leaves the cluster.
        let gone = snapshot(
            nodes
                .iter()
                .filter(|n| n.name != name("y"))
                .cloned()
                .collect(),
        );
        assert!(watch.update(&gone, &nodes[0], &relayed, 401).is_empty());
    }

    #[test]
    fn the_watch_ignores_live_sessions_public_nodes_and_its_own_location() {
        let nodes = cluster();
        let s = snapshot(nodes.clone());
        let attempt = |last_handshake| DirectAttempt {
            endpoint: Some("198.51.100.9:4000".parse().unwrap()),
            last_handshake,
        };
        let device = BTreeMap::from([(name("y"), attempt(0)), (name("p1"), attempt(0))]);
        let mut watch = DirectWatch::default();
        // x moved to y's location: y shares it, p1 is public; neither counts.
        let mut local = nodes[0].clone();
        local.location = "cloud".parse().unwrap();
        for now in [0, 100] {
            assert!(watch.update(&s, &local, &device, now).is_empty());
        }
        let live = BTreeMap::from([(name("y"), attempt(50))]);
        for now in [0, 100] {
            assert!(watch.update(&s, &nodes[0], &live, now).is_empty());
        }
        // A public node never asks for a relay.
        for now in [0, 100] {
            assert!(watch.update(&s, &nodes[2], &device, now).is_empty());
        }
    }

    proptest! {
        /// Every node computes the same relays, whatever the order of the snapshot;
        /// a relay is a public node other than the pair's two.
        #[test]
        fn relays_agree_and_are_public(
            public in proptest::collection::vec(any::<bool>(), 2..8),
            reports in proptest::collection::vec((0usize..8, 0usize..8), 0..10),
            rotate in 0usize..8,
        ) {
            let mut nodes: Vec<Node> = public
                .iter()
                .enumerate()
                .map(|(i, &p)| node(&format!("n{i}"), &format!("l{}", i % 3), p, i as u8 + 1))
                .collect();
            for (a, b) in reports {
                let (a, b) = (a % nodes.len(), b % nodes.len());
                let b_name = nodes[b].name.clone();
                nodes[a].unreachable_direct.insert(b_name);
            }
            let pairs = relayed_pairs(&snapshot(nodes.clone()));
            let mut rotated = nodes.clone();
            rotated.rotate_left(rotate % nodes.len());
            prop_assert_eq!(&relayed_pairs(&snapshot(rotated)), &pairs);
            let s = snapshot(nodes.clone());
            for (pair, via) in &pairs {
                let relay = nodes.iter().find(|n| &n.name == via).unwrap();
                prop_assert!(!relay.behind_nat());
                prop_assert!(pair.side_of(via).is_none());
                prop_assert_eq!(
                    path(&s, pair.first(), pair.second()),
                    path(&s, pair.second(), pair.first())
                );
            }
        }
    }
}
