//! wiremesh itself: one `wiremesh agent` per host (which starts its `wiremesh-wg`
//! device), on an embedded registry in the driver's work directory, full
//! granularity (a mesh). Each host is its own location, so every node is reached
//! at its public endpoint; the worker behind NAT has none and dials out.
//!
//! The agents allocate pod CIDRs themselves; the driver claims each worker's
//! testbed CIDR for it in the registry first, and an agent keeps a block its node
//! already holds. wiremesh has no hub-and-spoke shape: its location granularity
//! puts leaders between *sites*, which a testbed of one host per site does not use.

use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use wiremesh_agent::Cluster;
use wiremesh_host::uapi_client;
use wiremesh_model::{ClusterSettings, Granularity, NodeName};

use super::process::{self, Deployment};
use super::userspace_wg::{interface_name, KEEPALIVE_SECS, PORT};
use super::{Bed, Shape, Vpn, VpnError};

const NAME: &str = "wiremesh";
const CLUSTER: &str = "edge";

pub struct Wiremesh {
    /// The `wiremesh` binary (its `wiremesh-wg` sits beside it).
    exe: PathBuf,
    deployment: Deployment,
    /// The devices' interface names, one per host.
    interfaces: Vec<String>,
}

impl Wiremesh {
    pub fn new(exe: PathBuf) -> Wiremesh {
        Wiremesh {
            exe,
            deployment: Deployment::default(),
            interfaces: Vec::new(),
        }
    }

    /// The agents start their `wiremesh-wg` detached (so an agent restart drops no
    /// session): they are not the agents' children. Found by their command line,
    /// whose last argument is the interface name (unique to this run).
    fn device_pids(&self) -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
                let args: Vec<&[u8]> = cmdline
                    .split(|b| *b == 0)
                    .filter(|a| !a.is_empty())
                    .collect();
                let program = String::from_utf8_lossy(args.first()?);
                let last = String::from_utf8_lossy(args.last()?);
                (program.ends_with("wiremesh-wg") && self.interfaces.iter().any(|i| *i == last))
                    .then_some(pid)
            })
            .collect()
    }

    fn bring_up(&mut self, bed: &Bed) -> Result<(), VpnError> {
        let dir = bed.work_dir.join(NAME);
        process::private_dir(NAME, &dir)?;
        let registry = format!("dir:{}", dir.join("registry").display());
        let settings = ClusterSettings {
            cluster_cidr: "10.42.0.0/16".parse().expect("constant"),
            node_prefix_len: 24,
            port: PORT,
            // The underlay is IPv4: 1500 less 60 bytes of WireGuard over IPv4.
            mtu: process::tunnel_mtu(bed, 60),
            granularity: Granularity::Full,
            ..ClusterSettings::default()
        };
        let cluster = wiremesh_agent::open_store(&registry)
            .map(|store| Cluster::new(store, CLUSTER))
            .map_err(|e| setup("opening the registry", e))?;
        cluster
            .init(&settings)
            .map_err(|e| setup("writing the cluster settings", e))?;
        for w in bed.workers() {
            let name: NodeName = w.name.parse().map_err(|e| setup("a node name", e))?;
            let cidr: Option<IpNet> = w.pod_cidr;
            let block = cluster
                .claim_block(&name, &settings, cidr)
                .map_err(|e| setup(format!("claiming {}'s pod CIDR", w.name), e))?;
            if Some(block.pod_cidr) != cidr {
                return Err(setup(
                    format!("claiming {}'s pod CIDR", w.name),
                    format!("got {} instead of {cidr:?}", block.pod_cidr),
                ));
            }
        }
        let exe = self.exe.display().to_string();
        for host in &bed.hosts {
            let state = dir.join(&host.name).display().to_string();
            let endpoint = format!("{}:{PORT}", host.underlay);
            let keepalive = KEEPALIVE_SECS.to_string();
            let ifname = interface_name(host);
            let mut args = vec![
                exe.as_str(),
                "agent",
                "--cluster",
                CLUSTER,
                "--name",
                &host.name,
                "--location",
                &host.name,
                "--registry",
                &registry,
                "--state-dir",
                &state,
                "--interface",
                &ifname,
                "--keepalive",
                &keepalive,
            ];
            if !host.behind_nat {
                args.extend(["--public-endpoint", endpoint.as_str()]);
            }
            let log = dir.join(format!("{}.log", host.name));
            self.deployment.spawn(
                NAME,
                &format!("the agent on {}", host.name),
                &host.netns,
                &args,
                &log,
            )?;
            self.deployment.track_link(&host.netns, &ifname);
            self.interfaces.push(ifname);
        }
        // Up once the master's device has every worker as a peer; the harness then
        // proves requests flow.
        let socket = uapi_client::socket_path(&interface_name(bed.master()));
        let workers = bed.workers().count();
        let mut died = None;
        let ready = process::poll(Duration::from_secs(30), || {
            if let Err(e) = self.deployment.check_alive(NAME, &dir) {
                died = Some(e);
                return true;
            }
            uapi_client::get(&socket).is_ok_and(|d| d.peers.len() == workers)
        });
        match died {
            Some(e) => Err(e),
            None if !ready => Err(setup(
                "bringing up the mesh",
                format!(
                    "the master's device did not list all {workers} workers as peers within 30 s; see the logs in {}",
                    dir.display()
                ),
            )),
            None => Ok(()),
        }
    }
}

fn setup(what: impl Into<String>, reason: impl ToString) -> VpnError {
    VpnError::Setup {
        vpn: NAME,
        what: what.into(),
        reason: reason.to_string(),
    }
}

impl Vpn for Wiremesh {
    fn name(&self) -> &'static str {
        NAME
    }

    fn shapes(&self) -> &'static [Shape] {
        &[Shape::Mesh]
    }

    fn check_installed(&self) -> Result<(), VpnError> {
        let device = wiremesh_agent::device::default_program();
        if self.exe.is_file() && device.is_file() {
            Ok(())
        } else {
            Err(VpnError::NotInstalled {
                vpn: NAME,
                hint: format!(
                    "{} or {} is missing: cargo build --release",
                    self.exe.display(),
                    device.display()
                ),
            })
        }
    }

    fn packages(&self) -> &'static [&'static str] {
        &[]
    }

    fn up(&mut self, bed: &Bed, _shape: Shape) -> Result<(), VpnError> {
        let result = self.bring_up(bed);
        process::undo_on_error(NAME, &mut self.deployment, result)
    }

    fn pids(&self) -> Vec<u32> {
        let mut pids = self.deployment.pids();
        pids.extend(self.device_pids());
        pids
    }

    fn down(&mut self) -> Result<(), VpnError> {
        let result = self.deployment.down(NAME);
        // A device outlives its agent by design; here it must go too.
        let devices = self.device_pids();
        for pid in &devices {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::SIGTERM,
            );
        }
        let gone = process::poll(Duration::from_secs(5), || self.device_pids().is_empty());
        if !gone {
            for pid in self.device_pids() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::SIGKILL,
                );
            }
        }
        self.interfaces.clear();
        result
    }
}
