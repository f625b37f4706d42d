//! Test-only helpers shared by wiremesh's integration tests.
//!
//! - [`Netns`]: a uniquely named network namespace (`wmt-<random>-<name>`) that is
//!   deleted — and every process in it terminated — when the guard drops, even when
//!   the test panics. Run commands in it ([`Netns::exec`], [`Netns::spawn`]) or run
//!   Rust code in it ([`Netns::run`], a thread that joined the namespace).
//! - [`veth_pair`]: connect two namespaces.
//! - [`wait_until`]: bounded polling instead of fixed sleeps.
//! - [`require_root`], [`require_tool`]: print `skipped: <why>` and return false when a
//!   test cannot run here, so it never passes silently; with `WIREMESH_NO_SKIP` set
//!   (CI sets it) a missing prerequisite fails the test instead.
//! - [`cargo_bin`]: the path of a binary built by this workspace.
//! - [`unique_ifname`]: interface names for devices; `/var/run/wireguard/` is shared by
//!   every namespace, so two `wg0`s in two namespaces would fight over `wg0.sock`.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// `n` random lowercase letters and digits (not cryptographic: for unique names).
pub fn random_suffix(n: usize) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let mut x = h.finish();
    (0..n)
        .map(|_| {
            let c = ALPHABET[(x % ALPHABET.len() as u64) as usize];
            x = (x / ALPHABET.len() as u64) ^ x.rotate_left(17).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            c as char
        })
        .collect()
}

/// A unique interface name: `prefix` (at most 10 bytes) plus 5 random characters.
pub fn unique_ifname(prefix: &str) -> String {
    assert!(prefix.len() <= 10, "interface names are at most 15 bytes");
    format!("{prefix}{}", random_suffix(5))
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn on_path(tool: &str) -> bool {
    if tool.contains('/') {
        return Path::new(tool).exists();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// True if `tool` is on `PATH`; otherwise prints `skipped: <tool> not installed`.
pub fn require_tool(tool: &str) -> bool {
    on_path(tool) || skip(&format!("{tool} not installed"))
}

/// Says why a test does not run, and returns false; panics under `WIREMESH_NO_SKIP`,
/// where a skip would hide a broken CI machine behind a green run.
pub fn skip(why: &str) -> bool {
    assert!(
        std::env::var_os("WIREMESH_NO_SKIP").is_none(),
        "cannot run: {why} (WIREMESH_NO_SKIP is set)"
    );
    println!("skipped: {why}");
    false
}

/// True if this process may create network namespaces and TUN devices (root, `ip`
/// present, `/dev/net/tun` there); otherwise prints `skipped: <why>`.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("needs root for network namespaces");
    }
    if !Path::new("/dev/net/tun").exists() {
        return skip("/dev/net/tun missing");
    }
    require_tool("ip")
}

/// The path of binary `name` built by this workspace: `$CARGO_TARGET_DIR` or the
/// workspace's `target/`, preferring whichever of `debug`/`release` is newer.
pub fn cargo_bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let candidates = ["debug", "release"].map(|p| target.join(p).join(name));
    candidates
        .iter()
        .filter_map(|p| Some((std::fs::metadata(p).ok()?.modified().ok()?, p)))
        .max_by_key(|(t, _)| *t)
        .map(|(_, p)| p.clone())
        .unwrap_or_else(|| candidates[0].clone())
}

/// A network namespace that exists for the guard's lifetime.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `wmt-<random>-<name>` with `lo` up.
    pub fn new(name: &str) -> io::Result<Self> {
        let ns = Self {
            name: format!("wmt-{}-{name}", random_suffix(6)),
        };
        run_ok(Command::new("ip").args(["netns", "add", &ns.name]))?;
        // From here on Drop cleans up.
        run_ok(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// The namespace's name (for `ip -n NAME` / `ip netns exec NAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    /// Runs a command inside the namespace and waits for it.
    pub fn exec(&self, args: &[&str]) -> io::Result<Output> {
        self.command(args).stdin(Stdio::null()).output()
    }

    /// Runs a command inside the namespace; its stdout if it succeeded, else an error
    /// carrying its stderr.
    pub fn exec_ok(&self, args: &[&str]) -> io::Result<String> {
        let out = self.exec(args)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(io::Error::other(format!(
                "{args:?} in {} failed ({}): {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// Like [`Netns::exec`], with environment variables set.
    pub fn exec_env(&self, env: &[(&str, &str)], args: &[&str]) -> io::Result<Output> {
        let mut c = self.command(args);
        c.envs(env.iter().copied()).stdin(Stdio::null());
        c.output()
    }

    /// Starts a command inside the namespace (stdout and stderr inherited, so they
    /// show in test output). It is terminated when the guard drops, if still running.
    pub fn spawn(&self, args: &[&str]) -> io::Result<Child> {
        self.command(args).stdin(Stdio::null()).spawn()
    }

    /// Runs `f` on a thread that has joined this namespace: sockets it opens live here.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let path = Path::new("/var/run/netns").join(&self.name);
        let file = std::fs::File::open(&path)?;
        std::thread::scope(|s| {
            s.spawn(|| {
                use std::os::fd::AsRawFd;
                // SAFETY: setns on a valid namespace fd affects only this thread.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// The processes running in the namespace.
    pub fn pids(&self) -> Vec<i32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // SIGTERM first so devices remove their UAPI sockets, then SIGKILL.
        // Only processes inside this namespace are touched.
        for pid in self.pids() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if !wait_until(Duration::from_secs(3), || self.pids().is_empty()) {
            for pid in self.pids() {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            wait_until(Duration::from_secs(2), || self.pids().is_empty());
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

fn run_ok(cmd: &mut Command) -> io::Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Connects `a` and `b` with a veth pair, assigns `addr_a` / `addr_b` (CIDR notation,
/// IPv4 or IPv6) and brings both ends up. Returns the two interface names.
pub fn veth_pair(a: &Netns, b: &Netns, addr_a: &str, addr_b: &str) -> io::Result<(String, String)> {
    let suffix = random_suffix(5);
    let (ia, ib) = (format!("va{suffix}"), format!("vb{suffix}"));
    run_ok(Command::new("ip").args([
        "link",
        "add",
        &ia,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        &ib,
        "netns",
        b.name(),
    ]))?;
    for (ns, dev, addr) in [(a, &ia, addr_a), (b, &ib, addr_b)] {
        let mut args = vec!["-n", ns.name(), "addr", "add", addr, "dev", dev.as_str()];
        if addr.contains(':') {
            // No duplicate address detection: the address is usable at once.
            args.push("nodad");
        }
        run_ok(Command::new("ip").args(&args))?;
        run_ok(Command::new("ip").args(["-n", ns.name(), "link", "set", dev.as_str(), "up"]))?;
    }
    Ok((ia, ib))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_short() {
        let a = unique_ifname("wmt");
        let b = unique_ifname("wmt");
        assert_ne!(a, b);
        assert_eq!(a.len(), 8);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn wait_until_is_bounded() {
        let start = Instant::now();
        assert!(!wait_until(Duration::from_millis(50), || false));
        assert!(start.elapsed() < Duration::from_secs(2));
        let mut n = 0;
        assert!(wait_until(Duration::from_secs(1), || {
            n += 1;
            n > 2
        }));
    }

    #[test]
    fn cargo_bin_points_into_the_target_dir() {
        let p = cargo_bin("wiremesh-wg");
        assert_eq!(p.file_name().and_then(|n| n.to_str()), Some("wiremesh-wg"));
        let profile = p
            .parent()
            .and_then(|d| d.file_name())
            .and_then(|n| n.to_str());
        assert!(
            matches!(profile, Some("debug" | "release")),
            "{}",
            p.display()
        );
    }

    #[test]
    fn netns_lifecycle() {
        if !require_root() {
            return;
        }
        let path;
        let mut child;
        {
            let a = Netns::new("kit").unwrap();
            let b = Netns::new("kit2").unwrap();
            path = Path::new("/var/run/netns").join(a.name());
            assert!(path.exists());
            veth_pair(&a, &b, "192.168.200.1/24", "192.168.200.2/24").unwrap();
            let out = a.exec_ok(&["ip", "-o", "addr"]).unwrap();
            assert!(out.contains("192.168.200.1"), "{out}");
            child = a.spawn(&["sleep", "60"]).unwrap();
            let bound = a
                .run(|| std::net::UdpSocket::bind("192.168.200.1:0").is_ok())
                .unwrap();
            assert!(bound, "thread did not join the namespace");
        }
        assert!(!path.exists(), "namespace not deleted");
        // The guard terminated the process it started.
        assert!(!child.wait().unwrap().success());
    }
}
