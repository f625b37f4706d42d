//! Links, addresses and routes, through iproute2.
//!
//! Routes wiremesh installs carry their own protocol number ([`WIREMESH_PROTO`]), so
//! the agent can list exactly its own routes and remove the ones no longer wanted
//! without touching anything else on the host.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use crate::{run, HostError};

/// `proto` of every route wiremesh installs (unassigned in /etc/iproute2/rt_protos).
pub const WIREMESH_PROTO: u8 = 52;

/// A route as installed on the host.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstalledRoute {
    pub dst: IpNet,
    pub dev: String,
    pub via: Option<IpAddr>,
}

#[derive(Deserialize)]
struct JsonRoute {
    #[serde(default)]
    dst: String,
    dev: Option<String>,
    gateway: Option<String>,
}

/// Every route with wiremesh's protocol number, IPv4 and IPv6.
pub fn list_own() -> Result<Vec<InstalledRoute>, HostError> {
    let proto = WIREMESH_PROTO.to_string();
    let mut routes = Vec::new();
    for family in ["-4", "-6"] {
        let args = [
            "ip",
            "-json",
            family,
            "route",
            "show",
            "proto",
            proto.as_str(),
        ];
        let out = run(&args)?;
        let parsed: Vec<JsonRoute> =
            serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out }).map_err(|e| {
                HostError::Output {
                    command: args.join(" "),
                    reason: e.to_string(),
                }
            })?;
        for r in parsed {
            let dst = if r.dst.contains('/') {
                r.dst.parse::<IpNet>().ok()
            } else {
                r.dst.parse::<IpAddr>().ok().map(IpNet::from)
            };
            let (Some(dst), Some(dev)) = (dst, r.dev) else {
                continue;
            };
            routes.push(InstalledRoute {
                dst,
                dev,
                via: r.gateway.and_then(|g| g.parse().ok()),
            });
        }
    }
    routes.sort();
    Ok(routes)
}

pub fn replace(route: &InstalledRoute) -> Result<(), HostError> {
    let dst = route.dst.to_string();
    let proto = WIREMESH_PROTO.to_string();
    let mut args = vec![
        "ip",
        "route",
        "replace",
        dst.as_str(),
        "dev",
        route.dev.as_str(),
        "proto",
        proto.as_str(),
    ];
    let via = route.via.map(|v| v.to_string());
    if let Some(via) = &via {
        args.extend(["via", via.as_str()]);
    }
    run(&args).map(|_| ())
}

pub fn delete(route: &InstalledRoute) -> Result<(), HostError> {
    let dst = route.dst.to_string();
    run(&[
        "ip",
        "route",
        "del",
        dst.as_str(),
        "dev",
        route.dev.as_str(),
    ])
    .map(|_| ())
}

/// Give `dev` exactly this address (keeping it if present), this MTU, and bring it up.
pub fn configure_link(dev: &str, address: IpNet, mtu: u16) -> Result<(), HostError> {
    let addr = address.to_string();
    run(&["ip", "address", "replace", addr.as_str(), "dev", dev])?;
    let mtu = mtu.to_string();
    run(&["ip", "link", "set", "dev", dev, "mtu", mtu.as_str(), "up"]).map(|_| ())
}

/// The interface the kernel would use to reach `addr` (for routes via a gateway).
pub fn dev_towards(addr: IpAddr) -> Option<String> {
    let out = run(&["ip", "-json", "route", "get", &addr.to_string()]).ok()?;
    let routes: Vec<JsonRoute> = serde_json::from_str(&out).ok()?;
    routes.into_iter().next()?.dev
}

/// The MTU of the interface that holds the local address `addr`.
pub fn mtu_of_local_address(addr: IpAddr) -> Option<u16> {
    #[derive(Deserialize)]
    struct Link {
        mtu: u16,
    }
    let out = run(&["ip", "-json", "address", "show", "to", &addr.to_string()]).ok()?;
    let links: Vec<Link> = serde_json::from_str(&out).ok()?;
    links.into_iter().map(|l| l.mtu).min()
}

/// Whether `dev` takes IPv6 (a host may switch IPv6 off, or not have it at all).
pub fn ipv6_enabled(dev: &str) -> bool {
    std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"))
        .is_ok_and(|v| v.trim() == "0")
}

pub fn link_exists(dev: &str) -> bool {
    run(&["ip", "link", "show", "dev", dev]).is_ok()
}

/// Write a sysctl under /proc/sys (e.g. `net/ipv4/ip_forward`) in the current namespace.
/// A value already in place is not written again: in a container whose /proc/sys is
/// read-only (a DaemonSet with only NET_ADMIN), an init step may have set it.
pub fn sysctl(key: &str, value: &str) -> Result<(), HostError> {
    let path = format!("/proc/sys/{key}");
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(|e| HostError::Command {
        command: format!("sysctl {key}={value}"),
        stderr: e.to_string(),
    })
}

/// Turn the node into a router for pod traffic (IPv4 and IPv6), without ICMP redirects:
/// a leader sends transit traffic back out the interface it came in on, by design.
pub fn enable_forwarding() -> Result<(), HostError> {
    sysctl("net/ipv4/ip_forward", "1")?;
    sysctl("net/ipv4/conf/all/send_redirects", "0")?;
    // IPv6 may be disabled on the host; IPv4 forwarding is what every mesh needs.
    let _ = sysctl("net/ipv6/conf/all/forwarding", "1");
    Ok(())
}
