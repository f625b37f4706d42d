//! The shell: each CNI command as a sequence of reads, pure decisions and effects.
//!
//! Decisions live in [`crate::ipam`], [`crate::config`], [`crate::result`] and
//! [`crate::veth`]; this module reads the agent's state and the IPAM store, calls
//! them, and applies the outcome with `wiremesh_host::pod` and `ip`. The plugin runs
//! in the node's network namespace (where the runtime started it), so node-side
//! commands need no namespace argument.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::{json, Value};
use wiremesh_host::{pod, run};
use wiremesh_vpc::dns::search_path;
use wiremesh_vpc::record::DnsZone;
use wiremesh_vpc::{Label, LocalPodRecord, PodName};

use crate::config::{self, Attachment, NetConf, FALLBACK_MTU};
use crate::error::CniError;
use crate::ipam;
use crate::request::{self, Command, Request};
use crate::result::{self, AddResult, Dns, Interface};
use crate::store::Store;
use crate::version::Version;
use crate::veth;

/// The agent's pod CIDR file inside its state dir.
pub const POD_CIDR_FILE: &str = "pod-cidr";
/// The agent's IPv6 pod CIDR, present when the cluster has dual-stack pods.
pub const POD_CIDR_V6_FILE: &str = "pod-cidr-v6";

/// Run one invocation; `Ok(Some(json))` is printed to stdout.
pub fn run_command(env: &HashMap<String, String>, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let req = request::parse(env)?;
    if req.command == Command::Version {
        return Ok(Some(version_info()));
    }
    let conf = config::parse(stdin)?;
    let needs = |min: Version, what: &str| {
        if conf.cni_version < min {
            Err(CniError::IncompatibleVersion {
                requested: conf.cni_version.to_string(),
                supported: format!("{min} or later for {what}"),
            })
        } else {
            Ok(())
        }
    };
    match req.command {
        Command::Add => {
            let pod = pod_id(env, req.container_id()?);
            add(&conf, &req, &pod).map(Some)
        }
        Command::Del => del(&conf, &req).map(|()| None),
        Command::Check => {
            needs(Version::CHECK, "CHECK")?;
            check(&conf, &req).map(|()| None)
        }
        Command::Gc => {
            needs(Version::GC_STATUS, "GC")?;
            gc(&conf).map(|()| None)
        }
        Command::Status => {
            needs(Version::GC_STATUS, "STATUS")?;
            status(&conf).map(|()| None)
        }
        Command::Version => Ok(Some(version_info())),
    }
}

fn version_info() -> Value {
    let supported: Vec<String> = Version::SUPPORTED.iter().map(|v| v.to_string()).collect();
    json!({"cniVersion": Version::LATEST.to_string(), "supportedVersions": supported})
}

/// The agent's answer for one VPC, `<stateDir>/vpcs/<vpc>/vpc.json` (written by
/// `wiremesh_agent::vpc`).
pub const VPCS_DIR: &str = "vpcs";
pub const LOCAL_VPC_FILE: &str = "vpc.json";
/// Inside a VPC's directory: one `<container id>.json` ([`LocalPodRecord`]) per pod
/// this plugin added, which the agent publishes with the pod's labels.
pub const PODS_DIR: &str = "pods";
/// How long ADD waits for the agent to set up a VPC new to this node.
const VPC_WAIT: Duration = Duration::from_secs(10);

/// Where a pod of this network goes: the node's namespace and pod CIDR, or a VPC's.
struct Placement {
    /// `None`: the node's own namespace (where the plugin runs).
    node_netns: Option<String>,
    pools: ipam::Pools,
    mtu: u16,
    dns: Option<(IpAddr, DnsZone)>,
}

/// Who the pod is, for the DNS search path and the agent's pod record.
struct PodId {
    namespace: Label,
    name: PodName,
}

/// One `KEY=value` of `CNI_ARGS`.
fn cni_arg<'a>(env: &'a HashMap<String, String>, key: &str) -> Option<&'a str> {
    env.get("CNI_ARGS")?
        .split(';')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// The pod's namespace and name from `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`,
/// as Kubernetes runtimes pass them); without them, `default` and a name made from
/// the container id.
fn pod_id(env: &HashMap<String, String>, container_id: &str) -> PodId {
    let namespace = cni_arg(env, "K8S_POD_NAMESPACE")
        .and_then(|ns| Label::parse("K8S_POD_NAMESPACE", ns).ok())
        .unwrap_or_else(|| Label::parse("namespace", "default").expect("a label"));
    let name = cni_arg(env, "K8S_POD_NAME")
        .and_then(|n| PodName::parse("K8S_POD_NAME", n).ok())
        .unwrap_or_else(|| container_pod_name(container_id));
    PodId { namespace, name }
}

/// A DNS label from a container id (letters, digits, `_`, `.`, `-`): `pod-` and the
/// id, lowercased, other characters as `-`, cut to 63 characters.
fn container_pod_name(container_id: &str) -> PodName {
    let mut name: String = "pod-"
        .chars()
        .chain(container_id.chars().map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        }))
        .take(63)
        .collect();
    while name.ends_with('-') {
        name.pop();
    }
    PodName::parse("name", &name).expect("letters, digits and inner '-'")
}

fn placement(conf: &NetConf, wait: bool) -> Result<Placement, CniError> {
    match &conf.vpc {
        None => Ok(Placement {
            node_netns: None,
            // A podCidr of the network's own is IPv4-only; the agent's is dual-stack
            // when the cluster is.
            pools: match conf.pod_cidr {
                Some(pool) => ipam::Pools::V4(pool),
                None => {
                    let pool = pod_cidr(conf)?;
                    match pod_cidr_v6(conf)? {
                        Some(v6) => ipam::Pools::Dual(pool, v6),
                        None => ipam::Pools::V4(pool),
                    }
                }
            },
            mtu: mtu(conf),
            dns: None,
        }),
        Some(vpc) => vpc_placement(conf, vpc, wait),
    }
}

/// Asks the agent for `vpc` on this node (a directory in its state dir) and reads its
/// answer, waiting up to [`VPC_WAIT`] when `wait`.
fn vpc_placement(conf: &NetConf, vpc: &Label, wait: bool) -> Result<Placement, CniError> {
    let dir = conf.state_dir.join(VPCS_DIR).join(vpc.as_str());
    let file = dir.join(LOCAL_VPC_FILE);
    if wait {
        std::fs::create_dir_all(&dir).map_err(|e| {
            CniError::io(
                format!("asking the agent for VPC {vpc} at {}", dir.display()),
                e,
            )
        })?;
        let deadline = Instant::now() + VPC_WAIT;
        while !file.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let text = std::fs::read(&file).map_err(|e| match e.kind() {
        ErrorKind::NotFound => CniError::TryAgain(format!(
            "{} does not exist: the agent has not set VPC {vpc} up on this node (is `wiremesh agent --state-dir {}` running, and does `wiremesh vpc show {vpc}` find it?)",
            file.display(),
            conf.state_dir.display()
        )),
        _ => CniError::io(format!("reading {}", file.display()), e),
    })?;
    parse_local_vpc(&text, conf.mtu).map_err(|reason| {
        CniError::io(
            format!("agent state {} is unreadable", file.display()),
            std::io::Error::new(ErrorKind::InvalidData, reason),
        )
    })
}

/// `vpc.json`: the VPC's namespace, the node's blocks (an IPv4 one, an IPv6 one, or
/// both in a dual-stack VPC), the pod MTU (unless the network config sets one) and
/// the VPC's DNS.
fn parse_local_vpc(text: &[u8], mtu: Option<u16>) -> Result<Placement, String> {
    let v: Value = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    let field = |k: &str| v.get(k).ok_or_else(|| format!("no {k}"));
    let netns = field("netns")?
        .as_str()
        .ok_or("netns is no string")?
        .to_owned();
    let blocks = field("pod_cidrs")?
        .as_array()
        .ok_or("pod_cidrs is no list")?
        .iter()
        .enumerate()
        .map(|(i, c)| {
            c.as_str()
                .and_then(|c| c.parse::<IpNet>().ok())
                .ok_or_else(|| format!("pod_cidrs[{i}] is no CIDR"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let pools = ipam::Pools::new(
        blocks.iter().find_map(|b| match b {
            IpNet::V4(b) => Some(*b),
            IpNet::V6(_) => None,
        }),
        blocks.iter().find_map(|b| match b {
            IpNet::V6(b) => Some(*b),
            IpNet::V4(_) => None,
        }),
    )
    .ok_or("pod_cidrs is empty")?;
    let vpc_mtu = field("mtu")?
        .as_u64()
        .and_then(|m| u16::try_from(m).ok())
        .ok_or("mtu is no MTU")?;
    let nameserver: IpAddr = field("nameserver")?
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or("nameserver is no address")?;
    let zone = field("zone")?.as_str().ok_or("zone is no string")?;
    let zone = DnsZone::parse("zone", zone).map_err(|e| e.to_string())?;
    Ok(Placement {
        node_netns: Some(netns),
        pools,
        mtu: mtu.unwrap_or(vpc_mtu),
        dns: Some((nameserver, zone)),
    })
}

/// The pool: `podCidr` if set, else what the agent claimed. A missing file means the
/// agent has not started (yet): code 11, the runtime retries.
fn pod_cidr(conf: &NetConf) -> Result<Ipv4Net, CniError> {
    if let Some(cidr) = conf.pod_cidr {
        return Ok(cidr);
    }
    let path = conf.state_dir.join(POD_CIDR_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(CniError::TryAgain(format!(
                "{} does not exist: is `wiremesh agent --state-dir {}` running? (or set podCidr)",
                path.display(),
                conf.state_dir.display()
            )))
        }
        Err(e) => {
            return Err(CniError::io(
                format!("reading the agent's pod CIDR from {}", path.display()),
                e,
            ))
        }
    };
    config::parse_pod_cidr("stateDir", text.trim()).map_err(|e| {
        CniError::io(
            format!("agent state {} is unreadable", path.display()),
            std::io::Error::new(ErrorKind::InvalidData, e.to_string()),
        )
    })
}

/// The agent's IPv6 pod CIDR; `None` when it wrote none (IPv4-only pods).
fn pod_cidr_v6(conf: &NetConf) -> Result<Option<Ipv6Net>, CniError> {
    let path = conf.state_dir.join(POD_CIDR_V6_FILE);
    let unreadable = |e: std::io::Error| {
        CniError::io(
            format!("reading the agent's IPv6 pod CIDR from {}", path.display()),
            e,
        )
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map(Some).map_err(|_| {
            unreadable(std::io::Error::new(
                ErrorKind::InvalidData,
                format!("{:?} is not an IPv6 CIDR", text.trim()),
            ))
        }),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(unreadable(e)),
    }
}

/// `mtu` if set, else the WireGuard interface's, else 1420.
fn mtu(conf: &NetConf) -> u16 {
    conf.mtu.unwrap_or_else(|| {
        run(&["ip", "-json", "link", "show", "dev", &conf.interface])
            .ok()
            .and_then(|out| veth::link_facts(&out))
            .and_then(|(_, mtu)| mtu)
            .unwrap_or(FALLBACK_MTU)
    })
}

fn attachment(req: &Request) -> Result<Attachment, CniError> {
    Ok(Attachment {
        container_id: req.container_id()?.to_owned(),
        ifname: req.ifname()?.to_owned(),
    })
}

/// The container's namespace must exist before anything is allocated for it.
fn existing_netns(req: &Request, missing: fn(String) -> CniError) -> Result<&Path, CniError> {
    let netns = req.netns()?;
    if netns.exists() {
        Ok(netns)
    } else {
        Err(missing(format!(
            "network namespace {} does not exist",
            netns.display()
        )))
    }
}

fn ip_in(netns: &Path, args: &[&str]) -> Result<String, CniError> {
    let net = format!("--net={}", netns.display());
    let mut full = vec!["nsenter", net.as_str(), "ip"];
    full.extend(args);
    Ok(run(&full)?)
}

/// `ip` on the node side: in the VPC's namespace, or where the plugin runs.
fn ip_on_node(node_netns: Option<&str>, args: &[&str]) -> Result<String, CniError> {
    let mut full = vec!["ip"];
    if let Some(ns) = node_netns {
        full.extend(["-n", ns]);
    }
    full.extend(args);
    Ok(run(&full)?)
}

fn add(conf: &NetConf, req: &Request, pod: &PodId) -> Result<Value, CniError> {
    let netns = existing_netns(req, |reason| CniError::InvalidEnv {
        var: "CNI_NETNS",
        reason,
    })?;
    let who = attachment(req)?;
    let place = placement(conf, true)?;
    let (pool, mtu, node_ns) = (
        place.pools.allocated(),
        place.mtu,
        place.node_netns.as_deref(),
    );
    let address = {
        let store = Store::open(&conf.data_dir, &conf.name)?;
        let taken = store.allocations()?;
        match ipam::held_by(&taken, &who) {
            // A retried ADD keeps the address it got the first time.
            Some(ip) => ip,
            None => {
                let ip = ipam::pick(pool, &taken, store.last_reserved()).ok_or_else(|| {
                    CniError::TryAgain(format!(
                        "all {} addresses of pod CIDR {pool} are taken; DEL or GC frees them",
                        ipam::size(pool)
                    ))
                })?;
                store.reserve(ip, &who)?;
                ip
            }
        }
        // The lock goes here: plugging the veth in needs no exclusion.
    };
    let addrs = match pod_addresses(&place.pools, address) {
        Ok(addrs) => addrs,
        Err(e) => {
            release(conf, address);
            return Err(e);
        }
    };
    let host_if = veth::host_ifname(&who.container_id, &who.ifname);
    let link = pod::PodLink {
        node_netns: node_ns,
        pod_netns: netns,
        host_if: &host_if,
        pod_if: &who.ifname,
        pod_ip: addrs.v4,
        pod_ip_v6: addrs.v6,
        mtu,
    };
    let plugged = pod::attach(&link).map_err(CniError::from).and_then(|()| {
        let Some(vpc) = &conf.vpc else {
            return Ok(());
        };
        let record = LocalPodRecord {
            namespace: pod.namespace.to_string(),
            name: pod.name.to_string(),
            address: address.to_string(),
            // An IPv6-only pod's one address is its `address`.
            address_v6: addrs
                .v6
                .filter(|_| address.is_ipv4())
                .map(|a| a.to_string()),
            labels: conf.labels.clone(),
        };
        write_pod_file(&pod_file(conf, vpc, &who.container_id), &record).inspect_err(|_| {
            let _ = pod::detach(node_ns, &host_if);
        })
    });
    if let Err(e) = plugged {
        release(conf, address);
        return Err(e);
    }
    // MACs are informational; a failed read must not fail a working ADD.
    let host_facts = ip_on_node(node_ns, &["-json", "link", "show", "dev", &host_if])
        .ok()
        .and_then(|o| veth::link_facts(&o));
    let pod_facts = ip_in(netns, &["-json", "link", "show", "dev", &who.ifname])
        .ok()
        .and_then(|o| veth::link_facts(&o));
    let facts = |f: Option<(Option<String>, Option<u16>)>| f.unwrap_or((None, Some(mtu)));
    let (host_mac, host_mtu) = facts(host_facts);
    let (pod_mac, pod_mtu) = facts(pod_facts);
    let added = AddResult {
        host: Interface {
            name: host_if.clone(),
            mac: host_mac,
            mtu: host_mtu,
            sandbox: None,
        },
        container: Interface {
            name: who.ifname.clone(),
            mac: pod_mac,
            mtu: pod_mtu,
            sandbox: Some(netns.display().to_string()),
        },
        address: addrs.v4,
        address_v6: addrs.v6,
        dns: place.dns.map(|(nameserver, zone)| Dns {
            nameservers: vec![nameserver],
            search: search_path(&pod.namespace, &zone).to_vec(),
            options: vec!["ndots:5".into()],
        }),
    };
    Ok(result::render(
        &added,
        conf.cni_version,
        conf.prev_result.as_ref(),
    ))
}

/// Give `address` back after a failed ADD, so it leaks nothing.
fn release(conf: &NetConf, address: IpAddr) {
    if let Ok(store) = Store::open(&conf.data_dir, &conf.name) {
        let _ = store.release(address);
    }
}

/// The pod's addresses for its store entry `ip`.
fn pod_addresses(pools: &ipam::Pools, ip: IpAddr) -> Result<ipam::PodAddrs, CniError> {
    pools.addresses(ip).ok_or_else(|| {
        let reason = match pools {
            ipam::Pools::Dual(v4, v6) if IpNet::V4(*v4).contains(&ip) => {
                format!("IPv6 pod CIDR {v6} has room for no address per address of {v4}")
            }
            _ => format!("{ip} is outside pod CIDR {}", pools.allocated()),
        };
        CniError::io(
            format!("the address store's {ip}"),
            std::io::Error::new(ErrorKind::InvalidData, reason),
        )
    })
}

/// `<stateDir>/vpcs/<vpc>/pods/<container id>.json`: the agent's view of the pod.
fn pod_file(conf: &NetConf, vpc: &Label, container_id: &str) -> std::path::PathBuf {
    conf.state_dir
        .join(VPCS_DIR)
        .join(vpc.as_str())
        .join(PODS_DIR)
        .join(format!("{container_id}.json"))
}

/// Atomically: the agent may read it at any moment.
fn write_pod_file(path: &Path, record: &LocalPodRecord) -> Result<(), CniError> {
    let json = serde_json::to_vec_pretty(record).expect("serializes");
    let tmp = path.with_extension("tmp");
    path.parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&tmp, &json))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| CniError::io(format!("writing {}", path.display()), e))
}

/// Remove the link, then free the address; both steps tolerate "already gone".
fn del(conf: &NetConf, req: &Request) -> Result<(), CniError> {
    let who = attachment(req)?;
    // A VPC the agent no longer hosts took its namespace, and the link, with it.
    let node_ns = match placement(conf, false) {
        Ok(place) => place.node_netns,
        Err(_) if conf.vpc.is_some() => None,
        Err(e) => return Err(e),
    };
    let host_if = veth::host_ifname(&who.container_id, &who.ifname);
    // Deleting the node end takes the container end (and the /32 route) with it.
    if conf.vpc.is_none() || node_ns.is_some() {
        pod::detach(node_ns.as_deref(), &host_if)?;
    }
    let store = Store::open(&conf.data_dir, &conf.name)?;
    if let Some(ip) = ipam::held_by(&store.allocations()?, &who) {
        store.release(ip)?;
    }
    // The VPC's last pod on this node: tell the agent, which removes the namespace.
    if let Some(vpc) = &conf.vpc {
        let file = pod_file(conf, vpc, &who.container_id);
        match std::fs::remove_file(&file) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                return Err(CniError::io(format!("removing {}", file.display()), e))
            }
            _ => {}
        }
        if store.allocations()?.is_empty() {
            let dir = conf.state_dir.join(VPCS_DIR).join(vpc.as_str());
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    return Err(CniError::io(format!("removing {}", dir.display()), e))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn check(conf: &NetConf, req: &Request) -> Result<(), CniError> {
    let netns = existing_netns(req, CniError::ContainerUnknown)?;
    let who = attachment(req)?;
    let ip = {
        let store = Store::open(&conf.data_dir, &conf.name)?;
        ipam::held_by(&store.allocations()?, &who).ok_or_else(|| {
            CniError::CheckFailed(format!(
                "no address is allocated to container {} interface {}",
                who.container_id, who.ifname
            ))
        })?
    };
    let place = placement(conf, false).map_err(|e| CniError::CheckFailed(e.to_string()))?;
    let addrs =
        pod_addresses(&place.pools, ip).map_err(|e| CniError::CheckFailed(e.to_string()))?;
    let families = [
        addrs
            .v4
            .map(|a| (IpAddr::V4(a), IpAddr::V4(pod::POD_GATEWAY))),
        addrs
            .v6
            .map(|a| (IpAddr::V6(a), IpAddr::V6(pod::POD_GATEWAY_V6))),
    ];
    for (address, gateway) in families.into_iter().flatten() {
        if let Some(prev) = &conf.prev_result {
            if !config::prev_result_ips(prev).contains(&address) {
                return Err(CniError::CheckFailed(format!(
                    "prevResult does not list {address}, the pod's address"
                )));
            }
        }
        check_family(place.node_netns.as_deref(), netns, &who, address, gateway)?;
    }
    Ok(())
}

/// The pod's link in one family: the node's route to `address` over the pod's veth,
/// `address` on the pod's interface, and its default route via `gateway`.
fn check_family(
    node_ns: Option<&str>,
    netns: &Path,
    who: &Attachment,
    address: IpAddr,
    gateway: IpAddr,
) -> Result<(), CniError> {
    let host_if = veth::host_ifname(&who.container_id, &who.ifname);
    let failed = |what: String| Err(CniError::CheckFailed(what));
    let family = if address.is_ipv4() { "-4" } else { "-6" };
    let host_routes = ip_on_node(
        node_ns,
        &["-json", family, "route", "show", &address.to_string()],
    )
    .map_err(|e| CniError::CheckFailed(format!("node link {host_if}: {e}")))?;
    if !veth::has_route(&host_routes, &address.to_string(), &host_if, None) {
        return failed(format!(
            "the node has no route to {address} through {host_if}"
        ));
    }
    let addrs = ip_in(
        netns,
        &["-json", family, "address", "show", "dev", &who.ifname],
    )
    .map_err(|e| CniError::CheckFailed(format!("interface {}: {e}", who.ifname)))?;
    if !veth::has_address(&addrs, address) {
        return failed(format!("{} in the container lacks {address}", who.ifname));
    }
    let routes = ip_in(netns, &["-json", family, "route", "show"])?;
    if !veth::has_route(&routes, "default", &who.ifname, Some(gateway)) {
        return failed(format!(
            "the container has no default route via {gateway} dev {}",
            who.ifname
        ));
    }
    Ok(())
}

/// Free every address (and node link) not held by an attachment the runtime still knows.
fn gc(conf: &NetConf) -> Result<(), CniError> {
    let valid = conf.valid_attachments.as_deref().ok_or_else(|| {
        // Treating a missing list as empty would unplug every pod on the node.
        CniError::config(config::VALID_ATTACHMENTS, "is required for GC")
    })?;
    let store = Store::open(&conf.data_dir, &conf.name)?;
    let node_ns = placement(conf, false).ok().and_then(|p| p.node_netns);
    for (ip, owner) in ipam::garbage(&store.allocations()?, valid) {
        if let Some(o) = owner {
            let host_if = veth::host_ifname(&o.container_id, &o.ifname);
            pod::detach(node_ns.as_deref(), &host_if)?;
        }
        store.release(ip)?;
    }
    Ok(())
}

/// Ready for ADD: a pod CIDR is known and has a free address.
fn status(conf: &NetConf) -> Result<(), CniError> {
    let unavailable = |e: CniError| CniError::NotAvailable(e.to_string());
    let pool = match placement(conf, false) {
        Ok(place) => place.pools.allocated(),
        // A VPC new to this node: ADD asks the agent for it; a running agent is enough.
        Err(CniError::TryAgain(_)) if conf.vpc.is_some() => {
            pod_cidr(conf).map_err(unavailable)?;
            return Ok(());
        }
        Err(e) => return Err(unavailable(e)),
    };
    let store = Store::open(&conf.data_dir, &conf.name).map_err(unavailable)?;
    if !ipam::has_room(pool, &store.allocations().map_err(unavailable)?) {
        return Err(CniError::NotAvailable(format!(
            "every address of pod CIDR {pool} is taken"
        )));
    }
    Ok(())
}

/// For the error reply: the version the runtime speaks, if it sent a readable one.
pub fn error_version(stdin: &[u8]) -> Version {
    config::peek_version(stdin)
        .filter(|v| Version::SUPPORTED.contains(v))
        .unwrap_or(Version::LATEST)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_is_named_from_cni_args_else_from_its_container() {
        let env = |args: &str| HashMap::from([("CNI_ARGS".to_owned(), args.to_owned())]);
        let k8s = pod_id(
            &env("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-7f9c.a"),
            "c1",
        );
        assert_eq!(
            (k8s.namespace.as_str(), k8s.name.as_str()),
            ("shop", "web-7f9c.a")
        );
        let bare = pod_id(&HashMap::new(), "0A1b_2.3-");
        assert_eq!(
            (bare.namespace.as_str(), bare.name.as_str()),
            ("default", "pod-0a1b-2-3")
        );
        let bad = pod_id(&env("K8S_POD_NAMESPACE=Shop;K8S_POD_NAME=Web"), "c1");
        assert_eq!(
            (bad.namespace.as_str(), bad.name.as_str()),
            ("default", "pod-c1")
        );
        assert_eq!(container_pod_name(&"f".repeat(64)).as_str().len(), 63);
    }

    #[test]
    fn a_vpc_gives_pods_its_blocks_of_either_family() {
        let local = |cidrs: serde_json::Value| {
            let v = json!({"netns": "wm-vpc-7", "pod_cidrs": cidrs, "mtu": 1380,
                           "nameserver": "10.96.0.10", "zone": "cluster.local"});
            parse_local_vpc(v.to_string().as_bytes(), None)
        };
        let pools = |cidrs| local(cidrs).expect("a placement").pools;
        let (v4, v6) = (
            "10.10.3.0/24".parse().unwrap(),
            "fd10:0:0:3::/64".parse().unwrap(),
        );
        assert_eq!(pools(json!(["10.10.3.0/24"])), ipam::Pools::V4(v4));
        assert_eq!(
            pools(json!(["fd10:0:0:3::/64", "10.10.3.0/24"])),
            ipam::Pools::Dual(v4, v6)
        );
        assert_eq!(pools(json!(["fd10:0:0:3::/64"])), ipam::Pools::V6(v6));
        for bad in [json!([]), json!(["10.10.3.0/33"]), json!("10.10.3.0/24")] {
            assert!(local(bad.clone()).is_err(), "{bad}");
        }
    }
}
