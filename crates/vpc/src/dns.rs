//! DNS answers of one VPC, per the Kubernetes DNS-based service discovery schema
//! (github.com/kubernetes/dns, docs/specification.md, schema 1.1.0).
//!
//! [`DnsView::new`] derives every record from a VPC's services and endpoints once;
//! [`DnsView::resolve`] is then a lookup. The agent builds a new view on each change and
//! swaps it in whole; a DNS server adapter (hickory) turns [`Answer`]s into messages
//! and sends [`Answer::Forward`] queries to the node's upstream resolvers.
//!
//! - `<svc>.<ns>.svc.<zone>`: A/AAAA of the clusterIP; for a headless service one
//!   record per ready endpoint, NXDOMAIN if none is ready.
//! - `_<port>._<proto>.<svc>.<ns>.svc.<zone>`: SRV for each named port.
//! - `<hostname>.<svc>.<ns>.svc.<zone>`: a headless service's endpoint (its hostname,
//!   or its address with dashes, as CoreDNS does).
//! - PTR for clusterIPs and headless endpoints; `dns-version.<zone>`: TXT.
//! - Names are case-insensitive. Names outside the zone, and reverse names outside
//!   the VPC's CIDRs, are forwarded.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::record::DnsZone;
use crate::snapshot::VpcState;
use crate::Label;

/// TTL of every answer: clusterIPs are stable, but headless answers follow endpoints.
pub const TTL_SECS: u32 = 5;
/// The schema version `dns-version.<zone>` announces.
pub const SCHEMA_VERSION: &str = "1.1.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueryType {
    A,
    Aaaa,
    Srv,
    Ptr,
    Txt,
    /// Any other type (by its number): names exist, records of it do not.
    Other(u16),
}

impl QueryType {
    /// From the type's number on the wire (RFC 1035 §3.2.2, RFC 3596, RFC 2782).
    pub fn from_u16(t: u16) -> QueryType {
        match t {
            1 => QueryType::A,
            28 => QueryType::Aaaa,
            33 => QueryType::Srv,
            12 => QueryType::Ptr,
            16 => QueryType::Txt,
            other => QueryType::Other(other),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: String,
    },
    Ptr(String),
    Txt(String),
}

impl RData {
    fn query_type(&self) -> QueryType {
        match self {
            RData::A(_) => QueryType::A,
            RData::Aaaa(_) => QueryType::Aaaa,
            RData::Srv { .. } => QueryType::Srv,
            RData::Ptr(_) => QueryType::Ptr,
            RData::Txt(_) => QueryType::Txt,
        }
    }

    fn address(ip: IpAddr) -> RData {
        match ip {
            IpAddr::V4(a) => RData::A(a),
            IpAddr::V6(a) => RData::Aaaa(a),
        }
    }
}

/// One resource record; names are lowercase, fully qualified, without the final dot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    pub ttl: u32,
    pub data: RData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Records(Vec<Record>),
    /// The name exists, but has no record of the type asked for.
    NoData,
    NxDomain,
    /// Not this VPC's to answer: ask the upstream resolvers.
    Forward,
}

/// The DNS records of one VPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsView {
    zone: String,
    /// The VPC's own ranges: reverse names inside them are answered here.
    cidrs: Vec<IpNet>,
    records: HashMap<String, Vec<RData>>,
    /// Every name with records, and each of its ancestors inside the zone.
    names: BTreeSet<String>,
}

/// `d.c.b.a.in-addr.arpa` or the 32-nibble `ip6.arpa` name of `ip`.
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => {
            let [a, b, c, d] = a.octets();
            format!("{d}.{c}.{b}.{a}.in-addr.arpa")
        }
        IpAddr::V6(a) => {
            let mut s = String::with_capacity(72);
            for byte in a.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", byte & 0x0f, byte >> 4));
            }
            s + "ip6.arpa"
        }
    }
}

/// The address a full reverse name stands for.
fn parse_reverse_name(name: &str) -> Option<IpAddr> {
    if let Some(rest) = name.strip_suffix(".in-addr.arpa") {
        let mut octets = rest
            .split('.')
            .map(|l| l.parse::<u8>().ok())
            .collect::<Option<Vec<u8>>>()?;
        if octets.len() != 4 {
            return None;
        }
        octets.reverse();
        let o: [u8; 4] = octets.try_into().ok()?;
        return Some(IpAddr::V4(o.into()));
    }
    let rest = name.strip_suffix(".ip6.arpa")?;
    let nibbles = rest
        .split('.')
        .map(|l| u8::from_str_radix(l, 16).ok().filter(|_| l.len() == 1))
        .collect::<Option<Vec<u8>>>()?;
    if nibbles.len() != 32 {
        return None;
    }
    let mut o = [0u8; 16];
    for (i, pair) in nibbles.chunks(2).enumerate() {
        o[15 - i] = pair[0] | (pair[1] << 4);
    }
    Some(IpAddr::V6(o.into()))
}

/// An endpoint's label under its headless service: its hostname, or its address with
/// dashes (`10-10-1-5`, `fd10--5`).
fn endpoint_label(hostname: Option<&Label>, address: IpAddr) -> String {
    hostname.map_or_else(
        || address.to_string().replace(['.', ':'], "-"),
        |h| h.to_string(),
    )
}

impl DnsView {
    pub fn new(vpc: &VpcState) -> DnsView {
        let zone = vpc.vpc.dns_zone.to_string();
        let mut view = DnsView {
            cidrs: vpc
                .vpc
                .pod_cidrs
                .iter()
                .chain([&vpc.vpc.service_cidr])
                .copied()
                .collect(),
            zone: zone.clone(),
            records: HashMap::new(),
            names: BTreeSet::new(),
        };
        view.add(
            format!("dns-version.{zone}"),
            RData::Txt(SCHEMA_VERSION.into()),
        );
        for svc in vpc.services.values() {
            let s = &svc.service;
            let base = format!("{}.{}.svc.{zone}", s.name, s.namespace);
            let named_ports = s.ports.iter().filter_map(|p| Some((p.name.as_ref()?, p)));
            match s.cluster_ip {
                Some(ip) => {
                    view.add(base.clone(), RData::address(ip));
                    view.add(reverse_name(ip), RData::Ptr(base.clone()));
                    for (name, p) in named_ports {
                        let srv = RData::Srv {
                            priority: 0,
                            weight: 100,
                            port: p.port,
                            target: base.clone(),
                        };
                        view.add(format!("_{name}._{}.{base}", p.protocol.as_str()), srv);
                    }
                }
                None => {
                    let ready: Vec<_> = svc.endpoints.iter().filter(|e| e.ready).collect();
                    // Weights split evenly, as the schema's examples do.
                    let weight = u16::try_from(100 / ready.len().max(1)).unwrap_or(1).max(1);
                    for e in &ready {
                        let host =
                            format!("{}.{base}", endpoint_label(e.hostname.as_ref(), e.address));
                        view.add(base.clone(), RData::address(e.address));
                        view.add(host.clone(), RData::address(e.address));
                        view.add(reverse_name(e.address), RData::Ptr(host.clone()));
                        for (name, p) in named_ports.clone() {
                            let srv = RData::Srv {
                                priority: 0,
                                weight,
                                port: p.target_port,
                                target: host.clone(),
                            };
                            view.add(format!("_{name}._{}.{base}", p.protocol.as_str()), srv);
                        }
                    }
                }
            }
        }
        view
    }

    fn add(&mut self, name: String, data: RData) {
        // Ancestors inside the zone exist too (empty non-terminals: NODATA, not NXDOMAIN).
        let mut n = name.as_str();
        while n.len() > self.zone.len() && n.ends_with(&self.zone) {
            self.names.insert(n.to_owned());
            n = n.split_once('.').map_or("", |(_, rest)| rest);
        }
        self.names.insert(name.clone());
        self.records.entry(name).or_default().push(data);
    }

    fn in_zone(&self, name: &str) -> bool {
        name == self.zone
            || name
                .strip_suffix(self.zone.as_str())
                .is_some_and(|head| head.ends_with('.'))
    }

    /// The answer to a query for `name` (any case, with or without the final dot).
    pub fn resolve(&self, name: &str, qtype: QueryType) -> Answer {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if let Some(found) = self.records.get(&name) {
            let records: Vec<Record> = found
                .iter()
                .filter(|d| d.query_type() == qtype)
                .map(|d| Record {
                    name: name.clone(),
                    ttl: TTL_SECS,
                    data: d.clone(),
                })
                .collect();
            return if records.is_empty() {
                Answer::NoData
            } else {
                Answer::Records(records)
            };
        }
        let ours = self.in_zone(&name)
            || parse_reverse_name(&name)
                .is_some_and(|ip| self.cidrs.iter().any(|c| c.contains(&ip)));
        match (ours, self.names.contains(&name) || name == self.zone) {
            (false, _) => Answer::Forward,
            (true, true) => Answer::NoData,
            (true, false) => Answer::NxDomain,
        }
    }
}

/// The search domains of a pod in `namespace`: short names find services of its own
/// namespace first, then `<svc>.<ns>` anywhere in the VPC.
pub fn search_path(namespace: &Label, zone: &DnsZone) -> [String; 3] {
    [
        format!("{namespace}.svc.{zone}"),
        format!("svc.{zone}"),
        zone.to_string(),
    ]
}

/// A pod's `/etc/resolv.conf`. `ndots:5` as Kubernetes sets it, so `db.web` is tried
/// with the search path before as an absolute name.
pub fn resolv_conf(nameserver: IpAddr, namespace: &Label, zone: &DnsZone) -> String {
    format!(
        "nameserver {nameserver}\nsearch {}\noptions ndots:5\n",
        search_path(namespace, zone).join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{EndpointRecord, ServiceRecord, VpcMemberRecord, VpcRecord};
    use crate::snapshot::tests::{nodes, prefix};
    use crate::snapshot::{Mesh, Records, VpcSnapshot};
    use proptest::prelude::*;

    fn view() -> DnsView {
        let vpc = VpcRecord {
            name: "blue".into(),
            id: 7,
            pod_cidrs: vec!["10.10.0.0/16".into(), "fd10::/56".into()],
            service_cidr: "10.96.0.0/24".into(),
            dns_zone: "cluster.local".into(),
        };
        let member = VpcMemberRecord {
            vpc: "blue".into(),
            node: "n1".into(),
            pod_cidrs: vec!["10.10.1.0/24".into(), "fd10::/64".into()],
        };
        let service = |json: serde_json::Value| {
            serde_json::from_value::<ServiceRecord>(json)
                .unwrap()
                .try_into()
                .unwrap()
        };
        let endpoint = |svc: &str, addr: &str, hostname: Option<&str>, ready: bool| {
            EndpointRecord {
                vpc: "blue".into(),
                namespace: "web".into(),
                service: svc.into(),
                address: addr.into(),
                node: "n1".into(),
                hostname: hostname.map(str::to_owned),
                ready: Some(ready),
                serving: None,
                terminating: false,
            }
            .try_into()
            .unwrap()
        };
        let records = Records {
            vpcs: vec![vpc.try_into().unwrap()],
            members: vec![member.try_into().unwrap()],
            services: vec![
                service(
                    serde_json::json!({"vpc": "blue", "namespace": "web", "name": "db",
                    "cluster_ip": "10.96.0.11",
                    "ports": [{"name": "pg", "protocol": "TCP", "port": 5432},
                              {"name": "stats", "protocol": "UDP", "port": 9000}]}),
                ),
                service(
                    serde_json::json!({"vpc": "blue", "namespace": "web", "name": "peers",
                    "cluster_ip": "None",
                    "ports": [{"name": "raft", "protocol": "TCP", "port": 7000, "target_port": 7001}]}),
                ),
                service(
                    serde_json::json!({"vpc": "blue", "namespace": "web", "name": "idle",
                    "cluster_ip": "None", "ports": [{"protocol": "TCP", "port": 80}]}),
                ),
            ],
            endpoints: vec![
                endpoint("peers", "10.10.1.5", Some("peer-0"), true),
                endpoint("peers", "fd10::6", None, true),
                endpoint("peers", "10.10.1.7", Some("peer-2"), false),
                endpoint("idle", "10.10.1.8", None, false),
            ],
            pods: Vec::new(),
        };
        let nodes = nodes();
        let mesh = Mesh {
            prefix: prefix(),
            nodes: &nodes,
        };
        let (snap, bads) = VpcSnapshot::build(records, mesh);
        assert!(bads.is_empty(), "{bads:?}");
        DnsView::new(&snap.vpcs["blue"])
    }

    /// Data-driven: the answer as lines `name ttl TYPE data`, or NODATA/NXDOMAIN/FORWARD.
    fn check(name: &str, qtype: QueryType, want: &str) {
        let got = match view().resolve(name, qtype) {
            Answer::Records(rs) => rs
                .iter()
                .map(|r| {
                    let data = match &r.data {
                        RData::A(a) => format!("A {a}"),
                        RData::Aaaa(a) => format!("AAAA {a}"),
                        RData::Srv {
                            priority,
                            weight,
                            port,
                            target,
                        } => format!("SRV {priority} {weight} {port} {target}"),
                        RData::Ptr(p) => format!("PTR {p}"),
                        RData::Txt(t) => format!("TXT {t}"),
                    };
                    format!("{} {} {data}", r.name, r.ttl)
                })
                .collect::<Vec<_>>()
                .join("\n"),
            Answer::NoData => "NODATA".into(),
            Answer::NxDomain => "NXDOMAIN".into(),
            Answer::Forward => "FORWARD".into(),
        };
        assert_eq!(got, want, "{name} {qtype:?}");
    }

    use QueryType::*;

    #[test]
    fn cluster_ip_services() {
        check(
            "db.web.svc.cluster.local",
            A,
            "db.web.svc.cluster.local 5 A 10.96.0.11",
        );
        check(
            "DB.Web.SVC.cluster.LOCAL.",
            A,
            "db.web.svc.cluster.local 5 A 10.96.0.11",
        );
        check("db.web.svc.cluster.local", Aaaa, "NODATA");
        check("db.web.svc.cluster.local", Other(15), "NODATA");
        check(
            "_pg._tcp.db.web.svc.cluster.local",
            Srv,
            "_pg._tcp.db.web.svc.cluster.local 5 SRV 0 100 5432 db.web.svc.cluster.local",
        );
        check(
            "_stats._udp.db.web.svc.cluster.local",
            Srv,
            "_stats._udp.db.web.svc.cluster.local 5 SRV 0 100 9000 db.web.svc.cluster.local",
        );
        check("_pg._udp.db.web.svc.cluster.local", Srv, "NXDOMAIN");
        check("_tcp.db.web.svc.cluster.local", Srv, "NODATA");
        check(
            "11.0.96.10.in-addr.arpa",
            Ptr,
            "11.0.96.10.in-addr.arpa 5 PTR db.web.svc.cluster.local",
        );
    }

    #[test]
    fn headless_services() {
        check(
            "peers.web.svc.cluster.local",
            A,
            "peers.web.svc.cluster.local 5 A 10.10.1.5",
        );
        check(
            "peers.web.svc.cluster.local",
            Aaaa,
            "peers.web.svc.cluster.local 5 AAAA fd10::6",
        );
        check(
            "_raft._tcp.peers.web.svc.cluster.local",
            Srv,
            "_raft._tcp.peers.web.svc.cluster.local 5 SRV 0 50 7001 peer-0.peers.web.svc.cluster.local\n\
             _raft._tcp.peers.web.svc.cluster.local 5 SRV 0 50 7001 fd10--6.peers.web.svc.cluster.local",
        );
        check(
            "peer-0.peers.web.svc.cluster.local",
            A,
            "peer-0.peers.web.svc.cluster.local 5 A 10.10.1.5",
        );
        check(
            "fd10--6.peers.web.svc.cluster.local",
            Aaaa,
            "fd10--6.peers.web.svc.cluster.local 5 AAAA fd10::6",
        );
        // Not ready: no record at all.
        check("peer-2.peers.web.svc.cluster.local", A, "NXDOMAIN");
        check(
            "5.1.10.10.in-addr.arpa",
            Ptr,
            "5.1.10.10.in-addr.arpa 5 PTR peer-0.peers.web.svc.cluster.local",
        );
        check(
            &reverse_name("fd10::6".parse().unwrap()),
            Ptr,
            &format!(
                "{} 5 PTR fd10--6.peers.web.svc.cluster.local",
                reverse_name("fd10::6".parse().unwrap())
            ),
        );
        // No ready endpoint: the name does not exist.
        check("idle.web.svc.cluster.local", A, "NXDOMAIN");
    }

    #[test]
    fn zone_names_and_forwarding() {
        check(
            "dns-version.cluster.local",
            Txt,
            "dns-version.cluster.local 5 TXT 1.1.0",
        );
        check("web.svc.cluster.local", A, "NODATA");
        check("svc.cluster.local", A, "NODATA");
        check("cluster.local", A, "NODATA");
        check("db.prod.svc.cluster.local", A, "NXDOMAIN");
        check(
            "db.web.svc.cluster.local.web.svc.cluster.local",
            A,
            "NXDOMAIN",
        );
        check("example.com", A, "FORWARD");
        check("xcluster.local", A, "FORWARD");
        // Reverse names: ours inside the VPC's CIDRs, the upstream's outside.
        check("99.0.96.10.in-addr.arpa", Ptr, "NXDOMAIN");
        check("9.9.10.10.in-addr.arpa", Ptr, "NXDOMAIN");
        check("8.8.8.8.in-addr.arpa", Ptr, "FORWARD");
        check("10.in-addr.arpa", Ptr, "FORWARD");
    }

    #[test]
    fn search_path_and_resolv_conf() {
        let ns = Label::parse("ns", "web").unwrap();
        let zone = DnsZone::parse("zone", "cluster.local").unwrap();
        assert_eq!(
            resolv_conf("10.96.0.10".parse().unwrap(), &ns, &zone),
            "nameserver 10.96.0.10\nsearch web.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
        );
        // A short name through the search path finds the service of the pod's namespace.
        let v = view();
        let first = search_path(&ns, &zone)
            .iter()
            .map(|d| v.resolve(&format!("db.{d}"), A))
            .find(|a| matches!(a, Answer::Records(_)));
        assert!(first.is_some());
    }

    proptest! {
        #[test]
        fn reverse_names_round_trip(v4 in any::<u32>(), v6 in any::<u128>()) {
            for ip in [IpAddr::V4(v4.into()), IpAddr::V6(v6.into())] {
                prop_assert_eq!(parse_reverse_name(&reverse_name(ip)), Some(ip));
            }
        }

        /// Whatever the query, an answer and no panic; names outside the zone are forwarded.
        #[test]
        fn any_name_gets_an_answer(name in "[a-zA-Z0-9._-]{0,80}", t in any::<u16>()) {
            let answer = view().resolve(&name, QueryType::from_u16(t));
            let lower = name.to_ascii_lowercase();
            let lower = lower.trim_end_matches('.');
            if !lower.ends_with("cluster.local") && !lower.ends_with(".arpa") {
                prop_assert_eq!(answer, Answer::Forward);
            }
        }
    }
}
