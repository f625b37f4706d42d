//! `wiremesh agent`: parse flags into an [`AgentConfig`] and run the loop until SIGINT/SIGTERM.
//!
//! On Kubernetes the node's annotations and addresses fill in what the flags leave
//! out (location, endpoints, leader preference, keepalive), so an administrator
//! configures a node with `kubectl annotate` and the DaemonSet passes no per-node flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use wiremesh_agent::agent::until_available;
use wiremesh_agent::device::{default_program, DeviceBackend};
use wiremesh_agent::kube::NodePreferences;
use wiremesh_agent::{AgentConfig, Registry};
use wiremesh_model::NodeName;

use crate::RegistryArgs;

#[derive(Args)]
pub struct AgentArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    /// This node's name (a DNS name, unique in the cluster; on Kubernetes, its Node's name).
    #[arg(long, env = "WIREMESH_NODE")]
    name: String,
    /// This node's location (site); nodes of one location share a private network
    /// [default: on Kubernetes the node's wiremesh.io/location annotation or region
    /// label, else `default`].
    #[arg(long)]
    location: Option<String>,
    /// Where nodes of other locations reach this node (IP:port). Leave out behind NAT
    /// [default: on Kubernetes wiremesh.io/public-endpoint, else the node's ExternalIP].
    #[arg(long)]
    public_endpoint: Option<SocketAddr>,
    /// Where nodes of this location reach this node (IP:port) [default: on
    /// Kubernetes wiremesh.io/private-endpoint, else the node's InternalIP].
    #[arg(long)]
    private_endpoint: Option<SocketAddr>,
    /// WireGuard interface name (unique on the host).
    #[arg(long, default_value = "wiremesh0")]
    interface: String,
    /// State directory: the private key (mode 0600) and the pod CIDR claim.
    #[arg(long, default_value_os_t = crate::default_state_dir())]
    state_dir: PathBuf,
    /// Higher wins this location's leader election [default: on Kubernetes
    /// wiremesh.io/leader-preference, else 0].
    #[arg(long, allow_negative_numbers = true)]
    leader_preference: Option<i32>,
    /// Persistent keepalive in seconds for this node's tunnels (default: on Kubernetes
    /// wiremesh.io/persistent-keepalive; else 25 behind NAT).
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

pub fn run(mut a: AgentArgs) -> Result<()> {
    let device = match a.device.as_deref() {
        None => DeviceBackend::Userspace {
            program: default_program(),
        },
        Some("existing") => DeviceBackend::Existing,
        Some(program) => DeviceBackend::Userspace {
            program: program.into(),
        },
    };
    let name: NodeName = a.name.parse().context("--name")?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let (registry, preferences): (Box<dyn Registry>, NodePreferences) =
        if a.registry.is_kubernetes() {
            let kube = a.registry.open_kubernetes()?;
            let preferences = until_available(&stop, "reading this node's annotations", || {
                let port = kube.settings()?.port;
                kube.node_preferences(&name, port)
            })?;
            (Box::new(kube), preferences)
        } else {
            (a.registry.open()?, NodePreferences::default())
        };
    let location = match a.location.take() {
        Some(location) => location.parse().context("--location")?,
        None => preferences
            .location
            .unwrap_or_else(|| "default".parse().expect("a DNS label")),
    };
    let config = AgentConfig {
        name,
        location,
        state_dir: a.state_dir,
        interface: a.interface,
        public_endpoint: a.public_endpoint.or(preferences.public_endpoint),
        private_endpoint: a.private_endpoint.or(preferences.private_endpoint),
        leader_preference: a
            .leader_preference
            .or(preferences.leader_preference)
            .unwrap_or(0),
        persistent_keepalive: a.keepalive.or(preferences.persistent_keepalive),
        device,
        lease_ttl: Duration::from_secs(a.lease_ttl.max(2)),
        resync: Duration::from_secs(10),
        leave_on_exit: a.leave_on_exit,
        metrics: a.metrics,
        mtu: a.mtu,
        rotate_key_every: a.rotate_key_every.map(Duration::from_secs),
    };
    wiremesh_agent::run(&*registry, config, stop)?;
    Ok(())
}
