//! `wiremesh bench edge`: the edge-VPN testbed of Goethals et al. (CNSM 2019) in
//! network namespaces on one host, with every VPN a user could pick side by side.
//!
//! - [`testbed`]: master + workers + pods + a NAT router, joined by a wanem hub.
//! - [`vpn`]: the VPNs under test behind one trait, and the driver list.
//! - [`load`] and [`http`]: the load generator on the master and the pods' server.
//! - [`stats`], [`scenario`], [`report`], [`svg`], [`resources`]: pure parts
//!   (percentiles, the plan, tables, plots, `/proc` parsing).
//! - [`harness`]: the run: bring each VPN up, prove it carries the traffic, measure
//!   every point, write the results.

pub mod harness;
pub mod http;
pub mod load;
pub mod report;
pub mod resources;
pub mod scenario;
pub mod stats;
pub mod svg;
pub mod testbed;
pub mod vpn;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A setting that makes no sense, named by its command-line field.
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("testbed: {what}: {reason}")]
    Testbed { what: String, reason: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("interrupted")]
    Interrupted,
}
