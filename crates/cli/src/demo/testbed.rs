//! The demo's hosts and wires: network namespaces joined by veth pairs to bridges
//! that stand for each location's LAN and for the internet, a NAT router in front of
//! the edge site, and the agent processes. Dropping a [`Testbed`] removes all of it.
//!
//! Pods are dual-stack. The underlay is IPv4 or IPv6 ([`Underlay`]); each IPv4
//! address of the plan below has an IPv6 twin ([`v6_twin`]) for the IPv6 underlay.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use wiremesh_agent::Cluster;
use wiremesh_host::{netns, nft, pod, route, run};
use wiremesh_model::{ClusterSettings, Granularity};

/// Every namespace of the demo starts with this.
pub const PREFIX: &str = "wmd-";
const FABRIC: &str = "wmd-net";
const NAT: &str = "wmd-nat";
pub const CLUSTER: &str = "demo";
const PORT: u16 = 51820;
/// The demo's IPv6 pod addresses; each node's /64 has the index of its IPv4 /24.
const CLUSTER_CIDR_V6: &str = "fd42:42::/48";

/// The family of the addresses the nodes reach each other over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Underlay {
    Ipv4,
    Ipv6,
}

impl Underlay {
    /// An address of the plan (always written as IPv4) in this underlay's family.
    fn address(self, v4: Ipv4Addr) -> IpAddr {
        match self {
            Underlay::Ipv4 => IpAddr::V4(v4),
            Underlay::Ipv6 => IpAddr::V6(v6_twin(v4)),
        }
    }

    /// `address` with the prefix length of the plan's /24 (a /64 in IPv6).
    fn cidr(self, v4: Ipv4Addr) -> String {
        match self {
            Underlay::Ipv4 => format!("{v4}/24"),
            Underlay::Ipv6 => format!("{}/64", v6_twin(v4)),
        }
    }
}

/// The IPv6 twin of `a.b.c.d`: `fd00:a:b:c::d`, so each IPv4 /24 has a /64 twin.
pub fn v6_twin(v4: Ipv4Addr) -> Ipv6Addr {
    let [a, b, c, d] = v4.octets().map(u16::from);
    Ipv6Addr::new(0xfd00, a, b, c, 0, 0, 0, d)
}

pub struct DemoNode {
    pub name: &'static str,
    pub location: &'static str,
    /// The location's LAN bridge in the fabric namespace.
    pub lan: &'static str,
    pub lan_ip: Ipv4Addr,
    /// Address on the internet bridge; `None` behind the edge NAT.
    pub wan_ip: Option<Ipv4Addr>,
}

const fn v4(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

pub const NODES: [DemoNode; 6] = [
    DemoNode {
        name: "a1",
        location: "cloud-a",
        lan: "lan-a",
        lan_ip: v4(192, 168, 1, 11),
        wan_ip: Some(v4(203, 0, 113, 11)),
    },
    DemoNode {
        name: "a2",
        location: "cloud-a",
        lan: "lan-a",
        lan_ip: v4(192, 168, 1, 12),
        wan_ip: Some(v4(203, 0, 113, 12)),
    },
    DemoNode {
        name: "b1",
        location: "cloud-b",
        lan: "lan-b",
        lan_ip: v4(192, 168, 2, 11),
        wan_ip: Some(v4(203, 0, 113, 21)),
    },
    DemoNode {
        name: "b2",
        location: "cloud-b",
        lan: "lan-b",
        lan_ip: v4(192, 168, 2, 12),
        wan_ip: Some(v4(203, 0, 113, 22)),
    },
    DemoNode {
        name: "e1",
        location: "edge",
        lan: "lan-e",
        lan_ip: v4(192, 168, 3, 11),
        wan_ip: None,
    },
    DemoNode {
        name: "e2",
        location: "edge",
        lan: "lan-e",
        lan_ip: v4(192, 168, 3, 12),
        wan_ip: None,
    },
];
const EDGE_GATEWAY: Ipv4Addr = v4(192, 168, 3, 1);
const NAT_WAN_IP: Ipv4Addr = v4(203, 0, 113, 30);
const PODS_PER_NODE: u8 = 2;

pub struct Pod {
    pub label: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

pub struct Testbed {
    workdir: PathBuf,
    underlay: Underlay,
    agents: Vec<Child>,
    pods: Vec<Pod>,
}

fn node_ns(name: &str) -> String {
    format!("{PREFIX}{name}")
}

/// Counts of packets the nodes sent on their underlay links.
pub struct Audit {
    pub wireguard: u64,
    pub other: u64,
    /// What the other packets were: (icmp, tcp, udp, anything else).
    pub other_kinds: [(String, u64); 4],
}

impl Testbed {
    pub fn build(workdir: &Path, underlay: Underlay) -> Result<Testbed> {
        down(workdir);
        fs::create_dir_all(workdir.join("logs"))?;
        let bed = Testbed {
            workdir: workdir.to_owned(),
            underlay,
            agents: Vec::new(),
            pods: Vec::new(),
        };
        netns::add(FABRIC)?;
        for bridge in ["wan", "lan-a", "lan-b", "lan-e"] {
            run(&["ip", "-n", FABRIC, "link", "add", bridge, "type", "bridge"])?;
            run(&["ip", "-n", FABRIC, "link", "set", bridge, "up"])?;
        }
        for node in &NODES {
            let ns = node_ns(node.name);
            netns::add(&ns)?;
            wire(&ns, "lan0", node.lan, underlay, node.lan_ip)?;
            if let Some(wan) = node.wan_ip {
                wire(&ns, "wan0", "wan", underlay, wan)?;
            } else {
                let gateway = underlay.address(EDGE_GATEWAY).to_string();
                run(&["ip", "-n", &ns, "route", "add", "default", "via", &gateway])?;
            }
            // Count what the node puts on its underlay links, before any agent runs.
            netns::enter(&ns, move || nft::apply(&audit_ruleset(underlay)))??;
        }
        netns::add(NAT)?;
        wire(NAT, "lan0", "lan-e", underlay, EDGE_GATEWAY)?;
        wire(NAT, "wan0", "wan", underlay, NAT_WAN_IP)?;
        netns::enter(NAT, move || -> Result<()> {
            let (forwarding, family) = match underlay {
                Underlay::Ipv4 => ("net/ipv4/ip_forward", "ip"),
                Underlay::Ipv6 => ("net/ipv6/conf/all/forwarding", "ip6"),
            };
            route::sysctl(forwarding, "1")?;
            nft::apply(&format!(
                "table {family} nat {{\n chain postrouting {{\n  type nat hook postrouting priority srcnat;\n  oifname \"wan0\" masquerade\n }}\n}}\n",
            ))?;
            Ok(())
        })??;
        Ok(bed)
    }

    pub fn cluster(&self) -> Result<Cluster> {
        let store = wiremesh_agent::open_store(&format!(
            "dir:{}",
            self.workdir.join("registry").display()
        ))?;
        let cluster = Cluster::new(store, CLUSTER);
        let settings = ClusterSettings {
            granularity: Granularity::Location,
            port: PORT,
            // As `wiremesh init` does: the VPCs of the demo's second act need one.
            mesh_ula: Some(crate::vpc_cmd::random_mesh_ula()?),
            cluster_cidr_v6: Some(CLUSTER_CIDR_V6.parse().expect("constant")),
            ..ClusterSettings::default()
        };
        cluster.init(&settings)?;
        Ok(cluster)
    }

    pub fn start_agents(&mut self) -> Result<()> {
        self.cluster()?;
        let exe = std::env::current_exe().context("locating the wiremesh binary")?;
        for node in &NODES {
            let log =
                fs::File::create(self.workdir.join("logs").join(format!("{}.log", node.name)))?;
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &node_ns(node.name)])
                .arg(&exe)
                .args([
                    "agent",
                    "--cluster",
                    CLUSTER,
                    "--name",
                    node.name,
                    "--location",
                    node.location,
                ])
                .arg("--registry")
                .arg(format!("dir:{}", self.workdir.join("registry").display()))
                .arg("--state-dir")
                .arg(self.workdir.join("nodes").join(node.name))
                .args(["--interface", &node_ns(node.name), "--lease-ttl", "10"])
                .args(["--private-endpoint", &self.endpoint(node.lan_ip)]);
            if let Some(wan) = node.wan_ip {
                cmd.args(["--public-endpoint", &self.endpoint(wan)]);
            }
            let child = cmd
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting an agent")?;
            self.agents.push(child);
        }
        Ok(())
    }

    fn endpoint(&self, v4: Ipv4Addr) -> String {
        SocketAddr::new(self.underlay.address(v4), PORT).to_string()
    }

    /// Two dual-stack containers per node, addressed from the pod CIDRs each node's
    /// agent published.
    pub fn add_pods(&mut self, cluster: &Cluster) -> Result<()> {
        let (snapshot, _, _) = cluster.snapshot()?;
        let mtu = snapshot.settings.mtu;
        for node in &NODES {
            let record = snapshot
                .nodes
                .iter()
                .find(|n| n.name.as_str() == node.name)
                .context("node record")?;
            let ipnet::IpNet::V4(cidr) = record.pod_cidr else {
                anyhow::bail!("the demo uses IPv4 pod CIDRs")
            };
            let cidr6 = record
                .pod_cidr_v6
                .context("the demo's pods are dual-stack")?;
            for i in 1..=PODS_PER_NODE {
                let ns = format!("{PREFIX}{}-p{i}", node.name);
                netns::add(&ns)?;
                let ip = cidr
                    .hosts()
                    .nth(usize::from(i))
                    .context("pod CIDR too small")?;
                // The host part of the IPv4 address, in the IPv6 block.
                let ip6 = Ipv6Addr::from(
                    u128::from(cidr6.network())
                        + u128::from(u32::from(ip) - u32::from(cidr.network())),
                );
                pod::attach(&pod::PodLink {
                    node_netns: Some(&node_ns(node.name)),
                    pod_netns: &netns::path_of(&ns),
                    host_if: &format!("pod{i}"),
                    pod_if: "eth0",
                    pod_ip: Some(ip),
                    pod_ip_v6: Some(ip6),
                    mtu,
                })?;
                self.pods.push(Pod {
                    label: format!("{}/p{i}", node.name),
                    netns: ns,
                    ip,
                    ip6,
                });
            }
        }
        Ok(())
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    pub fn audit(&self) -> Result<Audit> {
        let kinds = ["icmp", "tcp", "udp", "other"].map(|k| (k.to_string(), 0));
        let mut audit = Audit {
            wireguard: 0,
            other: 0,
            other_kinds: kinds,
        };
        for node in &NODES {
            let counters = netns::enter(&node_ns(node.name), || {
                nft::named_counters("inet", "wmd_audit")
            })??;
            for (name, packets) in counters {
                if name == "wireguard" {
                    audit.wireguard += packets;
                } else {
                    audit.other += packets;
                    if let Some(kind) = audit
                        .other_kinds
                        .iter_mut()
                        .find(|(k, _)| name.strip_prefix("other_") == Some(k.as_str()))
                    {
                        kind.1 += packets;
                    }
                }
            }
        }
        Ok(audit)
    }
}

/// Connect `ifname` in namespace `ns` to a bridge of the fabric, with the address of
/// `underlay`'s family for `v4`. The link carries no other family: nothing of the
/// other could cross the underlay in plaintext. IPv6 addresses skip DAD (the plan
/// has no duplicates), so they are usable at once.
fn wire(ns: &str, ifname: &str, bridge: &str, underlay: Underlay, v4: Ipv4Addr) -> Result<()> {
    let peer = format!("{}-{ifname}", ns.trim_start_matches(PREFIX));
    run(&[
        "ip", "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", &peer, "netns",
        FABRIC,
    ])?;
    run(&[
        "ip", "-n", FABRIC, "link", "set", &peer, "master", bridge, "up",
    ])?;
    let addr = underlay.cidr(v4);
    match underlay {
        Underlay::Ipv4 => {
            let key = format!("net/ipv6/conf/{ifname}/disable_ipv6");
            netns::enter(ns, move || route::sysctl(&key, "1"))??;
            run(&["ip", "-n", ns, "address", "add", &addr, "dev", ifname])?;
        }
        Underlay::Ipv6 => {
            run(&[
                "ip", "-n", ns, "address", "add", &addr, "dev", ifname, "nodad",
            ])?;
        }
    }
    run(&["ip", "-n", ns, "link", "set", ifname, "up"])?;
    Ok(())
}

/// Counters for packets of the underlay's family leaving a node's underlay links:
/// WireGuard's UDP port, or anything else. IPv6's own link housekeeping (router and
/// neighbour discovery, multicast listener reports) is no container traffic.
fn audit_ruleset(underlay: Underlay) -> String {
    let (family, housekeeping) = match underlay {
        Underlay::Ipv4 => ("ipv4", String::new()),
        Underlay::Ipv6 => (
            "ipv6",
            "\x20 icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld-listener-report, mld2-listener-report } return\n"
                .to_string(),
        ),
    };
    format!(
        "table inet wmd_audit {{\n\
         \x20counter wireguard {{}}\n\
         \x20counter other_icmp {{}}\n\
         \x20counter other_tcp {{}}\n\
         \x20counter other_udp {{}}\n\
         \x20counter other_other {{}}\n\
         \x20chain out {{\n\
         \x20 type filter hook postrouting priority 300; policy accept;\n\
         \x20 oifname != {{ \"lan0\", \"wan0\" }} return\n\
         \x20 meta nfproto != {family} return\n\
         {housekeeping}\
         \x20 udp sport {PORT} counter name wireguard accept\n\
         \x20 meta l4proto {{ icmp, icmpv6 }} counter name other_icmp accept\n\
         \x20 meta l4proto tcp counter name other_tcp accept\n\
         \x20 meta l4proto udp counter name other_udp accept\n\
         \x20 counter name other_other\n\
         \x20}}\n\
         }}\n"
    )
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(agent.id() as i32),
                nix::sys::signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for agent in &mut self.agents {
            while Instant::now() < deadline && matches!(agent.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = agent.kill();
            let _ = agent.wait();
        }
        down(&self.workdir);
    }
}

/// Remove every demo namespace (killing what runs inside), stale UAPI sockets, and the workdir.
pub fn down(workdir: &Path) {
    for ns in netns::list(PREFIX) {
        if let Ok(pids) = run(&["ip", "netns", "pids", &ns]) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::SIGKILL,
                );
            }
        }
        let _ = netns::delete(&ns);
    }
    for node in &NODES {
        let _ = fs::remove_file(wiremesh_host::uapi_client::socket_path(&node_ns(node.name)));
    }
    crate::vpc_pod::forget_vpc_names(PREFIX);
    let _ = fs::remove_dir_all(workdir);
}
