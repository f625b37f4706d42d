//! The services ruleset of one VPC namespace on one node, in kube-proxy's nftables
//! layout: a `service-ips` verdict map keyed on `daddr . l4proto . dport` jumps to a
//! chain per service port, which picks an endpoint chain with `numgen random mod N`;
//! the endpoint chain DNATs to the endpoint's target port.
//!
//! Computed in two steps, both pure: [`plan`] decides, per service port, which
//! endpoints take new connections (Kubernetes' rules: ready ones, else serving
//! terminating ones; `Local` policy keeps this node's) and who may connect; then
//! [`ServicesPlan::render`] writes one `nft -f` transaction that replaces the table
//! atomically. The agent keeps the last applied plan: [`udp_conntrack_flushes`] of old
//! and new says which UDP conntrack entries would keep one-way flows on a removed
//! endpoint.
//!
//! - A service port with no usable endpoint is in `no-endpoint-services` and rejected
//!   (TCP reset, ICMP port unreachable for UDP) before NAT: a client fails at once
//!   instead of hanging.
//! - ClientIP affinity: one dynamic set per endpoint with the affinity timeout; the
//!   endpoint chain adds the client, the service chain sends a known client back.
//! - Access policy: a client-side check on the VIP (filter hooks, before DNAT), and a
//!   backend-side check in the forward hook on this node's endpoints, so a pod that
//!   dials an endpoint's address directly meets the same policy. A dual-stack
//!   backend pod is checked at both its addresses, the other family's in a table of
//!   that family holding only this check (replaced whole each time: it keeps no
//!   state), so IPv6 cannot go around a check IPv4 meets.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::IpAddr;

use ipnet::IpNet;
use wiremesh_model::NodeName;

use crate::record::{IpFamily, LabelSelector};
use crate::snapshot::{ServiceState, VpcState};
use crate::{Endpoint, Label, Protocol, SessionAffinity, TrafficPolicy};

/// `writeln!` into a `String`, which cannot fail.
macro_rules! emit {
    ($out:expr, $($arg:tt)*) => {
        let _ = writeln!($out, $($arg)*);
    };
}

/// The table's name in every VPC namespace.
pub const TABLE: &str = "wmvpc";

/// Traffic to one service port's VIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipPort {
    pub namespace: Label,
    pub service: Label,
    pub target_port: u16,
    /// Endpoints that take new connections, sorted; empty: rejected.
    pub endpoints: Vec<IpAddr>,
    pub affinity_timeout_secs: Option<u32>,
    /// `None`: open to every source; else the sources allowed (maybe none).
    pub allowed: Option<Vec<IpNet>>,
}

/// `(address, protocol, port)`: a VIP port or an endpoint's target port.
pub type Key = (IpAddr, Protocol, u16);

/// What the ruleset of one VPC namespace on one node says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicesPlan {
    /// The service CIDR's family: the table's.
    pub family: IpFamily,
    pub vips: BTreeMap<Key, VipPort>,
    /// This node's endpoints of services with an access policy, at each address of
    /// their pod (both families): the sources allowed, of the key's family.
    pub backend_access: BTreeMap<Key, Vec<IpNet>>,
}

/// The endpoints of `svc` that take new connections from a client on `node`.
pub fn usable_endpoints<'a>(svc: &'a ServiceState, node: &NodeName) -> Vec<&'a Endpoint> {
    let candidates: Vec<&Endpoint> = svc
        .endpoints
        .iter()
        .filter(|e| match svc.service.internal_traffic_policy {
            TrafficPolicy::Cluster => true,
            TrafficPolicy::Local => e.node == *node,
        })
        .collect();
    let ready: Vec<&Endpoint> = candidates.iter().copied().filter(|e| e.ready).collect();
    if ready.is_empty() {
        candidates.into_iter().filter(|e| e.is_fallback()).collect()
    } else {
        ready
    }
}

/// `nets` of `family` without those another one covers (nftables rejects overlapping
/// elements), sorted.
fn minimal(nets: impl IntoIterator<Item = IpNet>, family: IpFamily) -> Vec<IpNet> {
    let nets: BTreeSet<IpNet> = nets
        .into_iter()
        .filter(|n| IpFamily::of_net(n) == family)
        .collect();
    nets.iter()
        .filter(|n| !nets.iter().any(|m| m != *n && m.contains(*n)))
        .copied()
        .collect()
}

/// The services plan of `vpc` for node `node`. `resolve` gives the addresses of the
/// VPC's pods that match a label selector (the caller knows the pods).
pub fn plan(
    vpc: &VpcState,
    node: &NodeName,
    resolve: &dyn Fn(&LabelSelector) -> Vec<IpAddr>,
) -> ServicesPlan {
    let family = IpFamily::of_net(&vpc.vpc.service_cidr);
    let mut vips = BTreeMap::new();
    // `None` once any service leaves the key open: its clients must get through too.
    let mut backend: BTreeMap<Key, Option<BTreeSet<IpNet>>> = BTreeMap::new();
    for svc in vpc.services.values() {
        let s = &svc.service;
        // Both families: the backend check guards a pod's every address.
        let sources: Option<Vec<IpNet>> = s.access.as_ref().map(|a| {
            let pods = a.allowed_pods.iter().flat_map(resolve).map(IpNet::from);
            a.allowed_cidrs.iter().copied().chain(pods).collect()
        });
        let allowed = sources
            .as_ref()
            .map(|nets| minimal(nets.iter().copied(), family));
        let affinity_timeout_secs = match s.session_affinity {
            SessionAffinity::None => None,
            SessionAffinity::ClientIp { timeout_secs } => Some(timeout_secs),
        };
        for port in &s.ports {
            let local = svc.endpoints.iter().filter(|e| e.node == *node);
            for address in local.flat_map(|e| backend_addresses(vpc, e.address)) {
                let entry = backend
                    .entry((address, port.protocol, port.target_port))
                    .or_insert_with(|| Some(BTreeSet::new()));
                match (&sources, entry) {
                    (Some(nets), Some(set)) => set.extend(nets.iter().copied()),
                    (_, entry) => *entry = None,
                }
            }
            let Some(vip) = s.cluster_ip.filter(|ip| IpFamily::of(ip) == family) else {
                continue;
            };
            let mut endpoints: Vec<IpAddr> = usable_endpoints(svc, node)
                .into_iter()
                .map(|e| e.address)
                .filter(|a| IpFamily::of(a) == family)
                .collect();
            endpoints.sort();
            vips.insert(
                (vip, port.protocol, port.port),
                VipPort {
                    namespace: s.namespace.clone(),
                    service: s.name.clone(),
                    target_port: port.target_port,
                    endpoints,
                    affinity_timeout_secs,
                    allowed: allowed.clone(),
                },
            );
        }
    }
    let backend_access = backend
        .into_iter()
        .filter_map(|(k, v)| Some((k, minimal(v?, IpFamily::of(&k.0)))))
        .collect();
    ServicesPlan {
        family,
        vips,
        backend_access,
    }
}

/// Where a client may reach the backend at `endpoint`: every address of the pod
/// holding it (a dual-stack pod has two), or the endpoint alone if no pod does.
fn backend_addresses(vpc: &VpcState, endpoint: IpAddr) -> Vec<IpAddr> {
    vpc.pods
        .values()
        .find(|p| p.addresses().any(|a| a == endpoint))
        .map_or_else(|| vec![endpoint], |p| p.addresses().collect())
}

/// nftables names: `/` separates the parts (labels never contain one); an IPv6
/// address's `:` is not allowed in a name and becomes `.`.
fn name_part(ip: &IpAddr) -> String {
    ip.to_string().replace(':', ".")
}

struct Names {
    service: String,
}

impl Names {
    fn new(key: &Key, vip: &VipPort) -> Names {
        let (_, proto, port) = key;
        Names {
            service: format!(
                "{}/{}/{}/{port}",
                vip.namespace,
                vip.service,
                proto.as_str()
            ),
        }
    }
    fn service_chain(&self) -> String {
        format!("svc-{}", self.service)
    }
    fn access_chain(&self) -> String {
        format!("access-{}", self.service)
    }
    fn endpoint_chain(&self, ep: &IpAddr) -> String {
        format!("ep-{}/{}", self.service, name_part(ep))
    }
    fn affinity_set(&self, ep: &IpAddr) -> String {
        format!("aff-{}/{}", self.service, name_part(ep))
    }
}

fn backend_chain((addr, proto, port): &Key) -> String {
    format!("backend-{}/{}/{port}", name_part(addr), proto.as_str())
}

/// The table family's keyword and address type.
fn family_words(family: IpFamily) -> (&'static str, &'static str) {
    match family {
        IpFamily::V4 => ("ip", "ipv4_addr"),
        IpFamily::V6 => ("ip6", "ipv6_addr"),
    }
}

/// The family of the other table: the one that holds only backend checks.
fn other(family: IpFamily) -> IpFamily {
    match family {
        IpFamily::V4 => IpFamily::V6,
        IpFamily::V6 => IpFamily::V4,
    }
}

/// The chain that ends a refused connection. UDP (and anything else) gets ICMP port
/// unreachable: `reject`'s default.
fn emit_reject_chain(o: &mut String) {
    emit!(
        o,
        "\tchain reject-service {{\n\t\tmeta l4proto tcp reject with tcp reset\n\t\treject\n\t}}"
    );
}

/// The backend-side check: new connections to this node's restricted endpoints.
fn emit_forward_chain(o: &mut String, key_expr: &str) {
    emit!(
        o,
        "\tchain filter-forward {{\n\t\ttype filter hook forward priority 0; policy accept;\n\
         \t\tct state new {key_expr} vmap @endpoint-access\n\t}}"
    );
}

/// A chain letting `nets` through and refusing everyone else.
fn emit_allow_chain(o: &mut String, ip: &str, chain: String, nets: &[IpNet]) {
    emit!(o, "\tchain {chain} {{");
    if !nets.is_empty() {
        let set = join(nets.iter().map(|n| match n {
            // Single addresses print bare; prefixes as CIDRs.
            n if n.prefix_len() == n.max_prefix_len() => n.addr().to_string(),
            n => n.to_string(),
        }));
        emit!(o, "\t\t{ip} saddr {{ {set} }} return");
    }
    emit!(o, "\t\tgoto reject-service\n\t}}");
}

fn key_text((addr, proto, port): &Key) -> String {
    format!("{addr} . {} . {port}", proto.as_str())
}

fn join(items: impl IntoIterator<Item = String>) -> String {
    items.into_iter().collect::<Vec<_>>().join(", ")
}

impl ServicesPlan {
    /// Chains and affinity sets (with their timeout) besides the fixed ones: what a
    /// later transaction deletes when its plan no longer has them.
    fn objects(&self) -> (BTreeSet<String>, BTreeSet<(String, u32)>) {
        let mut chains = BTreeSet::new();
        let mut sets = BTreeSet::new();
        for (k, v) in &self.vips {
            let names = Names::new(k, v);
            if v.allowed.is_some() {
                chains.insert(names.access_chain());
            }
            if !v.endpoints.is_empty() {
                chains.insert(names.service_chain());
            }
            for ep in &v.endpoints {
                chains.insert(names.endpoint_chain(ep));
                if let Some(timeout) = v.affinity_timeout_secs {
                    sets.insert((names.affinity_set(ep), timeout));
                }
            }
        }
        chains.extend(
            self.backend_access_of(self.family)
                .map(|(k, _)| backend_chain(k)),
        );
        (chains, sets)
    }

    fn backend_access_of(&self, family: IpFamily) -> impl Iterator<Item = (&Key, &Vec<IpNet>)> {
        self.backend_access
            .iter()
            .filter(move |(k, _)| IpFamily::of(&k.0) == family)
    }

    /// One `nft -f` transaction from `previous` (the plan applied last; `None` when
    /// unknown, e.g. after a restart) to this plan. The same plans render the same text.
    ///
    /// With `previous`, rules and the fixed maps are flushed and rewritten, but
    /// affinity sets that stay keep their clients. Without it, the table is replaced
    /// whole. If the transaction fails (the table is not what `previous` says), render
    /// again with `None`.
    pub fn render(&self, previous: Option<&ServicesPlan>) -> String {
        let (ip, addr_type) = family_words(self.family);
        let key_type = format!("{addr_type} . inet_proto . inet_service");
        let key_expr = format!("{ip} daddr . meta l4proto . th dport");
        let mut out = String::new();
        let o = &mut out;
        match previous {
            Some(prev) if prev.family == self.family => {
                emit!(
                    o,
                    "flush table {ip} {TABLE}\n\
                     flush map {ip} {TABLE} service-ips\n\
                     flush set {ip} {TABLE} no-endpoint-services\n\
                     flush map {ip} {TABLE} service-access\n\
                     flush map {ip} {TABLE} endpoint-access"
                );
                // Nothing refers to these any more: the flushes above emptied every
                // rule and map that did.
                let (old_chains, old_sets) = prev.objects();
                let (chains, sets) = self.objects();
                for chain in old_chains.difference(&chains) {
                    emit!(o, "delete chain {ip} {TABLE} {chain}");
                }
                // A changed timeout deletes the set here and declares it again below.
                for (set, _) in old_sets.difference(&sets) {
                    emit!(o, "delete set {ip} {TABLE} {set}");
                }
            }
            other => {
                if let Some(prev) = other {
                    let (old_ip, _) = family_words(prev.family);
                    emit!(o, "delete table {old_ip} {TABLE}");
                }
                // `add` first so the delete cannot fail: the whole file is one transaction.
                emit!(o, "table {ip} {TABLE} {{}}\ndelete table {ip} {TABLE}");
            }
        }
        emit!(o, "table {ip} {TABLE} {{");

        let elements = |o: &mut String, items: Vec<String>| {
            if !items.is_empty() {
                emit!(o, "\t\telements = {{ {} }}", join(items));
            }
        };
        let with_endpoints = |v: &&VipPort| !v.endpoints.is_empty();
        emit!(o, "\tmap service-ips {{\n\t\ttype {key_type} : verdict");
        elements(
            o,
            self.vips
                .iter()
                .filter(|(_, v)| with_endpoints(v))
                .map(|(k, v)| {
                    format!(
                        "{} : goto {}",
                        key_text(k),
                        Names::new(k, v).service_chain()
                    )
                })
                .collect(),
        );
        emit!(
            o,
            "\t}}\n\tset no-endpoint-services {{\n\t\ttype {key_type}"
        );
        elements(
            o,
            self.vips
                .iter()
                .filter(|(_, v)| !with_endpoints(v))
                .map(|(k, _)| key_text(k))
                .collect(),
        );
        emit!(
            o,
            "\t}}\n\tmap service-access {{\n\t\ttype {key_type} : verdict"
        );
        elements(
            o,
            self.vips
                .iter()
                .filter(|(_, v)| v.allowed.is_some())
                .map(|(k, v)| format!("{} : goto {}", key_text(k), Names::new(k, v).access_chain()))
                .collect(),
        );
        emit!(
            o,
            "\t}}\n\tmap endpoint-access {{\n\t\ttype {key_type} : verdict"
        );
        elements(
            o,
            self.backend_access_of(self.family)
                .map(|(k, _)| format!("{} : goto {}", key_text(k), backend_chain(k)))
                .collect(),
        );
        emit!(o, "\t}}");

        for (k, v) in &self.vips {
            let Some(timeout) = v.affinity_timeout_secs else {
                continue;
            };
            let names = Names::new(k, v);
            for ep in &v.endpoints {
                emit!(
                    o,
                    "\tset {} {{\n\t\ttype {addr_type}\n\t\tflags dynamic,timeout\n\t\ttimeout {timeout}s\n\t}}",
                    names.affinity_set(ep)
                );
            }
        }

        emit_reject_chain(o);
        // Filter before NAT (-110 < -100): rejections see the VIP, not an endpoint.
        // New connections only, as kube-proxy: an established one outlives its
        // endpoint's removal or a policy change, and conntrack keeps its DNAT.
        for hook in ["prerouting", "output"] {
            emit!(
                o,
                "\tchain filter-{hook} {{\n\t\ttype filter hook {hook} priority -110; policy accept;\n\
                 \t\tct state new {key_expr} @no-endpoint-services goto reject-service\n\
                 \t\tct state new {key_expr} vmap @service-access\n\t}}"
            );
        }
        emit_forward_chain(o, &key_expr);
        // The output hook refuses the `dstnat` keyword on nft 1.0.6: numbers for both.
        for hook in ["prerouting", "output"] {
            emit!(
                o,
                "\tchain nat-{hook} {{\n\t\ttype nat hook {hook} priority -100; policy accept;\n\
                 \t\t{key_expr} vmap @service-ips\n\t}}"
            );
        }

        for (k, v) in &self.vips {
            let names = Names::new(k, v);
            if let Some(nets) = &v.allowed {
                emit_allow_chain(o, ip, names.access_chain(), nets);
            }
            if v.endpoints.is_empty() {
                continue;
            }
            emit!(o, "\tchain {} {{", names.service_chain());
            if v.affinity_timeout_secs.is_some() {
                for ep in &v.endpoints {
                    emit!(
                        o,
                        "\t\t{ip} saddr @{} goto {}",
                        names.affinity_set(ep),
                        names.endpoint_chain(ep)
                    );
                }
            }
            let choices = join(
                v.endpoints
                    .iter()
                    .enumerate()
                    .map(|(i, ep)| format!("{i} : goto {}", names.endpoint_chain(ep))),
            );
            emit!(
                o,
                "\t\tnumgen random mod {} vmap {{ {choices} }}\n\t}}",
                v.endpoints.len()
            );
            let (_, proto, _) = k;
            for ep in &v.endpoints {
                emit!(o, "\tchain {} {{", names.endpoint_chain(ep));
                if v.affinity_timeout_secs.is_some() {
                    emit!(o, "\t\tupdate @{} {{ {ip} saddr }}", names.affinity_set(ep));
                }
                let target = match ep {
                    IpAddr::V4(a) => format!("{a}:{}", v.target_port),
                    IpAddr::V6(a) => format!("[{a}]:{}", v.target_port),
                };
                // nft 1.0.6 wants the protocol stated before `dnat to addr:port`.
                emit!(
                    o,
                    "\t\tmeta l4proto {} dnat to {target}\n\t}}",
                    proto.as_str()
                );
            }
        }
        for (k, nets) in self.backend_access_of(self.family) {
            emit_allow_chain(o, ip, backend_chain(k), nets);
        }
        emit!(o, "}}");
        self.render_other_family(o);
        out
    }

    /// The other family's table: the backend checks at dual-stack pods' other
    /// addresses, or nothing.
    fn render_other_family(&self, o: &mut String) {
        let family = other(self.family);
        let (ip, addr_type) = family_words(family);
        emit!(o, "table {ip} {TABLE} {{}}\ndelete table {ip} {TABLE}");
        let checks: Vec<(&Key, &Vec<IpNet>)> = self.backend_access_of(family).collect();
        if checks.is_empty() {
            return;
        }
        emit!(
            o,
            "table {ip} {TABLE} {{\n\tmap endpoint-access {{\n\t\ttype {addr_type} . inet_proto . inet_service : verdict\n\t\telements = {{ {} }}\n\t}}",
            join(
                checks
                    .iter()
                    .map(|(k, _)| format!("{} : goto {}", key_text(k), backend_chain(k)))
            )
        );
        emit_reject_chain(o);
        emit_forward_chain(o, &format!("{ip} daddr . meta l4proto . th dport"));
        for (k, nets) in checks {
            emit_allow_chain(o, ip, backend_chain(k), nets);
        }
        emit!(o, "}}");
    }
}

/// A UDP conntrack entry to delete: flows to `vip:port` answered by `endpoint`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConntrackFlush {
    pub vip: IpAddr,
    pub port: u16,
    pub endpoint: IpAddr,
}

impl ConntrackFlush {
    /// Arguments for `conntrack` in the VPC namespace. It exits 1 when nothing matched.
    pub fn args(&self) -> Vec<String> {
        [
            "-D",
            "-p",
            "udp",
            "--orig-dst",
            &self.vip.to_string(),
            "--orig-port-dst",
            &self.port.to_string(),
            "--reply-src",
            &self.endpoint.to_string(),
        ]
        .map(str::to_owned)
        .to_vec()
    }
}

/// UDP entries that would keep one-way flows on an endpoint `new` no longer uses:
/// conntrack outlives a ruleset change, so without this a sender keeps reaching a
/// removed pod (or whoever gets its address next).
pub fn udp_conntrack_flushes(old: &ServicesPlan, new: &ServicesPlan) -> Vec<ConntrackFlush> {
    let mut flushes = Vec::new();
    for (key, vip) in &old.vips {
        let (addr, proto, port) = *key;
        if proto != Protocol::Udp {
            continue;
        }
        let kept = new.vips.get(key).map_or(&[][..], |v| &v.endpoints[..]);
        for ep in vip.endpoints.iter().filter(|ep| !kept.contains(ep)) {
            flushes.push(ConntrackFlush {
                vip: addr,
                port,
                endpoint: *ep,
            });
        }
    }
    flushes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{EndpointRecord, ServiceRecord};
    use crate::snapshot::tests::{nodes, prefix, records};
    use crate::snapshot::{Mesh, Records, VpcSnapshot};
    use crate::{Endpoint, Service};

    fn n(name: &str) -> NodeName {
        name.parse().unwrap()
    }

    fn svc(json: serde_json::Value) -> Service {
        let mut base = serde_json::json!({
            "vpc": "blue", "namespace": "web", "name": "db", "cluster_ip": "10.96.0.11",
            "ports": [{"protocol": "TCP", "port": 80, "target_port": 8080}]
        });
        base.as_object_mut()
            .unwrap()
            .extend(json.as_object().unwrap().clone());
        serde_json::from_value::<ServiceRecord>(base)
            .unwrap()
            .try_into()
            .unwrap()
    }

    fn ep(svc: &str, addr: &str, node: &str, state: (bool, bool, bool)) -> Endpoint {
        let (ready, serving, terminating) = state;
        EndpointRecord {
            vpc: "blue".into(),
            namespace: "web".into(),
            service: svc.into(),
            address: addr.into(),
            node: node.into(),
            hostname: None,
            ready: Some(ready),
            serving: Some(serving),
            terminating,
        }
        .try_into()
        .unwrap()
    }

    const READY: (bool, bool, bool) = (true, true, false);
    const TERMINATING: (bool, bool, bool) = (false, true, true);
    const UNREADY: (bool, bool, bool) = (false, false, false);

    fn vpc(services: Vec<Service>, endpoints: Vec<Endpoint>) -> VpcState {
        let mut r: Records = records();
        r.services = services;
        r.endpoints = endpoints;
        blue(r)
    }

    /// VPC `blue` of a snapshot of `r`, which must have no bad record.
    fn blue(r: Records) -> VpcState {
        let (mut snap, bads) = VpcSnapshot::build(
            r,
            Mesh {
                prefix: prefix(),
                nodes: &nodes(),
            },
        );
        assert!(bads.is_empty(), "{bads:?}");
        snap.vpcs.remove("blue").unwrap()
    }

    fn no_pods(_: &LabelSelector) -> Vec<IpAddr> {
        Vec::new()
    }

    fn endpoints_of(plan: &ServicesPlan) -> Vec<String> {
        plan.vips
            .values()
            .flat_map(|v| v.endpoints.iter().map(|e| e.to_string()))
            .collect()
    }

    #[test]
    fn renders_the_kube_proxy_layout() {
        let state = vpc(
            vec![
                svc(
                    serde_json::json!({"session_affinity": "ClientIP", "affinity_timeout_seconds": 30}),
                ),
                svc(
                    serde_json::json!({"name": "dns", "cluster_ip": "10.96.0.10",
                    "ports": [{"protocol": "UDP", "port": 53}],
                    "access": {"allowed_cidrs": ["10.10.0.0/16"], "allowed_pods": [{"app": "api"}]}}),
                ),
                svc(serde_json::json!({"name": "empty", "cluster_ip": "10.96.0.12"})),
            ],
            vec![
                ep("db", "10.10.1.5", "n1", READY),
                ep("db", "10.10.2.5", "n2", READY),
                ep("dns", "10.10.1.53", "n1", READY),
            ],
        );
        // The API pod lies inside the allowed CIDR: the smaller element is pruned.
        let resolve = |_: &LabelSelector| vec!["10.10.2.9".parse().unwrap()];
        let text = plan(&state, &n("n1"), &resolve).render(None);
        let want = "\
table ip wmvpc {}
delete table ip wmvpc
table ip wmvpc {
	map service-ips {
		type ipv4_addr . inet_proto . inet_service : verdict
		elements = { 10.96.0.10 . udp . 53 : goto svc-web/dns/udp/53, 10.96.0.11 . tcp . 80 : goto svc-web/db/tcp/80 }
	}
	set no-endpoint-services {
		type ipv4_addr . inet_proto . inet_service
		elements = { 10.96.0.12 . tcp . 80 }
	}
	map service-access {
		type ipv4_addr . inet_proto . inet_service : verdict
		elements = { 10.96.0.10 . udp . 53 : goto access-web/dns/udp/53 }
	}
	map endpoint-access {
		type ipv4_addr . inet_proto . inet_service : verdict
		elements = { 10.10.1.53 . udp . 53 : goto backend-10.10.1.53/udp/53 }
	}
	set aff-web/db/tcp/80/10.10.1.5 {
		type ipv4_addr
		flags dynamic,timeout
		timeout 30s
	}
	set aff-web/db/tcp/80/10.10.2.5 {
		type ipv4_addr
		flags dynamic,timeout
		timeout 30s
	}
	chain reject-service {
		meta l4proto tcp reject with tcp reset
		reject
	}
	chain filter-prerouting {
		type filter hook prerouting priority -110; policy accept;
		ct state new ip daddr . meta l4proto . th dport @no-endpoint-services goto reject-service
		ct state new ip daddr . meta l4proto . th dport vmap @service-access
	}
	chain filter-output {
		type filter hook output priority -110; policy accept;
		ct state new ip daddr . meta l4proto . th dport @no-endpoint-services goto reject-service
		ct state new ip daddr . meta l4proto . th dport vmap @service-access
	}
	chain filter-forward {
		type filter hook forward priority 0; policy accept;
		ct state new ip daddr . meta l4proto . th dport vmap @endpoint-access
	}
	chain nat-prerouting {
		type nat hook prerouting priority -100; policy accept;
		ip daddr . meta l4proto . th dport vmap @service-ips
	}
	chain nat-output {
		type nat hook output priority -100; policy accept;
		ip daddr . meta l4proto . th dport vmap @service-ips
	}
	chain access-web/dns/udp/53 {
		ip saddr { 10.10.0.0/16 } return
		goto reject-service
	}
	chain svc-web/dns/udp/53 {
		numgen random mod 1 vmap { 0 : goto ep-web/dns/udp/53/10.10.1.53 }
	}
	chain ep-web/dns/udp/53/10.10.1.53 {
		meta l4proto udp dnat to 10.10.1.53:53
	}
	chain svc-web/db/tcp/80 {
		ip saddr @aff-web/db/tcp/80/10.10.1.5 goto ep-web/db/tcp/80/10.10.1.5
		ip saddr @aff-web/db/tcp/80/10.10.2.5 goto ep-web/db/tcp/80/10.10.2.5
		numgen random mod 2 vmap { 0 : goto ep-web/db/tcp/80/10.10.1.5, 1 : goto ep-web/db/tcp/80/10.10.2.5 }
	}
	chain ep-web/db/tcp/80/10.10.1.5 {
		update @aff-web/db/tcp/80/10.10.1.5 { ip saddr }
		meta l4proto tcp dnat to 10.10.1.5:8080
	}
	chain ep-web/db/tcp/80/10.10.2.5 {
		update @aff-web/db/tcp/80/10.10.2.5 { ip saddr }
		meta l4proto tcp dnat to 10.10.2.5:8080
	}
	chain backend-10.10.1.53/udp/53 {
		ip saddr { 10.10.0.0/16 } return
		goto reject-service
	}
}
table ip6 wmvpc {}
delete table ip6 wmvpc
";
        assert_eq!(text, want, "got:\n{text}");
    }

    #[test]
    fn same_input_same_text_whatever_the_order() {
        let services = vec![
            svc(serde_json::json!({})),
            svc(serde_json::json!({"name": "cache", "cluster_ip": "10.96.0.13"})),
        ];
        let endpoints = vec![
            ep("db", "10.10.2.5", "n2", READY),
            ep("db", "10.10.1.5", "n1", READY),
            ep("cache", "10.10.1.6", "n1", READY),
        ];
        let a = plan(
            &vpc(services.clone(), endpoints.clone()),
            &n("n1"),
            &no_pods,
        );
        let mut services = services;
        let mut endpoints = endpoints;
        services.reverse();
        endpoints.reverse();
        let b = plan(&vpc(services, endpoints), &n("n1"), &no_pods);
        assert_eq!(a, b);
        assert_eq!(a.render(None), b.render(None));
    }

    /// The lines before the table's definition.
    fn prelude(text: &str) -> Vec<&str> {
        text.lines().take_while(|l| !l.ends_with('{')).collect()
    }

    #[test]
    fn rerendering_deletes_what_went_and_keeps_affinity_sets() {
        let affine = |timeout: u32| {
            svc(
                serde_json::json!({"session_affinity": "ClientIP", "affinity_timeout_seconds": timeout}),
            )
        };
        let both = vec![
            ep("db", "10.10.1.5", "n1", READY),
            ep("db", "10.10.2.5", "n2", READY),
        ];
        let old = plan(&vpc(vec![affine(30)], both), &n("n1"), &no_pods);
        let one = vec![ep("db", "10.10.1.5", "n1", READY)];
        let new = plan(&vpc(vec![affine(30)], one.clone()), &n("n1"), &no_pods);
        let text = new.render(Some(&old));
        assert_eq!(
            prelude(&text),
            [
                "flush table ip wmvpc",
                "flush map ip wmvpc service-ips",
                "flush set ip wmvpc no-endpoint-services",
                "flush map ip wmvpc service-access",
                "flush map ip wmvpc endpoint-access",
                "delete chain ip wmvpc ep-web/db/tcp/80/10.10.2.5",
                "delete set ip wmvpc aff-web/db/tcp/80/10.10.2.5",
            ]
        );
        // The staying set is declared again: an `add` that keeps its elements.
        assert!(text.contains("\tset aff-web/db/tcp/80/10.10.1.5 {"));
        // The same plan again: nothing to delete.
        assert_eq!(prelude(&new.render(Some(&new))).len(), 5);
        // A new timeout needs a new set.
        let longer = plan(&vpc(vec![affine(60)], one), &n("n1"), &no_pods);
        assert_eq!(
            prelude(&longer.render(Some(&new)))[5..],
            ["delete set ip wmvpc aff-web/db/tcp/80/10.10.1.5"]
        );
        // Unknown previous state: the table is replaced whole.
        assert_eq!(
            prelude(&new.render(None)),
            ["table ip wmvpc {}", "delete table ip wmvpc"]
        );
    }

    #[test]
    fn endpoint_choice_follows_kubernetes() {
        let with = |policy: &str, eps: Vec<Endpoint>| {
            let s = svc(serde_json::json!({"internal_traffic_policy": policy}));
            endpoints_of(&plan(&vpc(vec![s], eps), &n("n1"), &no_pods))
        };
        // Ready ones only, while any is ready.
        assert_eq!(
            with(
                "Cluster",
                vec![
                    ep("db", "10.10.1.5", "n1", READY),
                    ep("db", "10.10.1.6", "n1", TERMINATING),
                    ep("db", "10.10.2.5", "n2", UNREADY),
                ]
            ),
            ["10.10.1.5"]
        );
        // Serving terminating endpoints are the fallback; unready ones never.
        assert_eq!(
            with(
                "Cluster",
                vec![
                    ep("db", "10.10.1.6", "n1", TERMINATING),
                    ep("db", "10.10.2.5", "n2", UNREADY),
                ]
            ),
            ["10.10.1.6"]
        );
        // Local: this node's only, even when another node has a ready one.
        assert_eq!(
            with(
                "Local",
                vec![
                    ep("db", "10.10.1.6", "n1", TERMINATING),
                    ep("db", "10.10.2.5", "n2", READY),
                ]
            ),
            ["10.10.1.6"]
        );
        assert!(with("Local", vec![ep("db", "10.10.2.5", "n2", READY)]).is_empty());
    }

    #[test]
    fn backend_access_opens_when_any_service_is_open() {
        // Two services share one pod and target port: one open, one restricted.
        let restricted = svc(serde_json::json!({"access": {"allowed_cidrs": ["10.10.9.0/24"]}}));
        let open = svc(serde_json::json!({"name": "db-open", "cluster_ip": "10.96.0.12"}));
        let eps = vec![
            ep("db", "10.10.1.5", "n1", READY),
            ep("db-open", "10.10.1.5", "n1", READY),
        ];
        let p = plan(
            &vpc(vec![restricted.clone(), open], eps),
            &n("n1"),
            &no_pods,
        );
        assert!(p.backend_access.is_empty());
        // Restricted alone: the backend check on n1; none on n2, which has no endpoint.
        let eps = vec![ep("db", "10.10.1.5", "n1", READY)];
        let state = vpc(vec![restricted], eps);
        assert_eq!(plan(&state, &n("n1"), &no_pods).backend_access.len(), 1);
        assert!(plan(&state, &n("n2"), &no_pods).backend_access.is_empty());
    }

    #[test]
    fn an_access_policy_matching_nobody_rejects_everyone() {
        let s = svc(serde_json::json!({"access": {"allowed_pods": [{"app": "none"}]}}));
        let p = plan(
            &vpc(vec![s], vec![ep("db", "10.10.1.5", "n1", READY)]),
            &n("n1"),
            &no_pods,
        );
        assert!(p
            .render(None)
            .contains("\tchain access-web/db/tcp/80 {\n\t\tgoto reject-service\n\t}"));
    }

    /// A dual-stack VPC (IPv4 services): `db-0` on n1 behind service `db`, whose
    /// policy admits `api-0` on n2; both pods have an address of each family.
    fn dual_stack_state() -> VpcState {
        let mut r: Records = records();
        r.vpcs.retain(|v| v.name.as_str() == "blue");
        r.vpcs[0].pod_cidrs.push("fd10::/56".parse().unwrap());
        r.members.retain(|m| m.vpc.as_str() == "blue");
        for (m, block) in r
            .members
            .iter_mut()
            .zip(["fd10:0:0:1::/64", "fd10:0:0:2::/64"])
        {
            m.pod_cidrs.push(block.parse().unwrap());
        }
        r.pods[0].address_v6 = Some("fd10:0:0:1::5".parse().unwrap());
        let mut api = r.pods[0].clone();
        api.name = crate::PodName::parse("name", "api-0").unwrap();
        api.node = n("n2");
        api.address = "10.10.2.9".parse().unwrap();
        api.address_v6 = Some("fd10:0:0:2::9".parse().unwrap());
        r.pods.push(api);
        r.services = vec![svc(
            serde_json::json!({"access": {"allowed_pods": [{"app": "api"}]}}),
        )];
        r.endpoints = vec![ep("db", "10.10.1.5", "n1", READY)];
        blue(r)
    }

    /// A client dialling a dual-stack backend's IPv6 address meets the policy its
    /// IPv4 address has, with the admitted pods' IPv6 addresses: in a table of its own
    /// family beside the services' one.
    #[test]
    fn a_dual_stack_backend_is_guarded_in_both_families() {
        let state = dual_stack_state();
        let resolve = |_: &LabelSelector| -> Vec<IpAddr> {
            vec![
                "10.10.2.9".parse().unwrap(),
                "fd10:0:0:2::9".parse().unwrap(),
            ]
        };
        let p = plan(&state, &n("n1"), &resolve);
        let checks: Vec<(String, Vec<String>)> = p
            .backend_access
            .iter()
            .map(|((a, _, port), nets)| {
                (
                    format!("{a}:{port}"),
                    nets.iter().map(ToString::to_string).collect(),
                )
            })
            .collect();
        assert_eq!(
            checks,
            [
                ("10.10.1.5:8080".into(), vec!["10.10.2.9/32".into()]),
                (
                    "fd10:0:0:1::5:8080".into(),
                    vec!["fd10:0:0:2::9/128".into()]
                ),
            ]
        );
        // The VIP is IPv4: only IPv4 sources are listed there.
        let vip = p.vips.values().next().unwrap();
        assert_eq!(vip.allowed, Some(vec!["10.10.2.9/32".parse().unwrap()]));
        let text = p.render(None);
        let ip6 = &text[text.find("table ip6 wmvpc {\n").expect("an ip6 table")..];
        assert_eq!(
            ip6,
            "\
table ip6 wmvpc {
	map endpoint-access {
		type ipv6_addr . inet_proto . inet_service : verdict
		elements = { fd10:0:0:1::5 . tcp . 8080 : goto backend-fd10.0.0.1..5/tcp/8080 }
	}
	chain reject-service {
		meta l4proto tcp reject with tcp reset
		reject
	}
	chain filter-forward {
		type filter hook forward priority 0; policy accept;
		ct state new ip6 daddr . meta l4proto . th dport vmap @endpoint-access
	}
	chain backend-fd10.0.0.1..5/tcp/8080 {
		ip6 saddr { fd10:0:0:2::9 } return
		goto reject-service
	}
}
"
        );
        // The IPv4 table keeps only its own family's check.
        assert_eq!(text.matches("chain backend-").count(), 2);
        assert!(!text.contains("ip saddr { fd10"));
        // No policy: no check in either family.
        let mut open = state;
        open.services
            .values_mut()
            .for_each(|s| s.service.access = None);
        assert!(plan(&open, &n("n1"), &resolve).backend_access.is_empty());
    }

    #[test]
    fn udp_flushes_name_removed_endpoints_only() {
        let dns =
            svc(serde_json::json!({"name": "dns", "ports": [{"protocol": "UDP", "port": 53}]}));
        let web = svc(serde_json::json!({"name": "web", "cluster_ip": "10.96.0.12"}));
        let old_eps = vec![
            ep("dns", "10.10.1.53", "n1", READY),
            ep("dns", "10.10.2.53", "n2", READY),
            ep("web", "10.10.1.80", "n1", READY),
        ];
        let old = plan(
            &vpc(vec![dns.clone(), web.clone()], old_eps.clone()),
            &n("n1"),
            &no_pods,
        );
        let new_eps = vec![ep("dns", "10.10.2.53", "n2", READY)];
        let new = plan(&vpc(vec![dns, web], new_eps), &n("n1"), &no_pods);
        let flushes = udp_conntrack_flushes(&old, &new);
        assert_eq!(
            flushes,
            [ConntrackFlush {
                vip: "10.96.0.11".parse().unwrap(),
                port: 53,
                endpoint: "10.10.1.53".parse().unwrap()
            }]
        );
        assert_eq!(
            flushes[0].args().join(" "),
            "-D -p udp --orig-dst 10.96.0.11 --orig-port-dst 53 --reply-src 10.10.1.53"
        );
        assert!(udp_conntrack_flushes(&new, &new).is_empty());
        // A deleted service flushes all its endpoints.
        let gone = plan(&vpc(vec![], vec![]), &n("n1"), &no_pods);
        assert_eq!(udp_conntrack_flushes(&old, &gone).len(), 2);
    }
}
