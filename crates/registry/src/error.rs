//! The registry's one error type.
//!
//! Callers mostly care about three cases: the store is unreachable (retry later),
//! a lease is gone (grant a new one and rewrite the records), and watch history is
//! gone (list again). Each has its own variant; the rest says what broke and where.

use std::io;
use std::path::PathBuf;

use crate::{LeaseId, Revision};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend could not be reached or did not answer; worth retrying.
    #[error("registry unavailable: {reason}")]
    Unavailable { reason: String },

    /// The backend understood the request and said no: authentication,
    /// permissions, a server-side limit.
    #[error("registry refused the request: {reason}")]
    Refused { reason: String },

    #[error("lease {0} not found: it expired or was revoked")]
    LeaseNotFound(LeaseId),

    /// The watch's history no longer reaches back to `requested`.
    #[error(
        "cannot watch from revision {requested}: history up to revision {compacted} was compacted; list again"
    )]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },

    /// The watch's backend side stopped without saying why (its thread or task ended).
    #[error("watch ended")]
    WatchClosed,

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Stored data that cannot be read back; names the file or key.
    #[error("registry data at {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },

    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}
