//! All VPC records checked against each other: the value the agent, the data plane's
//! member table, the ruleset and DNS are computed from.
//!
//! Records that parsed alone can still clash (two VPCs with one id, a member CIDR
//! outside its VPC, a clusterIP taken twice). [`VpcSnapshot::build`] sets each such
//! record aside as a [`BadRecord`] naming the field, and keeps the rest: one bad record
//! never takes a VPC down. Inputs are sorted first, so which of two clashing records
//! wins does not depend on the order the registry listed them in.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use wiremesh_model::{FieldError, NodeName};

use crate::record::{overlaps, IpFamily};
use crate::wire::MeshPrefix;
use crate::{Endpoint, Label, NodeId, Pod, PodName, Service, Vpc, VpcId, VpcMember};

/// A record left out of the snapshot, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// Which record: `vpc blue`, `member blue/n1`, `service blue/web/db`,
    /// `endpoint blue/web/db/10.10.1.5`, `pod blue/web/db-0`.
    pub record: String,
    pub error: FieldError,
}

/// The parsed records, as listed from a registry.
#[derive(Debug, Clone, Default)]
pub struct Records {
    pub vpcs: Vec<Vpc>,
    pub members: Vec<VpcMember>,
    pub services: Vec<Service>,
    pub endpoints: Vec<Endpoint>,
    pub pods: Vec<Pod>,
}

/// What the records are checked against: the mesh's address plan and its nodes.
#[derive(Debug, Clone, Copy)]
pub struct Mesh<'a> {
    pub prefix: MeshPrefix,
    /// Every node of the cluster with its id, from the agent's address plan.
    pub nodes: &'a BTreeMap<NodeName, NodeId>,
}

/// One service and its endpoints (sorted by address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceState {
    pub service: Service,
    pub endpoints: Vec<Endpoint>,
}

/// One VPC with what belongs to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpcState {
    pub vpc: Vpc,
    pub members: BTreeMap<NodeName, VpcMember>,
    /// Keyed by (namespace, name).
    pub services: BTreeMap<(Label, Label), ServiceState>,
    /// Keyed by (namespace, name).
    pub pods: BTreeMap<(Label, PodName), Pod>,
}

impl VpcState {
    /// The lowest free clusterIP for a new service of this VPC, if any is left.
    pub fn allocate_cluster_ip(&self) -> Option<IpAddr> {
        let used: BTreeSet<IpAddr> = self
            .services
            .values()
            .filter_map(|s| s.service.cluster_ip)
            .collect();
        allocate_cluster_ip(self.vpc.service_cidr, &used)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VpcSnapshot {
    pub vpcs: BTreeMap<Label, VpcState>,
    pub node_ids: BTreeMap<NodeName, NodeId>,
}

fn bad(record: String, error: FieldError) -> BadRecord {
    BadRecord { record, error }
}

impl VpcSnapshot {
    pub fn build(records: Records, mesh: Mesh<'_>) -> (VpcSnapshot, Vec<BadRecord>) {
        let mut bads = Vec::new();
        // Outer addresses name nodes by id: two nodes on one id could speak for each
        // other. The first by name keeps it; the other is left out, and its members
        // and endpoints with it.
        let mut node_ids = BTreeMap::new();
        let mut owners: BTreeMap<NodeId, &NodeName> = BTreeMap::new();
        for (name, id) in mesh.nodes {
            match owners.get(id) {
                Some(owner) => {
                    let key = format!("node {name}");
                    let reason = format!("{id} is node {owner}'s id");
                    bads.push(bad(key.clone(), FieldError::new("id", reason).within(&key)));
                }
                None => {
                    owners.insert(*id, name);
                    node_ids.insert(name.clone(), *id);
                }
            }
        }
        let mut snapshot = VpcSnapshot {
            vpcs: BTreeMap::new(),
            node_ids,
        };
        let Records {
            mut vpcs,
            mut members,
            mut services,
            mut endpoints,
            mut pods,
        } = records;

        vpcs.sort_by(|a, b| (&a.name, a.id).cmp(&(&b.name, b.id)));
        let mut ids: BTreeMap<VpcId, Label> = BTreeMap::new();
        for vpc in vpcs {
            let key = format!("vpc {}", vpc.name);
            match check_vpc(&snapshot, &ids, &vpc, mesh.prefix) {
                Ok(()) => {
                    ids.insert(vpc.id, vpc.name.clone());
                    let state = VpcState {
                        vpc,
                        members: BTreeMap::new(),
                        services: BTreeMap::new(),
                        pods: BTreeMap::new(),
                    };
                    snapshot.vpcs.insert(state.vpc.name.clone(), state);
                }
                Err(e) => bads.push(bad(key.clone(), e.within(&key))),
            }
        }

        members.sort_by(|a, b| (&a.vpc, &a.node).cmp(&(&b.vpc, &b.node)));
        for member in members {
            let key = format!("member {}/{}", member.vpc, member.node);
            match check_member(&snapshot, &member) {
                Ok(()) => {
                    let state = snapshot.vpcs.get_mut(&member.vpc).expect("checked");
                    state.members.insert(member.node.clone(), member);
                }
                Err(e) => bads.push(bad(key.clone(), e.within(&key))),
            }
        }

        pods.sort_by(|a, b| (&a.vpc, &a.namespace, &a.name).cmp(&(&b.vpc, &b.namespace, &b.name)));
        for pod in pods {
            let key = format!("pod {}/{}/{}", pod.vpc, pod.namespace, pod.name);
            match check_pod(&snapshot, &pod) {
                Ok(()) => {
                    let state = snapshot.vpcs.get_mut(&pod.vpc).expect("checked");
                    state
                        .pods
                        .insert((pod.namespace.clone(), pod.name.clone()), pod);
                }
                Err(e) => bads.push(bad(key.clone(), e.within(&key))),
            }
        }

        services
            .sort_by(|a, b| (&a.vpc, &a.namespace, &a.name).cmp(&(&b.vpc, &b.namespace, &b.name)));
        for service in services {
            let key = format!(
                "service {}/{}/{}",
                service.vpc, service.namespace, service.name
            );
            match check_service(&snapshot, &service) {
                Ok(()) => {
                    let state = snapshot.vpcs.get_mut(&service.vpc).expect("checked");
                    state.services.insert(
                        (service.namespace.clone(), service.name.clone()),
                        ServiceState {
                            service,
                            endpoints: Vec::new(),
                        },
                    );
                }
                Err(e) => bads.push(bad(key.clone(), e.within(&key))),
            }
        }

        endpoints.sort_by(|a, b| {
            (&a.vpc, &a.namespace, &a.service, a.address).cmp(&(
                &b.vpc,
                &b.namespace,
                &b.service,
                b.address,
            ))
        });
        for endpoint in endpoints {
            let key = format!(
                "endpoint {}/{}/{}/{}",
                endpoint.vpc, endpoint.namespace, endpoint.service, endpoint.address
            );
            match check_endpoint(&snapshot, &endpoint) {
                Ok(()) => {
                    let state = snapshot.vpcs.get_mut(&endpoint.vpc).expect("checked");
                    let svc = state
                        .services
                        .get_mut(&(endpoint.namespace.clone(), endpoint.service.clone()))
                        .expect("checked");
                    svc.endpoints.push(endpoint);
                }
                Err(e) => bads.push(bad(key.clone(), e.within(&key))),
            }
        }
        (snapshot, bads)
    }
}

fn check_vpc(
    snapshot: &VpcSnapshot,
    ids: &BTreeMap<VpcId, Label>,
    vpc: &Vpc,
    prefix: MeshPrefix,
) -> Result<(), FieldError> {
    if snapshot.vpcs.contains_key(&vpc.name) {
        return Err(FieldError::new("name", "another VPC has this name"));
    }
    if let Some(other) = ids.get(&vpc.id) {
        return Err(FieldError::new(
            "id",
            format!("{} is VPC {other}'s id", vpc.id),
        ));
    }
    let ula = prefix.net();
    for (i, c) in vpc.pod_cidrs.iter().enumerate() {
        if overlaps(c, &ula) {
            return Err(FieldError::new(
                format!("pod_cidrs[{i}]"),
                format!("{c} overlaps the mesh ULA {ula}"),
            ));
        }
    }
    if overlaps(&vpc.service_cidr, &ula) {
        return Err(FieldError::new(
            "service_cidr",
            format!("{} overlaps the mesh ULA {ula}", vpc.service_cidr),
        ));
    }
    Ok(())
}

fn check_member(snapshot: &VpcSnapshot, member: &VpcMember) -> Result<(), FieldError> {
    let state = snapshot
        .vpcs
        .get(&member.vpc)
        .ok_or_else(|| FieldError::new("vpc", format!("no VPC {}", member.vpc)))?;
    if !snapshot.node_ids.contains_key(&member.node) {
        return Err(FieldError::new("node", format!("no node {}", member.node)));
    }
    if state.members.contains_key(&member.node) {
        return Err(FieldError::new(
            "node",
            format!("{} is already a member of {}", member.node, member.vpc),
        ));
    }
    for (i, cidr) in member.pod_cidrs.iter().enumerate() {
        let field = format!("pod_cidrs[{i}]");
        let inside = state
            .vpc
            .pod_cidrs
            .iter()
            .any(|v| IpFamily::of_net(v) == IpFamily::of_net(cidr) && v.contains(cidr));
        if !inside {
            return Err(FieldError::new(
                field,
                format!("{cidr} is outside VPC {}'s pod CIDRs", member.vpc),
            ));
        }
        if let Some(other) = state
            .members
            .values()
            .find(|m| m.pod_cidrs.iter().any(|c| overlaps(c, cidr)))
        {
            return Err(FieldError::new(
                field,
                format!("{cidr} overlaps node {}'s pod CIDR", other.node),
            ));
        }
    }
    Ok(())
}

fn check_pod(snapshot: &VpcSnapshot, pod: &Pod) -> Result<(), FieldError> {
    let state = snapshot
        .vpcs
        .get(&pod.vpc)
        .ok_or_else(|| FieldError::new("vpc", format!("no VPC {}", pod.vpc)))?;
    if !snapshot.node_ids.contains_key(&pod.node) {
        return Err(FieldError::new("node", format!("no node {}", pod.node)));
    }
    let member = state.members.get(&pod.node).ok_or_else(|| {
        FieldError::new(
            "node",
            format!("{} is not a member of VPC {}", pod.node, pod.vpc),
        )
    })?;
    let field = |a: &IpAddr| {
        if *a == pod.address {
            "address"
        } else {
            "address_v6"
        }
    };
    // Another node's address would let a label admit (or back a service with) a pod
    // the receiver never delivers from there.
    if let Some(a) = pod
        .addresses()
        .find(|a| !member.pod_cidrs.iter().any(|c| c.contains(a)))
    {
        return Err(FieldError::new(
            field(&a),
            format!(
                "{a} is outside node {}'s pod CIDRs in VPC {}",
                pod.node, pod.vpc
            ),
        ));
    }
    if state
        .pods
        .contains_key(&(pod.namespace.clone(), pod.name.clone()))
    {
        return Err(FieldError::new("name", "another pod has this name"));
    }
    for a in pod.addresses() {
        if let Some(other) = state.pods.values().find(|p| p.addresses().any(|b| b == a)) {
            return Err(FieldError::new(
                field(&a),
                format!("{a} is pod {}/{}'s", other.namespace, other.name),
            ));
        }
    }
    Ok(())
}

fn check_service(snapshot: &VpcSnapshot, service: &Service) -> Result<(), FieldError> {
    let state = snapshot
        .vpcs
        .get(&service.vpc)
        .ok_or_else(|| FieldError::new("vpc", format!("no VPC {}", service.vpc)))?;
    if state
        .services
        .contains_key(&(service.namespace.clone(), service.name.clone()))
    {
        return Err(FieldError::new("name", "another service has this name"));
    }
    if let Some(ip) = service.cluster_ip {
        let cidr = state.vpc.service_cidr;
        if !cidr.contains(&ip) || ip == cidr.network() || (ip.is_ipv4() && ip == cidr.broadcast()) {
            return Err(FieldError::new(
                "cluster_ip",
                format!("{ip} is not a usable address of the service CIDR {cidr}"),
            ));
        }
        if let Some(other) = state
            .services
            .values()
            .find(|s| s.service.cluster_ip == Some(ip))
        {
            return Err(FieldError::new(
                "cluster_ip",
                format!(
                    "{ip} is service {}/{}'s",
                    other.service.namespace, other.service.name
                ),
            ));
        }
    }
    Ok(())
}

fn check_endpoint(snapshot: &VpcSnapshot, endpoint: &Endpoint) -> Result<(), FieldError> {
    let state = snapshot
        .vpcs
        .get(&endpoint.vpc)
        .ok_or_else(|| FieldError::new("vpc", format!("no VPC {}", endpoint.vpc)))?;
    let service = state
        .services
        .get(&(endpoint.namespace.clone(), endpoint.service.clone()))
        .ok_or_else(|| {
            FieldError::new(
                "service",
                format!("no service {}/{}", endpoint.namespace, endpoint.service),
            )
        })?;
    if !snapshot.node_ids.contains_key(&endpoint.node) {
        return Err(FieldError::new(
            "node",
            format!("no node {}", endpoint.node),
        ));
    }
    let member = state.members.get(&endpoint.node).ok_or_else(|| {
        FieldError::new(
            "node",
            format!("{} is not a member of VPC {}", endpoint.node, endpoint.vpc),
        )
    })?;
    // Inside the node's block, not just the VPC's: the receiver drops anything else.
    if !member
        .pod_cidrs
        .iter()
        .any(|c| c.contains(&endpoint.address))
    {
        return Err(FieldError::new(
            "address",
            format!(
                "{} is outside node {}'s pod CIDRs in VPC {}",
                endpoint.address, endpoint.node, endpoint.vpc
            ),
        ));
    }
    if service
        .endpoints
        .iter()
        .any(|e| e.address == endpoint.address)
    {
        return Err(FieldError::new("address", "listed twice for this service"));
    }
    Ok(())
}

/// Offset of the DNS service's clusterIP in a service CIDR (kube-dns's convention).
const DNS_OFFSET: u128 = 10;

fn offset_addr(cidr: IpNet, offset: u128) -> IpAddr {
    match cidr.network() {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a).wrapping_add(offset as u32)).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a).wrapping_add(offset)).into()),
    }
}

/// The clusterIP of a VPC's DNS service: the service CIDR's 10th address.
pub fn dns_cluster_ip(service_cidr: IpNet) -> IpAddr {
    offset_addr(service_cidr, DNS_OFFSET)
}

/// The lowest address of `service_cidr` that is not in `used`, skipping the network
/// address, the IPv4 broadcast address and the DNS service's `.10`.
pub fn allocate_cluster_ip(service_cidr: IpNet, used: &BTreeSet<IpAddr>) -> Option<IpAddr> {
    let host_bits = u32::from(service_cidr.max_prefix_len() - service_cidr.prefix_len());
    // The last usable offset; IPv4 keeps its broadcast address out.
    let last = match (service_cidr, host_bits) {
        (_, 128) => u128::MAX,
        (IpNet::V4(_), bits) => (1u128 << bits) - 2,
        (IpNet::V6(_), bits) => (1u128 << bits) - 1,
    };
    // Ends after at most `used.len() + 2` steps: only used addresses are skipped.
    (1..=last)
        .filter(|&o| o != DNS_OFFSET)
        .map(|o| offset_addr(service_cidr, o))
        .find(|ip| !used.contains(ip))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::record::{EndpointRecord, PodRecord, ServiceRecord, VpcMemberRecord, VpcRecord};
    use proptest::prelude::*;

    pub(crate) fn prefix() -> MeshPrefix {
        "fd77:aa:bbcc::/48".parse().unwrap()
    }

    pub(crate) fn nodes() -> BTreeMap<NodeName, NodeId> {
        [("n1", 1), ("n2", 2), ("n3", 3)]
            .into_iter()
            .map(|(n, id)| (n.parse().unwrap(), NodeId(id)))
            .collect()
    }

    pub(crate) fn vpc(name: &str, id: u32, pod: &str, svc: &str) -> Vpc {
        VpcRecord {
            name: name.into(),
            id,
            pod_cidrs: vec![pod.into()],
            service_cidr: svc.into(),
            dns_zone: "cluster.local".into(),
        }
        .try_into()
        .unwrap()
    }

    pub(crate) fn member(vpc: &str, node: &str, cidr: &str) -> VpcMember {
        VpcMemberRecord {
            vpc: vpc.into(),
            node: node.into(),
            pod_cidrs: vec![cidr.into()],
        }
        .try_into()
        .unwrap()
    }

    pub(crate) fn service(vpc: &str, ns: &str, name: &str, ip: &str) -> Service {
        serde_json::from_value::<ServiceRecord>(serde_json::json!({
            "vpc": vpc, "namespace": ns, "name": name, "cluster_ip": ip,
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "target_port": 8080}]
        }))
        .unwrap()
        .try_into()
        .unwrap()
    }

    pub(crate) fn endpoint(vpc: &str, svc: &str, addr: &str, node: &str) -> Endpoint {
        EndpointRecord {
            vpc: vpc.into(),
            namespace: "web".into(),
            service: svc.into(),
            address: addr.into(),
            node: node.into(),
            hostname: None,
            ready: None,
            serving: None,
            terminating: false,
        }
        .try_into()
        .unwrap()
    }

    /// Two VPCs on the same pod CIDR (overlap is allowed), a service with two endpoints.
    pub(crate) fn records() -> Records {
        Records {
            vpcs: vec![
                vpc("blue", 7, "10.10.0.0/16", "10.96.0.0/24"),
                vpc("red", 8, "10.10.0.0/16", "10.96.0.0/24"),
            ],
            members: vec![
                member("blue", "n1", "10.10.1.0/24"),
                member("blue", "n2", "10.10.2.0/24"),
                member("red", "n1", "10.10.1.0/24"),
            ],
            services: vec![service("blue", "web", "db", "10.96.0.11")],
            endpoints: vec![
                endpoint("blue", "db", "10.10.2.5", "n2"),
                endpoint("blue", "db", "10.10.1.5", "n1"),
            ],
            pods: vec![pod("blue", "db-0", "10.10.1.5", "n1", &[("app", "db")])],
        }
    }

    pub(crate) fn pod(
        vpc: &str,
        name: &str,
        addr: &str,
        node: &str,
        labels: &[(&str, &str)],
    ) -> Pod {
        PodRecord {
            vpc: vpc.into(),
            namespace: "web".into(),
            name: name.into(),
            address: addr.into(),
            address_v6: None,
            node: node.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
        .try_into()
        .unwrap()
    }

    fn build(records: Records) -> (VpcSnapshot, Vec<BadRecord>) {
        VpcSnapshot::build(
            records,
            Mesh {
                prefix: prefix(),
                nodes: &nodes(),
            },
        )
    }

    #[test]
    fn good_records_all_land() {
        let (snap, bads) = build(records());
        assert!(bads.is_empty(), "{bads:?}");
        assert_eq!(snap.vpcs.len(), 2);
        let blue = &snap.vpcs["blue"];
        assert_eq!(blue.members.len(), 2);
        let db = blue.services.values().next().unwrap();
        let addrs: Vec<String> = db.endpoints.iter().map(|e| e.address.to_string()).collect();
        assert_eq!(addrs, ["10.10.1.5", "10.10.2.5"]);
    }

    /// Each clash is set aside with the record and field named; the rest stays.
    #[test]
    fn clashes_are_set_aside_naming_the_field() {
        let check = |edit: &dyn Fn(&mut Records), record: &str, field: &str| {
            let mut r = records();
            edit(&mut r);
            let (snap, bads) = build(r);
            assert_eq!(bads.len(), 1, "{bads:?}");
            assert_eq!(bads[0].record, record);
            assert_eq!(bads[0].error.field, format!("{record}.{field}"));
            // The rest of the records are unaffected.
            assert_eq!(
                snap.vpcs["blue"].services.len() + snap.vpcs["blue"].members.len(),
                3
            );
        };
        check(
            &|r| r.vpcs.push(vpc("green", 7, "10.20.0.0/16", "10.97.0.0/24")),
            "vpc green",
            "id",
        );
        check(
            &|r| r.vpcs.push(vpc("red", 9, "10.20.0.0/16", "10.97.0.0/24")),
            "vpc red",
            "name",
        );
        check(
            &|r| {
                r.vpcs
                    .push(vpc("green", 9, "fd77:aa:bbcc:1::/64", "10.97.0.0/24"))
            },
            "vpc green",
            "pod_cidrs[0]",
        );
        check(
            &|r| r.vpcs.push(vpc("green", 9, "10.20.0.0/16", "fd77:aa::/32")),
            "vpc green",
            "service_cidr",
        );
        check(
            &|r| r.members.push(member("blue", "n3", "10.11.0.0/24")),
            "member blue/n3",
            "pod_cidrs[0]",
        );
        check(
            &|r| r.members.push(member("blue", "n3", "10.10.2.128/25")),
            "member blue/n3",
            "pod_cidrs[0]",
        );
        check(
            &|r| r.members.push(member("blue", "n9", "10.10.9.0/24")),
            "member blue/n9",
            "node",
        );
        check(
            &|r| r.members.push(member("pink", "n3", "10.10.9.0/24")),
            "member pink/n3",
            "vpc",
        );
        check(
            &|r| {
                r.services
                    .push(service("blue", "web", "zeta", "10.96.0.11"))
            },
            "service blue/web/zeta",
            "cluster_ip",
        );
        check(
            &|r| {
                r.services
                    .push(service("blue", "web", "cache", "10.96.1.1"))
            },
            "service blue/web/cache",
            "cluster_ip",
        );
        check(
            &|r| {
                r.services
                    .push(service("blue", "web", "cache", "10.96.0.255"))
            },
            "service blue/web/cache",
            "cluster_ip",
        );
        check(
            &|r| r.endpoints.push(endpoint("blue", "db", "10.10.3.5", "n2")),
            "endpoint blue/web/db/10.10.3.5",
            "address",
        );
        check(
            &|r| r.endpoints.push(endpoint("blue", "db", "10.10.3.5", "n3")),
            "endpoint blue/web/db/10.10.3.5",
            "node",
        );
        check(
            &|r| r.endpoints.push(endpoint("blue", "db", "10.10.3.5", "n7")),
            "endpoint blue/web/db/10.10.3.5",
            "node",
        );
        check(
            &|r| {
                r.endpoints
                    .push(endpoint("blue", "cache", "10.10.1.6", "n1"))
            },
            "endpoint blue/web/cache/10.10.1.6",
            "service",
        );
        check(
            &|r| r.endpoints.push(endpoint("blue", "db", "10.10.1.5", "n1")),
            "endpoint blue/web/db/10.10.1.5",
            "address",
        );
        check(
            &|r| r.pods.push(pod("blue", "db-1", "10.10.1.5", "n1", &[])),
            "pod blue/web/db-1",
            "address",
        );
        check(
            &|r| r.pods.push(pod("blue", "db-1", "10.10.2.6", "n1", &[])),
            "pod blue/web/db-1",
            "address",
        );
        check(
            &|r| r.pods.push(pod("blue", "db-1", "10.10.3.6", "n3", &[])),
            "pod blue/web/db-1",
            "node",
        );
        check(
            &|r| r.pods.push(pod("blue", "db-0", "10.10.1.6", "n1", &[])),
            "pod blue/web/db-0",
            "name",
        );
        check(
            &|r| r.pods.push(pod("pink", "db-1", "10.10.1.6", "n1", &[])),
            "pod pink/web/db-1",
            "vpc",
        );
    }

    #[test]
    fn a_node_id_taken_twice_leaves_the_second_node_out() {
        let mut nodes = nodes();
        nodes.insert("n0".parse().unwrap(), NodeId(2));
        let (snap, bads) = VpcSnapshot::build(
            records(),
            Mesh {
                prefix: prefix(),
                nodes: &nodes,
            },
        );
        // n0 sorts first and keeps id 2: n2 is out, with its member and endpoint.
        let records: Vec<&str> = bads.iter().map(|b| b.record.as_str()).collect();
        assert_eq!(
            records,
            [
                "node n2",
                "member blue/n2",
                "endpoint blue/web/db/10.10.2.5"
            ]
        );
        assert_eq!(bads[0].error.field, "node n2.id");
        assert!(!snap.node_ids.contains_key(&"n2".parse().unwrap()));
    }

    #[test]
    fn allocation_skips_network_dns_and_broadcast() {
        let cidr: IpNet = "10.96.0.0/28".parse().unwrap();
        let mut used = BTreeSet::new();
        let mut got = Vec::new();
        while let Some(ip) = allocate_cluster_ip(cidr, &used) {
            used.insert(ip);
            got.push(ip.to_string());
        }
        let want: Vec<String> = (1..=14)
            .filter(|o| *o != 10)
            .map(|o| format!("10.96.0.{o}"))
            .collect();
        assert_eq!(got, want);
        assert_eq!(dns_cluster_ip(cidr).to_string(), "10.96.0.10");
        let v6: IpNet = "fd00:96::/112".parse().unwrap();
        assert_eq!(
            allocate_cluster_ip(v6, &BTreeSet::new())
                .unwrap()
                .to_string(),
            "fd00:96::1"
        );
        let (snap, _) = build(records());
        let blue = &snap.vpcs["blue"];
        assert_eq!(blue.allocate_cluster_ip().unwrap().to_string(), "10.96.0.1");
    }

    fn shuffle<T>(v: &mut [T], seed: u64) {
        let n = v.len();
        v.rotate_left((seed as usize) % n);
        if seed & 1 == 1 {
            v.reverse();
        }
    }

    proptest! {
        /// The registry's listing order never changes the outcome.
        #[test]
        fn build_is_order_independent(seed in any::<u64>()) {
            let mut r = records();
            r.vpcs.push(vpc("green", 7, "10.20.0.0/16", "10.97.0.0/24"));
            r.members.push(member("blue", "n3", "10.10.2.128/25"));
            r.services.push(service("blue", "web", "cache", "10.96.0.11"));
            r.pods.push(pod("blue", "db-1", "10.10.1.5", "n1", &[]));
            r.pods.push(pod("blue", "db-2", "10.10.2.5", "n2", &[]));
            let (a, bad_a) = build(r.clone());
            shuffle(&mut r.vpcs, seed);
            shuffle(&mut r.members, seed);
            shuffle(&mut r.services, seed);
            shuffle(&mut r.endpoints, seed);
            shuffle(&mut r.pods, seed);
            let (b, bad_b) = build(r);
            prop_assert_eq!(a, b);
            prop_assert_eq!(bad_a, bad_b);
        }

        /// Allocation returns an unused, usable address of the CIDR.
        #[test]
        fn allocation_is_fresh(taken in proptest::collection::btree_set(0u32..256, 0..200)) {
            let cidr: IpNet = "10.96.0.0/24".parse().unwrap();
            let used: BTreeSet<IpAddr> = taken.iter().map(|o| offset_addr(cidr, u128::from(*o))).collect();
            if let Some(ip) = allocate_cluster_ip(cidr, &used) {
                prop_assert!(!used.contains(&ip));
                prop_assert!(cidr.contains(&ip));
                prop_assert!(ip != cidr.network() && ip != cidr.broadcast() && ip != dns_cluster_ip(cidr));
            } else {
                prop_assert!((1..255u32).filter(|o| *o != 10).all(|o| taken.contains(&o)));
            }
        }
    }
}
