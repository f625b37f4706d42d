//! wiremesh's vocabulary: the things a cluster is made of, as validated types.
//!
//! Everything that enters wiremesh from a registry, a flag or a file is parsed here,
//! once, into types (`PublicKey`, not `String`). A bad record becomes a
//! [`FieldError`] naming the field, and only that record is dropped: one broken node
//! never takes down the mesh. Records travel as JSON in the registry; the `*Record`
//! types are that wire form and the plain types are what the rest of the code uses.

mod error;
mod name;
mod node;
mod peer;
mod settings;

pub use error::FieldError;
pub use name::{Location, NodeName, PeerName};
pub use node::{Node, NodePair, NodeRecord};
pub use peer::{ExternalPeer, ExternalPeerRecord};
pub use settings::{mesh_ula_from, ClusterSettings, ClusterSettingsRecord, Granularity};
pub use wiremesh_uapi::{PrivateKey, PublicKey};

/// Seconds a node waits before it repeats its record (its heartbeat) by default.
pub const DEFAULT_HEARTBEAT_SECS: u64 = 5;
/// A node whose last heartbeat is older than this has left the mesh.
pub const DEFAULT_LEASE_SECS: u64 = 15;
/// Keepalive for nodes behind NAT: often enough for the tightest common NAT timeout (30 s).
pub const DEFAULT_NAT_KEEPALIVE_SECS: u16 = 25;
