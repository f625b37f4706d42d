//! The embedded store's contents and the rules that change them, with no I/O.
//!
//! [`State`] is what `store.json` holds: the revision counter, the keys, the leases
//! with their absolute expiry times, and a bounded log of recent changes that
//! watches read from. Every method takes the time as an argument (milliseconds since
//! the Unix epoch) so the rules — lease expiry above all — are tested without a
//! clock; the shell in `mod.rs` does the locking, the file I/O and reads the clock.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::{Event, KeyValue, LeaseId, Revision, StoreError};

/// The version of the file layout; bumped when a change would misread old files.
pub const FORMAT: u32 = 1;

/// Milliseconds since the Unix epoch. Wall-clock time, because expiry times are
/// shared between processes, and one host's processes share one clock.
pub type UnixMillis = u64;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    format: u32,
    revision: Revision,
    /// Every change at or below this revision has been dropped from `log`.
    compacted: Revision,
    next_lease: i64,
    entries: BTreeMap<String, Entry>,
    leases: BTreeMap<i64, Lease>,
    log: VecDeque<LogRecord>,
    /// Set by any change that must be written back; never stored.
    #[serde(skip)]
    dirty: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Entry {
    #[serde(with = "b64")]
    value: Vec<u8>,
    mod_revision: Revision,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease: Option<i64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Lease {
    ttl_ms: u64,
    expires_at: UnixMillis,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct LogRecord {
    revision: Revision,
    key: String,
    /// `None` for a delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    put: Option<Entry>,
}

impl Default for State {
    fn default() -> Self {
        State {
            format: FORMAT,
            revision: 0,
            compacted: 0,
            next_lease: 1,
            entries: BTreeMap::new(),
            leases: BTreeMap::new(),
            log: VecDeque::new(),
            dirty: false,
        }
    }
}

impl State {
    /// Checks what serde cannot: a state that passes is safe for every method.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!(
                "format {} is not the supported format {FORMAT}",
                self.format
            ));
        }
        // Revisions and lease ids are i64 in etcd; keeping to that range also
        // leaves room to count up without overflow.
        if i64::try_from(self.revision).is_err() || self.revision == i64::MAX as u64 {
            return Err(format!("revision {} is out of range", self.revision));
        }
        if self.next_lease < 1 || self.next_lease == i64::MAX {
            return Err(format!("next_lease {} is out of range", self.next_lease));
        }
        if self.compacted > self.revision {
            return Err(format!(
                "compacted revision {} is above revision {}",
                self.compacted, self.revision
            ));
        }
        for (key, entry) in &self.entries {
            if entry.mod_revision > self.revision || entry.mod_revision == 0 {
                return Err(format!(
                    "key {key:?}: mod_revision {} outside 1..={}",
                    entry.mod_revision, self.revision
                ));
            }
            if let Some(lease) = entry.lease {
                if !self.leases.contains_key(&lease) {
                    return Err(format!("key {key:?}: lease {lease:x} does not exist"));
                }
            }
        }
        if let Some(&max) = self.leases.keys().next_back() {
            if max >= self.next_lease {
                return Err(format!(
                    "lease {max:x} is not below next_lease {:x}",
                    self.next_lease
                ));
            }
        }
        let mut previous = self.compacted;
        for record in &self.log {
            if record.revision < previous
                || record.revision <= self.compacted
                || record.revision > self.revision
            {
                return Err(format!(
                    "log record for {:?} has revision {} out of order",
                    record.key, record.revision
                ));
            }
            previous = record.revision;
        }
        Ok(())
    }

    pub fn revision(&self) -> Revision {
        self.revision
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// The earliest lease expiry, so a poller knows when to reap.
    pub fn next_expiry(&self) -> Option<UnixMillis> {
        self.leases.values().map(|l| l.expires_at).min()
    }

    /// Ends every lease whose time is up, oldest first, each at its own revision
    /// (as etcd revokes them one by one).
    pub fn reap(&mut self, now: UnixMillis, log_capacity: usize) {
        let mut expired: Vec<(UnixMillis, i64)> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires_at <= now)
            .map(|(&id, l)| (l.expires_at, id))
            .collect();
        expired.sort_unstable();
        for (_, id) in expired {
            self.remove_lease(id, log_capacity);
        }
    }

    pub fn get(&self, key: &str) -> Option<KeyValue> {
        self.entries.get(key).map(|e| key_value(key, e))
    }

    pub fn list(&self, prefix: &str) -> (Vec<KeyValue>, Revision) {
        let kvs = self
            .entries
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| key_value(k, e))
            .collect();
        (kvs, self.revision)
    }

    pub fn put(
        &mut self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
        log_capacity: usize,
    ) -> Result<Revision, StoreError> {
        if let Some(id) = lease {
            if !self.leases.contains_key(&id.0) {
                return Err(StoreError::LeaseNotFound(id));
            }
        }
        self.revision += 1;
        let entry = Entry {
            value: value.to_vec(),
            mod_revision: self.revision,
            lease: lease.map(|l| l.0),
        };
        self.entries.insert(key.to_owned(), entry.clone());
        self.record(key, Some(entry), log_capacity);
        Ok(self.revision)
    }

    pub fn compare_and_put(
        &mut self,
        key: &str,
        expected: Option<Revision>,
        value: &[u8],
        lease: Option<LeaseId>,
        log_capacity: usize,
    ) -> Result<bool, StoreError> {
        let actual = self.entries.get(key).map(|e| e.mod_revision);
        if actual != expected {
            return Ok(false);
        }
        self.put(key, value, lease, log_capacity).map(|_| true)
    }

    pub fn delete(&mut self, key: &str, log_capacity: usize) -> bool {
        if self.entries.remove(key).is_none() {
            return false;
        }
        self.revision += 1;
        self.record(key, None, log_capacity);
        true
    }

    pub fn grant_lease(&mut self, ttl_ms: u64, now: UnixMillis) -> LeaseId {
        let id = self.next_lease;
        self.next_lease += 1;
        self.leases.insert(
            id,
            Lease {
                ttl_ms,
                expires_at: now.saturating_add(ttl_ms),
            },
        );
        self.dirty = true;
        LeaseId(id)
    }

    /// Callers reap first, so a lease still here has not expired.
    pub fn keep_alive(&mut self, lease: LeaseId, now: UnixMillis) -> Result<(), StoreError> {
        let entry = self
            .leases
            .get_mut(&lease.0)
            .ok_or(StoreError::LeaseNotFound(lease))?;
        entry.expires_at = now.saturating_add(entry.ttl_ms);
        self.dirty = true;
        Ok(())
    }

    pub fn revoke_lease(&mut self, lease: LeaseId, log_capacity: usize) -> Result<(), StoreError> {
        if !self.leases.contains_key(&lease.0) {
            return Err(StoreError::LeaseNotFound(lease));
        }
        self.remove_lease(lease.0, log_capacity);
        Ok(())
    }

    /// The changes under `prefix` after revision `after`, or `Compacted` if the log
    /// has dropped some of them.
    pub fn events_after(&self, prefix: &str, after: Revision) -> Result<Vec<Event>, StoreError> {
        if after < self.compacted {
            return Err(StoreError::Compacted {
                requested: after,
                compacted: self.compacted,
            });
        }
        // The log is in revision order: skip what the watcher has, keep the rest.
        let start = self.log.partition_point(|r| r.revision <= after);
        Ok(self
            .log
            .range(start..)
            .filter(|r| r.key.starts_with(prefix))
            .map(|r| match &r.put {
                Some(entry) => Event::Put(key_value(&r.key, entry)),
                None => Event::Delete {
                    key: r.key.clone(),
                    mod_revision: r.revision,
                },
            })
            .collect())
    }

    /// Deletes the lease and its keys; one revision for all the keys, none if it had no keys.
    fn remove_lease(&mut self, id: i64, log_capacity: usize) {
        self.leases.remove(&id);
        self.dirty = true;
        let keys: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| e.lease == Some(id))
            .map(|(k, _)| k.clone())
            .collect();
        if keys.is_empty() {
            return;
        }
        self.revision += 1;
        for key in keys {
            self.entries.remove(&key);
            self.record(&key, None, log_capacity);
        }
    }

    /// Appends a change at the current revision and trims the log to its capacity.
    /// Trimming drops whole revisions, so a watch never sees half of one.
    fn record(&mut self, key: &str, put: Option<Entry>, log_capacity: usize) {
        self.dirty = true;
        self.log.push_back(LogRecord {
            revision: self.revision,
            key: key.to_owned(),
            put,
        });
        while self.log.len() > log_capacity {
            let Some(dropped) = self.log.pop_front() else {
                break;
            };
            self.compacted = dropped.revision;
            while self
                .log
                .front()
                .is_some_and(|r| r.revision == self.compacted)
            {
                self.log.pop_front();
            }
        }
    }
}

fn key_value(key: &str, entry: &Entry) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: entry.value.clone(),
        mod_revision: entry.mod_revision,
        lease: entry.lease.map(LeaseId),
    }
}

/// Values are arbitrary bytes; JSON holds them as base64 text.
mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: usize = 100;

    #[test]
    fn lease_expiry_deletes_keys_at_one_revision() {
        let mut s = State::default();
        let lease = s.grant_lease(1_000, 10_000);
        s.put("a", b"1", Some(lease), CAP).unwrap();
        s.put("b", b"2", Some(lease), CAP).unwrap();
        s.put("c", b"3", None, CAP).unwrap();
        s.reap(10_999, CAP);
        assert_eq!(s.revision(), 3, "not yet expired");
        s.reap(11_000, CAP);
        assert_eq!(s.revision(), 4);
        assert_eq!(s.get("a"), None);
        assert!(s.get("c").is_some());
        let events = s.events_after("", 3).unwrap();
        assert_eq!(
            events,
            vec![
                Event::Delete {
                    key: "a".into(),
                    mod_revision: 4
                },
                Event::Delete {
                    key: "b".into(),
                    mod_revision: 4
                },
            ]
        );
        assert!(matches!(
            s.keep_alive(lease, 11_000),
            Err(StoreError::LeaseNotFound(_))
        ));
    }

    #[test]
    fn keep_alive_moves_expiry_from_now() {
        let mut s = State::default();
        let lease = s.grant_lease(1_000, 0);
        s.put("a", b"1", Some(lease), CAP).unwrap();
        s.keep_alive(lease, 900).unwrap();
        s.reap(1_500, CAP);
        assert!(s.get("a").is_some());
        s.reap(1_900, CAP);
        assert!(s.get("a").is_none());
    }

    #[test]
    fn rewriting_without_lease_detaches_key() {
        let mut s = State::default();
        let lease = s.grant_lease(1_000, 0);
        s.put("a", b"1", Some(lease), CAP).unwrap();
        s.put("a", b"2", None, CAP).unwrap();
        s.reap(5_000, CAP);
        assert_eq!(s.get("a").map(|kv| kv.value), Some(b"2".to_vec()));
        // A lease without keys ends without a revision.
        assert_eq!(s.revision(), 2);
    }

    #[test]
    fn trimming_drops_whole_revisions_and_reports_compaction() {
        let mut s = State::default();
        let lease = s.grant_lease(1_000, 0);
        s.put("a", b"1", Some(lease), 3).unwrap(); // rev 1
        s.put("b", b"1", Some(lease), 3).unwrap(); // rev 2
        s.put("c", b"1", None, 3).unwrap(); // rev 3
        s.revoke_lease(lease, 3).unwrap(); // rev 4: deletes a and b; log holds 5 > 3
        s.validate().unwrap();
        // Dropping rev 1 and 2 leaves rev 3 and both halves of rev 4.
        assert_eq!(s.log.len(), 3);
        assert!(matches!(
            s.events_after("", 1),
            Err(StoreError::Compacted {
                requested: 1,
                compacted: 2
            })
        ));
        assert_eq!(s.events_after("", 2).unwrap().len(), 3);
    }

    #[test]
    fn list_takes_only_the_prefix() {
        let mut s = State::default();
        for key in ["n/a", "n/b", "n0", "m", "n/c/d"] {
            s.put(key, b"x", None, CAP).unwrap();
        }
        let (kvs, rev) = s.list("n/");
        let keys: Vec<_> = kvs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, ["n/a", "n/b", "n/c/d"]);
        assert_eq!(rev, 5);
    }

    #[test]
    fn failed_compare_changes_nothing() {
        let mut s = State::default();
        assert!(s.compare_and_put("k", None, b"1", None, CAP).unwrap());
        assert!(!s.compare_and_put("k", None, b"2", None, CAP).unwrap());
        assert!(!s.compare_and_put("k", Some(7), b"2", None, CAP).unwrap());
        assert!(s.compare_and_put("k", Some(1), b"3", None, CAP).unwrap());
        assert_eq!(s.revision(), 2);
    }

    #[test]
    fn validate_rejects_inconsistent_state() {
        let mut s = State::default();
        s.put("k", b"1", None, CAP).unwrap();
        let mut bad = s.clone();
        bad.revision = 0;
        assert!(bad.validate().unwrap_err().contains("mod_revision"));
        let mut bad = s.clone();
        bad.entries.get_mut("k").unwrap().lease = Some(9);
        assert!(bad.validate().unwrap_err().contains("lease"));
        let text = serde_json::to_string(&s).unwrap();
        let back: State = serde_json::from_str(&text).unwrap();
        back.validate().unwrap();
        assert_eq!((back.entries, back.log), (s.entries, s.log));
    }

    /// Whatever a damaged file holds, loading it either fails or gives a state
    /// every operation can run on: truncations and changed digits of a real file.
    #[test]
    fn damaged_files_never_panic() {
        let mut s = State::default();
        let lease = s.grant_lease(1_000, 0);
        s.put("a", b"1", Some(lease), 4).unwrap();
        s.put("b", b"2", None, 4).unwrap();
        s.put("a", b"3", Some(lease), 4).unwrap();
        s.delete("b", 4);
        s.grant_lease(5_000, 0);
        let text = serde_json::to_string(&s).unwrap();
        let mut variants: Vec<String> = (0..text.len())
            .filter(|&i| text.is_char_boundary(i))
            .map(|i| text[..i].to_owned())
            .collect();
        for (i, c) in text.char_indices().filter(|(_, c)| c.is_ascii_digit()) {
            for digit in ["0", "9", "18446744073709551615", "-1"] {
                variants.push(format!(
                    "{}{digit}{}",
                    &text[..i],
                    &text[i + c.len_utf8()..]
                ));
            }
        }
        let mut usable = 0;
        for variant in &variants {
            let Ok(mut state) = serde_json::from_str::<State>(variant) else {
                continue;
            };
            if state.validate().is_err() {
                continue;
            }
            usable += 1;
            let _ = state.events_after("", 0);
            let _ = state.list("");
            state.reap(u64::MAX, 4);
            let _ = state.grant_lease(u64::MAX, u64::MAX);
            let _ = state.put("c", b"x", None, 4);
            let _ = state.delete("a", 4);
            let _ = state.revoke_lease(lease, 4);
        }
        assert!(usable > 0, "no variant loaded: the test checks nothing");
    }
}
