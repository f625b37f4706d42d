//! wiremesh's registry: where the nodes of a cluster find each other.
//!
//! Agents keep JSON records under keys such as `wiremesh/<cluster>/nodes/<name>` and
//! need four things from the place they keep them: plain reads and writes, leases
//! (a node's record vanishes when its agent stops renewing it), change notification
//! (watch), and compare-and-swap (pod-CIDR allocation, leader claims). [`Store`] is
//! that contract. It mirrors etcd v3 one to one — a single revision counter for the
//! whole store, `mod_revision` per key, leases that delete their keys, watches that
//! resume from a revision and report compaction — so the etcd backend is a thin
//! translation and every other backend is held to etcd's semantics by one
//! conformance suite ([`conformance`]).
//!
//! Backends:
//! - [`EmbeddedStore`]: a directory on one host, shared by several processes through
//!   a lock file; for single-host clusters and tests, with no server to run.
//! - `EtcdStore` (feature `etcd`): an etcd v3 cluster, for everything else.
//!
//! [`Address`] parses the `--registry` string that picks a backend and opens it.
//!
//! The API is blocking: the agent is a std-thread event loop, and a watch delivers
//! on a [`std::sync::mpsc`] channel ([`Watch`]).

mod address;
pub mod conformance;
mod embedded;
mod error;
#[cfg(feature = "etcd")]
mod etcd;
mod etcd_options;
mod store;
mod watch;

pub use address::Address;
pub use embedded::{EmbeddedOptions, EmbeddedStore};
pub use error::StoreError;
#[cfg(feature = "etcd")]
pub use etcd::EtcdStore;
pub use etcd_options::{EtcdOptions, EtcdTls};
pub use store::{Event, KeyValue, LeaseId, Revision, Store};
pub use watch::{Watch, WatchBatch, WatchSender};
