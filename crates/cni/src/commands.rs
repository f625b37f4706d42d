//! The shell: each CNI command as a sequence of reads, pure decisions and effects.
//!
//! Decisions live in [`crate::ipam`], [`crate::config`], [`crate::result`] and
//! [`crate::veth`]; this module reads the agent's state and the IPAM store, calls
//! them, and applies the outcome with `wiremesh_host::pod` and `ip`. The plugin runs
//! in the node's network namespace (where the runtime started it), so node-side
//! commands need no namespace argument.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::Path;

use ipnet::Ipv4Net;
use serde_json::{json, Value};
use wiremesh_host::{pod, run};

use crate::config::{self, Attachment, NetConf, FALLBACK_MTU};
use crate::error::CniError;
use crate::ipam;
use crate::request::{self, Command, Request};
use crate::result::{self, AddResult, Interface};
use crate::store::Store;
use crate::version::Version;
use crate::veth;

/// The agent's pod CIDR file inside its state dir.
pub const POD_CIDR_FILE: &str = "pod-cidr";

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
        Command::Add => add(&conf, &req).map(Some),
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

fn add(conf: &NetConf, req: &Request) -> Result<Value, CniError> {
    let netns = existing_netns(req, |reason| CniError::InvalidEnv {
        var: "CNI_NETNS",
        reason,
    })?;
    let who = attachment(req)?;
    let pool = pod_cidr(conf)?;
    let mtu = mtu(conf);
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
                        ipam::usable(pool).count()
                    ))
                })?;
                store.reserve(ip, &who)?;
                ip
            }
        }
        // The lock goes here: plugging the veth in needs no exclusion.
    };
    let host_if = veth::host_ifname(&who.container_id, &who.ifname);
    let link = pod::PodLink {
        node_netns: None,
        pod_netns: netns,
        host_if: &host_if,
        pod_if: &who.ifname,
        pod_ip: address,
        mtu,
    };
    if let Err(e) = pod::attach(&link) {
        // Give the address back, so a failed ADD leaks nothing.
        if let Ok(store) = Store::open(&conf.data_dir, &conf.name) {
            let _ = store.release(address);
        }
        return Err(e.into());
    }
    // MACs are informational; a failed read must not fail a working ADD.
    let host_facts = run(&["ip", "-json", "link", "show", "dev", &host_if])
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
        address,
        gateway: pod::POD_GATEWAY,
    };
    Ok(result::render(
        &added,
        conf.cni_version,
        conf.prev_result.as_ref(),
    ))
}

/// Remove the link, then free the address; both steps tolerate "already gone".
fn del(conf: &NetConf, req: &Request) -> Result<(), CniError> {
    let who = attachment(req)?;
    // Deleting the node end takes the container end (and the /32 route) with it.
    pod::detach(None, &veth::host_ifname(&who.container_id, &who.ifname))?;
    let store = Store::open(&conf.data_dir, &conf.name)?;
    if let Some(ip) = ipam::held_by(&store.allocations()?, &who) {
        store.release(ip)?;
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
    if let Some(prev) = &conf.prev_result {
        if !config::prev_result_ips(prev).contains(&ip) {
            return Err(CniError::CheckFailed(format!(
                "prevResult does not list {ip}, the address allocated to this container"
            )));
        }
    }
    let host_if = veth::host_ifname(&who.container_id, &who.ifname);
    let failed = |what: String| Err(CniError::CheckFailed(what));
    let host_routes = run(&["ip", "-json", "-4", "route", "show", &ip.to_string()])
        .map_err(|e| CniError::CheckFailed(format!("node link {host_if}: {e}")))?;
    if !veth::has_route(&host_routes, &ip.to_string(), &host_if, None) {
        return failed(format!("the node has no route to {ip} through {host_if}"));
    }
    let addrs = ip_in(
        netns,
        &["-json", "-4", "address", "show", "dev", &who.ifname],
    )
    .map_err(|e| CniError::CheckFailed(format!("interface {}: {e}", who.ifname)))?;
    if !veth::has_address(&addrs, ip) {
        return failed(format!("{} in the container lacks {ip}/32", who.ifname));
    }
    let routes = ip_in(netns, &["-json", "-4", "route", "show"])?;
    if !veth::has_route(&routes, "default", &who.ifname, Some(pod::POD_GATEWAY)) {
        return failed(format!(
            "the container has no default route via {} dev {}",
            pod::POD_GATEWAY,
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
    for (ip, owner) in ipam::garbage(&store.allocations()?, valid) {
        if let Some(o) = owner {
            pod::detach(None, &veth::host_ifname(&o.container_id, &o.ifname))?;
        }
        store.release(ip)?;
    }
    Ok(())
}

/// Ready for ADD: a pod CIDR is known and has a free address.
fn status(conf: &NetConf) -> Result<(), CniError> {
    let unavailable = |e: CniError| CniError::NotAvailable(e.to_string());
    let pool = pod_cidr(conf).map_err(unavailable)?;
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
