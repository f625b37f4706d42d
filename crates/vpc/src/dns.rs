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
//! - Zones: `<zone>` and one reverse zone per VPC CIDR (its whole octets or nibbles,
//!   `0.96.10.in-addr.arpa` for `10.96.0.0/24`). Each apex has an SOA and an NS
//!   (`ns.dns.<zone>`, whose A/AAAA is the VPC's nameserver); NXDOMAIN and NODATA
//!   answers carry their zone's SOA, so resolvers cache them for [`TTL_SECS`]
//!   (RFC 2308), as CoreDNS's kubernetes plugin does.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::record::DnsZone;
use crate::snapshot::{dns_cluster_ip, VpcState};
use crate::Label;

/// TTL of every answer, and of negative answers (the SOA's minimum): clusterIPs are
/// stable, but headless answers follow endpoints.
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
    Soa,
    Ns,
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
            6 => QueryType::Soa,
            2 => QueryType::Ns,
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
    Soa(Soa),
    Ns(String),
}

/// A zone's start of authority (RFC 1035 §3.3.13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Soa {
    pub mname: String,
    pub rname: String,
    /// Changes with the zone's records (no zone transfers: it only marks a change).
    pub serial: u32,
    pub refresh: u32,
    pub retry: u32,
    pub expire: u32,
    /// How long a negative answer may be cached (RFC 2308 §4).
    pub minimum: u32,
}

impl RData {
    fn query_type(&self) -> QueryType {
        match self {
            RData::A(_) => QueryType::A,
            RData::Aaaa(_) => QueryType::Aaaa,
            RData::Srv { .. } => QueryType::Srv,
            RData::Ptr(_) => QueryType::Ptr,
            RData::Txt(_) => QueryType::Txt,
            RData::Soa(_) => QueryType::Soa,
            RData::Ns(_) => QueryType::Ns,
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
    /// The name exists, but has no record of the type asked for. Negative answers
    /// hold their zone's SOA record, for the authority section.
    NoData(Record),
    NxDomain(Record),
    /// Not this VPC's to answer: ask the upstream resolvers.
    Forward,
}

/// The DNS records of one VPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsView {
    zone: String,
    /// `zone` and the reverse zones of `cidrs`.
    zones: BTreeSet<String>,
    /// The VPC's own ranges: reverse names inside them are answered here.
    cidrs: Vec<IpNet>,
    records: HashMap<String, Vec<RData>>,
    /// Every name with records, and each of its ancestors inside its zone.
    names: BTreeSet<String>,
    serial: u32,
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

/// The network a reverse name stands for: `5.1.10.10.in-addr.arpa` is
/// `10.10.1.5/32`, `1.10.10.in-addr.arpa` is `10.10.1.0/24` (whole octets, or nibbles
/// under `ip6.arpa`).
fn parse_reverse_name(name: &str) -> Option<IpNet> {
    if let Some(rest) = name.strip_suffix(".in-addr.arpa") {
        let labels: Vec<u8> = rest
            .split('.')
            .map(|l| l.parse::<u8>().ok())
            .collect::<Option<_>>()?;
        if labels.len() > 4 {
            return None;
        }
        let mut o = [0u8; 4];
        for (i, octet) in labels.iter().rev().enumerate() {
            o[i] = *octet;
        }
        let len = u8::try_from(labels.len() * 8).ok()?;
        return IpNet::new(Ipv4Addr::from(o).into(), len).ok();
    }
    let rest = name.strip_suffix(".ip6.arpa")?;
    let nibbles: Vec<u8> = rest
        .split('.')
        .map(|l| u8::from_str_radix(l, 16).ok().filter(|_| l.len() == 1))
        .collect::<Option<_>>()?;
    if nibbles.len() > 32 {
        return None;
    }
    let mut o = [0u8; 16];
    for (i, nibble) in nibbles.iter().rev().enumerate() {
        o[i / 2] |= if i % 2 == 0 { nibble << 4 } else { *nibble };
    }
    let len = u8::try_from(nibbles.len() * 4).ok()?;
    IpNet::new(Ipv6Addr::from(o).into(), len).ok()
}

/// The reverse zone of `cidr`: its network's whole octets (IPv4) or nibbles (IPv6).
fn reverse_zone(cidr: IpNet) -> String {
    // The labels below the zone: the rest of the address's octets or nibbles.
    let below = match cidr {
        IpNet::V4(_) => 4 - usize::from(cidr.prefix_len() / 8),
        IpNet::V6(_) => 32 - usize::from(cidr.prefix_len() / 4),
    };
    let full = reverse_name(cidr.network());
    full.splitn(below + 1, '.')
        .last()
        .unwrap_or_default()
        .to_owned()
}

/// FNV-1a: a serial that follows the records, the same on every node.
fn fnv1a(hash: u32, bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .fold(hash, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
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
        let cidrs: Vec<IpNet> = vpc
            .vpc
            .pod_cidrs
            .iter()
            .chain([&vpc.vpc.service_cidr])
            .copied()
            .collect();
        let zones = cidrs
            .iter()
            .map(|c| reverse_zone(*c))
            .chain([zone.clone()])
            .collect();
        let mut view = DnsView {
            cidrs,
            zone: zone.clone(),
            zones,
            records: HashMap::new(),
            names: BTreeSet::new(),
            serial: 0,
        };
        view.add(
            format!("dns-version.{zone}"),
            RData::Txt(SCHEMA_VERSION.into()),
        );
        view.add(
            format!("ns.dns.{zone}"),
            RData::address(dns_cluster_ip(vpc.vpc.service_cidr)),
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
        // The serial covers every record but the apexes' own, which hold it.
        view.serial = view.names.iter().fold(0x811c_9dc5, |h, name| {
            let data = view.records.get(name).map(|d| format!("{d:?}"));
            fnv1a(
                fnv1a(h, name.as_bytes()),
                data.unwrap_or_default().as_bytes(),
            )
        });
        let ns = format!("ns.dns.{zone}");
        for apex in view.zones.clone() {
            let soa = view.soa(&apex).data;
            view.add(apex.clone(), soa);
            view.add(apex, RData::Ns(ns.clone()));
        }
        view
    }

    fn add(&mut self, name: String, data: RData) {
        // Ancestors inside the zone exist too (empty non-terminals: NODATA, not NXDOMAIN).
        if let Some(zone) = self.zone_of(&name) {
            let zone_len = zone.len();
            let mut n = name.as_str();
            while n.len() > zone_len {
                self.names.insert(n.to_owned());
                n = n.split_once('.').map_or("", |(_, rest)| rest);
            }
        }
        self.names.insert(name.clone());
        self.records.entry(name).or_default().push(data);
    }

    /// The innermost of the view's zones that holds `name`.
    fn zone_of(&self, name: &str) -> Option<&str> {
        self.zones
            .iter()
            .filter(|z| {
                name.strip_suffix(z.as_str())
                    .is_some_and(|head| head.is_empty() || head.ends_with('.'))
            })
            .max_by_key(|z| z.len())
            .map(String::as_str)
    }

    /// The SOA record of the zone holding `name` (the VPC's zone for a name outside
    /// them all, which no record of a checked snapshot is).
    fn soa(&self, name: &str) -> Record {
        let apex = self.zone_of(name).unwrap_or(&self.zone);
        Record {
            name: apex.to_owned(),
            ttl: TTL_SECS,
            data: RData::Soa(Soa {
                mname: format!("ns.dns.{}", self.zone),
                rname: format!("hostmaster.{}", self.zone),
                serial: self.serial,
                // RFC 1912 §2.2's usual values; nothing transfers these zones.
                refresh: 7200,
                retry: 1800,
                expire: 86400,
                minimum: TTL_SECS,
            }),
        }
    }

    /// Whether this view answers for `name`, a name without records here: inside the
    /// VPC's zone, or a reverse name inside one of the VPC's CIDRs.
    fn ours(&self, name: &str) -> bool {
        match self.zone_of(name) {
            None => false,
            Some(zone) if zone == self.zone => true,
            // A reverse zone may be wider than its CIDR (`10.in-addr.arpa` for a /12).
            Some(_) => parse_reverse_name(name).is_some_and(|net| {
                self.cidrs
                    .iter()
                    .any(|c| c.prefix_len() <= net.prefix_len() && c.contains(&net.network()))
            }),
        }
    }

    /// The answer to a query for `name` (any case, with or without the final dot).
    pub fn resolve(&self, name: &str, qtype: QueryType) -> Answer {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        let records: Vec<Record> = self
            .records
            .get(&name)
            .into_iter()
            .flatten()
            .filter(|d| d.query_type() == qtype)
            .map(|d| Record {
                name: name.clone(),
                ttl: TTL_SECS,
                data: d.clone(),
            })
            .collect();
        if !records.is_empty() {
            Answer::Records(records)
        } else if self.names.contains(&name) {
            Answer::NoData(self.soa(&name))
        } else if self.ours(&name) {
            Answer::NxDomain(self.soa(&name))
        } else {
            Answer::Forward
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

    fn service(json: serde_json::Value) -> crate::Service {
        serde_json::from_value::<ServiceRecord>(json)
            .unwrap()
            .try_into()
            .unwrap()
    }

    fn endpoint(svc: &str, addr: &str, hostname: Option<&str>, ready: bool) -> crate::Endpoint {
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
    }

    /// VPC `blue` with `pod_cidrs` (n1's blocks of them: `n1_cidrs`) and
    /// `service_cidr`, and the given services and endpoints.
    fn records(
        [pod_cidrs, n1_cidrs]: [&[&str]; 2],
        service_cidr: &str,
        services: Vec<crate::Service>,
        endpoints: Vec<crate::Endpoint>,
    ) -> Records {
        let strings = |cs: &[&str]| cs.iter().map(|c| c.to_string()).collect();
        let vpc = VpcRecord {
            name: "blue".into(),
            id: 7,
            pod_cidrs: strings(pod_cidrs),
            service_cidr: service_cidr.into(),
            dns_zone: "cluster.local".into(),
        };
        let member = VpcMemberRecord {
            vpc: "blue".into(),
            node: "n1".into(),
            pod_cidrs: strings(n1_cidrs),
        };
        Records {
            vpcs: vec![vpc.try_into().unwrap()],
            members: vec![member.try_into().unwrap()],
            services,
            endpoints,
            pods: Vec::new(),
        }
    }

    fn build(records: Records) -> DnsView {
        let nodes = nodes();
        let mesh = Mesh {
            prefix: prefix(),
            nodes: &nodes,
        };
        let (snap, bads) = VpcSnapshot::build(records, mesh);
        assert!(bads.is_empty(), "{bads:?}");
        DnsView::new(&snap.vpcs["blue"])
    }

    fn blue() -> Records {
        records(
            [
                &["10.10.0.0/16", "fd10::/56"],
                &["10.10.1.0/24", "fd10::/64"],
            ],
            "10.96.0.0/24",
            vec![
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
            vec![
                endpoint("peers", "10.10.1.5", Some("peer-0"), true),
                endpoint("peers", "fd10::6", None, true),
                endpoint("peers", "10.10.1.7", Some("peer-2"), false),
                endpoint("idle", "10.10.1.8", None, false),
            ],
        )
    }

    fn view() -> DnsView {
        build(blue())
    }

    /// `view`'s answer as lines `name ttl TYPE data`, or `NODATA <zone>` /
    /// `NXDOMAIN <zone>` (the SOA's owner), or `FORWARD`.
    fn show(view: &DnsView, name: &str, qtype: QueryType) -> String {
        let line = |r: &Record| {
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
                RData::Ns(n) => format!("NS {n}"),
                RData::Soa(s) => format!(
                    "SOA {} {} {} {} {} {}",
                    s.mname, s.rname, s.refresh, s.retry, s.expire, s.minimum
                ),
            };
            format!("{} {} {data}", r.name, r.ttl)
        };
        let negative = |kind: &str, soa: &Record| {
            assert_eq!(line(soa), line(&view.soa(&soa.name)), "the zone's SOA");
            assert_eq!(soa.ttl, TTL_SECS);
            format!("{kind} {}", soa.name)
        };
        match view.resolve(name, qtype) {
            Answer::Records(rs) => rs.iter().map(line).collect::<Vec<_>>().join("\n"),
            Answer::NoData(soa) => negative("NODATA", &soa),
            Answer::NxDomain(soa) => negative("NXDOMAIN", &soa),
            Answer::Forward => "FORWARD".into(),
        }
    }

    /// Data-driven: `view()`'s answer, as [`show`] writes it.
    fn check(name: &str, qtype: QueryType, want: &str) {
        assert_eq!(show(&view(), name, qtype), want, "{name} {qtype:?}");
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
        check("db.web.svc.cluster.local", Aaaa, "NODATA cluster.local");
        check(
            "db.web.svc.cluster.local",
            Other(15),
            "NODATA cluster.local",
        );
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
        check(
            "_pg._udp.db.web.svc.cluster.local",
            Srv,
            "NXDOMAIN cluster.local",
        );
        check("_tcp.db.web.svc.cluster.local", Srv, "NODATA cluster.local");
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
        check(
            "peer-2.peers.web.svc.cluster.local",
            A,
            "NXDOMAIN cluster.local",
        );
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
        check("idle.web.svc.cluster.local", A, "NXDOMAIN cluster.local");
    }

    #[test]
    fn zone_names_and_forwarding() {
        check(
            "dns-version.cluster.local",
            Txt,
            "dns-version.cluster.local 5 TXT 1.1.0",
        );
        check("web.svc.cluster.local", A, "NODATA cluster.local");
        check("svc.cluster.local", A, "NODATA cluster.local");
        check("cluster.local", A, "NODATA cluster.local");
        check("db.prod.svc.cluster.local", A, "NXDOMAIN cluster.local");
        check(
            "db.web.svc.cluster.local.web.svc.cluster.local",
            A,
            "NXDOMAIN cluster.local",
        );
        check("example.com", A, "FORWARD");
        check("xcluster.local", A, "FORWARD");
        // Reverse names: ours inside the VPC's CIDRs, the upstream's outside.
        check(
            "99.0.96.10.in-addr.arpa",
            Ptr,
            "NXDOMAIN 0.96.10.in-addr.arpa",
        );
        check("9.9.10.10.in-addr.arpa", Ptr, "NXDOMAIN 10.10.in-addr.arpa");
        check("8.8.8.8.in-addr.arpa", Ptr, "FORWARD");
        check("10.in-addr.arpa", Ptr, "FORWARD");
    }

    #[test]
    fn zone_apexes_have_soa_and_ns() {
        let soa = "ns.dns.cluster.local hostmaster.cluster.local 7200 1800 86400 5";
        check("cluster.local", Soa, &format!("cluster.local 5 SOA {soa}"));
        check("Cluster.Local.", Soa, &format!("cluster.local 5 SOA {soa}"));
        check(
            "cluster.local",
            Ns,
            "cluster.local 5 NS ns.dns.cluster.local",
        );
        check(
            "ns.dns.cluster.local",
            A,
            "ns.dns.cluster.local 5 A 10.96.0.10",
        );
        check("dns.cluster.local", A, "NODATA cluster.local");
        // One reverse zone per CIDR, by whole octets or nibbles.
        check(
            "0.96.10.in-addr.arpa",
            Soa,
            &format!("0.96.10.in-addr.arpa 5 SOA {soa}"),
        );
        let v6_zone = "0.0.0.0.0.0.0.0.0.0.0.1.d.f.ip6.arpa";
        check(v6_zone, Soa, &format!("{v6_zone} 5 SOA {soa}"));
        check(
            &reverse_name("fd10::99".parse().unwrap()),
            Ptr,
            &format!("NXDOMAIN {v6_zone}"),
        );
        // An empty non-terminal of a reverse zone (above 10.10.1.5's PTR) exists.
        check("1.10.10.in-addr.arpa", Ptr, "NODATA 10.10.in-addr.arpa");
        check("10.10.in-addr.arpa", Ptr, "NODATA 10.10.in-addr.arpa");
        check("2.10.10.in-addr.arpa", Ptr, "NXDOMAIN 10.10.in-addr.arpa");
        // Every SOA of a view has one serial.
        let v = view();
        assert_eq!(
            v.soa("10.10.in-addr.arpa").data,
            v.soa("cluster.local").data
        );
    }

    /// A reverse zone wider than its CIDR (a /12 is in `10.in-addr.arpa`): names
    /// of the zone outside the CIDR are the upstream's.
    #[test]
    fn a_wide_reverse_zone_answers_only_inside_its_cidr() {
        let v = build(records(
            [&["10.16.0.0/12"], &["10.16.1.0/24"]],
            "10.96.0.0/24",
            vec![],
            vec![],
        ));
        let soa = |zone: &str| {
            format!("{zone} 5 SOA ns.dns.cluster.local hostmaster.cluster.local 7200 1800 86400 5")
        };
        assert_eq!(show(&v, "10.in-addr.arpa", Soa), soa("10.in-addr.arpa"));
        assert_eq!(
            show(&v, "9.9.17.10.in-addr.arpa", Ptr),
            "NXDOMAIN 10.in-addr.arpa"
        );
        assert_eq!(
            show(&v, "17.10.in-addr.arpa", Ptr),
            "NXDOMAIN 10.in-addr.arpa"
        );
        assert_eq!(show(&v, "9.9.9.10.in-addr.arpa", Ptr), "FORWARD");
        assert_eq!(show(&v, "9.10.in-addr.arpa", Ptr), "FORWARD");
    }

    /// The SOA serial changes when a record does, and only then (the agent swaps in
    /// an equal view as a no-op).
    #[test]
    fn the_serial_follows_the_records() {
        let serial = |v: &DnsView| match v.soa("cluster.local").data {
            RData::Soa(s) => s.serial,
            other => panic!("{other:?}"),
        };
        let mut more = blue();
        more.endpoints
            .push(endpoint("idle", "10.10.1.9", None, true));
        assert_eq!(serial(&view()), serial(&view()));
        assert_ne!(serial(&view()), serial(&build(more)));
    }

    /// An IPv6-only VPC: clusterIPs and endpoints answer AAAA; A gets NODATA with the
    /// zone's SOA; PTRs live in the CIDRs' `ip6.arpa` zones.
    #[test]
    fn an_ipv6_vpc_answers_aaaa() {
        let v = build(records(
            [&["fd10::/56"], &["fd10::/64"]],
            "fd96::/112",
            vec![
                service(
                    serde_json::json!({"vpc": "blue", "namespace": "web", "name": "db",
                    "cluster_ip": "fd96::b", "ports": [{"name": "pg", "protocol": "TCP", "port": 5432}]}),
                ),
                service(
                    serde_json::json!({"vpc": "blue", "namespace": "web", "name": "peers",
                    "cluster_ip": "None", "ports": [{"protocol": "TCP", "port": 7000}]}),
                ),
            ],
            vec![endpoint("peers", "fd10::6", Some("peer-0"), true)],
        ));
        let at = |name: &str, t| show(&v, name, t);
        assert_eq!(
            at("db.web.svc.cluster.local", Aaaa),
            "db.web.svc.cluster.local 5 AAAA fd96::b"
        );
        assert_eq!(at("db.web.svc.cluster.local", A), "NODATA cluster.local");
        assert_eq!(
            at("peers.web.svc.cluster.local", Aaaa),
            "peers.web.svc.cluster.local 5 AAAA fd10::6"
        );
        assert_eq!(at("peers.web.svc.cluster.local", A), "NODATA cluster.local");
        assert_eq!(
            at("peer-0.peers.web.svc.cluster.local", Aaaa),
            "peer-0.peers.web.svc.cluster.local 5 AAAA fd10::6"
        );
        assert_eq!(
            at("peer-0.peers.web.svc.cluster.local", A),
            "NODATA cluster.local"
        );
        assert_eq!(
            at("ns.dns.cluster.local", Aaaa),
            "ns.dns.cluster.local 5 AAAA fd96::a"
        );
        let ptr = reverse_name("fd96::b".parse().unwrap());
        assert_eq!(
            at(&ptr, Ptr),
            format!("{ptr} 5 PTR db.web.svc.cluster.local")
        );
        // fd96::/112: 28 nibbles, 24 of them zeros.
        let zone = format!("{}6.9.d.f.ip6.arpa", "0.".repeat(24));
        assert_eq!(
            at(&reverse_name("fd96::c".parse().unwrap()), Ptr),
            format!("NXDOMAIN {zone}")
        );
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
                prop_assert_eq!(parse_reverse_name(&reverse_name(ip)), Some(IpNet::from(ip)));
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
