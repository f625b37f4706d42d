//! A throwaway etcd cluster for tests: members on 127.x.y.z loopback addresses
//! with their own data directories, killed when the value is dropped.
//!
//! Each cluster gets loopback addresses of its own (from the process id and a
//! counter), so tests in parallel, or a system etcd on 127.0.0.1:2379, never clash.
//! [`EtcdCluster::start_tls`] serves clients over TLS with client certificates,
//! from a CA the helper makes with the `openssl` command.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

pub use wiremesh_testkit::require_tool;

use wiremesh_registry::{EtcdOptions, EtcdStore, EtcdTls, Store};

pub struct EtcdCluster {
    members: Vec<Member>,
    dir: tempfile::TempDir,
    /// Whether clients must speak TLS and show a certificate.
    tls: bool,
    /// What [`EtcdCluster::connect`] uses: TLS material when `tls`.
    options: EtcdOptions,
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
        Self::start_with(size, false)
    }

    /// Like [`EtcdCluster::start`], with TLS and client certificates on the client
    /// port; also `None` (having said why) without the `openssl` command.
    pub fn start_tls(size: usize) -> Option<EtcdCluster> {
        if !require_tool("openssl") {
            return None;
        }
        Self::start_with(size, true)
    }

    fn start_with(size: usize, tls: bool) -> Option<EtcdCluster> {
        if !require_tool("etcd") {
            println!("apt-get install etcd-server etcd-client");
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
            tls,
            options: EtcdOptions::default(),
        };
        if tls {
            cluster.options.tls = Some(cluster.make_certificates());
        }
        for i in 0..size {
            cluster.spawn(i);
        }
        for i in 0..size {
            cluster.wait_ready(i);
        }
        Some(cluster)
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| client_url(&m.ip, self.tls))
            .collect()
    }

    /// The options [`EtcdCluster::connect`] uses (with TLS material for a TLS cluster).
    pub fn options(&self) -> EtcdOptions {
        self.options.clone()
    }

    pub fn connect(&self) -> EtcdStore {
        EtcdStore::connect(&self.endpoints(), self.options()).expect("connect")
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
        let url = client_url(&member.ip, self.tls);
        let data_dir: PathBuf = self.dir.path().join(&member.name);
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", member.name)))
            .expect("open member log");
        let mut command = Command::new("etcd");
        if self.tls {
            let file = |name: &str| self.dir.path().join(name);
            command
                .arg("--cert-file")
                .arg(file("server.crt"))
                .arg("--key-file")
                .arg(file("server.key"))
                .arg("--trusted-ca-file")
                .arg(file("ca.crt"))
                .arg("--client-cert-auth");
        }
        let child = command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen-client-urls", &url])
            .args(["--advertise-client-urls", &url])
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
        let endpoint = [client_url(&self.members[i].ip, self.tls)];
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = EtcdStore::connect(&endpoint, self.options())
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

impl EtcdCluster {
    /// A CA, a server certificate for every member's address and a client
    /// certificate, as PEM files in the cluster's directory; returns the client's
    /// TLS options.
    fn make_certificates(&self) -> EtcdTls {
        let dir = self.dir.path();
        let san = self
            .members
            .iter()
            .map(|m| format!("IP:{}", m.ip))
            .collect::<Vec<_>>()
            .join(",");
        std::fs::write(
            dir.join("server.ext"),
            format!("subjectAltName={san}\nextendedKeyUsage=serverAuth\n"),
        )
        .expect("write server.ext");
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")
            .expect("write client.ext");
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            dir,
            &[
                &["req", "-x509"],
                &ec[..],
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.crt",
                    "-days",
                    "1",
                    "-subj",
                    "/CN=wiremesh-test-ca",
                ],
            ]
            .concat(),
        );
        for (name, cn) in [("server", "etcd"), ("client", "root")] {
            openssl(
                dir,
                &[
                    &["req"],
                    &ec[..],
                    &[
                        "-keyout",
                        &format!("{name}.key"),
                        "-out",
                        &format!("{name}.csr"),
                        "-subj",
                        &format!("/CN={cn}"),
                    ],
                ]
                .concat(),
            );
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "1",
                    "-out",
                    &format!("{name}.crt"),
                    "-extfile",
                    &format!("{name}.ext"),
                ],
            );
        }
        let read = |name: &str| std::fs::read(dir.join(name)).expect("read certificate");
        EtcdTls {
            ca_pem: read("ca.crt"),
            identity: Some((read("client.crt"), read("client.key"))),
            domain: None,
        }
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        output.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn client_url(ip: &str, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{ip}:2379")
}

fn peer_url(ip: &str) -> String {
    format!("http://{ip}:2380")
}
