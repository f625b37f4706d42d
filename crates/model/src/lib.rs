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

/// A node whose last heartbeat is older than this has left the mesh (agents beat
/// every third of it). 10 s: a dead node's service endpoints must leave within 10 s.
pub const DEFAULT_LEASE_SECS: u64 = 10;
/// Keepalive for nodes behind NAT: often enough for the tightest common NAT timeout (30 s).
pub const DEFAULT_NAT_KEEPALIVE_SECS: u16 = 25;
