//! `wiremesh agent`: parse flags into an [`AgentConfig`] and run the loop until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use wiremesh_agent::device::{default_program, DeviceBackend};
use wiremesh_agent::AgentConfig;

use crate::RegistryArgs;

#[derive(Args)]
pub struct AgentArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    /// This node's name (a DNS label, unique in the cluster).
    #[arg(long, env = "WIREMESH_NODE")]
    name: String,
    /// This node's location (site); nodes of one location share a private network.
    #[arg(long, default_value = "default")]
    location: String,
    /// Where nodes of other locations reach this node (IP:port). Leave out behind NAT.
    #[arg(long)]
    public_endpoint: Option<SocketAddr>,
    /// Where nodes of this location reach this node (IP:port).
    #[arg(long)]
    private_endpoint: Option<SocketAddr>,
    /// WireGuard interface name (unique on the host).
    #[arg(long, default_value = "wiremesh0")]
    interface: String,
    /// State directory: the private key (mode 0600) and the pod CIDR claim.
    #[arg(long, default_value_os_t = crate::default_state_dir())]
    state_dir: PathBuf,
    /// Higher wins this location's leader election.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    leader_preference: i32,
    /// Persistent keepalive in seconds for this node's tunnels (default 25 behind NAT).
    #[arg(long)]
    keepalive: Option<u16>,
    /// WireGuard device: a userspace program to start (default: wiremesh-wg next to
    /// this binary), or `existing` to drive a device that already serves UAPI.
    #[arg(long)]
    device: Option<String>,
    /// Seconds the node's records outlive its last heartbeat.
    #[arg(long, default_value_t = wiremesh_model::DEFAULT_LEASE_SECS)]
    lease_ttl: u64,
    /// Remove this node's record, routes and rules when the agent stops.
    #[arg(long)]
    leave_on_exit: bool,
    /// WireGuard interface MTU (default: the cluster's MTU, lowered to what this node's underlay carries).
    #[arg(long)]
    mtu: Option<u16>,
    /// Replace the node's key pair every this many seconds (also on `wiremesh rotate-key`).
    #[arg(long, value_name = "SECS")]
    rotate_key_every: Option<u64>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9586).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
}

pub fn run(a: AgentArgs) -> Result<()> {
    let device = match a.device.as_deref() {
        None => DeviceBackend::Userspace {
            program: default_program(),
        },
        Some("existing") => DeviceBackend::Existing,
        Some(program) => DeviceBackend::Userspace {
            program: program.into(),
        },
    };
    let config = AgentConfig {
        name: a.name.parse().context("--name")?,
        location: a.location.parse().context("--location")?,
        state_dir: a.state_dir,
        interface: a.interface,
        public_endpoint: a.public_endpoint,
        private_endpoint: a.private_endpoint,
        leader_preference: a.leader_preference,
        persistent_keepalive: a.keepalive,
        device,
        lease_ttl: Duration::from_secs(a.lease_ttl.max(2)),
        resync: Duration::from_secs(10),
        leave_on_exit: a.leave_on_exit,
        metrics: a.metrics,
        mtu: a.mtu,
        rotate_key_every: a.rotate_key_every.map(Duration::from_secs),
    };
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let cluster = a.registry.open()?;
    wiremesh_agent::run(cluster, config, stop)?;
    Ok(())
}
