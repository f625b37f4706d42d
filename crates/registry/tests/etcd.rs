//! The etcd backend against a real 3-member etcd cluster started by the test:
//! the conformance suite, a watch that lives through members being killed and
//! restarted, and compaction ending a watch. Prints `skipped: ...` and passes
//! when etcd is not installed (see crates/registry/APT-PACKAGES).

#![cfg(feature = "etcd")]

mod etcd_cluster;

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use etcd_cluster::EtcdCluster;
use wiremesh_registry::{EtcdOptions, EtcdStore, Event, Revision, Store, StoreError};

#[test]
fn conformance_on_a_three_member_cluster() {
    let Some(cluster) = EtcdCluster::start(3) else {
        return;
    };
    wiremesh_registry::conformance::run_all(|| Box::new(cluster.connect()) as Box<dyn Store>);
}

/// Each member in turn is killed while a watch is open and writes go on, then
/// restarted: the watch must deliver every write once, in order.
#[test]
fn watch_survives_member_restarts() {
    let Some(mut cluster) = EtcdCluster::start(3) else {
        return;
    };
    let store = cluster.connect();
    let prefix = "wiremesh-test/restarts/";
    let (_, start) = store.list(prefix).expect("list");
    let watch = store.watch(prefix, start).expect("watch");
    let mut expected = Vec::new();
    let mut write = |n: usize| {
        let key = format!("{prefix}k{n}");
        let revision = create(&store, &key);
        expected.push((key, revision));
    };
    write(0);
    for member in 0..3 {
        cluster.kill(member);
        write(10 * member + 1);
        write(10 * member + 2);
        cluster.restart(member);
        write(10 * member + 3);
    }
    let mut seen: Vec<(String, Revision)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < expected.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match watch.recv_timeout(left) {
            Ok(Some(batch)) => seen.extend(batch.events.into_iter().map(|e| match e {
                Event::Put(kv) => (kv.key, kv.mod_revision),
                other => panic!("unexpected {other:?}"),
            })),
            Ok(None) => panic!(
                "timed out with {seen:?}, want {expected:?}; logs in {}",
                cluster.log_dir().display()
            ),
            Err(e) => panic!("watch ended: {e}"),
        }
    }
    assert_eq!(seen, expected);
}

/// After `etcdctl compact`, a watch from before the compaction ends with
/// `Compacted`, while one from after it works.
#[test]
fn compaction_ends_a_watch_from_before_it() {
    if !etcd_cluster::require_tool("etcdctl") {
        return;
    }
    let Some(cluster) = EtcdCluster::start(1) else {
        return;
    };
    let store = cluster.connect();
    let prefix = "wiremesh-test/compaction/";
    let first = store.put(&format!("{prefix}a"), b"1", None).expect("put");
    let last = store.put(&format!("{prefix}a"), b"2", None).expect("put");
    let status = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", cluster.endpoints().join(",")))
        .args(["compact", &last.to_string()])
        .output()
        .expect("run etcdctl");
    assert!(status.status.success(), "etcdctl compact: {status:?}");
    // etcd keeps the history from the compaction revision on: a watch must start
    // there or later, that is, after `last - 1`.
    let watch = store.watch(prefix, first - 1).expect("watch");
    match watch.recv_timeout(Duration::from_secs(15)) {
        Err(StoreError::Compacted {
            requested,
            compacted,
        }) => {
            assert_eq!(requested, first - 1);
            assert_eq!(compacted, last - 1);
        }
        other => panic!("want Compacted, got {other:?}"),
    }
    let watch = store.watch(prefix, last - 1).expect("watch");
    let batch = watch
        .recv_timeout(Duration::from_secs(15))
        .expect("watch from the compaction point")
        .expect("a batch");
    assert_eq!(batch.events.len(), 1);
}

/// Creates `key` with a compare-and-put, retrying while a member is down: unlike
/// a plain put, a retry of a create that already went through cannot write twice.
fn create(store: &dyn Store, key: &str) -> Revision {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match store.compare_and_put(key, None, b"v", None) {
            Ok(_) => {
                if let Some(kv) = store.get(key).ok().flatten() {
                    return kv.mod_revision;
                }
            }
            Err(e) if Instant::now() > deadline => panic!("cannot write {key}: {e}"),
            Err(_) => {}
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A watch keeps working after every handle on its store is gone.
#[test]
fn watch_outlives_its_store_handle() {
    let Some(cluster) = EtcdCluster::start(1) else {
        return;
    };
    let prefix = "wiremesh-test/outlives/";
    let watch = {
        let store = cluster.connect();
        store.watch(prefix, store.list(prefix).expect("list").1)
    }
    .expect("watch");
    let revision = cluster
        .connect()
        .put(&format!("{prefix}k"), b"v", None)
        .expect("put");
    let batch = watch
        .recv_timeout(Duration::from_secs(15))
        .expect("watch alive")
        .expect("a batch");
    assert_eq!(batch.events.len(), 1);
    assert_eq!(batch.events[0].mod_revision(), revision);
}

/// TLS with client certificates: the suite's basics over it, and a client
/// without the cluster's CA cannot get in.
#[test]
fn tls_with_client_certificates() {
    let Some(cluster) = EtcdCluster::start_tls(1) else {
        return;
    };
    let open = || Box::new(cluster.connect()) as Box<dyn Store>;
    wiremesh_registry::conformance::put_get_list_delete(&open);
    wiremesh_registry::conformance::watch_in_order(&open);

    let mut untrusted = cluster.options();
    untrusted.tls = None;
    let endpoints = cluster.endpoints();
    let refused = EtcdStore::connect(&endpoints, untrusted).and_then(|s| s.get("k"));
    assert!(
        refused.is_err(),
        "plain client read over a TLS port: {refused:?}"
    );
}

/// etcd's own user/password authentication: right credentials work, wrong ones
/// and none are `Refused`.
#[test]
fn user_and_password() {
    if !etcd_cluster::require_tool("etcdctl") {
        return;
    }
    let Some(cluster) = EtcdCluster::start(1) else {
        return;
    };
    let endpoints = cluster.endpoints();
    for args in [
        &["user", "add", "root:test-password"][..],
        &["auth", "enable"],
    ] {
        let output = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .args(args)
            .output()
            .expect("run etcdctl");
        assert!(output.status.success(), "etcdctl {args:?}: {output:?}");
    }
    let with = |user: Option<(&str, &str)>| EtcdOptions {
        user: user.map(|(u, p)| (u.to_owned(), p.to_owned())),
        ..cluster.options()
    };
    let store =
        EtcdStore::connect(&endpoints, with(Some(("root", "test-password")))).expect("connect");
    let revision = store
        .put("wiremesh-test/auth", b"v", None)
        .expect("put with password");
    assert_eq!(
        store
            .get("wiremesh-test/auth")
            .expect("get")
            .map(|kv| kv.mod_revision),
        Some(revision)
    );

    let wrong =
        EtcdStore::connect(&endpoints, with(Some(("root", "wrong")))).and_then(|s| s.get("k"));
    assert!(
        matches!(wrong, Err(StoreError::Refused { .. })),
        "wrong password: {wrong:?}"
    );
    let none = EtcdStore::connect(&endpoints, with(None)).and_then(|s| s.get("k"));
    assert!(
        matches!(none, Err(StoreError::Refused { .. })),
        "no credentials: {none:?}"
    );
    // The password never shows in the options' Debug form.
    assert!(!format!("{:?}", with(Some(("root", "test-password")))).contains("test-password"));
}
