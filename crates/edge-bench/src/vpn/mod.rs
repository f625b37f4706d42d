//! The VPNs under test, behind one small trait so the harness treats them alike.
//!
//! A driver writes its configuration under [`Bed::work_dir`], starts its daemons in
//! the hosts' network namespaces, and routes each worker's pod CIDR through the
//! overlay, so the master's load generator reaches every pod only through the VPN.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;

pub mod nebula;
pub mod none;
pub mod openvpn;
mod process;
pub mod softether;
pub mod tinc;
pub mod userspace_wg;
pub mod wiremesh;

/// How the VPN's tunnels are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    /// The study's layout: the server on the master, every worker a client of it;
    /// worker-to-worker traffic goes through the master.
    HubAndSpoke,
    /// Every host tunnels to every other directly.
    Mesh,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Master,
    Worker,
}

/// One host of the testbed, as a driver sees it.
#[derive(Clone, Debug)]
pub struct Host {
    /// Short unique name (`master`, `w1`, `w2`, ...): usable in config file names.
    pub name: String,
    pub role: Role,
    /// The host's network namespace (a name under `/var/run/netns`).
    pub netns: String,
    /// The host's address on the underlay (the emulated WAN).
    pub underlay: IpAddr,
    /// The underlay interface inside `netns`.
    pub underlay_if: String,
    /// Pods behind this host (a worker's pod namespace lives in it); `None` on the master.
    pub pod_cidr: Option<IpNet>,
    /// The address this host takes inside the overlay (a tunnel interface address).
    pub overlay: IpAddr,
    /// The host sits behind a NAT: it can dial out, nobody can dial it.
    pub behind_nat: bool,
}

/// Everything a driver needs to bring a VPN up.
#[derive(Clone, Debug)]
pub struct Bed {
    pub hosts: Vec<Host>,
    /// The overlay network that every [`Host::overlay`] lies in.
    pub overlay_cidr: IpNet,
    /// A scratch directory owned by this driver for this run (configs, keys, logs).
    pub work_dir: PathBuf,
    /// Underlay MTU; the driver picks its tunnel MTU below it.
    pub underlay_mtu: u16,
}

impl Bed {
    pub fn master(&self) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.role == Role::Master)
            .expect("a testbed always has a master")
    }

    pub fn workers(&self) -> impl Iterator<Item = &Host> {
        self.hosts.iter().filter(|h| h.role == Role::Worker)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VpnError {
    /// The VPN's programs are not on this machine: the harness skips it with this line.
    #[error("{vpn} is not installed: {hint}")]
    NotInstalled { vpn: &'static str, hint: String },
    #[error("{vpn} does not support the {shape:?} shape")]
    Unsupported { vpn: &'static str, shape: Shape },
    #[error("{vpn}: {what}: {reason}")]
    Setup {
        vpn: &'static str,
        what: String,
        reason: String,
    },
}

/// A VPN the harness can bring up on a [`Bed`] and tear down again.
pub trait Vpn: Send {
    /// Short name used in tables and file names (`openvpn`, `wireguard-go`, ...).
    fn name(&self) -> &'static str;

    /// The shapes this VPN can take; the first is the one the study used.
    fn shapes(&self) -> &'static [Shape];

    /// Whether the programs it needs are installed; `Err(NotInstalled)` says how to get them.
    fn check_installed(&self) -> Result<(), VpnError>;

    /// Debian packages (or crates for `cargo install --locked`, prefixed `cargo:`) that
    /// `--install-peers` installs for this VPN.
    fn packages(&self) -> &'static [&'static str];

    /// Configure and start the VPN on every host in `shape`, with routes so each
    /// worker's pod CIDR and every overlay address are reached through the tunnel.
    /// Returns once tunnels are configured (the harness then proves traffic flows).
    fn up(&mut self, bed: &Bed, shape: Shape) -> Result<(), VpnError>;

    /// The PIDs of the VPN's processes on every host (for CPU seconds and peak RSS);
    /// empty for a VPN without processes (no VPN).
    fn pids(&self) -> Vec<u32>;

    /// Stop every process and remove interfaces, routes and rules `up` created.
    /// Must be safe to call after a failed or partial `up`, and more than once.
    fn down(&mut self) -> Result<(), VpnError>;
}

/// Every VPN the harness knows, baseline first, in the order they run. `wiremesh`
/// is the binary whose `agent` subcommand (and sibling `wiremesh-wg`) it starts.
pub fn drivers(wiremesh: PathBuf) -> Vec<Box<dyn Vpn>> {
    vec![
        Box::new(none::NoVpn::default()),
        Box::new(self::wiremesh::Wiremesh::new(wiremesh)),
        Box::new(userspace_wg::UserspaceWg::new(
            userspace_wg::Program::WireguardGo,
        )),
        Box::new(userspace_wg::UserspaceWg::new(
            userspace_wg::Program::Boringtun,
        )),
        Box::new(openvpn::OpenVpn::new()),
        Box::new(tinc::Tinc::new()),
        Box::new(softether::SoftEther::new()),
        Box::new(nebula::Nebula::new()),
    ]
}
