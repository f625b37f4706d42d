//! One node's share of the mesh: its WireGuard interface, peers and routes.
//!
//! [`compute`] is the heart of wiremesh. Every node runs it on the same snapshot,
//! so the configurations agree with each other by construction: if `a` lists `b`
//! as a peer for some prefixes, `b` lists `a` for the prefixes `a` sends from.
//! WireGuard's cryptokey routing needs exactly that: a packet is accepted only
//! from the peer whose allowed IPs contain its source address.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::Serialize;
use wiremesh_model::{
    ClusterSettings, ExternalPeer, Granularity, Location, Node, NodeName, PublicKey,
    DEFAULT_NAT_KEEPALIVE_SECS,
};
use wiremesh_vpc::wire::MeshPrefix;

use crate::relay::{relay_endpoint, relayed_pairs};
use crate::{leaders, Snapshot};

/// Everything one node should have configured, sorted so that equal topologies
/// compare (and diff) equal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Topology {
    pub this: NodeName,
    pub leaders: BTreeMap<Location, NodeName>,
    pub interface: Interface,
    /// Sorted by public key; one entry per WireGuard peer of this node.
    pub peers: Vec<Peer>,
    /// Sorted and deduplicated.
    pub routes: Vec<Route>,
}

/// The node's WireGuard interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Interface {
    /// The node's mesh IP with the mesh CIDR's prefix length, so the kernel routes
    /// the whole mesh CIDR out of the interface.
    pub address: IpNet,
    pub listen_port: u16,
    pub mtu: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerKind {
    Node,
    External,
}

/// One WireGuard peer of this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Peer {
    /// The node's or external peer's name, for people and logs; `kind` says which.
    pub name: String,
    pub kind: PeerKind,
    pub public_key: PublicKey,
    /// `None` when the peer has no known address: it dials in, and WireGuard's
    /// roaming learns where from.
    pub endpoint: Option<SocketAddr>,
    /// Sorted and deduplicated.
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Route {
    /// Out of the WireGuard interface; the peer is chosen by allowed IPs.
    Tunnel { dst: IpNet },
    /// Unencrypted over the location's private network, to a node of the same
    /// location (only with `trust_location_network`).
    Gateway { dst: IpNet, via: IpAddr },
}

impl Route {
    pub fn dst(&self) -> IpNet {
        match self {
            Route::Tunnel { dst } | Route::Gateway { dst, .. } => *dst,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    #[error("node {name} is not in the snapshot (is its lease expired?)")]
    UnknownNode { name: NodeName },
    #[error("external peer {name} is not in the registry")]
    UnknownPeer { name: wiremesh_model::PeerName },
    #[error("node name {name} is used by more than one node")]
    DuplicateNode { name: NodeName },
    #[error("public key {public_key} is used by both {first} and {second}")]
    DuplicatePublicKey {
        public_key: PublicKey,
        first: String,
        second: String,
    },
    #[error("{first}'s {first_prefix} overlaps {second}'s {second_prefix}")]
    OverlappingPrefixes {
        first: String,
        first_prefix: IpNet,
        second: String,
        second_prefix: IpNet,
    },
    #[error("node {name}'s mesh_ip {mesh_ip} is outside the mesh CIDR {mesh_cidr}")]
    MeshIpOutsideMeshCidr {
        name: NodeName,
        mesh_ip: IpAddr,
        mesh_cidr: IpNet,
    },
}

/// The topology of node `this` in `snapshot`.
///
/// With [`Granularity::Full`] every node peers with every other node and every
/// external peer. With [`Granularity::Location`] a node peers with the nodes of
/// its own location (over their private endpoints) and sends everything else to
/// its leader; leaders peer with each other and with the external peers.
/// `trust_location_network` matters only with `Location`; `Full` asks for a
/// tunnel between every pair of nodes (in Kilo, full granularity likewise makes
/// every node a location of its own).
///
/// Fails if `this` is not in the snapshot, or if the snapshot is inconsistent
/// (duplicate names or keys, overlapping prefixes): WireGuard could not route
/// such a mesh unambiguously, and every node would fail alike rather than each
/// guessing differently.
pub fn compute(snapshot: &Snapshot, this: &NodeName) -> Result<Topology, TopologyError> {
    validate(snapshot)?;
    let settings = &snapshot.settings;
    // Sorted by name so that every "first" below (e.g. the observer of an endpoint)
    // is independent of the registry's order.
    let mut nodes: Vec<&Node> = snapshot.nodes.iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let me = *nodes
        .iter()
        .find(|n| &n.name == this)
        .ok_or_else(|| TopologyError::UnknownNode { name: this.clone() })?;
    if !settings.mesh_cidr.contains(&me.mesh_ip) {
        return Err(TopologyError::MeshIpOutsideMeshCidr {
            name: me.name.clone(),
            mesh_ip: me.mesh_ip,
            mesh_cidr: settings.mesh_cidr,
        });
    }
    let leaders = leaders(snapshot);
    let mut plan = Plan {
        me,
        nodes: &nodes,
        relays: relayed_pairs(snapshot),
        peers: BTreeMap::new(),
        gateways: Vec::new(),
    };

    match settings.granularity {
        Granularity::Full => {
            for m in nodes.iter().filter(|m| m.name != me.name) {
                plan.node_peer(m, mesh_prefixes(settings, m));
            }
            for e in &snapshot.peers {
                plan.external_peer(e);
            }
        }
        Granularity::Location => {
            let trusted = settings.trust_location_network;
            for m in nodes
                .iter()
                .filter(|m| m.name != me.name && m.location == me.location)
            {
                match gateway_between(trusted, me, m) {
                    Some(via) => plan.gateway(m, mesh_prefixes(settings, m), via),
                    None => plan.node_peer(m, mesh_prefixes(settings, m)),
                }
            }
            let my_leader = &leaders[&me.location];
            if my_leader == &me.name {
                for (location, leader) in leaders.iter().filter(|(l, _)| **l != me.location) {
                    let leader = node_named(&nodes, leader);
                    let prefixes = nodes
                        .iter()
                        .filter(|n| &n.location == location)
                        .flat_map(|n| mesh_prefixes(settings, n));
                    plan.node_peer(leader, prefixes);
                }
                for e in &snapshot.peers {
                    plan.external_peer(e);
                }
            } else {
                // A follower sends everything outside its location to its leader.
                let leader = node_named(&nodes, my_leader);
                let remote = nodes
                    .iter()
                    .filter(|n| n.location != me.location)
                    .flat_map(|n| mesh_prefixes(settings, n));
                let external = snapshot
                    .peers
                    .iter()
                    .flat_map(|e| e.allowed_ips.iter().copied());
                let prefixes: Vec<IpNet> = remote.chain(external).collect();
                match gateway_between(trusted, me, leader) {
                    Some(via) => plan.gateway(leader, prefixes, via),
                    None => plan.node_peer(leader, prefixes),
                }
            }
        }
    }

    let mut peers: Vec<Peer> = plan.peers.into_values().collect();
    for p in &mut peers {
        p.allowed_ips.sort();
        p.allowed_ips.dedup();
    }
    let mut routes: Vec<Route> = peers
        .iter()
        .flat_map(|p| p.allowed_ips.iter().map(|&dst| Route::Tunnel { dst }))
        .chain(plan.gateways)
        .collect();
    routes.sort();
    routes.dedup();

    let address = IpNet::new(me.mesh_ip, settings.mesh_cidr.prefix_len())
        .expect("the mesh IP is inside the mesh CIDR, so of the same family");
    Ok(Topology {
        this: me.name.clone(),
        leaders,
        interface: Interface {
            address,
            listen_port: settings.port,
            mtu: settings.mtu,
        },
        peers,
        routes,
    })
}

/// A node's own prefixes: its pod CIDR (both, with dual-stack pods) and its mesh IP
/// as a host prefix.
pub(crate) fn own_prefixes(node: &Node) -> Vec<IpNet> {
    [node.pod_cidr, IpNet::from(node.mesh_ip)]
        .into_iter()
        .chain(node.pod_cidr_v6.map(IpNet::V6))
        .collect()
}

/// What other nodes route to a node: [`own_prefixes`] and, when the cluster has a
/// mesh ULA, the `/64` its VPCs' outer addresses lie in (one per node whatever the
/// number of VPCs). A node whose pod CIDR is no block of the cluster has no node id,
/// hence no `/64`: it hosts no VPC. External peers are never VPC members, so their
/// view ([`crate::external_view`]) leaves the `/64`s out.
pub(crate) fn mesh_prefixes(settings: &ClusterSettings, node: &Node) -> Vec<IpNet> {
    let vpc_net = settings.mesh_ula.and_then(|ula| {
        let id = crate::ipam::node_id(settings, node.pod_cidr).ok()?;
        let prefix = MeshPrefix::new(ula).ok()?;
        Some(IpNet::V6(prefix.node_net(id)))
    });
    own_prefixes(node).into_iter().chain(vpc_net).collect()
}

/// With a trusted location network, two nodes of one location talk in the clear
/// over it, but only if both have a private address: a node without one is still
/// reached through the tunnel, and both sides must agree on that or one would
/// send encrypted packets the other has no peer for.
pub(crate) fn gateway_between(trusted: bool, me: &Node, other: &Node) -> Option<IpAddr> {
    if !trusted || me.location != other.location {
        return None;
    }
    me.private_endpoint?;
    other.private_endpoint.map(|e| e.ip())
}

fn node_named<'a>(nodes: &[&'a Node], name: &NodeName) -> &'a Node {
    nodes
        .iter()
        .find(|n| &n.name == name)
        .expect("leaders are elected from these nodes")
}

/// The peers and gateway routes of one node, being assembled.
struct Plan<'a> {
    me: &'a Node,
    nodes: &'a [&'a Node],
    /// Pairs of nodes carried by a relay, and the relay ([`crate::relay`]).
    relays: BTreeMap<wiremesh_model::NodePair, NodeName>,
    peers: BTreeMap<PublicKey, Peer>,
    gateways: Vec<Route>,
}

impl Plan<'_> {
    /// Add `prefixes` to node `m`'s peer entry, creating it on first use (a
    /// follower's leader gets its own prefixes, then the rest of the world's).
    fn node_peer(&mut self, m: &Node, prefixes: impl IntoIterator<Item = IpNet>) {
        let (me, nodes) = (self.me, self.nodes);
        // Through a relay, keepalive also holds the relay's view of our NAT mapping.
        let relayed = relay_endpoint(&self.relays, nodes, &me.name, &m.name);
        let peer = self.peers.entry(m.public_key).or_insert_with(|| Peer {
            name: m.name.to_string(),
            kind: PeerKind::Node,
            public_key: m.public_key,
            endpoint: relayed.or_else(|| endpoint_of(me, m, nodes)),
            allowed_ips: Vec::new(),
            persistent_keepalive: match (relayed, m.location != me.location) {
                (Some(_), _) => nat_keepalive(me).or(Some(DEFAULT_NAT_KEEPALIVE_SECS)),
                (None, true) => nat_keepalive(me),
                (None, false) => None,
            },
        });
        peer.allowed_ips.extend(prefixes);
    }

    fn external_peer(&mut self, e: &ExternalPeer) {
        let keepalive = nat_keepalive(self.me).or(e.persistent_keepalive);
        self.peers.insert(
            e.public_key,
            Peer {
                name: e.name.to_string(),
                kind: PeerKind::External,
                public_key: e.public_key,
                endpoint: e.endpoint,
                allowed_ips: e.allowed_ips.clone(),
                persistent_keepalive: keepalive,
            },
        );
    }

    /// Routes to `prefixes` via `m`'s private address `via`. A gateway of one family
    /// cannot carry the other's prefixes (IPv6 pods over an IPv4 LAN): those go
    /// through a tunnel to `m`, which by symmetry does the same towards us.
    fn gateway(&mut self, m: &Node, prefixes: impl IntoIterator<Item = IpNet>, via: IpAddr) {
        let (direct, tunnelled): (Vec<IpNet>, Vec<IpNet>) = prefixes
            .into_iter()
            .partition(|dst| dst.network().is_ipv4() == via.is_ipv4());
        self.gateways
            .extend(direct.into_iter().map(|dst| Route::Gateway { dst, via }));
        if !tunnelled.is_empty() {
            self.node_peer(m, tunnelled);
        }
    }
}

/// A node behind NAT keeps its mapping open towards peers outside its location;
/// peers of its own location share its NAT and need none.
fn nat_keepalive(me: &Node) -> Option<u16> {
    me.behind_nat().then(|| {
        me.persistent_keepalive
            .unwrap_or(DEFAULT_NAT_KEEPALIVE_SECS)
    })
}

/// Where `me` sends to `m`: the private endpoint within a location, the public one
/// across locations; failing that the public one, then an endpoint some node has
/// observed `m` sending from (the lowest observer's name, for determinism). `None`
/// leaves it to `m` to dial in.
fn endpoint_of(me: &Node, m: &Node, nodes_by_name: &[&Node]) -> Option<SocketAddr> {
    let same_location = me.location == m.location;
    let direct = if same_location {
        m.private_endpoint.or(m.public_endpoint)
    } else {
        m.public_endpoint
    };
    direct.or_else(|| {
        nodes_by_name
            .iter()
            .filter(|o| o.name != m.name)
            .find_map(|o| o.observed_endpoints.get(&m.name).copied())
    })
}

/// Reject snapshots WireGuard could not route unambiguously. This checks the whole
/// cluster, not just `this`'s peers, so that all nodes fail (or succeed) together.
pub(crate) fn validate(snapshot: &Snapshot) -> Result<(), TopologyError> {
    let mut names: BTreeSet<&NodeName> = BTreeSet::new();
    let mut keys: BTreeMap<PublicKey, String> = BTreeMap::new();
    let mut prefixes: Vec<(IpNet, String)> = Vec::new();
    let mut sorted_nodes: Vec<&Node> = snapshot.nodes.iter().collect();
    sorted_nodes.sort_by(|a, b| a.name.cmp(&b.name));
    for n in &sorted_nodes {
        if !names.insert(&n.name) {
            return Err(TopologyError::DuplicateNode {
                name: n.name.clone(),
            });
        }
    }
    let mut owners: Vec<(String, PublicKey, Vec<IpNet>)> = sorted_nodes
        .iter()
        .map(|n| {
            (
                format!("node {}", n.name),
                n.public_key,
                mesh_prefixes(&snapshot.settings, n),
            )
        })
        .collect();
    let mut externals: Vec<&ExternalPeer> = snapshot.peers.iter().collect();
    externals.sort_by(|a, b| (&a.name, a.public_key).cmp(&(&b.name, b.public_key)));
    owners.extend(externals.iter().map(|e| {
        (
            format!("peer {}", e.name),
            e.public_key,
            e.allowed_ips.clone(),
        )
    }));

    for (owner, key, nets) in owners {
        if let Some(first) = keys.get(&key) {
            return Err(TopologyError::DuplicatePublicKey {
                public_key: key,
                first: first.clone(),
                second: owner,
            });
        }
        keys.insert(key, owner.clone());
        prefixes.extend(nets.into_iter().map(|n| (n.trunc(), owner.clone())));
    }

    // Prefixes either nest or are disjoint. In order of start address (bigger first
    // on a tie) each prefix's enclosing prefixes form a stack, so one pass finds any
    // prefix inside another owner's.
    prefixes.sort_by(|(a, oa), (b, ob)| {
        (family(a), start(a), a.prefix_len(), oa).cmp(&(family(b), start(b), b.prefix_len(), ob))
    });
    let mut stack: Vec<&(IpNet, String)> = Vec::new();
    for item in &prefixes {
        while stack
            .last()
            .is_some_and(|(outer, _)| !outer.contains(&item.0))
        {
            stack.pop();
        }
        if let Some((outer, outer_owner)) = stack.iter().find(|(_, o)| *o != item.1) {
            return Err(TopologyError::OverlappingPrefixes {
                first: outer_owner.clone(),
                first_prefix: *outer,
                second: item.1.clone(),
                second_prefix: item.0,
            });
        }
        stack.push(item);
    }
    Ok(())
}

fn family(net: &IpNet) -> u8 {
    match net {
        IpNet::V4(_) => 4,
        IpNet::V6(_) => 6,
    }
}

fn start(net: &IpNet) -> u128 {
    match net.network() {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}
