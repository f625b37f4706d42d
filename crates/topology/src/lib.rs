//! wiremesh's topology: from a snapshot of the cluster, the WireGuard peers, allowed
//! IPs and routes one node should have, computed as a plain value.
//!
//! This is the "compute" of compute → diff → apply (STYLE.md): given the same
//! [`Snapshot`] every node computes the same [`leaders`] and a [`Topology`] for
//! itself, with no I/O, clock or randomness, so the agent only has to diff it against
//! the host and apply the difference, and `wiremesh graph` ([`render_dot`]) draws
//! exactly what the agents apply. As in Kilo, a cluster is split into locations; with
//! [`Granularity::Location`](wiremesh_model::Granularity) one leader per location
//! carries the tunnels to the other locations, so traffic between sites goes
//! node → own leader → remote leader → node.
//!
//! Architecture invariant: output depends only on the snapshot's contents, never on
//! the order of its nodes or peers; everything is sorted.

mod dot;
mod external;
pub mod ipam;
mod leader;
pub mod relay;
mod topology;

use wiremesh_model::{ClusterSettings, ExternalPeer, Node};

pub use dot::render_dot;
pub use external::{external_view, gateways};
pub use leader::{forwarding_probe, leaders, ForwardingProbe};
pub use topology::{compute, Interface, Peer, PeerKind, Route, Topology, TopologyError};

/// What the registry holds right now: the settings, the live nodes (the agent has
/// already dropped nodes whose lease expired) and the external peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub settings: ClusterSettings,
    pub nodes: Vec<Node>,
    pub peers: Vec<ExternalPeer>,
}
