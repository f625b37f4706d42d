//! The hosts and wires: a master and N workers as network namespaces, joined by a
//! wanem [`Hub`] (the emulated WAN), each worker with one pod namespace serving HTTP.
//! The last worker sits behind a NAT router (its own namespace, nftables
//! masquerade): it can dial out, nobody can dial it.
//!
//! Names are `wme-<random>-<host>`, unique per run so runs and tests can overlap;
//! dropping the [`Testbed`] (also on panic, or when the harness stops on Ctrl-C)
//! stops the servers, the hub, and deletes every namespace with what runs in it.
//!
//! Addresses: underlay `10.200.0.0/24` (master `.1`, worker i `.1+i`, the NAT
//! router in the worker's place), behind the NAT `192.168.77.0/24`; pods
//! `10.42.i.0/24` (the pod is `.2`), overlay `10.99.0.0/24`. The hub also routes
//! each pod CIDR to its worker's port, as a cloud network would: so the VPN-less
//! baseline works, and a VPN that leaked plaintext would work too — which the
//! honesty check's watch on the underlay catches.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use ipnet::{IpNet, Ipv4Net};
use wiremesh_host::{netns, nft, pod, route, run};
use wiremesh_wanem::{Hub, PortSpec};

use crate::http;
use crate::vpn::{Bed, Host, Role};
use crate::BenchError;

/// The underlay's MTU (a WAN's usual 1500).
pub const UNDERLAY_MTU: u16 = 1500;
/// The pods' MTU: below every VPN's tunnel MTU, the same with or without a VPN.
pub const POD_MTU: u16 = 1380;
/// The hub's interface in every host (and in the NAT router).
const UNDERLAY_IF: &str = "wan0";
const NAT_WORKER_IF: &str = "lan0";

/// A worker's new underlay address in the address-change event.
pub fn moved_address(worker: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, 0, 101 + worker as u8)
}

fn underlay(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, 0, 1 + index as u8)
}

fn net(addr: Ipv4Addr, len: u8) -> IpNet {
    IpNet::V4(Ipv4Net::new(addr, len).expect("prefix length within 32"))
}

pub struct Testbed {
    pub bed: Bed,
    pub hub: Hub,
    /// The pods' servers, one per worker, in worker order.
    pub pods: Vec<SocketAddr>,
    servers: Vec<JoinHandle<()>>,
    stop_servers: Arc<AtomicBool>,
    /// Last: fields drop in order, so the hub's ports go before their namespaces.
    _namespaces: Namespaces,
}

pub struct TestbedSpec<'a> {
    pub workers: usize,
    /// Put the last worker behind a NAT router.
    pub nat_worker: bool,
    pub response_bytes: usize,
    pub seed: u64,
    pub work_dir: &'a Path,
}

fn host_error(what: impl Into<String>) -> impl FnOnce(wiremesh_host::HostError) -> BenchError {
    let what = what.into();
    move |e| BenchError::Testbed {
        what,
        reason: e.to_string(),
    }
}

impl Testbed {
    pub fn build(spec: &TestbedSpec) -> Result<Testbed, BenchError> {
        if !(1..=90).contains(&spec.workers) {
            return Err(BenchError::Invalid {
                field: "workers",
                reason: format!("{} is not within 1..=90", spec.workers),
            });
        }
        let prefix = format!("wme-{}-", random_tag());
        // Dropped on any early return below: a failed build leaves nothing behind.
        let mut namespaces = Namespaces::default();
        let stop_servers = Arc::new(AtomicBool::new(false));
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for i in 0..=spec.workers {
            let (name, role) = if i == 0 {
                ("master".to_string(), Role::Master)
            } else {
                (format!("w{i}"), Role::Worker)
            };
            let ns = format!("{prefix}{name}");
            namespaces.add(&ns)?;
            netns::enter(&ns, || -> Result<(), wiremesh_host::HostError> {
                route::sysctl("net/ipv6/conf/all/disable_ipv6", "1")?;
                route::enable_forwarding()
            })
            .and_then(|r| r)
            .map_err(host_error(format!("configuring {ns}")))?;
            let behind_nat = spec.nat_worker && i == spec.workers && i > 0;
            let (port_ns, host_underlay, host_if) = if behind_nat {
                let router = format!("{prefix}nat");
                namespaces.add(&router)?;
                build_nat(&router, &ns).map_err(host_error("building the NAT router"))?;
                (router, IpAddr::V4(NAT_INSIDE_WORKER), NAT_WORKER_IF)
            } else {
                (ns.clone(), IpAddr::V4(underlay(i)), UNDERLAY_IF)
            };
            ports.push(PortSpec {
                netns: port_ns,
                ifname: UNDERLAY_IF.into(),
                addresses: vec![net(underlay(i), 24)],
                mtu: UNDERLAY_MTU,
            });
            hosts.push(Host {
                name,
                role,
                netns: ns,
                underlay: host_underlay,
                underlay_if: host_if.into(),
                pod_cidr: (i > 0).then(|| net(Ipv4Addr::new(10, 42, i as u8, 0), 24)),
                overlay: IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1 + i as u8)),
                behind_nat,
            });
        }
        let hub = Hub::start(spec.seed, ports).map_err(|e| BenchError::Testbed {
            what: "starting the WAN emulator".into(),
            reason: e.to_string(),
        })?;
        let mut pods = Vec::new();
        for (i, host) in hosts.iter().enumerate().skip(1) {
            let cidr = host.pod_cidr.expect("workers have pod CIDRs");
            if !host.behind_nat {
                hub.set_port_routes(i, vec![cidr])
                    .map_err(|e| BenchError::Testbed {
                        what: "routing pod CIDRs in the hub".into(),
                        reason: e.to_string(),
                    })?;
            }
            let pod_ns = format!("{}-pod", host.netns);
            namespaces.add(&pod_ns)?;
            let IpNet::V4(v4) = cidr else {
                unreachable!("the testbed's pod CIDRs are IPv4")
            };
            let pod_ip = v4.hosts().nth(1).expect("a /24 has hosts");
            pod::attach(&pod::PodLink {
                node_netns: Some(&host.netns),
                pod_netns: &netns::path_of(&pod_ns),
                host_if: "pod0",
                pod_if: "eth0",
                pod_ip: Some(pod_ip),
                pod_ip_v6: None,
                mtu: POD_MTU,
            })
            .map_err(host_error(format!("plugging in {pod_ns}")))?;
            pods.push(SocketAddr::from((pod_ip, http::PORT)));
        }
        let body = Arc::new(http::response(spec.response_bytes));
        let mut servers = Vec::new();
        for ns in namespaces.0.iter().filter(|n| n.ends_with("-pod")) {
            servers.push(start_server(ns, body.clone(), stop_servers.clone())?);
        }
        let bed = Bed {
            hosts,
            overlay_cidr: "10.99.0.0/24".parse().expect("constant"),
            work_dir: spec.work_dir.to_owned(),
            underlay_mtu: UNDERLAY_MTU,
        };
        Ok(Testbed {
            bed,
            hub,
            pods,
            servers,
            stop_servers,
            _namespaces: namespaces,
        })
    }

    /// The pods of workers the master can reach directly (not behind the NAT).
    pub fn direct_pods(&self) -> Vec<SocketAddr> {
        self.bed
            .workers()
            .zip(&self.pods)
            .filter(|(h, _)| !h.behind_nat)
            .map(|(_, p)| *p)
            .collect()
    }

    /// The pod behind the NAT, if there is one.
    pub fn nat_pod(&self) -> Option<SocketAddr> {
        self.bed
            .workers()
            .zip(&self.pods)
            .find(|(h, _)| h.behind_nat)
            .map(|(_, p)| *p)
    }

    pub fn master_netns(&self) -> &str {
        &self.bed.master().netns
    }
}

/// The namespaces a testbed made; dropping this deletes them (newest first) with
/// every process inside.
#[derive(Default)]
struct Namespaces(Vec<String>);

impl Namespaces {
    fn add(&mut self, ns: &str) -> Result<(), BenchError> {
        netns::add(ns).map_err(host_error(format!("creating namespace {ns}")))?;
        self.0.push(ns.to_owned());
        Ok(())
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        while let Some(ns) = self.0.pop() {
            let _ = netns::kill_and_delete(&ns);
        }
    }
}

const NAT_INSIDE_ROUTER: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const NAT_INSIDE_WORKER: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);

/// A router between the worker in `worker_ns` and the hub (its port comes later):
/// a veth to the worker, forwarding, and masquerade out of the hub port.
fn build_nat(router: &str, worker_ns: &str) -> Result<(), wiremesh_host::HostError> {
    run(&[
        "ip",
        "link",
        "add",
        "lan0",
        "netns",
        router,
        "type",
        "veth",
        "peer",
        "name",
        NAT_WORKER_IF,
        "netns",
        worker_ns,
    ])?;
    let inside = format!("{NAT_INSIDE_ROUTER}/24");
    let worker = format!("{NAT_INSIDE_WORKER}/24");
    run(&["ip", "-n", router, "address", "add", &inside, "dev", "lan0"])?;
    run(&["ip", "-n", router, "link", "set", "lan0", "up"])?;
    run(&[
        "ip",
        "-n",
        worker_ns,
        "address",
        "add",
        &worker,
        "dev",
        NAT_WORKER_IF,
    ])?;
    run(&["ip", "-n", worker_ns, "link", "set", NAT_WORKER_IF, "up"])?;
    run(&[
        "ip",
        "-n",
        worker_ns,
        "route",
        "add",
        "default",
        "via",
        &NAT_INSIDE_ROUTER.to_string(),
    ])?;
    netns::enter(router, || -> Result<(), wiremesh_host::HostError> {
        route::sysctl("net/ipv6/conf/all/disable_ipv6", "1")?;
        route::enable_forwarding()?;
        nft::apply(&format!(
            "table ip edge_nat {{\n chain postrouting {{\n  type nat hook postrouting priority srcnat;\n  oifname \"{UNDERLAY_IF}\" masquerade\n }}\n}}\n"
        ))
    })?
}

fn start_server(
    ns: &str,
    body: Arc<Vec<u8>>,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, BenchError> {
    let (ready, bound) = std::sync::mpsc::channel();
    let handle = netns::spawn_in(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds");
        rt.block_on(async move {
            match tokio::net::TcpListener::bind(("0.0.0.0", http::PORT)).await {
                Ok(listener) => {
                    let _ = ready.send(Ok(()));
                    http::serve(listener, body, stop).await;
                }
                Err(e) => {
                    let _ = ready.send(Err(e.to_string()));
                }
            }
        });
    })
    .map_err(host_error(format!("starting the server in {ns}")))?;
    bound
        .recv()
        .unwrap_or_else(|_| Err("the server thread ended".into()))
        .map_err(|reason| BenchError::Testbed {
            what: format!("binding the server in {ns}"),
            reason,
        })?;
    Ok(handle)
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.stop_servers.store(true, Ordering::Relaxed);
        for s in self.servers.drain(..) {
            let _ = s.join();
        }
    }
}

/// Eight random lowercase letters and digits for this run's namespace names.
fn random_tag() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let mut x = h.finish();
    (0..6)
        .map(|_| {
            let c = b"abcdefghijklmnopqrstuvwxyz0123456789"[(x % 36) as usize];
            x /= 36;
            c as char
        })
        .collect()
}
