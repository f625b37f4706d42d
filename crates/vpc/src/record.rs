//! VPCs, memberships, services and endpoints: their JSON wire forms (`*Record`) and the
//! validated types the rest of wiremesh uses.
//!
//! Each `TryFrom<*Record>` checks what one record can check alone and names the field
//! (`service blue/web/db.ports[1].port`); what needs other records (a member's CIDR
//! inside its VPC's, a clusterIP unused) is [`crate::snapshot`]'s job.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use wiremesh_model::{FieldError, NodeName};

/// Kubernetes' default ClientIP affinity timeout (`sessionAffinityConfig.clientIP.timeoutSeconds`).
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10_800;
/// Kubernetes' upper bound for the affinity timeout: one day.
pub const MAX_AFFINITY_TIMEOUT_SECS: u32 = 86_400;

/// A DNS-1035 label: lowercase letters, digits and '-', starting with a letter, ending
/// with a letter or digit, 1 to 63 characters. Names of VPCs, namespaces, services,
/// ports and endpoint hostnames, so each can be a DNS label and an nftables name part.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Label(String);

impl Label {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses `s`, naming `field` in the error.
    pub fn parse(field: &str, s: &str) -> Result<Label, FieldError> {
        let bytes = s.as_bytes();
        if bytes.is_empty() || bytes.len() > 63 {
            return Err(FieldError::new(
                field,
                format!("{s:?} must be 1 to 63 characters"),
            ));
        }
        let body_ok = bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
        let first_ok = bytes[0].is_ascii_lowercase();
        let last_ok = bytes[bytes.len() - 1] != b'-';
        if !(body_ok && first_ok && last_ok) {
            return Err(FieldError::new(
                field,
                format!(
                    "{s:?} is not a DNS-1035 label (lowercase letters, digits and '-', \
                     starting with a letter, not ending with '-')"
                ),
            ));
        }
        Ok(Label(s.to_owned()))
    }
}

impl TryFrom<String> for Label {
    type Error = FieldError;
    fn try_from(s: String) -> Result<Self, FieldError> {
        Label::parse("name", &s)
    }
}

// Maps keyed by `Label` can be indexed by `&str`: both order as strings.
impl std::borrow::Borrow<str> for Label {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<Label> for String {
    fn from(l: Label) -> String {
        l.0
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

/// A DNS zone such as `cluster.local`: DNS-1123 labels joined by dots, lowercase, no
/// trailing dot, at most 253 characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DnsZone(String);

impl DnsZone {
    pub fn parse(field: &str, s: &str) -> Result<DnsZone, FieldError> {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if s.is_empty() || s.len() > 253 || !s.split('.').all(label_ok) {
            return Err(FieldError::new(
                field,
                format!(
                    "{s:?} is not a DNS zone (lowercase labels joined by '.', no trailing dot)"
                ),
            ));
        }
        Ok(DnsZone(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DnsZone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

/// A VPC's id: unique in the cluster, immutable, carried in every outer address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VpcId(pub u32);

impl fmt::Display for VpcId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A node's 16-bit id inside the mesh ULA (`<mesh /48>:<node id>::/64`), assigned by the
/// agent's address plan; this crate only carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u16);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(addr: &IpAddr) -> IpFamily {
        match addr {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    pub fn of_net(net: &IpNet) -> IpFamily {
        IpFamily::of(&net.addr())
    }
}

/// Ranges no VPC address may overlap: the nodes' own loopback and link-local ranges,
/// where 169.254.1.1 is every pod's gateway.
const RESERVED: [&str; 4] = ["127.0.0.0/8", "169.254.0.0/16", "::1/128", "fe80::/10"];

pub(crate) fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn parse_cidr(field: &str, s: &str) -> Result<IpNet, FieldError> {
    let net: IpNet = s
        .parse()
        .map_err(|_| FieldError::new(field, format!("{s:?} is not a CIDR")))?;
    if net != net.trunc() {
        return Err(FieldError::new(
            field,
            format!("{s:?} has host bits set (did you mean {}?)", net.trunc()),
        ));
    }
    for reserved in RESERVED {
        let reserved: IpNet = reserved.parse().expect("constant");
        if overlaps(&net, &reserved) {
            return Err(FieldError::new(
                field,
                format!("{net} overlaps the reserved range {reserved}"),
            ));
        }
    }
    Ok(net)
}

fn parse_ip(field: &str, s: &str) -> Result<IpAddr, FieldError> {
    s.parse()
        .map_err(|_| FieldError::new(field, format!("{s:?} is not an IP address")))
}

/// At most one CIDR per family, at least one.
fn parse_pod_cidrs(field: &str, cidrs: &[String]) -> Result<Vec<IpNet>, FieldError> {
    if cidrs.is_empty() || cidrs.len() > 2 {
        return Err(FieldError::new(
            field,
            "needs one or two CIDRs (IPv4 and/or IPv6)",
        ));
    }
    let nets = cidrs
        .iter()
        .enumerate()
        .map(|(i, s)| parse_cidr(&format!("{field}[{i}]"), s))
        .collect::<Result<Vec<_>, _>>()?;
    if nets.len() == 2 && IpFamily::of_net(&nets[0]) == IpFamily::of_net(&nets[1]) {
        return Err(FieldError::new(
            field,
            "two CIDRs of one family; give at most one IPv4 and one IPv6",
        ));
    }
    Ok(nets)
}

/// A layer-3 network of one tenant, spanning nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vpc {
    pub name: Label,
    pub id: VpcId,
    /// One or two (IPv4 and/or IPv6); each member node gets a block of them.
    pub pod_cidrs: Vec<IpNet>,
    /// Where clusterIPs come from; one family.
    pub service_cidr: IpNet,
    pub dns_zone: DnsZone,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VpcRecord {
    pub name: String,
    pub id: u32,
    pub pod_cidrs: Vec<String>,
    pub service_cidr: String,
    pub dns_zone: String,
}

impl TryFrom<VpcRecord> for Vpc {
    type Error = FieldError;

    fn try_from(r: VpcRecord) -> Result<Self, FieldError> {
        let name = Label::parse("name", &r.name)?;
        let within = |e: FieldError| e.within(&format!("vpc {}", r.name));
        if r.id == 0 {
            // `<mesh>:<node>:0:0::/96` is the node's own, outside every VPC.
            return Err(within(FieldError::new(
                "id",
                "0 is reserved for the node itself",
            )));
        }
        let pod_cidrs = parse_pod_cidrs("pod_cidrs", &r.pod_cidrs).map_err(within)?;
        let service_cidr = parse_cidr("service_cidr", &r.service_cidr).map_err(within)?;
        if let Some(clash) = pod_cidrs.iter().find(|p| overlaps(p, &service_cidr)) {
            return Err(within(FieldError::new(
                "service_cidr",
                format!("{service_cidr} overlaps pod CIDR {clash}"),
            )));
        }
        // Network, the DNS service's `.10`, and one more address at least.
        if service_cidr.hosts().nth(10).is_none() {
            return Err(within(FieldError::new(
                "service_cidr",
                format!("{service_cidr} is too small for a DNS service at .10"),
            )));
        }
        let dns_zone = DnsZone::parse("dns_zone", &r.dns_zone).map_err(within)?;
        Ok(Vpc {
            name,
            id: VpcId(r.id),
            pod_cidrs,
            service_cidr,
            dns_zone,
        })
    }
}

impl From<&Vpc> for VpcRecord {
    fn from(v: &Vpc) -> Self {
        VpcRecord {
            name: v.name.to_string(),
            id: v.id.0,
            pod_cidrs: v.pod_cidrs.iter().map(|c| c.to_string()).collect(),
            service_cidr: v.service_cidr.to_string(),
            dns_zone: v.dns_zone.to_string(),
        }
    }
}

/// A node's part of a VPC: the block(s) of the VPC's pod CIDRs its pods get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpcMember {
    pub vpc: Label,
    pub node: NodeName,
    pub pod_cidrs: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VpcMemberRecord {
    pub vpc: String,
    pub node: String,
    pub pod_cidrs: Vec<String>,
}

impl TryFrom<VpcMemberRecord> for VpcMember {
    type Error = FieldError;

    fn try_from(r: VpcMemberRecord) -> Result<Self, FieldError> {
        let within = |e: FieldError| e.within(&format!("member {}/{}", r.vpc, r.node));
        let vpc = Label::parse("vpc", &r.vpc).map_err(within)?;
        let node: NodeName = r
            .node
            .clone()
            .try_into()
            .map_err(|e: FieldError| within(FieldError::new("node", e.reason)))?;
        let pod_cidrs = parse_pod_cidrs("pod_cidrs", &r.pod_cidrs).map_err(within)?;
        Ok(VpcMember {
            vpc,
            node,
            pod_cidrs,
        })
    }
}

impl From<&VpcMember> for VpcMemberRecord {
    fn from(m: &VpcMember) -> Self {
        VpcMemberRecord {
            vpc: m.vpc.to_string(),
            node: m.node.to_string(),
            pod_cidrs: m.pod_cidrs.iter().map(|c| c.to_string()).collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The lowercase name nftables, conntrack and DNS SRV labels use.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// One port of a service: clients use `port` on the clusterIP; traffic goes to
/// `target_port` on the endpoint.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServicePort {
    /// Required when a service has more than one port; makes an SRV record.
    pub name: Option<Label>,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionAffinity {
    None,
    /// A client IP keeps its endpoint until it has been idle this long.
    ClientIp {
        timeout_secs: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrafficPolicy {
    /// Any endpoint of the VPC.
    #[default]
    Cluster,
    /// Only endpoints on the client's node; none there means the service rejects.
    Local,
}

/// Kubernetes `matchLabels`: a pod matches when it has every one of these labels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct LabelSelector(pub BTreeMap<String, String>);

impl LabelSelector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    fn parse(field: &str, labels: &BTreeMap<String, String>) -> Result<Self, FieldError> {
        parse_labels(field, labels).map(LabelSelector)
    }
}

/// Checks Kubernetes labels (a selector's or a pod's), naming `<field>.<key>` in the
/// error: keys are `[prefix/]name`, values empty or up to 63 characters.
pub fn parse_labels(
    field: &str,
    labels: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, FieldError> {
    let segment_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
    };
    for (k, v) in labels {
        // `prefix/name` with a DNS-subdomain prefix, or `name` alone.
        let name = k.rsplit_once('/').map_or(k.as_str(), |(prefix, name)| {
            if prefix.is_empty() || prefix.len() > 253 {
                ""
            } else {
                name
            }
        });
        if !segment_ok(name) {
            return Err(FieldError::new(
                format!("{field}.{k}"),
                "is not a label key ([prefix/]name, name 1 to 63 of [A-Za-z0-9-_.])",
            ));
        }
        if !v.is_empty() && !segment_ok(v) {
            return Err(FieldError::new(
                format!("{field}.{k}"),
                format!("{v:?} is not a label value (up to 63 of [A-Za-z0-9-_.])"),
            ));
        }
    }
    Ok(labels.clone())
}

/// Who may reach a service, besides nobody: sources in these CIDRs or pods matching
/// one of these selectors (resolved to addresses by the caller).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccessPolicy {
    pub allowed_cidrs: Vec<IpNet>,
    pub allowed_pods: Vec<LabelSelector>,
}

/// `namespace/name` in a VPC, named by the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub vpc: Label,
    pub namespace: Label,
    pub name: Label,
    /// `None`: headless, no VIP; DNS answers with the endpoints.
    pub cluster_ip: Option<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub session_affinity: SessionAffinity,
    pub internal_traffic_policy: TrafficPolicy,
    /// `None`: every pod of the VPC may connect.
    pub access: Option<AccessPolicy>,
    /// The pods that back this service; the owning agents write their endpoints.
    pub selector: LabelSelector,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePortRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `TCP` or `UDP`.
    pub protocol: String,
    // Wide integers so an out-of-range port is reported with its field, not as malformed JSON.
    pub port: i64,
    /// Defaults to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRecord {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_cidrs: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_pods: Vec<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRecord {
    pub vpc: String,
    pub namespace: String,
    pub name: String,
    /// An address of the VPC's service CIDR, or `None` for a headless service.
    pub cluster_ip: String,
    pub ports: Vec<ServicePortRecord>,
    /// `None` (default) or `ClientIP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<String>,
    /// ClientIP only; default 10800.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_timeout_seconds: Option<u32>,
    /// `Cluster` (default) or `Local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_traffic_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<AccessRecord>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
}

fn parse_port(field: &str, p: i64) -> Result<u16, FieldError> {
    match u16::try_from(p) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(FieldError::new(field, format!("{p} is outside 1..=65535"))),
    }
}

fn parse_service_port(i: usize, r: &ServicePortRecord) -> Result<ServicePort, FieldError> {
    let field = |f: &str| format!("ports[{i}].{f}");
    let name = r
        .name
        .as_deref()
        .map(|n| Label::parse(&field("name"), n))
        .transpose()?;
    let protocol = match r.protocol.as_str() {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        other => {
            return Err(FieldError::new(
                field("protocol"),
                format!("{other:?} is neither \"TCP\" nor \"UDP\""),
            ))
        }
    };
    let port = parse_port(&field("port"), r.port)?;
    let target_port = parse_port(&field("target_port"), r.target_port.unwrap_or(r.port))?;
    Ok(ServicePort {
        name,
        protocol,
        port,
        target_port,
    })
}

impl TryFrom<ServiceRecord> for Service {
    type Error = FieldError;

    fn try_from(r: ServiceRecord) -> Result<Self, FieldError> {
        let within =
            |e: FieldError| e.within(&format!("service {}/{}/{}", r.vpc, r.namespace, r.name));
        let vpc = Label::parse("vpc", &r.vpc).map_err(within)?;
        let namespace = Label::parse("namespace", &r.namespace).map_err(within)?;
        let name = Label::parse("name", &r.name).map_err(within)?;
        let cluster_ip = match r.cluster_ip.as_str() {
            "None" => None,
            s => Some(parse_ip("cluster_ip", s).map_err(within)?),
        };
        if r.ports.is_empty() {
            return Err(within(FieldError::new("ports", "a service needs a port")));
        }
        let ports = r
            .ports
            .iter()
            .enumerate()
            .map(|(i, p)| parse_service_port(i, p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(within)?;
        for (i, p) in ports.iter().enumerate() {
            if ports.len() > 1 && p.name.is_none() {
                return Err(within(FieldError::new(
                    format!("ports[{i}].name"),
                    "each port of a multi-port service needs a name",
                )));
            }
            let earlier = &ports[..i];
            if p.name.is_some() && earlier.iter().any(|q| q.name == p.name) {
                return Err(within(FieldError::new(
                    format!("ports[{i}].name"),
                    "is used by an earlier port",
                )));
            }
            if earlier
                .iter()
                .any(|q| (q.port, q.protocol) == (p.port, p.protocol))
            {
                return Err(within(FieldError::new(
                    format!("ports[{i}].port"),
                    format!(
                        "{}/{} is used by an earlier port",
                        p.port,
                        p.protocol.as_str()
                    ),
                )));
            }
        }
        let session_affinity = match (r.session_affinity.as_deref(), r.affinity_timeout_seconds) {
            (None | Some("None"), None) => SessionAffinity::None,
            (None | Some("None"), Some(_)) => {
                return Err(within(FieldError::new(
                    "affinity_timeout_seconds",
                    "is only meaningful with session_affinity \"ClientIP\"",
                )))
            }
            (Some("ClientIP"), timeout) => {
                let timeout_secs = timeout.unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECS);
                if !(1..=MAX_AFFINITY_TIMEOUT_SECS).contains(&timeout_secs) {
                    return Err(within(FieldError::new(
                        "affinity_timeout_seconds",
                        format!("{timeout_secs} is outside 1..={MAX_AFFINITY_TIMEOUT_SECS}"),
                    )));
                }
                SessionAffinity::ClientIp { timeout_secs }
            }
            (Some(other), _) => {
                return Err(within(FieldError::new(
                    "session_affinity",
                    format!("{other:?} is neither \"None\" nor \"ClientIP\""),
                )))
            }
        };
        let internal_traffic_policy = match r.internal_traffic_policy.as_deref() {
            None | Some("Cluster") => TrafficPolicy::Cluster,
            Some("Local") => TrafficPolicy::Local,
            Some(other) => {
                return Err(within(FieldError::new(
                    "internal_traffic_policy",
                    format!("{other:?} is neither \"Cluster\" nor \"Local\""),
                )))
            }
        };
        let access = r
            .access
            .as_ref()
            .map(|a| parse_access(a).map_err(|e| within(e.within("access"))))
            .transpose()?;
        let selector = LabelSelector::parse("selector", &r.selector).map_err(within)?;
        Ok(Service {
            vpc,
            namespace,
            name,
            cluster_ip,
            ports,
            session_affinity,
            internal_traffic_policy,
            access,
            selector,
        })
    }
}

fn parse_access(r: &AccessRecord) -> Result<AccessPolicy, FieldError> {
    if r.allowed_cidrs.is_empty() && r.allowed_pods.is_empty() {
        return Err(FieldError::new(
            "allowed_cidrs",
            "an access policy that allows nobody; leave `access` out to allow every pod",
        ));
    }
    let allowed_cidrs = r
        .allowed_cidrs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let field = format!("allowed_cidrs[{i}]");
            let net: IpNet = s
                .parse()
                .map_err(|_| FieldError::new(&field, format!("{s:?} is not a CIDR")))?;
            if net != net.trunc() {
                return Err(FieldError::new(field, format!("{s:?} has host bits set")));
            }
            Ok(net)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let allowed_pods = r
        .allowed_pods
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if s.is_empty() {
                return Err(FieldError::new(
                    format!("allowed_pods[{i}]"),
                    "an empty selector would match every pod",
                ));
            }
            LabelSelector::parse(&format!("allowed_pods[{i}]"), s)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AccessPolicy {
        allowed_cidrs,
        allowed_pods,
    })
}

impl From<&Service> for ServiceRecord {
    fn from(s: &Service) -> Self {
        let (session_affinity, affinity_timeout_seconds) = match s.session_affinity {
            SessionAffinity::None => (None, None),
            SessionAffinity::ClientIp { timeout_secs } => {
                (Some("ClientIP".to_owned()), Some(timeout_secs))
            }
        };
        ServiceRecord {
            vpc: s.vpc.to_string(),
            namespace: s.namespace.to_string(),
            name: s.name.to_string(),
            cluster_ip: s
                .cluster_ip
                .map_or_else(|| "None".to_owned(), |ip| ip.to_string()),
            ports: s
                .ports
                .iter()
                .map(|p| ServicePortRecord {
                    name: p.name.as_ref().map(|n| n.to_string()),
                    protocol: p.protocol.as_str().to_uppercase(),
                    port: p.port.into(),
                    target_port: Some(p.target_port.into()),
                })
                .collect(),
            session_affinity,
            affinity_timeout_seconds,
            internal_traffic_policy: match s.internal_traffic_policy {
                TrafficPolicy::Cluster => None,
                TrafficPolicy::Local => Some("Local".to_owned()),
            },
            access: s.access.as_ref().map(|a| AccessRecord {
                allowed_cidrs: a.allowed_cidrs.iter().map(|c| c.to_string()).collect(),
                allowed_pods: a.allowed_pods.iter().map(|s| s.0.clone()).collect(),
            }),
            selector: s.selector.0.clone(),
        }
    }
}

/// One backend of a service, as its node's agent reports it (EndpointSlice semantics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub vpc: Label,
    pub namespace: Label,
    pub service: Label,
    pub address: IpAddr,
    pub node: NodeName,
    /// Gives `<hostname>.<svc>.<ns>.svc.<zone>` for headless services.
    pub hostname: Option<Label>,
    /// Takes new connections. Never true while terminating.
    pub ready: bool,
    /// Would answer (ready, or terminating but still serving).
    pub serving: bool,
    pub terminating: bool,
}

impl Endpoint {
    /// Serving while terminating: Kubernetes sends new connections to such an endpoint
    /// only when no candidate is ready.
    pub fn is_fallback(&self) -> bool {
        !self.ready && self.serving && self.terminating
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointRecord {
    pub vpc: String,
    pub namespace: String,
    pub service: String,
    pub address: String,
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Kubernetes reads an absent `ready` as true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    /// Defaults to `ready`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<bool>,
    #[serde(default)]
    pub terminating: bool,
}

impl TryFrom<EndpointRecord> for Endpoint {
    type Error = FieldError;

    fn try_from(r: EndpointRecord) -> Result<Self, FieldError> {
        let within = |e: FieldError| {
            e.within(&format!(
                "endpoint {}/{}/{}/{}",
                r.vpc, r.namespace, r.service, r.address
            ))
        };
        let vpc = Label::parse("vpc", &r.vpc).map_err(within)?;
        let namespace = Label::parse("namespace", &r.namespace).map_err(within)?;
        let service = Label::parse("service", &r.service).map_err(within)?;
        let address = parse_ip("address", &r.address).map_err(within)?;
        let node: NodeName = r
            .node
            .clone()
            .try_into()
            .map_err(|e: FieldError| within(FieldError::new("node", e.reason)))?;
        let hostname = r
            .hostname
            .as_deref()
            .map(|h| Label::parse("hostname", h))
            .transpose()
            .map_err(within)?;
        let ready = r.ready.unwrap_or(true);
        if ready && r.terminating {
            return Err(within(FieldError::new(
                "ready",
                "a terminating endpoint is never ready",
            )));
        }
        Ok(Endpoint {
            vpc,
            namespace,
            service,
            address,
            node,
            hostname,
            ready,
            serving: r.serving.unwrap_or(ready),
            terminating: r.terminating,
        })
    }
}

impl From<&Endpoint> for EndpointRecord {
    fn from(e: &Endpoint) -> Self {
        EndpointRecord {
            vpc: e.vpc.to_string(),
            namespace: e.namespace.to_string(),
            service: e.service.to_string(),
            address: e.address.to_string(),
            node: e.node.to_string(),
            hostname: e.hostname.as_ref().map(|h| h.to_string()),
            ready: Some(e.ready),
            serving: Some(e.serving),
            terminating: e.terminating,
        }
    }
}

/// A pod's name in its namespace: a DNS-1123 subdomain, as Kubernetes names pods.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodName(String);

impl PodName {
    pub fn parse(field: &str, s: &str) -> Result<PodName, FieldError> {
        // Node and pod names follow one Kubernetes rule: reuse its check.
        NodeName::try_from(s.to_owned())
            .map(|_| PodName(s.to_owned()))
            .map_err(|e| FieldError::new(field, e.reason))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

/// A pod of a VPC, as the agent of its node reports it: where it is and its labels,
/// which services' selectors and access policies match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub vpc: Label,
    pub namespace: Label,
    pub name: PodName,
    /// IPv4 in a VPC with an IPv4 pod CIDR, else IPv6.
    pub address: IpAddr,
    /// A dual-stack pod's IPv6 address, beside its IPv4 `address`.
    pub address_v6: Option<Ipv6Addr>,
    pub node: NodeName,
    pub labels: BTreeMap<String, String>,
}

impl Pod {
    /// Every address of the pod: `address`, then `address_v6`.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(self.address).chain(self.address_v6.map(IpAddr::V6))
    }

    /// The pod's address of `family`, if it has one.
    pub fn address_of(&self, family: IpFamily) -> Option<IpAddr> {
        self.addresses().find(|a| IpFamily::of(a) == family)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodRecord {
    pub vpc: String,
    pub namespace: String,
    pub name: String,
    pub address: String,
    /// Absent in records of single-stack pods (and of agents older than dual-stack VPCs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_v6: Option<String>,
    pub node: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// `address_v6`: an IPv6 address, and only beside an IPv4 `address` (a pod has one
/// address per family).
fn parse_address_v6(address: &IpAddr, s: Option<&str>) -> Result<Option<Ipv6Addr>, FieldError> {
    let Some(s) = s else {
        return Ok(None);
    };
    let IpAddr::V6(v6) = parse_ip("address_v6", s)? else {
        return Err(FieldError::new(
            "address_v6",
            format!("{s:?} is not an IPv6 address"),
        ));
    };
    if address.is_ipv6() {
        return Err(FieldError::new(
            "address_v6",
            format!("{address}, the pod's address, is IPv6 already"),
        ));
    }
    Ok(Some(v6))
}

impl TryFrom<PodRecord> for Pod {
    type Error = FieldError;

    fn try_from(r: PodRecord) -> Result<Self, FieldError> {
        let within = |e: FieldError| e.within(&format!("pod {}/{}/{}", r.vpc, r.namespace, r.name));
        let node: NodeName = r
            .node
            .clone()
            .try_into()
            .map_err(|e: FieldError| within(FieldError::new("node", e.reason)))?;
        let address = parse_ip("address", &r.address).map_err(within)?;
        Ok(Pod {
            vpc: Label::parse("vpc", &r.vpc).map_err(within)?,
            namespace: Label::parse("namespace", &r.namespace).map_err(within)?,
            name: PodName::parse("name", &r.name).map_err(within)?,
            address,
            address_v6: parse_address_v6(&address, r.address_v6.as_deref()).map_err(within)?,
            node,
            labels: parse_labels("labels", &r.labels).map_err(within)?,
        })
    }
}

impl From<&Pod> for PodRecord {
    fn from(p: &Pod) -> Self {
        PodRecord {
            vpc: p.vpc.to_string(),
            namespace: p.namespace.to_string(),
            name: p.name.to_string(),
            address: p.address.to_string(),
            address_v6: p.address_v6.map(|a| a.to_string()),
            node: p.node.to_string(),
            labels: p.labels.clone(),
        }
    }
}

/// What the CNI plugin tells its node's agent about one pod it added:
/// `<stateDir>/vpcs/<vpc>/pods/<container id>.json`. The agent adds the VPC and
/// itself as the node, and publishes the [`Pod`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalPodRecord {
    pub namespace: String,
    pub name: String,
    /// The pod's IPv4 address, or its IPv6 one in an IPv6-only VPC.
    pub address: String,
    /// A dual-stack pod's IPv6 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_v6: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl LocalPodRecord {
    /// The pod it describes, on `node` in `vpc`.
    pub fn into_pod(self, vpc: &Label, node: &NodeName) -> Result<Pod, FieldError> {
        PodRecord {
            vpc: vpc.to_string(),
            namespace: self.namespace,
            name: self.name,
            address: self.address,
            address_v6: self.address_v6,
            node: node.to_string(),
            labels: self.labels,
        }
        .try_into()
    }
}

/// Parses one registry value: JSON into `R`, then into `T`; a malformed value names `kind`.
pub fn from_json<R, T>(kind: &str, bytes: &[u8]) -> Result<T, FieldError>
where
    R: for<'de> Deserialize<'de>,
    T: TryFrom<R, Error = FieldError>,
{
    let record: R = serde_json::from_slice(bytes)
        .map_err(|e| FieldError::new(kind, format!("malformed record: {e}")))?;
    record.try_into()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn vpc_record() -> VpcRecord {
        VpcRecord {
            name: "blue".into(),
            id: 7,
            pod_cidrs: vec!["10.10.0.0/16".into(), "fd10::/56".into()],
            service_cidr: "10.96.0.0/24".into(),
            dns_zone: "cluster.local".into(),
        }
    }

    fn service_record() -> ServiceRecord {
        serde_json::from_str(
            r#"{"vpc":"blue","namespace":"web","name":"db","cluster_ip":"10.96.0.11",
                "ports":[{"name":"pg","protocol":"TCP","port":5432},
                         {"name":"metrics","protocol":"UDP","port":9000,"target_port":9100}],
                "session_affinity":"ClientIP",
                "access":{"allowed_cidrs":["10.10.1.0/24"],"allowed_pods":[{"app":"api"}]},
                "selector":{"app":"db"}}"#,
        )
        .unwrap()
    }

    fn endpoint_record() -> EndpointRecord {
        serde_json::from_str(
            r#"{"vpc":"blue","namespace":"web","service":"db","address":"10.10.1.5","node":"n1"}"#,
        )
        .unwrap()
    }

    #[test]
    fn records_round_trip() {
        let vpc = Vpc::try_from(vpc_record()).unwrap();
        assert_eq!(Vpc::try_from(VpcRecord::from(&vpc)).unwrap(), vpc);
        let svc = Service::try_from(service_record()).unwrap();
        assert_eq!(
            svc.session_affinity,
            SessionAffinity::ClientIp {
                timeout_secs: 10_800
            }
        );
        assert_eq!(svc.ports[0].target_port, 5432);
        assert_eq!(Service::try_from(ServiceRecord::from(&svc)).unwrap(), svc);
        let ep = Endpoint::try_from(endpoint_record()).unwrap();
        assert!(ep.ready && ep.serving && !ep.terminating);
        assert_eq!(Endpoint::try_from(EndpointRecord::from(&ep)).unwrap(), ep);
        let json = serde_json::to_vec(&VpcRecord::from(&vpc)).unwrap();
        assert_eq!(from_json::<VpcRecord, Vpc>("vpc", &json).unwrap(), vpc);
    }

    #[test]
    fn vpc_errors_name_the_field() {
        let check = |edit: fn(&mut VpcRecord), field: &str| {
            let mut r = vpc_record();
            edit(&mut r);
            assert_eq!(Vpc::try_from(r).unwrap_err().field, field);
        };
        check(|r| r.name = "Blue".into(), "name");
        check(|r| r.name = "1blue".into(), "name");
        check(|r| r.id = 0, "vpc blue.id");
        check(|r| r.pod_cidrs = vec![], "vpc blue.pod_cidrs");
        check(
            |r| r.pod_cidrs = vec!["10.0.0.0/8".into(), "10.1.0.0/16".into()],
            "vpc blue.pod_cidrs",
        );
        check(
            |r| r.pod_cidrs = vec!["169.254.0.0/17".into()],
            "vpc blue.pod_cidrs[0]",
        );
        check(|r| r.pod_cidrs[1] = "::/0".into(), "vpc blue.pod_cidrs[1]");
        check(
            |r| r.pod_cidrs[0] = "10.10.0.1/16".into(),
            "vpc blue.pod_cidrs[0]",
        );
        check(
            |r| r.service_cidr = "127.0.0.0/16".into(),
            "vpc blue.service_cidr",
        );
        check(
            |r| r.service_cidr = "10.10.5.0/24".into(),
            "vpc blue.service_cidr",
        );
        check(
            |r| r.service_cidr = "10.96.0.0/29".into(),
            "vpc blue.service_cidr",
        );
        check(
            |r| r.dns_zone = "cluster.local.".into(),
            "vpc blue.dns_zone",
        );
    }

    #[test]
    fn service_errors_name_the_field() {
        let check = |edit: fn(&mut ServiceRecord), field: &str| {
            let mut r = service_record();
            edit(&mut r);
            assert_eq!(Service::try_from(r).unwrap_err().field, field);
        };
        let at = |f: &str| format!("service blue/web/db.{f}");
        check(|r| r.name = "db_1".into(), "service blue/web/db_1.name");
        check(
            |r| r.namespace = "-web".into(),
            "service blue/-web/db.namespace",
        );
        check(|r| r.cluster_ip = "10.96.0.300".into(), &at("cluster_ip"));
        check(|r| r.ports.clear(), &at("ports"));
        check(|r| r.ports[0].port = 0, &at("ports[0].port"));
        check(|r| r.ports[1].port = 65536, &at("ports[1].port"));
        check(
            |r| r.ports[1].target_port = Some(-1),
            &at("ports[1].target_port"),
        );
        check(
            |r| r.ports[1].protocol = "SCTP".into(),
            &at("ports[1].protocol"),
        );
        check(|r| r.ports[1].name = None, &at("ports[1].name"));
        check(
            |r| r.ports[1].name = Some("pg".into()),
            &at("ports[1].name"),
        );
        check(
            |r| {
                r.ports[1].port = 5432;
                r.ports[1].protocol = "TCP".into()
            },
            &at("ports[1].port"),
        );
        check(
            |r| r.session_affinity = Some("Cookie".into()),
            &at("session_affinity"),
        );
        check(
            |r| r.affinity_timeout_seconds = Some(0),
            &at("affinity_timeout_seconds"),
        );
        check(
            |r| {
                r.session_affinity = None;
                r.affinity_timeout_seconds = Some(5)
            },
            &at("affinity_timeout_seconds"),
        );
        check(
            |r| r.internal_traffic_policy = Some("local".into()),
            &at("internal_traffic_policy"),
        );
        check(
            |r| r.access = Some(AccessRecord::default()),
            &at("access.allowed_cidrs"),
        );
        check(
            |r| r.access.as_mut().unwrap().allowed_cidrs[0] = "10.10.1.1/24".into(),
            &at("access.allowed_cidrs[0]"),
        );
        check(
            |r| r.access.as_mut().unwrap().allowed_pods[0].clear(),
            &at("access.allowed_pods[0]"),
        );
        check(
            |r| {
                r.selector.insert("bad key!".into(), "x".into());
            },
            &at("selector.bad key!"),
        );
    }

    #[test]
    fn headless_and_single_unnamed_port() {
        let mut r = service_record();
        r.cluster_ip = "None".into();
        r.ports.truncate(1);
        r.ports[0].name = None;
        let svc = Service::try_from(r).unwrap();
        assert_eq!(svc.cluster_ip, None);
    }

    #[test]
    fn endpoint_errors_name_the_field() {
        let check = |edit: fn(&mut EndpointRecord), field: &str| {
            let mut r = endpoint_record();
            edit(&mut r);
            assert_eq!(Endpoint::try_from(r).unwrap_err().field, field);
        };
        let at = |f: &str| format!("endpoint blue/web/db/10.10.1.5.{f}");
        check(
            |r| r.address = "10.10.1".into(),
            "endpoint blue/web/db/10.10.1.address",
        );
        check(|r| r.node = "N1".into(), &at("node"));
        check(|r| r.hostname = Some("db.0".into()), &at("hostname"));
        check(|r| r.terminating = true, &at("ready"));
    }

    #[test]
    fn terminating_endpoint_is_a_fallback() {
        let mut r = endpoint_record();
        r.ready = Some(false);
        r.serving = Some(true);
        r.terminating = true;
        assert!(Endpoint::try_from(r).unwrap().is_fallback());
    }

    fn pod_record() -> PodRecord {
        serde_json::from_str(
            r#"{"vpc":"blue","namespace":"web","name":"db-0","address":"10.10.1.5","node":"n1",
                "labels":{"app":"db","example.com/tier":"data"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn pods_round_trip_and_errors_name_the_field() {
        let pod = Pod::try_from(pod_record()).unwrap();
        assert_eq!(Pod::try_from(PodRecord::from(&pod)).unwrap(), pod);
        let check = |edit: fn(&mut PodRecord), field: &str| {
            let mut r = pod_record();
            edit(&mut r);
            assert_eq!(Pod::try_from(r).unwrap_err().field, field);
        };
        let at = |f: &str| format!("pod blue/web/db-0.{f}");
        check(|r| r.address = "10.10.1".into(), &at("address"));
        check(
            |r| r.address_v6 = Some("10.10.1.6".into()),
            &at("address_v6"),
        );
        check(
            |r| r.address_v6 = Some("fd10::1::5".into()),
            &at("address_v6"),
        );
        check(
            |r| {
                r.address = "fd10:0:0:1::5".into();
                r.address_v6 = Some("fd10:0:0:1::6".into())
            },
            &at("address_v6"),
        );
        check(|r| r.node = "N1".into(), &at("node"));
        check(
            |r| r.namespace = "Web".into(),
            "pod blue/Web/db-0.namespace",
        );
        check(|r| r.name = "db_0".into(), "pod blue/web/db_0.name");
        check(
            |r| {
                r.labels.insert("app".into(), "-db".into());
            },
            &at("labels.app"),
        );
        check(
            |r| {
                r.labels.insert("/x".into(), "y".into());
            },
            &at("labels./x"),
        );
        let local = LocalPodRecord {
            namespace: "web".into(),
            name: "db-0".into(),
            address: "10.10.1.5".into(),
            address_v6: None,
            labels: pod.labels.clone(),
        };
        assert_eq!(
            local.into_pod(&pod.vpc, &"n1".parse().unwrap()).unwrap(),
            pod
        );
    }

    /// Records written before dual-stack VPCs (no `address_v6`) still parse, and a
    /// dual-stack pod keeps its IPv6 address through every form.
    #[test]
    fn a_pods_ipv6_address_is_optional_and_round_trips() {
        let old: LocalPodRecord =
            serde_json::from_str(r#"{"namespace":"web","name":"db-0","address":"10.10.1.5"}"#)
                .unwrap();
        let n1: NodeName = "n1".parse().unwrap();
        let vpc = Label::parse("vpc", "blue").unwrap();
        assert_eq!(old.clone().into_pod(&vpc, &n1).unwrap().address_v6, None);
        let local = LocalPodRecord {
            address_v6: Some("fd10:0:0:1::5".into()),
            ..old
        };
        let json = serde_json::to_string(&local).unwrap();
        let back: LocalPodRecord = serde_json::from_str(&json).unwrap();
        let pod = back.into_pod(&vpc, &n1).unwrap();
        assert_eq!(pod.address_v6, Some("fd10:0:0:1::5".parse().unwrap()));
        let json = serde_json::to_vec(&PodRecord::from(&pod)).unwrap();
        assert_eq!(from_json::<PodRecord, Pod>("pod", &json).unwrap(), pod);
        let v6: Vec<String> = pod.addresses().map(|a| a.to_string()).collect();
        assert_eq!(v6, ["10.10.1.5", "fd10:0:0:1::5"]);
        assert_eq!(
            pod.address_of(IpFamily::V6),
            Some("fd10:0:0:1::5".parse().unwrap())
        );
    }

    #[test]
    fn malformed_json_is_an_error() {
        let err = from_json::<ServiceRecord, Service>("service", b"{\"vpc\": 1").unwrap_err();
        assert_eq!(err.field, "service");
    }
}
