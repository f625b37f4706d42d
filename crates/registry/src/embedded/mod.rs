//! [`EmbeddedStore`]: the registry in a directory, for one host and no server.
//!
//! Several processes on one host — an agent per simulated node, CLI commands —
//! share one directory. It holds `store.json` (the whole [`State`]: revision,
//! keys, leases with absolute expiry times, and a bounded change log) and `lock`.
//! Every operation takes an exclusive `flock` on `lock`, reads `store.json`, ends
//! expired leases, does its work and, if anything changed, writes the file anew
//! (temporary file, fsync, rename, fsync of the directory), so a crash leaves the
//! old or the new state and never half of one. Leases therefore end as soon as
//! anyone looks, and watch pollers look on their own when one is due.
//!
//! A watch is a thread that polls the file every [`EmbeddedOptions::poll_interval`]
//! (a `stat`; a read only when the file changed or a lease is due) and sends the
//! log's changes after the last revision it delivered. When the log no longer
//! reaches back that far the watch ends with [`StoreError::Compacted`], as etcd's do.

mod state;

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use state::{State, UnixMillis};

use crate::store::check_key;
use crate::{KeyValue, LeaseId, Revision, Store, StoreError, Watch, WatchBatch, WatchSender};

const STATE_FILE: &str = "store.json";
const LOCK_FILE: &str = "lock";

/// A poller re-reads the file at least this often even if `stat` saw no change:
/// a reused inode number within one mtime tick could hide a write from `stat`.
const FULL_READ_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct EmbeddedOptions {
    /// How many changes the log keeps for watches; older ones are compacted away.
    pub log_capacity: usize,
    /// How often a watch looks for changes.
    pub poll_interval: Duration,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            log_capacity: 1000,
            poll_interval: Duration::from_millis(100),
        }
    }
}

/// A handle on a registry directory. Open as many as you like, in as many
/// processes: they all see one store.
#[derive(Clone, Debug)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    state_path: PathBuf,
    tmp_path: PathBuf,
    lock_path: PathBuf,
    options: EmbeddedOptions,
}

impl EmbeddedStore {
    /// Opens the store in `dir`, creating the directory (mode 0700) if needed.
    /// Fails with [`StoreError::Corrupt`] if the store there cannot be read.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(dir, EmbeddedOptions::default())
    }

    pub fn open_with(dir: impl AsRef<Path>, options: EmbeddedOptions) -> Result<Self, StoreError> {
        if options.log_capacity == 0 {
            return Err(StoreError::InvalidArgument(
                "log_capacity must be at least 1".into(),
            ));
        }
        let dir = dir.as_ref().to_path_buf();
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_error("create directory", &dir))?;
        let inner = Inner {
            state_path: dir.join(STATE_FILE),
            tmp_path: dir.join(format!("{STATE_FILE}.tmp")),
            lock_path: dir.join(LOCK_FILE),
            dir,
            options,
        };
        // Fail at open, not at first use, if the file is unreadable.
        inner.transact(|_, _| Ok(()))?;
        Ok(EmbeddedStore {
            inner: Arc::new(inner),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
}

impl Store for EmbeddedStore {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.inner.transact(|s, _| Ok(s.get(key)))
    }

    fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        self.inner.transact(|s, _| Ok(s.list(prefix)))
    }

    fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<Revision, StoreError> {
        check_key(key)?;
        let cap = self.inner.options.log_capacity;
        self.inner.transact(|s, _| s.put(key, value, lease, cap))
    }

    fn compare_and_put(
        &self,
        key: &str,
        expected: Option<Revision>,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<bool, StoreError> {
        check_key(key)?;
        let cap = self.inner.options.log_capacity;
        self.inner
            .transact(|s, _| s.compare_and_put(key, expected, value, lease, cap))
    }

    fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let cap = self.inner.options.log_capacity;
        self.inner.transact(|s, _| Ok(s.delete(key, cap)))
    }

    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        if ttl_ms == 0 {
            return Err(StoreError::InvalidArgument(
                "lease ttl must be at least 1 ms".into(),
            ));
        }
        self.inner.transact(|s, now| Ok(s.grant_lease(ttl_ms, now)))
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.transact(|s, now| s.keep_alive(lease, now))
    }

    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let cap = self.inner.options.log_capacity;
        self.inner.transact(|s, _| s.revoke_lease(lease, cap))
    }

    fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError> {
        let (tx, watch) = Watch::channel();
        let inner = self.inner.clone();
        let prefix = prefix.to_owned();
        thread::Builder::new()
            .name("registry-watch".into())
            .spawn(move || poll(&inner, &prefix, after, &tx))
            .map_err(io_error("start a watch thread for", &self.inner.dir))?;
        Ok(watch)
    }
}

impl Inner {
    /// Runs `f` on the current state under the lock, after ending expired leases,
    /// and writes the state back if anything changed — even when `f` fails, since
    /// the reaping must stick.
    fn transact<T>(
        &self,
        f: impl FnOnce(&mut State, UnixMillis) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        // A fresh open file description per operation: flock excludes other
        // descriptions, so threads sharing one handle exclude each other too, and
        // dropping the file releases the lock on every path out of here.
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&self.lock_path)
            .map_err(io_error("open lock file", &self.lock_path))?;
        lock.lock().map_err(io_error("lock", &self.lock_path))?;
        let mut state = self.load()?;
        let now = now_millis();
        state.reap(now, self.options.log_capacity);
        let result = f(&mut state, now);
        if state.is_dirty() {
            self.save(&state)?;
        }
        drop(lock);
        result
    }

    /// Reads the state without the lock: whole-file renames make every read a
    /// consistent snapshot. A missing file is an empty store.
    fn load(&self) -> Result<State, StoreError> {
        let bytes = match fs::read(&self.state_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(State::default()),
            Err(e) => return Err(io_error("read", &self.state_path)(e)),
        };
        let corrupt = |reason: String| StoreError::Corrupt {
            path: self.state_path.clone(),
            reason,
        };
        let state: State = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        state.validate().map_err(corrupt)?;
        Ok(state)
    }

    fn save(&self, state: &State) -> Result<(), StoreError> {
        let mut bytes = serde_json::to_vec(state).map_err(|e| StoreError::Corrupt {
            path: self.state_path.clone(),
            reason: format!("cannot encode: {e}"),
        })?;
        bytes.push(b'\n');
        let tmp = &self.tmp_path;
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(tmp)
            .map_err(io_error("create", tmp))?;
        file.write_all(&bytes).map_err(io_error("write", tmp))?;
        file.sync_all().map_err(io_error("fsync", tmp))?;
        drop(file);
        fs::rename(tmp, &self.state_path).map_err(io_error("rename into place", tmp))?;
        // The rename is durable only once the directory is.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error("fsync directory", &self.dir))
    }

    /// What `stat` says about the state file; any write changes it.
    fn stamp(&self) -> Option<(u64, u64, u64, i64, i64)> {
        let m = fs::metadata(&self.state_path).ok()?;
        Some((m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
    }
}

/// The watch thread: delivers changes under `prefix` after `after` until the
/// consumer drops its [`Watch`] or an error ends the watch.
fn poll(inner: &Inner, prefix: &str, after: Revision, tx: &WatchSender) {
    let mut delivered = after;
    let mut seen = None;
    let mut next_expiry: Option<UnixMillis> = None;
    let mut last_read: Option<Instant> = None;
    while !tx.is_closed() {
        let stamp = inner.stamp();
        let lease_due = next_expiry.is_some_and(|t| t <= now_millis());
        let stale = last_read.is_none_or(|t| t.elapsed() >= FULL_READ_INTERVAL);
        if stamp != seen || lease_due || stale {
            // A due lease is ended under the lock so its Delete events get logged;
            // otherwise a lock-free read is enough.
            let state = if lease_due {
                inner.transact(|s, _| Ok(s.clone()))
            } else {
                inner.load()
            };
            let events = state.and_then(|s| Ok((s.events_after(prefix, delivered)?, s)));
            let (events, state) = match events {
                Ok(found) => found,
                Err(e) => {
                    tx.send(Err(e));
                    return;
                }
            };
            seen = stamp;
            last_read = Some(Instant::now());
            next_expiry = state.next_expiry();
            if state.revision() > delivered {
                delivered = state.revision();
                if !events.is_empty() {
                    let batch = WatchBatch {
                        revision: delivered,
                        events,
                    };
                    if !tx.send(Ok(batch)) {
                        return;
                    }
                }
            }
        }
        thread::sleep(inner.options.poll_interval);
    }
}

fn now_millis() -> UnixMillis {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}
