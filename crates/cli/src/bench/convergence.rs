//! Convergence after a join: N nodes (namespaces on one bridge, one agent and one
//! `wiremesh-wg` each) are brought up and settle; then one more node joins, and the
//! benchmark times how long until every existing node's device lists it as a peer.
//! Timed from the moment its record is in the registry, so the agent's own start-up
//! (key generation, device start) is not counted.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use wiremesh_agent::Cluster;
use wiremesh_host::{netns, uapi_client};
use wiremesh_model::ClusterSettings;

const PREFIX: &str = "wmb-";
const FABRIC: &str = "wmb-net";

#[derive(clap::Args)]
pub struct Args {
    /// Cluster sizes to measure (nodes present before the join).
    #[arg(long, value_delimiter = ',', default_value = "10,20,50")]
    nodes: Vec<usize>,
    /// Working directory (registry, state, logs).
    #[arg(long, default_value = "/run/wiremesh-bench")]
    workdir: PathBuf,
}

struct Bed {
    workdir: PathBuf,
    agents: Vec<Child>,
}

impl Drop for Bed {
    fn drop(&mut self) {
        for a in &mut self.agents {
            let _ = a.kill();
            let _ = a.wait();
        }
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

fn node_name(i: usize) -> String {
    format!("n{i}")
}

impl Bed {
    fn new(workdir: &Path) -> Result<(Bed, Cluster)> {
        teardown(workdir);
        fs::create_dir_all(workdir.join("logs"))?;
        netns::add(FABRIC)?;
        wiremesh_host::run(&[
            "ip", "-n", FABRIC, "link", "add", "fabric", "type", "bridge",
        ])?;
        wiremesh_host::run(&["ip", "-n", FABRIC, "link", "set", "fabric", "up"])?;
        let store =
            wiremesh_agent::open_store(&format!("dir:{}", workdir.join("registry").display()))?;
        let cluster = Cluster::new(store, "bench");
        cluster.init(&ClusterSettings::default())?;
        Ok((
            Bed {
                workdir: workdir.to_owned(),
                agents: Vec::new(),
            },
            cluster,
        ))
    }

    fn start(&mut self, i: usize) -> Result<()> {
        let name = node_name(i);
        let ns = format!("{PREFIX}{name}");
        netns::add(&ns)?;
        let addr = format!("10.98.{}.{}", i / 250, i % 250 + 1);
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
            &format!("{addr}/16"),
            "dev",
            "eth0",
        ])?;
        wiremesh_host::run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        let log = fs::File::create(self.workdir.join("logs").join(format!("{name}.log")))?;
        let child = Command::new("ip")
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
            ])
            .arg("--registry")
            .arg(format!("dir:{}", self.workdir.join("registry").display()))
            .arg("--state-dir")
            .arg(self.workdir.join(&name))
            .args(["--public-endpoint", &format!("{addr}:51820")])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting an agent")?;
        self.agents.push(child);
        Ok(())
    }
}

/// How many of nodes `0..n` have `want` peers on their device.
fn settled(n: usize, want: usize) -> usize {
    (0..n)
        .filter(|i| {
            let socket = uapi_client::socket_path(&format!("{PREFIX}{}", node_name(*i)));
            uapi_client::get(&socket).is_ok_and(|d| d.peers.len() == want)
        })
        .count()
}

fn wait(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Result<Duration> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(start.elapsed())
}

pub fn run_one(workdir: &Path, n: usize) -> Result<(Duration, Duration)> {
    let (mut bed, cluster) = Bed::new(workdir)?;
    for i in 0..n {
        bed.start(i)?;
    }
    eprint!("  {n} nodes: settling ... ");
    let settle = wait(
        "the cluster to settle",
        Duration::from_secs(60 + 3 * n as u64),
        || settled(n, n - 1) == n,
    )?;
    eprintln!("{:.1}s", settle.as_secs_f64());
    bed.start(n)?;
    let joiner = node_name(n);
    wait("the new node's record", Duration::from_secs(30), || {
        cluster
            .snapshot()
            .is_ok_and(|(s, _, _)| s.nodes.iter().any(|x| x.name.as_str() == joiner))
    })?;
    let everyone = wait(
        "every node to add the new peer",
        Duration::from_secs(60),
        || settled(n, n) == n,
    )?;
    let joiner_done = wait(
        "the new node to have every peer",
        Duration::from_secs(60),
        || {
            let socket = uapi_client::socket_path(&format!("{PREFIX}{joiner}"));
            uapi_client::get(&socket).is_ok_and(|d| d.peers.len() == n)
        },
    )?;
    Ok((everyone, everyone.max(joiner_done)))
}

pub fn run(args: Args) -> Result<()> {
    println!("| nodes before join | all existing nodes have the new peer | and the new node has all peers |");
    println!("|---:|---:|---:|");
    for &n in &args.nodes {
        if n < 2 {
            bail!("--nodes: each size must be at least 2");
        }
        let (existing, all) = run_one(&args.workdir, n)?;
        println!(
            "| {n} | {:.0} ms | {:.0} ms |",
            existing.as_secs_f64() * 1e3,
            all.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
