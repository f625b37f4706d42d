//! Convergence after a join: N nodes (namespaces on one bridge, one agent and one
//! `wiremesh-wg` each) are brought up and settle; then one more node joins, and the
//! benchmark times how long until every existing node's device lists it as a peer.
//! Timed from the moment its record is in the registry, so the agent's own start-up
//! (key generation, device start) is not counted.
//!
//! The registry is a directory, or an etcd cluster this benchmark starts
//! (`--registry etcd`): its members run in the bridge's namespace, so every agent
//! talks to etcd over its node's link. [`Bed`] and [`Bed::join`] are shared with
//! `wiremesh bench fanout`, which reports the spread across agents.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use wiremesh_agent::Cluster;
use wiremesh_host::{netns, uapi_client};
use wiremesh_model::{ClusterSettings, Node, NodeName, PrivateKey, PublicKey};

use super::etcd::LocalEtcd;

const PREFIX: &str = "wmb-";
const FABRIC: &str = "wmb-net";
/// The bridge's MAC address (locally administered).
const BRIDGE_MAC: &str = "02:77:6d:00:00:01";

/// Where the bench cluster's records live.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Registry {
    /// The embedded registry: a directory in the working directory.
    Dir,
    /// A local etcd cluster started for the benchmark (needs Debian's etcd-server).
    Etcd,
}

/// The options shared by the benchmarks that build a [`Bed`].
#[derive(clap::Args, Clone)]
pub struct BedArgs {
    /// Members of the etcd cluster (with `--registry etcd`).
    #[arg(long, default_value_t = 3)]
    pub etcd_members: u8,
    /// Working directory (registry, state); the agents' logs go to WORKDIR.logs.
    #[arg(long, default_value = "/run/wiremesh-bench")]
    pub workdir: PathBuf,
    /// The agents' log filter (RUST_LOG syntax).
    #[arg(long, default_value = "warn")]
    pub agent_log: String,
}

#[derive(clap::Args)]
pub struct Args {
    /// Cluster sizes to measure (nodes present before the join).
    #[arg(long, value_delimiter = ',', default_value = "10,20,50")]
    nodes: Vec<usize>,
    /// The registry the agents use.
    #[arg(long, value_enum, default_value_t = Registry::Dir)]
    registry: Registry,
    #[command(flatten)]
    bed: BedArgs,
}

/// The test bed: a bridge in namespace `FABRIC`, one namespace per node, the
/// registry, and the agents (which start their devices).
pub struct Bed {
    workdir: PathBuf,
    registry: String,
    cluster: Cluster,
    /// The agents, by node index.
    agents: Vec<Child>,
    /// Agents that exited and were started again.
    pub restarts: usize,
    agent_log: String,
    etcd: Option<LocalEtcd>,
}

impl Drop for Bed {
    fn drop(&mut self) {
        for a in &mut self.agents {
            let _ = a.kill();
            let _ = a.wait();
        }
        drop(self.etcd.take());
        teardown(&self.workdir);
    }
}

fn teardown(workdir: &Path) {
    for ns in netns::list(PREFIX) {
        let _ = netns::kill_and_delete(&ns);
    }
    if let Ok(dir) = fs::read_dir(uapi_client::SOCKET_DIR) {
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with(PREFIX) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let _ = fs::remove_dir_all(workdir);
}

/// The agents' logs: beside the working directory, so they outlive the run (the
/// next run clears them).
fn log_dir(workdir: &Path) -> PathBuf {
    let mut dir = workdir.as_os_str().to_owned();
    dir.push(".logs");
    PathBuf::from(dir)
}

fn node_name(i: usize) -> String {
    format!("n{i}")
}

fn device_socket(i: usize) -> PathBuf {
    uapi_client::socket_path(&format!("{PREFIX}{}", node_name(i)))
}

/// How long one join took to reach each node.
pub struct JoinTimes {
    /// For each node present before the join, until its device had the new peer.
    pub existing: Vec<Duration>,
    /// Until, in addition, the new node's device had every other node as a peer.
    pub joiner: Duration,
}

impl Bed {
    pub fn new(registry: Registry, args: &BedArgs) -> Result<Bed> {
        let workdir = &args.workdir;
        teardown(workdir);
        let _ = fs::remove_dir_all(log_dir(workdir));
        fs::create_dir_all(log_dir(workdir))?;
        netns::add(FABRIC)?;
        // A fixed address: a bridge without one takes the lowest of its ports',
        // which changes as nodes are added, and etcd's addresses are on the bridge
        // itself: agents would keep sending to its old MAC until their ARP entry ages.
        wiremesh_host::run(&[
            "ip", "-n", FABRIC, "link", "add", "fabric", "address", BRIDGE_MAC, "type", "bridge",
        ])?;
        wiremesh_host::run(&["ip", "-n", FABRIC, "link", "set", "fabric", "up"])?;
        let mut etcd = None;
        let registry = match registry {
            Registry::Dir => format!("dir:{}", workdir.join("registry").display()),
            Registry::Etcd => {
                // Nodes are 10.98.0.1 and up (see `start`); etcd sits at the top.
                let ips: Vec<Ipv4Addr> = (1..=args.etcd_members.max(1))
                    .map(|i| Ipv4Addr::new(10, 98, 255, i))
                    .collect();
                for ip in &ips {
                    wiremesh_host::run(&[
                        "ip",
                        "-n",
                        FABRIC,
                        "address",
                        "add",
                        &format!("{ip}/16"),
                        "dev",
                        "fabric",
                    ])?;
                }
                let members = LocalEtcd::start(FABRIC, &ips, &workdir.join("etcd"))?;
                let address = members.address();
                etcd = Some(members);
                address
            }
        };
        // Opened inside the fabric namespace, where etcd listens: the client's
        // threads, and so its connections, stay there.
        let cluster = {
            let registry = registry.clone();
            netns::enter(FABRIC, move || {
                wiremesh_agent::open_store(&registry).map(|store| Cluster::new(store, "bench"))
            })??
        };
        cluster.init(&ClusterSettings::default())?;
        Ok(Bed {
            workdir: workdir.to_owned(),
            registry,
            cluster,
            agents: Vec::new(),
            restarts: 0,
            agent_log: args.agent_log.clone(),
            etcd,
        })
    }

    /// Nodes in the bed (running or not).
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    /// Adds node `len()` and starts its agent.
    pub fn add(&mut self) -> Result<()> {
        let i = self.agents.len();
        let name = node_name(i);
        let ns = format!("{PREFIX}{name}");
        netns::add(&ns)?;
        let peer = format!("{name}-eth");
        wiremesh_host::run(&[
            "ip", "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &peer,
            "netns", FABRIC,
        ])?;
        wiremesh_host::run(&[
            "ip", "-n", FABRIC, "link", "set", &peer, "master", "fabric", "up",
        ])?;
        wiremesh_host::run(&[
            "ip",
            "-n",
            &ns,
            "address",
            "add",
            &format!("{}/16", node_addr(i)),
            "dev",
            "eth0",
        ])?;
        wiremesh_host::run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        let child = self.spawn_agent(i)?;
        self.agents.push(child);
        Ok(())
    }

    fn spawn_agent(&self, i: usize) -> Result<Child> {
        let name = node_name(i);
        let ns = format!("{PREFIX}{name}");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_dir(&self.workdir).join(format!("{name}.log")))?;
        Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(std::env::current_exe()?)
            .args([
                "agent",
                "--cluster",
                "bench",
                "--name",
                &name,
                "--interface",
                &ns,
                "--registry",
                &self.registry,
            ])
            .arg("--state-dir")
            .arg(self.workdir.join(&name))
            .args(["--public-endpoint", &format!("{}:51820", node_addr(i))])
            .env("RUST_LOG", &self.agent_log)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting an agent")
    }

    /// Starts again every agent that has exited, as a supervisor would; they are
    /// counted in `restarts` and the bench reports them.
    fn restart_exited(&mut self) -> Result<()> {
        for i in 0..self.agents.len() {
            if let Ok(Some(status)) = self.agents[i].try_wait() {
                let log = log_dir(&self.workdir).join(format!("{}.log", node_name(i)));
                let text = fs::read_to_string(&log).unwrap_or_default();
                let last = text.lines().rev().find(|l| !l.trim().is_empty());
                eprintln!(
                    "  agent {} exited ({status}): {}; starting it again",
                    node_name(i),
                    last.unwrap_or("(no log)")
                );
                self.agents[i] = self.spawn_agent(i)?;
                self.restarts += 1;
            }
        }
        Ok(())
    }

    /// Waits until every node's device has every other node as a peer.
    pub fn settle(&mut self, timeout: Duration) -> Result<Duration> {
        let n = self.len();
        let start = Instant::now();
        while settled(n, n - 1) < n {
            if start.elapsed() > timeout {
                bail!(
                    "timed out after {timeout:?} waiting for the cluster to settle ({} of {n})",
                    settled(n, n - 1)
                );
            }
            self.restart_exited()?;
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(start.elapsed())
    }

    /// Adds one node and times how long until every node has it as a peer, from
    /// the moment its record is in the registry.
    pub fn join(&mut self) -> Result<JoinTimes> {
        let n = self.len();
        self.add()?;
        let joiner = node_name(n);
        let key = wait("the new node's record", Duration::from_secs(30), || {
            self.cluster.snapshot().ok().and_then(|(s, _, _)| {
                s.nodes
                    .iter()
                    .find(|x| x.name.as_str() == joiner)
                    .map(|x| x.public_key)
            })
        })?;
        let start = Instant::now();
        let existing = until_all_have(n, &key, start)?;
        let joiner = wait(
            "the new node to have every peer",
            Duration::from_secs(60),
            || {
                uapi_client::get(&device_socket(n))
                    .is_ok_and(|d| d.peers.len() == n)
                    .then_some(())
            },
        );
        joiner?;
        Ok(JoinTimes {
            existing,
            joiner: start.elapsed(),
        })
    }

    /// Writes the record of node `name`, which has no agent (a fresh key, the next
    /// free pod CIDR), and times how long until each agent's device has it as a
    /// peer, from just before the write: the fan-out of one registry change.
    pub fn announce(&self, name: &str) -> Result<Vec<Duration>> {
        let name: NodeName = name.parse()?;
        let settings = self.cluster.settings()?;
        let block = self.cluster.claim_block(&name, &settings, None)?;
        let key = PrivateKey::generate().public_key();
        let node = Node {
            name,
            location: "default".parse()?,
            public_key: key,
            public_endpoint: Some(SocketAddr::from((Ipv4Addr::new(10, 98, 254, 1), 51820))),
            private_endpoint: None,
            pod_cidr: block.pod_cidr,
            pod_cidr_v6: None,
            mesh_ip: block.mesh_ip,
            persistent_keepalive: None,
            leader_preference: 0,
            observed_endpoints: Default::default(),
            suspected_leaders: Default::default(),
            unreachable_direct: Default::default(),
            relay_ports: Default::default(),
            last_seen: 0,
        };
        let lease = self.cluster.store.grant_lease(Duration::from_secs(3600))?;
        let start = Instant::now();
        self.cluster.put_node(&node, lease)?;
        until_all_have(self.len(), &key, start)
    }
}

impl Bed {
    /// What the cluster's records weigh in the registry, by kind (`nodes`, `status`,
    /// ...): keys and bytes of values. Every agent reads all of them on each reconcile.
    pub fn registry_weight(&self) -> Result<Vec<(String, usize, usize)>> {
        let prefix = self.cluster.prefix();
        let (kvs, _) = self.cluster.store.list(&prefix)?;
        let mut kinds: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
        for kv in &kvs {
            let rest = kv.key.strip_prefix(&prefix).unwrap_or(&kv.key);
            let kind = rest.split('/').next().unwrap_or(rest).to_owned();
            let entry = kinds.entry(kind).or_default();
            entry.0 += 1;
            entry.1 += kv.value.len();
        }
        Ok(kinds.into_iter().map(|(k, (n, b))| (k, n, b)).collect())
    }
}

/// For each of nodes `0..n`, the time from `start` until its device has `key` as
/// a peer (polling every device in turn; at most 60 s).
fn until_all_have(n: usize, key: &PublicKey, start: Instant) -> Result<Vec<Duration>> {
    let timeout = Duration::from_secs(60);
    let mut times: Vec<Option<Duration>> = vec![None; n];
    while times.iter().any(Option::is_none) {
        if start.elapsed() > timeout {
            let late = times.iter().filter(|t| t.is_none()).count();
            bail!("after {timeout:?}, {late} nodes still lack the new peer");
        }
        for (i, t) in times.iter_mut().enumerate() {
            if t.is_none() && has_peer(i, key) {
                *t = Some(start.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(times.into_iter().flatten().collect())
}

/// Node `i`'s address on the bridge (10.98.0.0/16; etcd is at 10.98.255.x).
fn node_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 98, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn has_peer(i: usize, key: &PublicKey) -> bool {
    uapi_client::get(&device_socket(i)).is_ok_and(|d| d.peers.iter().any(|p| &p.public_key == key))
}

/// How many of nodes `0..n` have `want` peers on their device.
fn settled(n: usize, want: usize) -> usize {
    (0..n)
        .filter(|&i| uapi_client::get(&device_socket(i)).is_ok_and(|d| d.peers.len() == want))
        .count()
}

/// Polls `probe` every 10 ms until it gives a value, for at most `timeout`.
fn wait<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(value) = probe() {
            return Ok(value);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A cluster of `n` settled nodes.
pub fn settled_bed(registry: Registry, args: &BedArgs, n: usize) -> Result<Bed> {
    if n < 2 {
        bail!("a cluster needs at least 2 nodes");
    }
    let mut bed = Bed::new(registry, args)?;
    for _ in 0..n {
        bed.add()?;
    }
    eprint!("  {n} nodes: settling ... ");
    let settle = bed.settle(Duration::from_secs(60 + 3 * n as u64))?;
    eprintln!("{:.1}s", settle.as_secs_f64());
    Ok(bed)
}

pub fn run(args: Args) -> Result<()> {
    println!("registry: {:?}", args.registry);
    println!("| nodes before join | all existing nodes have the new peer | and the new node has all peers |");
    println!("|---:|---:|---:|");
    for &n in &args.nodes {
        let mut bed = settled_bed(args.registry, &args.bed, n)?;
        let times = bed.join()?;
        let existing = times.existing.iter().max().copied().unwrap_or_default();
        println!(
            "| {n} | {:.0} ms | {:.0} ms |",
            existing.as_secs_f64() * 1e3,
            times.joiner.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
