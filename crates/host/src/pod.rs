//! Plugging a pod (a network namespace) into its node: a veth pair, a /32 route to
//! the pod on the node, and in the pod a default route via a link-local gateway.
//!
//! The gateway is 169.254.1.1 on every pod's node-side veth (as Calico does): the
//! node answers ARP for it on each veth, so pods need no subnet and no bridge, and
//! pod traffic is always routed (never bridged) by the node.
//!
//! A dual-stack pod also gets an IPv6 /128 with a default route via fe80::1, the
//! node-side veth's link-local address (as on a router's every port): neighbour
//! discovery answers for it on each veth, and DAD is skipped on addresses only
//! this link can hold, so the pod is reachable at once. An IPv6-only pod gets that
//! alone: no IPv4 address, gateway or route.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use crate::{run, HostError};

pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const POD_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// `P`, the pod's IPv4 address, is an `Ipv4Addr` or, for a pod that may be
/// IPv6-only, an `Option<Ipv4Addr>` (so callers with IPv4 pods need not wrap it).
pub struct PodLink<'a> {
    /// Named namespace of the node, or `None` for the current one.
    pub node_netns: Option<&'a str>,
    pub pod_netns: &'a Path,
    /// Name of the node-side veth (unique on the node).
    pub host_if: &'a str,
    /// Name of the interface inside the pod.
    pub pod_if: &'a str,
    /// The pod's IPv4 address; `None` for an IPv6-only pod.
    pub pod_ip: Option<Ipv4Addr>,
    /// The pod's IPv6 address, for dual-stack and IPv6-only pods.
    pub pod_ip_v6: Option<Ipv6Addr>,
    pub mtu: u16,
}

fn ip_on_node(node_netns: Option<&str>, args: &[&str]) -> Result<String, HostError> {
    let mut full = vec!["ip"];
    if let Some(ns) = node_netns {
        full.extend(["-n", ns]);
    }
    full.extend(args);
    run(&full)
}

fn ip_in_pod(pod_netns: &Path, args: &[&str]) -> Result<String, HostError> {
    let net = format!("--net={}", pod_netns.display());
    let mut full = vec!["nsenter", net.as_str(), "ip"];
    full.extend(args);
    run(&full)
}

/// Create the link; on failure, remove what was made so a retry starts clean.
pub fn attach(link: &PodLink) -> Result<(), HostError> {
    let result = try_attach(link);
    if result.is_err() {
        let _ = detach(link.node_netns, link.host_if);
    }
    result
}

fn try_attach(l: &PodLink) -> Result<(), HostError> {
    let pod_ns = l.pod_netns.display().to_string();
    let mtu = l.mtu.to_string();
    ip_on_node(
        l.node_netns,
        &[
            "link", "add", l.host_if, "mtu", &mtu, "type", "veth", "peer", "name", l.pod_if, "mtu",
            &mtu, "netns", &pod_ns,
        ],
    )?;
    ip_on_node(l.node_netns, &["link", "set", l.host_if, "up"])?;
    ip_in_pod(l.pod_netns, &["link", "set", "lo", "up"])?;
    ip_in_pod(l.pod_netns, &["link", "set", l.pod_if, "up"])?;
    if let Some(v4) = l.pod_ip {
        attach_v4(l, v4)?;
    }
    if let Some(v6) = l.pod_ip_v6 {
        attach_v6(l, v6)?;
    }
    Ok(())
}

fn attach_v4(l: &PodLink, pod_ip: Ipv4Addr) -> Result<(), HostError> {
    let pod_ip = format!("{pod_ip}/32");
    let gw = POD_GATEWAY.to_string();
    ip_on_node(
        l.node_netns,
        &["address", "add", &format!("{gw}/32"), "dev", l.host_if],
    )?;
    ip_on_node(
        l.node_netns,
        &[
            "route", "replace", &pod_ip, "dev", l.host_if, "scope", "link",
        ],
    )?;
    ip_in_pod(l.pod_netns, &["address", "add", &pod_ip, "dev", l.pod_if])?;
    ip_in_pod(
        l.pod_netns,
        &["route", "add", &gw, "dev", l.pod_if, "scope", "link"],
    )?;
    ip_in_pod(
        l.pod_netns,
        &["route", "add", "default", "via", &gw, "dev", l.pod_if],
    )?;
    Ok(())
}

fn attach_v6(l: &PodLink, pod_ip: Ipv6Addr) -> Result<(), HostError> {
    let pod_ip = format!("{pod_ip}/128");
    let gw = POD_GATEWAY_V6.to_string();
    ip_on_node(
        l.node_netns,
        &[
            "-6",
            "address",
            "add",
            &format!("{gw}/64"),
            "dev",
            l.host_if,
            "scope",
            "link",
            "nodad",
        ],
    )?;
    ip_on_node(
        l.node_netns,
        &["-6", "route", "replace", &pod_ip, "dev", l.host_if],
    )?;
    ip_in_pod(
        l.pod_netns,
        &["-6", "address", "add", &pod_ip, "dev", l.pod_if, "nodad"],
    )?;
    ip_in_pod(
        l.pod_netns,
        &["-6", "route", "add", "default", "via", &gw, "dev", l.pod_if],
    )?;
    Ok(())
}

/// Remove the pod's link (its route goes with it). Idempotent.
pub fn detach(node_netns: Option<&str>, host_if: &str) -> Result<(), HostError> {
    match ip_on_node(node_netns, &["link", "del", host_if]) {
        Err(HostError::Command { stderr, .. }) if stderr.contains("Cannot find device") => Ok(()),
        other => other.map(|_| ()),
    }
}
