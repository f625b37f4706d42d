//! The node agent: turns the cluster's registry into this node's WireGuard peers,
//! routes and firewall rules, and keeps them so.
//!
//! One loop owns all state ([`agent::run`]): registry events and a tick come in,
//! the pure core computes the wanted [`wiremesh_topology::Topology`], [`plan`] diffs
//! it against what the host has, and the host adapters apply only the difference.
//! Unchanged peers are never touched, so a restarted agent drops no session.
//!
//! The loop reads and writes the cluster through the [`Registry`] trait: a store
//! ([`Cluster`]: embedded directory or etcd) or the Kubernetes API ([`KubeCluster`]).

pub mod agent;
pub mod cluster;
pub mod device;
pub mod dns;
pub mod firewall;
pub mod keys;
pub mod kube;
pub mod liveness;
pub mod metrics;
pub mod mtu;
pub mod plan;
pub mod prober;
pub mod registry;
pub mod relay;
pub mod underlay;
pub mod vpc;

pub use agent::{run, AgentConfig, AgentError};
pub use cluster::{open_store, open_store_with, Cluster};
pub use kube::KubeCluster;
pub use registry::{
    BadRecord, Change, Changes, Membership, NodeStatus, PeerStatus, Registry, RegistryError,
    ServiceId,
};
