//! Pods of a VPC on a simulated node, for `wiremesh demo` and `wiremesh bench vip`:
//! asked for and plugged in as the CNI plugin does (the node's agent is asked through
//! its state directory and answers with `vpcs/<vpc>/vpc.json`), without a container
//! runtime; and the records they need, written with this binary's own `vpc`,
//! `service` and `endpoints` commands.
//!
//! Simulated nodes run their agent under `ip netns exec`, so it sees its node's
//! `/sys`; that also gives it a mount namespace of its own, where the VPC namespaces
//! it makes are bind mounts. Any process of the node (agent or device) shows them
//! under its root, and a bind mount of that gives them a name here.

use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use wiremesh_agent::vpc::{LocalVpc, LOCAL_VPC_FILE, VPCS_DIR};
use wiremesh_host::{netns, pod};

/// How long an agent may take to host a VPC it was asked for.
const HOSTED_WITHIN: Duration = Duration::from_secs(60);

/// Asks the agent with state directory `state_dir` to host `vpc`, as the CNI
/// plugin's ADD does; [`plug`] waits for the answer.
pub fn request(state_dir: &Path, vpc: &str) -> Result<()> {
    let dir = state_dir.join(VPCS_DIR).join(vpc);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))
}

/// A pod of `vpc` on the node whose network namespace is `node_ns` and agent's state
/// directory `state_dir`: namespace `pod_ns` (made here), at host `host` of the
/// node's block. Names it gives the VPC's namespace start with `prefix`, so the
/// caller's teardown removes them with its own.
pub fn plug(
    state_dir: &Path,
    node_ns: &str,
    vpc: &str,
    host: usize,
    pod_ns: &str,
    prefix: &str,
) -> Result<Ipv4Addr> {
    request(state_dir, vpc)?;
    let file = state_dir.join(VPCS_DIR).join(vpc).join(LOCAL_VPC_FILE);
    let start = Instant::now();
    while !file.exists() {
        if start.elapsed() > HOSTED_WITHIN {
            bail!("{node_ns}'s agent did not host VPC {vpc} within {HOSTED_WITHIN:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let local = hosted(state_dir, vpc)?;
    let Some(IpNet::V4(block)) = local.pod_cidrs.first() else {
        bail!("VPC {vpc}: no IPv4 block on {node_ns}");
    };
    let ip = block
        .hosts()
        .nth(host)
        .with_context(|| format!("VPC {vpc}: no host {host} in {block}"))?;
    let vpc_ns = name_vpc_namespace(node_ns, &local.netns, prefix)?;
    netns::add(pod_ns)?;
    pod::attach(&pod::PodLink {
        node_netns: Some(&vpc_ns),
        pod_netns: &netns::path_of(pod_ns),
        host_if: &format!("p{host}"),
        pod_if: "eth0",
        pod_ip: Some(ip),
        pod_ip_v6: None,
        mtu: local.mtu,
    })?;
    Ok(ip)
}

/// What the agent of `state_dir` says of `vpc` on its node (once it hosts it).
pub fn hosted(state_dir: &Path, vpc: &str) -> Result<LocalVpc> {
    let file = state_dir.join(VPCS_DIR).join(vpc).join(LOCAL_VPC_FILE);
    serde_json::from_slice(&fs::read(&file)?).with_context(|| format!("reading {}", file.display()))
}

/// A name here (`<prefix><name>`) for VPC namespace `name` of node `node_ns`; the
/// same name again if it has one already.
fn name_vpc_namespace(node_ns: &str, name: &str, prefix: &str) -> Result<String> {
    let alias = format!("{prefix}{name}");
    if netns::exists(&alias) {
        return Ok(alias);
    }
    let out = Command::new("ip")
        .args(["netns", "pids", node_ns])
        .output()?;
    let path = netns::path_of(&alias);
    fs::File::create(&path)?;
    // Any process of the node's agent sees the name; the short-lived ones (the
    // agent's `ip` and `nft` commands) may exit before the mount: try the next.
    let mut failure = anyhow::anyhow!("no process of {node_ns} holds namespace {name}");
    for pid in String::from_utf8_lossy(&out.stdout).lines() {
        let source = format!("/proc/{}/root/run/netns/{name}", pid.trim());
        if !Path::new(&source).exists() {
            continue;
        }
        // `--no-canonicalize`: resolving the path would leave the process's root.
        let out = Command::new("mount")
            .args(["--no-canonicalize", "--bind", &source])
            .arg(&path)
            .output()?;
        if out.status.success() {
            return Ok(alias);
        }
        failure = anyhow::anyhow!("mount {source}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let _ = fs::remove_file(&path);
    Err(failure)
}

/// The names that agents on interfaces starting with `prefix` left here for their
/// VPC namespaces (`wm-vpc-<id>-<interface>`: empty files, the namespaces were
/// theirs alone) go.
pub fn forget_vpc_names(prefix: &str) {
    for name in netns::list("wm-vpc-") {
        let interface = name["wm-vpc-".len()..].split_once('-').map(|(_, i)| i);
        if interface.is_some_and(|i| i.starts_with(prefix)) {
            let _ = fs::remove_file(netns::path_of(&name));
        }
    }
}

/// This binary's record commands, against one registry and cluster.
pub struct Cli {
    pub registry: String,
    pub cluster: String,
}

impl Cli {
    /// Runs `wiremesh ARGS`; its standard output.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(std::env::current_exe()?)
            .args(args)
            .args(["--registry", &self.registry, "--cluster", &self.cluster])
            .output()?;
        if !out.status.success() {
            bail!(
                "wiremesh {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates service `vpc/ns/name` with `ports` (`name:port/proto`) and one
    /// endpoint; its VIP.
    pub fn service(
        &self,
        id: &str,
        ports: &[&str],
        endpoint: (Ipv4Addr, &str),
    ) -> Result<Ipv4Addr> {
        let mut args = vec!["service", "create", id];
        for port in ports {
            args.extend(["--port", port]);
        }
        let out = self.run(&args)?;
        // "service <id> at <vip>"
        let vip = out
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no VIP in {out:?}"))?;
        let (address, node) = (endpoint.0.to_string(), endpoint.1);
        self.run(&["endpoints", id, "--add", &address, "--node", node])?;
        Ok(vip)
    }
}
