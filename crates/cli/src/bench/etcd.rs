//! A throwaway etcd cluster inside a network namespace, for test beds whose nodes are
//! namespaces themselves: the members listen on addresses the caller has put on the
//! bed's bridge, so every node's agent reaches them the way it would reach a real
//! registry, over its own link. Each member has its own data directory and log under
//! `dir`; the members are SIGKILLed when the value drops.
//!
//! Used by `wiremesh bench` and, through `#[path]`, by the end-to-end tests
//! (`crates/cli/tests/support`), so both run etcd the same way.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use wiremesh_host::netns;
use wiremesh_registry::{EtcdOptions, EtcdStore, Store};

/// How long a member may take to serve (it needs a quorum and a leader).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct LocalEtcd {
    netns: String,
    dir: PathBuf,
    members: Vec<Member>,
}

struct Member {
    name: String,
    ip: Ipv4Addr,
    child: Option<Child>,
}

/// Whether an `etcd` binary is on `PATH` (Debian: `etcd-server`).
pub fn installed() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join("etcd").is_file()))
}

impl LocalEtcd {
    /// Starts one member on each of `ips` (already configured in namespace `netns`)
    /// and waits until every one serves reads.
    pub fn start(netns: &str, ips: &[Ipv4Addr], dir: &Path) -> Result<LocalEtcd> {
        if !installed() {
            bail!("etcd is not installed (apt-get install etcd-server)");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut etcd = LocalEtcd {
            netns: netns.to_owned(),
            dir: dir.to_owned(),
            members: ips
                .iter()
                .enumerate()
                .map(|(i, &ip)| Member {
                    name: format!("m{}", i + 1),
                    ip,
                    child: None,
                })
                .collect(),
        };
        etcd.start_all()?;
        Ok(etcd)
    }

    /// The registry address agents are given: `etcd://ip:2379,...`.
    pub fn address(&self) -> String {
        let members: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}:2379", m.ip))
            .collect();
        format!("etcd://{}", members.join(","))
    }

    #[allow(dead_code)] // used by the end-to-end tests
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Where the members' data directories and logs are.
    #[allow(dead_code)] // used by the end-to-end tests
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// SIGKILLs member `i`, as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    /// Starts member `i` again on its data and waits until it serves.
    #[allow(dead_code)] // used by the end-to-end tests
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i);
        self.spawn(i)?;
        self.wait_ready(i)
    }

    /// Starts every member that is not running (all at once: a quorum must be up
    /// for any of them to serve) and waits until each serves.
    pub fn start_all(&mut self) -> Result<()> {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.spawn(i)?;
            }
        }
        for i in 0..self.members.len() {
            self.wait_ready(i)?;
        }
        Ok(())
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let peer_url = |ip: Ipv4Addr| format!("http://{ip}:2380");
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, peer_url(m.ip)))
            .collect::<Vec<_>>()
            .join(",");
        let member = &self.members[i];
        let client_url = format!("http://{}:2379", member.ip);
        let log_path = self.dir.join(format!("{}.log", member.name));
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns, "etcd"])
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(self.dir.join(&member.name))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url(member.ip)])
            .args(["--initial-advertise-peer-urls", &peer_url(member.ip)])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args([
                "--initial-cluster-token",
                &format!("wiremesh-{}", self.netns),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd")?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Polls member `i` alone, from inside the namespace, until a read through it
    /// succeeds (which needs a leader).
    fn wait_ready(&mut self, i: usize) -> Result<()> {
        let endpoint = format!("http://{}:2379", self.members[i].ip);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let endpoint = endpoint.clone();
            let ready = netns::enter(&self.netns, move || {
                EtcdStore::connect(&[endpoint], EtcdOptions::default())
                    .and_then(|store| store.get("wiremesh-ready").map(drop))
                    .map_err(|e| e.to_string())
            })?;
            match ready {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => bail!(
                    "etcd member {} not serving after {READY_TIMEOUT:?}: {e}; log in {}",
                    self.members[i].name,
                    self.dir.display()
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
            if let Some(Ok(Some(status))) = self.members[i].child.as_mut().map(Child::try_wait) {
                bail!(
                    "etcd member {} exited with {status}; log in {}",
                    self.members[i].name,
                    self.dir.display()
                );
            }
        }
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        self.kill_all();
    }
}
