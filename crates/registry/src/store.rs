//! The [`Store`] trait and its vocabulary, modelled on etcd v3.
//!
//! Semantics every backend keeps (the [`conformance`](crate::conformance) suite
//! checks them):
//! - One revision counter for the whole store. Every change that writes or deletes
//!   at least one key raises it by one; reads, failed compare-and-puts, deleting a
//!   missing key and lease grants or keep-alives do not.
//! - A key's `mod_revision` is the revision of its last write.
//! - A key written with a lease is deleted, with a [`Event::Delete`], when the lease
//!   expires or is revoked. Writing a key again without a lease detaches it.
//! - A watch delivers every change under its prefix after a given revision, in
//!   revision order, with none missing and none repeated, or ends with
//!   [`StoreError::Compacted`] when that history is gone (re-list, then re-watch).

use std::fmt;
use std::time::Duration;

use crate::{StoreError, Watch};

/// The store-wide modification counter (etcd's `revision`). 0 is "before anything".
pub type Revision = u64;

/// A lease: keys attached to it live only as long as it is kept alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // etcd prints lease ids in hex; do the same so logs and `etcdctl` agree.
        write!(f, "{:x}", self.0)
    }
}

/// One key and its value, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision of the write that produced this value.
    pub mod_revision: Revision,
    pub lease: Option<LeaseId>,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    /// The key was deleted, explicitly or because its lease ended, at `mod_revision`.
    Delete {
        key: String,
        mod_revision: Revision,
    },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }

    pub fn mod_revision(&self) -> Revision {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// A registry backend. Handles are cheap to share across threads (`Send + Sync`);
/// every method blocks until the backend has answered.
pub trait Store: Send + Sync + 'static {
    /// The key's current value, if any.
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Every key that starts with `prefix`, sorted by key, and the store revision the
    /// listing was taken at: watch from that revision to miss nothing afterwards.
    fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError>;

    /// Writes the key (attached to `lease`, or to no lease) and returns the new
    /// revision. An unknown or expired lease is [`StoreError::LeaseNotFound`].
    fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<Revision, StoreError>;

    /// Atomic: writes only if the key's `mod_revision` equals `expected`
    /// (`None`: only if the key does not exist). Returns whether it wrote.
    fn compare_and_put(
        &self,
        key: &str,
        expected: Option<Revision>,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<bool, StoreError>;

    /// Deletes the key; returns whether it existed.
    fn delete(&self, key: &str) -> Result<bool, StoreError>;

    /// A new lease that ends `ttl` from now unless kept alive. Backends may round
    /// the TTL up (etcd counts whole seconds and has a minimum).
    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Restarts the lease's TTL. [`StoreError::LeaseNotFound`] if it already ended.
    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Ends the lease now and deletes its keys. [`StoreError::LeaseNotFound`] if it
    /// already ended.
    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Changes to keys under `prefix` with `mod_revision > after`, in revision order,
    /// none missing and none repeated, also across backend reconnects. When the
    /// backend no longer holds history back to `after`, the watch yields
    /// [`StoreError::Compacted`] and ends: list again and watch from that listing.
    fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError>;
}

/// Keys are never empty (etcd refuses them); every backend checks the same way.
pub(crate) fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::InvalidArgument("key must not be empty".into()));
    }
    Ok(())
}
