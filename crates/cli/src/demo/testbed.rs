//! The demo's hosts and wires: network namespaces joined by veth pairs to bridges
//! that stand for each location's LAN and for the internet, a NAT router in front of
//! the edge site, and the agent processes. Dropping a [`Testbed`] removes all of it.

use std::fs;
use std::net::Ipv4Addr;
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
}

pub struct Testbed {
    workdir: PathBuf,
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
    pub fn build(workdir: &Path) -> Result<Testbed> {
        down(workdir);
        fs::create_dir_all(workdir.join("logs"))?;
        let bed = Testbed {
            workdir: workdir.to_owned(),
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
            wire(&ns, "lan0", node.lan, &format!("{}/24", node.lan_ip))?;
            if let Some(wan) = node.wan_ip {
                wire(&ns, "wan0", "wan", &format!("{wan}/24"))?;
            } else {
                run(&[
                    "ip",
                    "-n",
                    &ns,
                    "route",
                    "add",
                    "default",
                    "via",
                    &EDGE_GATEWAY.to_string(),
                ])?;
            }
            // No IPv6 on the underlay links (the audit counts IPv4); the WireGuard
            // interface keeps it, for the mesh ULA routes of act 2's VPCs.
            let links: &[&str] = if node.wan_ip.is_some() {
                &["lan0", "wan0"]
            } else {
                &["lan0"]
            };
            for link in links {
                let key = format!("net/ipv6/conf/{link}/disable_ipv6");
                netns::enter(&ns, move || route::sysctl(&key, "1"))??;
            }
            // Count what the node puts on its underlay links, before any agent runs.
            netns::enter(&ns, || nft::apply(&audit_ruleset()))??;
        }
        netns::add(NAT)?;
        wire(NAT, "lan0", "lan-e", &format!("{EDGE_GATEWAY}/24"))?;
        wire(NAT, "wan0", "wan", &format!("{NAT_WAN_IP}/24"))?;
        netns::enter(NAT, || -> Result<()> {
            route::sysctl("net/ipv4/ip_forward", "1")?;
            nft::apply(
                "table ip nat {\n chain postrouting {\n  type nat hook postrouting priority srcnat;\n  oifname \"wan0\" masquerade\n }\n}\n",
            )?;
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
                .args(["--private-endpoint", &format!("{}:{PORT}", node.lan_ip)]);
            if let Some(wan) = node.wan_ip {
                cmd.args(["--public-endpoint", &format!("{wan}:{PORT}")]);
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

    /// Two containers per node, addressed from the pod CIDR each node's agent claimed.
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
            for i in 1..=PODS_PER_NODE {
                let ns = format!("{PREFIX}{}-p{i}", node.name);
                netns::add(&ns)?;
                let ip = cidr
                    .hosts()
                    .nth(usize::from(i))
                    .context("pod CIDR too small")?;
                pod::attach(&pod::PodLink {
                    node_netns: Some(&node_ns(node.name)),
                    pod_netns: &netns::path_of(&ns),
                    host_if: &format!("pod{i}"),
                    pod_if: "eth0",
                    pod_ip: ip,
                    mtu,
                })?;
                self.pods.push(Pod {
                    label: format!("{}/p{i}", node.name),
                    netns: ns,
                    ip,
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

/// Connect `ifname` in namespace `ns` to a bridge of the fabric, with an address.
fn wire(ns: &str, ifname: &str, bridge: &str, addr: &str) -> Result<()> {
    let peer = format!("{}-{ifname}", ns.trim_start_matches(PREFIX));
    run(&[
        "ip", "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", &peer, "netns",
        FABRIC,
    ])?;
    run(&[
        "ip", "-n", FABRIC, "link", "set", &peer, "master", bridge, "up",
    ])?;
    run(&["ip", "-n", ns, "address", "add", addr, "dev", ifname])?;
    run(&["ip", "-n", ns, "link", "set", ifname, "up"])?;
    Ok(())
}

/// Counters for IPv4 packets leaving a node's underlay links: WireGuard's UDP port, or anything else.
fn audit_ruleset() -> String {
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
         \x20 meta nfproto != ipv4 return\n\
         \x20 udp sport {PORT} counter name wireguard accept\n\
         \x20 meta l4proto icmp counter name other_icmp accept\n\
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
