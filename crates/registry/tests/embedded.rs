//! The embedded backend against the conformance suite, plus what only it has:
//! a file on disk that can be corrupt, a bounded change log, file modes.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use wiremesh_registry::{EmbeddedOptions, EmbeddedStore, Store, StoreError};

/// Each test gets its own directory; every call opens another handle on it.
fn fresh() -> impl Fn() -> Box<dyn Store> {
    let dir = tempfile::tempdir().expect("tempdir");
    move || {
        Box::new(EmbeddedStore::open(dir.path().join("registry")).expect("open")) as Box<dyn Store>
    }
}

wiremesh_registry::conformance_tests!(fresh());

#[test]
fn corrupt_file_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path()).expect("open");
    store.put("k", b"v", None).expect("put");
    let path = dir.path().join("store.json");
    for garbage in [&b"{\"format\": 1, \"revis"[..], b"", b"[]", b"\xff\xfe"] {
        fs::write(&path, garbage).expect("write garbage");
        let err = store.get("k").expect_err("corrupt file read");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        let err = EmbeddedStore::open(dir.path()).expect_err("open corrupt");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    }
}

#[test]
fn inconsistent_file_is_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path()).expect("open");
    store.put("k", b"v", None).expect("put");
    let path = dir.path().join("store.json");
    let text = fs::read_to_string(&path).expect("read");
    // A key from the future.
    fs::write(&path, text.replace("\"revision\":1", "\"revision\":0")).expect("write");
    let err = store.get("k").expect_err("inconsistent file read");
    assert!(err.to_string().contains("mod_revision"), "{err}");
}

#[test]
fn files_are_private() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("registry");
    let store = EmbeddedStore::open(&root).expect("open");
    store.put("k", b"v", None).expect("put");
    let mode = |p: &std::path::Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(&root.join("store.json")), 0o600);
    assert_eq!(mode(&root.join("lock")), 0o600);
}

#[test]
fn watch_behind_the_log_reports_compaction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = EmbeddedOptions {
        log_capacity: 4,
        ..EmbeddedOptions::default()
    };
    let store = EmbeddedStore::open_with(dir.path(), options).expect("open");
    for i in 0..10 {
        store.put(&format!("k{i}"), b"v", None).expect("put");
    }
    // Revisions 1..=6 were dropped; a watch after 6 still works, after 5 cannot.
    let watch = store.watch("", 6).expect("watch");
    let batch = watch
        .recv_timeout(Duration::from_secs(10))
        .expect("watch after 6")
        .expect("a batch");
    assert_eq!(batch.events.len(), 4);
    let watch = store.watch("", 5).expect("watch");
    match watch.recv_timeout(Duration::from_secs(10)) {
        Err(StoreError::Compacted {
            requested: 5,
            compacted: 6,
        }) => {}
        other => panic!("want Compacted, got {other:?}"),
    }
    assert!(matches!(watch.recv(), Err(StoreError::WatchClosed)));
}

#[test]
fn empty_key_and_zero_ttl_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path()).expect("open");
    assert!(matches!(
        store.put("", b"v", None),
        Err(StoreError::InvalidArgument(_))
    ));
    assert!(matches!(
        store.grant_lease(Duration::ZERO),
        Err(StoreError::InvalidArgument(_))
    ));
}

/// Set in the child processes of `processes_share_one_store`: the store to use.
const CHILD_DIR_ENV: &str = "WIREMESH_REGISTRY_TEST_CHILD_DIR";
const INCREMENTS: u32 = 15;

/// Real processes (this test binary, run again as children) increment one counter
/// with compare-and-put; the flock must make every increment count exactly once.
#[test]
fn processes_share_one_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path()).expect("open");
    let exe = std::env::current_exe().expect("own path");
    let children: Vec<_> = (0..3)
        .map(|_| {
            std::process::Command::new(&exe)
                .args(["--exact", "child_increments_counter", "--test-threads=1"])
                .env(CHILD_DIR_ENV, dir.path())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawn child")
        })
        .collect();
    for mut child in children {
        assert!(child.wait().expect("wait").success(), "a child failed");
    }
    let kv = store.get("counter").expect("get").expect("counter exists");
    assert_eq!(kv.value, (3 * INCREMENTS).to_string().as_bytes());
}

/// Does nothing unless started by `processes_share_one_store`.
#[test]
fn child_increments_counter() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let store = EmbeddedStore::open(dir).expect("open");
    let mut done = 0;
    while done < INCREMENTS {
        let current = store.get("counter").expect("get");
        let (expected, n) = match &current {
            Some(kv) => {
                let text = std::str::from_utf8(&kv.value).expect("utf-8");
                (Some(kv.mod_revision), text.parse::<u32>().expect("number"))
            }
            None => (None, 0),
        };
        let next = (n + 1).to_string();
        if store
            .compare_and_put("counter", expected, next.as_bytes(), None)
            .expect("cas")
        {
            done += 1;
        }
    }
}
