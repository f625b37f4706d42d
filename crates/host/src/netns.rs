//! Network namespaces: create, delete, and run code inside one.
//!
//! Code runs inside a namespace on a thread of its own, because `setns` changes only
//! the calling thread: the rest of the process stays where it was.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

use crate::{run, HostError};

pub const NETNS_DIR: &str = "/var/run/netns";

/// The bind-mount path of a named namespace.
pub fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn exists(name: &str) -> bool {
    path_of(name).exists()
}

/// Create a namespace with its loopback up. Creating one that exists is an error.
pub fn add(name: &str) -> Result<(), HostError> {
    run(&["ip", "netns", "add", name])?;
    run(&["ip", "-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Delete a namespace; a missing one is not an error (cleanup is idempotent).
pub fn delete(name: &str) -> Result<(), HostError> {
    if !exists(name) {
        return Ok(());
    }
    run(&["ip", "netns", "delete", name]).map(|_| ())
}

/// Kill every process inside a namespace, then delete it (for tearing down test beds).
pub fn kill_and_delete(name: &str) -> Result<(), HostError> {
    if let Ok(pids) = run(&["ip", "netns", "pids", name]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
    }
    delete(name)
}

/// Names of all namespaces that start with `prefix`.
pub fn list(prefix: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Run `f` on a new thread that has joined the namespace at `path` (a name's bind
/// mount, or `/proc/PID/ns/net`), and wait for its result.
pub fn enter_path<T, F>(path: &Path, f: F) -> Result<T, HostError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let netns_err = |reason: String| HostError::Netns {
        name: path.display().to_string(),
        reason,
    };
    let file = File::open(path).map_err(|e| netns_err(e.to_string()))?;
    let handle = std::thread::spawn(move || -> Result<T, String> {
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns: {e}"))?;
        Ok(f())
    });
    handle
        .join()
        .map_err(|_| netns_err("the task inside panicked".into()))?
        .map_err(netns_err)
}

/// [`enter_path`] for a named namespace.
pub fn enter<T, F>(name: &str, f: F) -> Result<T, HostError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    enter_path(&path_of(name), f)
}

/// Like [`enter`], but the thread stays in the namespace and keeps running `f`
/// (a server, say) until it returns; the caller gets the join handle.
pub fn spawn_in<F>(name: &str, f: F) -> Result<std::thread::JoinHandle<()>, HostError>
where
    F: FnOnce() + Send + 'static,
{
    let file = File::open(path_of(name)).map_err(|e| HostError::Netns {
        name: name.into(),
        reason: e.to_string(),
    })?;
    let name = name.to_owned();
    Ok(std::thread::spawn(move || {
        match setns(&file, CloneFlags::CLONE_NEWNET) {
            Ok(()) => f(),
            Err(e) => tracing::error!("cannot enter network namespace {name}: {e}"),
        }
    }))
}
