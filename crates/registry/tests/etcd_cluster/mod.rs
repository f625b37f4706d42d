//! A throwaway etcd cluster for tests: members on 127.x.y.z loopback addresses
//! with their own data directories, killed when the value is dropped.
//!
//! Each cluster gets loopback addresses of its own (from the process id and a
//! counter), so tests in parallel, or a system etcd on 127.0.0.1:2379, never clash.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use wiremesh_registry::{EtcdOptions, EtcdStore, Store};

pub struct EtcdCluster {
    members: Vec<Member>,
    dir: tempfile::TempDir,
}

struct Member {
    name: String,
    ip: String,
    child: Option<Child>,
}

impl EtcdCluster {
    /// Starts `size` members and waits for a leader; `None` (having printed
    /// `skipped: etcd not installed`) when there is no etcd binary.
    pub fn start(size: usize) -> Option<EtcdCluster> {
        if !on_path("etcd") {
            println!("skipped: etcd not installed (apt-get install etcd-server etcd-client)");
            return None;
        }
        static CLUSTERS: AtomicU32 = AtomicU32::new(0);
        let n = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let members = (1..=size)
            .map(|i| Member {
                name: format!("m{i}"),
                ip: format!("127.{}.{}.{i}", 100 + (n % 100), pid % 250 + 1),
                child: None,
            })
            .collect();
        let mut cluster = EtcdCluster {
            members,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        for i in 0..size {
            cluster.spawn(i);
        }
        for i in 0..size {
            cluster.wait_ready(i);
        }
        Some(cluster)
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| client_url(&m.ip)).collect()
    }

    pub fn connect(&self) -> EtcdStore {
        EtcdStore::connect(&self.endpoints(), EtcdOptions::default()).expect("connect")
    }

    /// SIGKILLs member `i`, as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its old data and waits until it serves.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_ready(i);
    }

    pub fn log_dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self, i: usize) {
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, peer_url(&m.ip)))
            .collect::<Vec<_>>()
            .join(",");
        // One token for the whole cluster; it also keeps clusters apart.
        let token = format!("wiremesh-test-{}", self.members[0].ip);
        let member = &self.members[i];
        let data_dir: PathBuf = self.dir.path().join(&member.name);
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", member.name)))
            .expect("open member log");
        let child = Command::new("etcd")
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen-client-urls", &client_url(&member.ip)])
            .args(["--advertise-client-urls", &client_url(&member.ip)])
            .args(["--listen-peer-urls", &peer_url(&member.ip)])
            .args(["--initial-advertise-peer-urls", &peer_url(&member.ip)])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &token])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.members[i].child = Some(child);
    }

    /// Polls member `i` alone until a read through it succeeds, which needs the
    /// member up and a leader elected (the client requires one).
    fn wait_ready(&mut self, i: usize) {
        let endpoint = [client_url(&self.members[i].ip)];
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = EtcdStore::connect(&endpoint, EtcdOptions::default())
                .and_then(|store| store.get("wiremesh-test/ready"));
            match ready {
                Ok(_) => return,
                Err(e) if Instant::now() > deadline => panic!(
                    "etcd member {} not ready after 30 s: {e}; logs in {}",
                    self.members[i].name,
                    self.dir.path().display()
                ),
                Err(_) => thread::sleep(Duration::from_millis(200)),
            }
            if let Some(child) = self.members[i].child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = std::fs::read_to_string(
                        self.dir
                            .path()
                            .join(format!("{}.log", self.members[i].name)),
                    )
                    .unwrap_or_default();
                    panic!("etcd member exited with {status}:\n{log}");
                }
            }
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

fn client_url(ip: &str) -> String {
    format!("http://{ip}:2379")
}

fn peer_url(ip: &str) -> String {
    format!("http://{ip}:2380")
}

pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}
