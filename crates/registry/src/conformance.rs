//! The conformance suite: what every [`Store`] backend must do, as runnable checks.
//!
//! Each case is a public function that takes an opener — a closure returning a new
//! handle on the same backing store each time it is called, as a second process
//! would get — and panics on the first broken promise. Cases write only under a
//! prefix of their own (unique per run), so they can share one store, run in
//! parallel, and run against a long-lived etcd. Waits are bounded polls; the only
//! sleeps are in the lease cases, where time passing is the thing under test.
//!
//! A backend's test file runs the suite with one line, either one `#[test]` per
//! case ([`conformance_tests!`](crate::conformance_tests), for backends that are
//! cheap to create) or all cases in one test ([`run_all`], for a shared server).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::{Event, KeyValue, Revision, Store, StoreError, Watch};

/// Opens a new handle on the store under test.
pub type Open<'a> = &'a dyn Fn() -> Box<dyn Store>;

/// How long a case waits for something that should happen promptly.
const WAIT: Duration = Duration::from_secs(15);
/// Lease TTL for the lease cases: short, but at etcd's minimum (it rounds up to 2 s).
const TTL: Duration = Duration::from_secs(2);

/// A case: it opens handles with the opener and panics on a broken promise.
pub type Case = fn(Open);

/// Every case, by name, in a cheap-first order. A case assumes nobody else writes
/// to the store while it runs (it reads revisions of deletes back from listings).
pub const CASES: &[(&str, Case)] = &[
    ("put_get_list_delete", put_get_list_delete),
    ("revisions_increase", revisions_increase),
    ("compare_and_put", compare_and_put),
    ("compare_and_put_race", compare_and_put_race),
    ("handles_share_data", handles_share_data),
    ("watch_in_order", watch_in_order),
    ("watch_from_past", watch_from_past),
    ("watch_sees_other_handles", watch_sees_other_handles),
    (
        "watch_with_concurrent_writers",
        watch_with_concurrent_writers,
    ),
    ("unknown_lease", unknown_lease),
    ("revoke_deletes_keys", revoke_deletes_keys),
    ("put_without_lease_detaches", put_without_lease_detaches),
    ("lease_expiry_deletes_keys", lease_expiry_deletes_keys),
    ("keep_alive_extends", keep_alive_extends),
];

/// Runs every case in turn against one store, printing each name.
pub fn run_all(open: impl Fn() -> Box<dyn Store>) {
    for (name, case) in CASES {
        eprintln!("conformance: {name}");
        let started = Instant::now();
        case(&open);
        eprintln!("conformance: {name} ok in {:?}", started.elapsed());
    }
}

/// One `#[test]` per conformance case. `$open` is evaluated afresh in each test
/// and must give a `Fn() -> Box<dyn Store>` that opens handles on one store, e.g.
/// a closure that owns a temporary directory.
#[macro_export]
macro_rules! conformance_tests {
    ($open:expr) => {
        $crate::conformance_tests!(@cases $open;
            put_get_list_delete, revisions_increase, compare_and_put,
            compare_and_put_race, handles_share_data, watch_in_order, watch_from_past,
            watch_sees_other_handles, watch_with_concurrent_writers, unknown_lease, revoke_deletes_keys,
            put_without_lease_detaches, lease_expiry_deletes_keys, keep_alive_extends);
    };
    (@cases $open:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let open = $open;
                $crate::conformance::$case(&open);
            }
        )*

        /// The list above is written out twice (here and `CASES`): keep them equal.
        #[test]
        fn conformance_macro_lists_every_case() {
            let listed = [$(stringify!($case)),*];
            let cases: Vec<&str> = $crate::conformance::CASES.iter().map(|(name, _)| *name).collect();
            assert_eq!(listed.as_slice(), cases.as_slice());
        }
    };
}

/// Basic reads and writes, prefix listing, and arbitrary bytes as values.
pub fn put_get_list_delete(open: Open) {
    let store = open();
    let p = prefix("put_get_list_delete");
    let key = |k: &str| format!("{p}{k}");

    assert_eq!(store.get(&key("a")).expect("get"), None);
    let rev_a = store.put(&key("a"), b"1", None).expect("put");
    store.put(&key("b"), b"", None).expect("put empty value");
    let binary = [0u8, 255, 10, 13, b'"', b'\\'];
    store.put(&key("sub/c"), &binary, None).expect("put");
    // A sibling that shares the prefix's letters but not the prefix.
    store
        .put(&format!("{}x/a", p.trim_end_matches('/')), b"no", None)
        .expect("put");

    let got = store.get(&key("a")).expect("get").expect("a exists");
    assert_eq!(
        got,
        KeyValue {
            key: key("a"),
            value: b"1".to_vec(),
            mod_revision: rev_a,
            lease: None
        }
    );
    let (kvs, list_rev) = store.list(&p).expect("list");
    let keys: Vec<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        [key("a"), key("b"), key("sub/c")],
        "sorted, prefix only"
    );
    assert_eq!(kvs[1].value, b"");
    assert_eq!(kvs[2].value, binary);
    assert!(
        list_rev >= kvs[2].mod_revision,
        "list revision covers its keys"
    );
    let (sub, _) = store.list(&key("sub/")).expect("list");
    assert_eq!(sub.len(), 1);

    let rev_a2 = store.put(&key("a"), b"2", None).expect("overwrite");
    assert!(rev_a2 > rev_a);
    assert_eq!(value(&*store, &key("a")), Some(b"2".to_vec()));

    assert!(store.delete(&key("a")).expect("delete"));
    assert!(!store.delete(&key("a")).expect("delete again"));
    assert_eq!(store.get(&key("a")).expect("get"), None);
    assert_eq!(store.list(&p).expect("list").0.len(), 2);
}

/// Each write gets a higher revision than the one before, and it is the key's
/// `mod_revision`; failed writes leave the key's revision alone.
pub fn revisions_increase(open: Open) {
    let store = open();
    let p = prefix("revisions_increase");
    let mut last = store.list(&p).expect("list").1;
    for i in 0..10 {
        let key = format!("{p}k{}", i % 3);
        let rev = store.put(&key, b"v", None).expect("put");
        assert!(rev > last, "revision {rev} after {last}");
        assert_eq!(mod_revision(&*store, &key), Some(rev));
        last = rev;
    }
    let key = format!("{p}k1");
    let before = mod_revision(&*store, &key);
    assert!(!store
        .compare_and_put(&key, Some(1), b"x", None)
        .expect("cas"));
    assert_eq!(mod_revision(&*store, &key), before, "failed cas wrote");
    assert!(store.delete(&key).expect("delete"));
    assert!(
        store.list(&p).expect("list").1 > last,
        "delete raises revision"
    );
}

/// Create-if-absent, swap-if-unchanged, and both refusing stale expectations.
pub fn compare_and_put(open: Open) {
    let store = open();
    let key = format!("{}k", prefix("compare_and_put"));
    assert!(store
        .compare_and_put(&key, None, b"1", None)
        .expect("create"));
    assert!(!store.compare_and_put(&key, None, b"2", None).expect("cas"));
    let rev = mod_revision(&*store, &key).expect("key exists");
    assert!(!store
        .compare_and_put(&key, Some(rev + 1000), b"2", None)
        .expect("cas"));
    assert_eq!(value(&*store, &key), Some(b"1".to_vec()));
    assert!(store
        .compare_and_put(&key, Some(rev), b"3", None)
        .expect("swap"));
    assert!(!store
        .compare_and_put(&key, Some(rev), b"4", None)
        .expect("stale swap"));
    assert_eq!(value(&*store, &key), Some(b"3".to_vec()));
    // Swapping onto a lease attaches the key to it.
    let lease = store.grant_lease(Duration::from_secs(60)).expect("grant");
    let rev = mod_revision(&*store, &key).expect("key exists");
    assert!(store
        .compare_and_put(&key, Some(rev), b"5", Some(lease))
        .expect("swap"));
    assert_eq!(
        store.get(&key).expect("get").and_then(|kv| kv.lease),
        Some(lease)
    );
    store.revoke_lease(lease).expect("revoke");
    assert_eq!(store.get(&key).expect("get"), None);
}

/// Threads, each with its own handle, race on one key: exactly one wins each round.
pub fn compare_and_put_race(open: Open) {
    const RACERS: usize = 6;
    let key = format!("{}k", prefix("compare_and_put_race"));
    let mut expected = None;
    for round in 0..2 {
        let barrier = Arc::new(Barrier::new(RACERS));
        let racers: Vec<_> = (0..RACERS)
            .map(|i| {
                let store = open();
                let (barrier, key) = (barrier.clone(), key.clone());
                thread::spawn(move || {
                    let value = format!("round {round} racer {i}");
                    barrier.wait();
                    store
                        .compare_and_put(&key, expected, value.as_bytes(), None)
                        .expect("cas")
                        .then_some(value)
                })
            })
            .collect();
        let winners: Vec<String> = racers
            .into_iter()
            .filter_map(|r| r.join().expect("racer panicked"))
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let store = open();
        let kv = store.get(&key).expect("get").expect("key exists");
        assert_eq!(kv.value, winners[0].as_bytes());
        expected = Some(kv.mod_revision);
    }
}

/// Two handles, as two processes would have, see each other's writes.
pub fn handles_share_data(open: Open) {
    let (one, two) = (open(), open());
    let key = format!("{}k", prefix("handles_share_data"));
    let rev = one.put(&key, b"from one", None).expect("put");
    let kv = two.get(&key).expect("get").expect("two sees one's write");
    assert_eq!(
        (kv.value.as_slice(), kv.mod_revision),
        (&b"from one"[..], rev)
    );
    assert!(two
        .compare_and_put(&key, Some(rev), b"from two", None)
        .expect("cas"));
    assert_eq!(value(&*one, &key), Some(b"from two".to_vec()));
    let lease = two.grant_lease(Duration::from_secs(60)).expect("grant");
    one.put(&key, b"leased", Some(lease))
        .expect("put on other handle's lease");
    one.revoke_lease(lease)
        .expect("revoke other handle's lease");
    assert_eq!(two.get(&key).expect("get"), None);
}

/// A watch from the listing's revision delivers every later change under its
/// prefix exactly once, in order, and nothing from outside the prefix.
pub fn watch_in_order(open: Open) {
    let store = open();
    let p = prefix("watch_in_order");
    let (_, rev) = store.list(&p).expect("list");
    let watch = store.watch(&p, rev).expect("watch");
    let mut expected = Vec::new();
    for i in 0..12 {
        let key = format!("{p}k{}", i % 4);
        if i % 3 == 2 {
            let gone = format!("{p}k{}", (i + 1) % 4);
            if store.get(&gone).expect("get").is_some() {
                expected.push(delete_event(&*store, &p, &gone));
            }
        }
        let value = format!("v{i}");
        let rev = store.put(&key, value.as_bytes(), None).expect("put");
        expected.push(put_event(&key, value.as_bytes(), rev));
        // Outside the prefix: must not show up.
        store
            .put(&format!("{}-other/k", p.trim_end_matches('/')), b"x", None)
            .expect("put");
    }
    expect_exactly(&watch, &*store, &p, &expected);
}

/// A watch from a revision in the past replays exactly the changes after it.
pub fn watch_from_past(open: Open) {
    let store = open();
    let p = prefix("watch_from_past");
    let mut history = Vec::new();
    for i in 0..6 {
        let key = format!("{p}k{i}");
        let rev = store.put(&key, b"v", None).expect("put");
        history.push(put_event(&key, b"v", rev));
    }
    history.push(delete_event(&*store, &p, &format!("{p}k0")));
    let rev = history[6].mod_revision();
    // From the first change, from the middle, from the last one (the delete), and
    // from after the last: nothing but what comes next.
    let starts = [0, 2, 6, 7];
    let watches: Vec<Watch> = starts
        .iter()
        .map(|&from| {
            let after = history.get(from).map_or(rev, |e| e.mod_revision() - 1);
            store.watch(&p, after).expect("watch")
        })
        .collect();
    let expected: Vec<(&Watch, &[Event])> = watches
        .iter()
        .zip(starts)
        .map(|(w, from)| (w, &history[from..]))
        .collect();
    expect_each_exactly(&expected, &*store, &p);
}

/// A watch sees the writes another handle makes, deletes included.
pub fn watch_sees_other_handles(open: Open) {
    let (watcher, writer) = (open(), open());
    let p = prefix("watch_sees_other_handles");
    let rev = watcher.list(&p).expect("list").1;
    let watch = watcher.watch(&p, rev).expect("watch");
    let key = format!("{p}k");
    let put_rev = writer.put(&key, b"v", None).expect("put");
    let expected = [
        put_event(&key, b"v", put_rev),
        delete_event(&*writer, &p, &key),
    ];
    expect_exactly(&watch, &*writer, &p, &expected);
}

/// Several handles write at once while a watch runs: it still delivers every
/// write exactly once, in revision order.
pub fn watch_with_concurrent_writers(open: Open) {
    const WRITERS: usize = 3;
    const WRITES: usize = 30;
    let store = open();
    let p = prefix("watch_with_concurrent_writers");
    let rev = store.list(&p).expect("list").1;
    let watch = store.watch(&p, rev).expect("watch");
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (writer, p) = (open(), p.clone());
            thread::spawn(move || {
                (0..WRITES)
                    .map(|i| {
                        let key = format!("{p}w{w}/k{}", i % 5);
                        let value = format!("{w}.{i}");
                        let rev = writer.put(&key, value.as_bytes(), None).expect("put");
                        put_event(&key, value.as_bytes(), rev)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut expected: Vec<Event> = writers
        .into_iter()
        .flat_map(|w| w.join().expect("writer panicked"))
        .collect();
    expected.sort_by_key(Event::mod_revision);
    expect_exactly(&watch, &*store, &p, &expected);
}

/// Writing with, renewing or revoking a lease that does not exist is `LeaseNotFound`.
pub fn unknown_lease(open: Open) {
    let store = open();
    let key = format!("{}k", prefix("unknown_lease"));
    let lease = store.grant_lease(Duration::from_secs(60)).expect("grant");
    store.revoke_lease(lease).expect("revoke");
    assert_lease_not_found(store.put(&key, b"v", Some(lease)), "put");
    assert_lease_not_found(store.compare_and_put(&key, None, b"v", Some(lease)), "cas");
    assert_lease_not_found(store.keep_alive(lease), "keep_alive");
    assert_lease_not_found(store.revoke_lease(lease), "revoke");
    assert_eq!(store.get(&key).expect("get"), None, "failed put wrote");
}

/// Revoking a lease deletes its keys, all at one revision, with Delete events,
/// and leaves other keys alone.
pub fn revoke_deletes_keys(open: Open) {
    let store = open();
    let p = prefix("revoke_deletes_keys");
    let lease = store.grant_lease(Duration::from_secs(60)).expect("grant");
    let (a, b, c) = (format!("{p}a"), format!("{p}b"), format!("{p}c"));
    store.put(&a, b"1", Some(lease)).expect("put");
    store.put(&b, b"2", Some(lease)).expect("put");
    store.put(&c, b"3", None).expect("put");
    let rev = store.list(&p).expect("list").1;
    let watch = store.watch(&p, rev).expect("watch");
    store.revoke_lease(lease).expect("revoke");
    let (kvs, revoked_at) = store.list(&p).expect("list");
    assert_eq!(kvs.iter().map(|kv| &kv.key).collect::<Vec<_>>(), [&c]);
    let deletes = |key: &str| Event::Delete {
        key: key.to_owned(),
        mod_revision: revoked_at,
    };
    expect_exactly(&watch, &*store, &p, &[deletes(&a), deletes(&b)]);
}

/// Writing a key again without a lease detaches it: the lease's end leaves it be.
pub fn put_without_lease_detaches(open: Open) {
    let store = open();
    let key = format!("{}k", prefix("put_without_lease_detaches"));
    let lease = store.grant_lease(Duration::from_secs(60)).expect("grant");
    store.put(&key, b"leased", Some(lease)).expect("put");
    store.put(&key, b"free", None).expect("put");
    assert_eq!(store.get(&key).expect("get").expect("exists").lease, None);
    store.revoke_lease(lease).expect("revoke");
    assert_eq!(value(&*store, &key), Some(b"free".to_vec()));
}

/// A lease nobody renews ends by itself: its keys go, with Delete events, and the
/// lease is gone for good.
pub fn lease_expiry_deletes_keys(open: Open) {
    let store = open();
    let p = prefix("lease_expiry_deletes_keys");
    let key = format!("{p}k");
    let lease = store.grant_lease(TTL).expect("grant");
    let put_rev = store.put(&key, b"v", Some(lease)).expect("put");
    let watch = store.watch(&p, put_rev).expect("watch");
    let granted = Instant::now();
    wait_until("the leased key to expire", TTL + WAIT, || {
        store.get(&key).expect("get").is_none()
    });
    assert!(
        granted.elapsed() >= TTL - Duration::from_millis(200),
        "expired after {:?}, before its TTL",
        granted.elapsed()
    );
    let events = collect(&watch, 1);
    assert!(
        matches!(&events[..], [Event::Delete { key: k, mod_revision }] if *k == key && *mod_revision > put_rev),
        "want one Delete of {key}, got {events:?}"
    );
    assert_lease_not_found(store.keep_alive(lease), "keep_alive after expiry");
    assert_lease_not_found(store.put(&key, b"v", Some(lease)), "put after expiry");
}

/// Keep-alives hold a lease well past its TTL; once they stop, it ends.
pub fn keep_alive_extends(open: Open) {
    let store = open();
    let key = format!("{}k", prefix("keep_alive_extends"));
    let lease = store.grant_lease(TTL).expect("grant");
    store.put(&key, b"v", Some(lease)).expect("put");
    let started = Instant::now();
    while started.elapsed() < TTL * 2 {
        store.keep_alive(lease).expect("keep_alive");
        assert!(
            store.get(&key).expect("get").is_some(),
            "key expired {:?} after grant despite keep-alives",
            started.elapsed()
        );
        // Renewing at a quarter of the TTL is what this case is about, not a sync.
        thread::sleep(TTL / 4);
    }
    wait_until(
        "the lease to end after keep-alives stop",
        TTL + WAIT,
        || store.get(&key).expect("get").is_none(),
    );
}

/// A prefix no other case or run uses: `conformance/<case>/<pid>-<time>-<n>/`.
fn prefix(case: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("conformance/{case}/{}-{nanos}-{n}/", std::process::id())
}

fn put_event(key: &str, value: &[u8], mod_revision: Revision) -> Event {
    Event::Put(KeyValue {
        key: key.to_owned(),
        value: value.to_vec(),
        mod_revision,
        lease: None,
    })
}

fn value(store: &dyn Store, key: &str) -> Option<Vec<u8>> {
    store.get(key).expect("get").map(|kv| kv.value)
}

fn mod_revision(store: &dyn Store, key: &str) -> Option<Revision> {
    store.get(key).expect("get").map(|kv| kv.mod_revision)
}

/// Deletes `key` and returns the event a watch should see. `delete` does not return
/// its revision, so it is read back from a listing: the store must have no other
/// writers while a case runs.
fn delete_event(store: &dyn Store, p: &str, key: &str) -> Event {
    assert!(store.delete(key).expect("delete"), "{key} existed");
    Event::Delete {
        key: key.to_owned(),
        mod_revision: store.list(p).expect("list").1,
    }
}

fn assert_lease_not_found<T: std::fmt::Debug>(result: Result<T, StoreError>, what: &str) {
    assert!(
        matches!(result, Err(StoreError::LeaseNotFound(_))),
        "{what}: want LeaseNotFound, got {result:?}"
    );
}

/// Polls `done` every 50 ms until it holds, failing after `limit`.
fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// The next `count` events (or more, if the last batch brings more), checking
/// each batch's own promises on the way.
fn collect(watch: &Watch, count: usize) -> Vec<Event> {
    let deadline = Instant::now() + WAIT;
    let mut events: Vec<Event> = Vec::new();
    let mut last_batch = 0;
    while events.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        let batch = match watch.recv_timeout(left) {
            Ok(Some(batch)) => batch,
            Ok(None) => panic!("timed out: {} of {count} events: {events:?}", events.len()),
            Err(e) => panic!("watch failed after {events:?}: {e}"),
        };
        assert!(batch.revision >= last_batch, "batch revisions go back");
        for event in &batch.events {
            assert!(
                event.mod_revision() <= batch.revision,
                "event {event:?} is newer than its batch {}",
                batch.revision
            );
        }
        last_batch = batch.revision;
        events.extend(batch.events);
    }
    events
}

/// The watch yields exactly `expected` and then nothing else.
fn expect_exactly(watch: &Watch, store: &dyn Store, p: &str, expected: &[Event]) {
    expect_each_exactly(&[(watch, expected)], store, p);
}

/// Each watch yields exactly its expected events and then nothing else: a
/// sentinel written afterwards under the prefix must be the very next event.
fn expect_each_exactly(watches: &[(&Watch, &[Event])], store: &dyn Store, p: &str) {
    for (watch, expected) in watches {
        let events = collect(watch, expected.len());
        assert_eq!(&events, expected, "watch events");
        let mut seen = HashSet::new();
        for pair in events.windows(2) {
            assert!(
                pair[0].mod_revision() <= pair[1].mod_revision(),
                "out of order"
            );
        }
        for event in &events {
            let first = seen.insert((event.mod_revision(), event.key().to_owned()));
            assert!(first, "repeated {event:?}");
        }
    }
    let sentinel = format!("{p}~sentinel");
    let rev = store.put(&sentinel, b"end", None).expect("put sentinel");
    for (watch, _) in watches {
        assert_eq!(
            collect(watch, 1),
            [put_event(&sentinel, b"end", rev)],
            "extra events after the expected ones"
        );
    }
}
