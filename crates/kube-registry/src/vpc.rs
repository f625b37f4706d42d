//! VPCs, members, services and endpoints as Kubernetes objects: the pure mappings.
//!
//! - A VPC is a cluster-scoped custom resource [`Vpc`] (`wiremesh.io/v1alpha1`): the
//!   administrator writes its `spec` (id, pod CIDRs, service CIDR, DNS zone); the
//!   agents claim their blocks of the pod CIDRs in its `status.members`, by
//!   replacing the status under the object's `resourceVersion`. One object holds
//!   every claim because Kubernetes can compare-and-swap only one object at a time:
//!   two nodes that read the same members and pick the same block cannot both write.
//! - A service is a `Service` in the service's namespace, labelled
//!   [`VPC_LABEL`], headless to Kubernetes (`clusterIP: None`: the API server would
//!   allocate from the cluster's own service CIDR, not the VPC's) with the VPC's
//!   clusterIP in the [`CLUSTER_IP`] annotation, and no `spec.selector` (so
//!   Kubernetes' EndpointSlice controller leaves it alone; the pods' selector is the
//!   [`SELECTOR`] annotation).
//! - An endpoint is an `EndpointSlice` of one endpoint (labels
//!   `kubernetes.io/service-name`, [`VPC_LABEL`], managed by [`MANAGED_BY`]), written
//!   by its node's agent; its liveness is the node's Lease (the registry leaves out
//!   endpoints of nodes whose Lease ended).
//!
//! - A pod of a VPC (its address and labels, for services' selectors and access
//!   rules) is an entry of the [`PODS`] annotation on its node's Lease, written by
//!   that node's agent: it goes with the Lease, as a store's pod record goes with
//!   the node's lease. (Kubernetes' own Pod objects lack the VPC address.)
//!
//! Every mapping goes through the `*Record` wire forms of `wiremesh-vpc`, so the
//! checks are the store's; errors are renamed to the object's fields.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use wiremesh_model::{FieldError, NodeName};
use wiremesh_topology::ipam;
use wiremesh_vpc as model;
use wiremesh_vpc::record::{AccessRecord, ServicePortRecord};
use wiremesh_vpc::{EndpointRecord, PodRecord, ServiceRecord, VpcRecord};

/// Which VPC a Service or EndpointSlice belongs to.
pub const VPC_LABEL: &str = "wiremesh.io/vpc";
/// A Service's address in its VPC's service CIDR, or `None` (headless).
pub const CLUSTER_IP: &str = "wiremesh.io/cluster-ip";
/// A Service's access policy, JSON (`allowed_cidrs`, `allowed_pods`).
pub const ACCESS: &str = "wiremesh.io/access";
/// The labels of the pods behind a Service, JSON.
pub const SELECTOR: &str = "wiremesh.io/selector";
/// The Service an EndpointSlice belongs to (Kubernetes' own label).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Who writes an EndpointSlice (Kubernetes' own label); ours say [`MANAGED_BY`].
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "wiremesh.io";
/// A node's VPC pods, on its Lease: a JSON list of pod records.
pub const PODS: &str = "wiremesh.io/pods";

/// A layer-3 network of one tenant, spanning nodes.
#[derive(CustomResource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "wiremesh.io",
    version = "v1alpha1",
    kind = "Vpc",
    plural = "vpcs",
    shortname = "wmvpc",
    status = "VpcStatus",
    doc = "A wiremesh VPC: a layer-3 network of one tenant, spanning nodes.",
    printcolumn = r#"{"name": "ID", "type": "integer", "jsonPath": ".spec.id"}"#,
    printcolumn = r#"{"name": "Pod CIDRs", "type": "string", "jsonPath": ".spec.podCIDRs"}"#,
    printcolumn = r#"{"name": "Service CIDR", "type": "string", "jsonPath": ".spec.serviceCIDR"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VpcSpec {
    /// Unique in the cluster, 1 to 4294967295; never changes (packets carry it).
    #[schemars(range(min = 1))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "a VPC's id never changes"}]))]
    pub id: u32,
    /// One or two (IPv4 and/or IPv6); each member node gets a block of each.
    #[serde(rename = "podCIDRs")]
    #[schemars(length(min = 1, max = 2))]
    pub pod_cidrs: Vec<String>,
    /// Where the VPC's services' clusterIPs come from.
    #[serde(rename = "serviceCIDR")]
    pub service_cidr: String,
    /// The VPC's DNS zone, e.g. `cluster.local`.
    pub dns_zone: String,
}

/// Written by the agents: which node holds which blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VpcStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<VpcMemberStatus>,
}

/// One node's blocks of the VPC's pod CIDRs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VpcMemberStatus {
    pub node: String,
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<String>,
}

/// `e` (from a record's check, its field prefixed with `context.`) with the field
/// renamed to the object's: the first part through `fields`, the rest camel-cased.
fn rename(e: FieldError, context: &str, fields: &[(&str, &str)]) -> FieldError {
    let field = e
        .field
        .strip_prefix(context)
        .and_then(|f| f.strip_prefix('.'))
        .unwrap_or(&e.field);
    let split = field.find(['.', '[']).unwrap_or(field.len());
    let (head, rest) = field.split_at(split);
    let head = fields
        .iter()
        .find(|(from, _)| *from == head)
        .map_or(head, |(_, to)| to);
    FieldError::new(format!("{head}{}", camel(rest)), e.reason)
}

fn camel(snake: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in snake.chars() {
        match c {
            '_' => upper = true,
            c if upper => {
                out.extend(c.to_uppercase());
                upper = false;
            }
            c => out.push(c),
        }
    }
    out
}

/// The field of an annotation or label, as errors name it.
fn meta_field(kind: &str, key: &str) -> String {
    format!("metadata.{kind}[{key}]")
}

pub fn vpc_to_kube(vpc: &model::Vpc) -> Vpc {
    let record = VpcRecord::from(vpc);
    Vpc::new(
        &record.name,
        VpcSpec {
            id: record.id,
            pod_cidrs: record.pod_cidrs,
            service_cidr: record.service_cidr,
            dns_zone: record.dns_zone,
        },
    )
}

/// The Vpc object as a VPC; errors name the object's field.
pub fn vpc_from_kube(object: &Vpc) -> Result<model::Vpc, FieldError> {
    let name = object.metadata.name.clone().unwrap_or_default();
    let spec = &object.spec;
    let record = VpcRecord {
        name: name.clone(),
        id: spec.id,
        pod_cidrs: spec.pod_cidrs.clone(),
        service_cidr: spec.service_cidr.clone(),
        dns_zone: spec.dns_zone.clone(),
    };
    model::Vpc::try_from(record).map_err(|e| {
        let fields = [
            ("name", "metadata.name"),
            ("id", "spec.id"),
            ("pod_cidrs", "spec.podCIDRs"),
            ("service_cidr", "spec.serviceCIDR"),
            ("dns_zone", "spec.dnsZone"),
        ];
        rename(e, &format!("vpc {name}"), &fields)
    })
}

/// The members in the object's status: each one parsed, or the field that is wrong.
pub fn members_from_kube(object: &Vpc) -> Vec<Result<model::VpcMember, FieldError>> {
    let vpc = object.metadata.name.clone().unwrap_or_default();
    let members = object.status.iter().flat_map(|s| &s.members);
    members
        .enumerate()
        .map(|(i, m)| {
            let record = model::VpcMemberRecord {
                vpc: vpc.clone(),
                node: m.node.clone(),
                pod_cidrs: m.pod_cidrs.clone(),
            };
            model::VpcMember::try_from(record).map_err(|e| {
                let at = format!("status.members[{i}]");
                let fields = [
                    ("vpc", "metadata.name".to_owned()),
                    ("node", format!("{at}.node")),
                    ("pod_cidrs", format!("{at}.podCIDRs")),
                ];
                let fields: Vec<(&str, &str)> =
                    fields.iter().map(|(f, t)| (*f, t.as_str())).collect();
                rename(e, &format!("member {vpc}/{}", m.node), &fields)
            })
        })
        .collect()
}

/// `node`'s blocks of `vpc`: the ones `members` say it holds, if they still lie in
/// the VPC's pod CIDRs, else the lowest free block of each CIDR. `Err` names the
/// CIDR with no block left.
pub fn claim_blocks(
    vpc: &model::Vpc,
    node: &NodeName,
    members: &[model::VpcMember],
) -> Result<Vec<IpNet>, IpNet> {
    if let Some(held) = members.iter().find(|m| &m.node == node) {
        let inside = held.pod_cidrs.len() == vpc.pod_cidrs.len()
            && held
                .pod_cidrs
                .iter()
                .all(|b| vpc.pod_cidrs.iter().any(|c| c.contains(b)));
        if inside {
            return Ok(held.pod_cidrs.clone());
        }
    }
    let taken: Vec<IpNet> = members
        .iter()
        .filter(|m| &m.node != node)
        .flat_map(|m| m.pod_cidrs.iter().copied())
        .collect();
    vpc.pod_cidrs
        .iter()
        .map(|&cidr| ipam::allocate_member(cidr, &taken).ok_or(cidr))
        .collect()
}

/// `object`'s status with `member` in place of the node's entry (or without it).
pub fn with_member(object: &Vpc, node: &NodeName, member: Option<&model::VpcMember>) -> VpcStatus {
    let mut members: Vec<VpcMemberStatus> = object
        .status
        .iter()
        .flat_map(|s| &s.members)
        .filter(|m| m.node != node.as_str())
        .cloned()
        .collect();
    members.extend(member.map(|m| VpcMemberStatus {
        node: m.node.to_string(),
        pod_cidrs: m.pod_cidrs.iter().map(ToString::to_string).collect(),
    }));
    members.sort_by(|a, b| a.node.cmp(&b.node));
    VpcStatus { members }
}

/// The Service object for `service`, in its namespace.
pub fn service_to_kube(service: &model::Service) -> core::Service {
    let r = ServiceRecord::from(service);
    let mut annotations = BTreeMap::from([(CLUSTER_IP.to_owned(), r.cluster_ip.clone())]);
    if let Some(access) = &r.access {
        annotations.insert(
            ACCESS.into(),
            serde_json::to_string(access).expect("records serialize"),
        );
    }
    if !r.selector.is_empty() {
        annotations.insert(
            SELECTOR.into(),
            serde_json::to_string(&r.selector).expect("records serialize"),
        );
    }
    let ports = r
        .ports
        .iter()
        .map(|p| core::ServicePort {
            name: p.name.clone(),
            protocol: Some(p.protocol.clone()),
            port: i32::try_from(p.port).unwrap_or(0),
            target_port: p
                .target_port
                .map(|t| IntOrString::Int(i32::try_from(t).unwrap_or(0))),
            ..core::ServicePort::default()
        })
        .collect();
    let affinity_config = r
        .affinity_timeout_seconds
        .map(|t| core::SessionAffinityConfig {
            client_ip: Some(core::ClientIPConfig {
                timeout_seconds: Some(i32::try_from(t).unwrap_or(i32::MAX)),
            }),
        });
    core::Service {
        metadata: ObjectMeta {
            name: Some(r.name.clone()),
            namespace: Some(r.namespace.clone()),
            labels: Some(BTreeMap::from([(VPC_LABEL.to_owned(), r.vpc.clone())])),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(core::ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some("None".into()),
            ports: Some(ports),
            session_affinity: r.session_affinity.clone(),
            session_affinity_config: affinity_config,
            internal_traffic_policy: r.internal_traffic_policy.clone(),
            ..core::ServiceSpec::default()
        }),
        status: None,
    }
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Result<&'a str, FieldError> {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map(String::as_str)
        .ok_or_else(|| FieldError::new(meta_field("labels", key), "missing"))
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

fn json_annotation<T: for<'de> Deserialize<'de>>(
    meta: &ObjectMeta,
    key: &str,
) -> Result<Option<T>, FieldError> {
    annotation(meta, key)
        .map(|json| {
            serde_json::from_str(json)
                .map_err(|e| FieldError::new(meta_field("annotations", key), e))
        })
        .transpose()
}

/// The Service object as a VPC service; errors name the object's field.
pub fn service_from_kube(object: &core::Service) -> Result<model::Service, FieldError> {
    let meta = &object.metadata;
    let spec = object.spec.clone().unwrap_or_default();
    let ports = spec
        .ports
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, p)| {
            let target_port = match &p.target_port {
                None => None,
                Some(IntOrString::Int(port)) => Some(i64::from(*port)),
                Some(IntOrString::String(name)) => {
                    return Err(FieldError::new(
                        format!("spec.ports[{i}].targetPort"),
                        format!("{name:?}: a named port is not supported, give a number"),
                    ))
                }
            };
            Ok(ServicePortRecord {
                name: p.name.clone(),
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                port: i64::from(p.port),
                target_port,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = spec
        .session_affinity_config
        .and_then(|c| c.client_ip?.timeout_seconds)
        .map(|t| {
            u32::try_from(t).map_err(|_| {
                FieldError::new(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{t} is negative"),
                )
            })
        })
        .transpose()?;
    let record = ServiceRecord {
        vpc: label(meta, VPC_LABEL)?.to_owned(),
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        cluster_ip: annotation(meta, CLUSTER_IP)
            .ok_or_else(|| FieldError::new(meta_field("annotations", CLUSTER_IP), "missing"))?
            .to_owned(),
        ports,
        session_affinity: spec.session_affinity,
        affinity_timeout_seconds: timeout,
        internal_traffic_policy: spec.internal_traffic_policy,
        access: json_annotation::<AccessRecord>(meta, ACCESS)?,
        selector: json_annotation(meta, SELECTOR)?.unwrap_or_default(),
    };
    let context = format!(
        "service {}/{}/{}",
        record.vpc, record.namespace, record.name
    );
    model::Service::try_from(record).map_err(|e| {
        let cluster_ip = meta_field("annotations", CLUSTER_IP);
        let access = meta_field("annotations", ACCESS);
        let selector = meta_field("annotations", SELECTOR);
        let vpc = meta_field("labels", VPC_LABEL);
        let fields = [
            ("vpc", vpc.as_str()),
            ("namespace", "metadata.namespace"),
            ("name", "metadata.name"),
            ("cluster_ip", cluster_ip.as_str()),
            ("ports", "spec.ports"),
            ("session_affinity", "spec.sessionAffinity"),
            (
                "affinity_timeout_seconds",
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            ),
            ("internal_traffic_policy", "spec.internalTrafficPolicy"),
            ("access", access.as_str()),
            ("selector", selector.as_str()),
        ];
        rename(e, &context, &fields)
    })
}

/// The name of the EndpointSlice that holds the endpoint at `address` of `service`:
/// the service's name and the address in hex (an IPv6 address's colons are not
/// allowed in a name).
pub fn slice_name(service: &model::Label, address: IpAddr) -> String {
    let octets = match address {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let hex: String = octets.iter().map(|b| format!("{b:02x}")).collect();
    format!("{service}-{hex}")
}

/// The EndpointSlice of one endpoint, in its service's namespace.
pub fn endpoint_to_kube(endpoint: &model::Endpoint) -> discovery::EndpointSlice {
    let r = EndpointRecord::from(endpoint);
    discovery::EndpointSlice {
        metadata: ObjectMeta {
            name: Some(slice_name(&endpoint.service, endpoint.address)),
            namespace: Some(r.namespace.clone()),
            labels: Some(BTreeMap::from([
                (SERVICE_NAME_LABEL.to_owned(), r.service.clone()),
                (VPC_LABEL.to_owned(), r.vpc.clone()),
                (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
            ])),
            ..ObjectMeta::default()
        },
        address_type: match endpoint.address {
            IpAddr::V4(_) => "IPv4".into(),
            IpAddr::V6(_) => "IPv6".into(),
        },
        endpoints: vec![discovery::Endpoint {
            addresses: vec![r.address.clone()],
            conditions: Some(discovery::EndpointConditions {
                ready: r.ready,
                serving: r.serving,
                terminating: Some(r.terminating),
            }),
            hostname: r.hostname.clone(),
            node_name: Some(r.node.clone()),
            ..discovery::Endpoint::default()
        }],
        ports: None,
    }
}

/// The endpoints of an EndpointSlice (any number of them, with one address each, as
/// Kubernetes' own controller writes them): each parsed, or the field that is wrong.
pub fn endpoints_from_kube(
    object: &discovery::EndpointSlice,
) -> Vec<Result<model::Endpoint, FieldError>> {
    let meta = &object.metadata;
    let (vpc, service) = match (label(meta, VPC_LABEL), label(meta, SERVICE_NAME_LABEL)) {
        (Ok(vpc), Ok(service)) => (vpc, service),
        (Err(e), _) | (_, Err(e)) => return vec![Err(e)],
    };
    object
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let at = format!("endpoints[{i}]");
            let [address] = e.addresses.as_slice() else {
                return Err(FieldError::new(
                    format!("{at}.addresses"),
                    "needs exactly one address",
                ));
            };
            let conditions = e.conditions.clone().unwrap_or_default();
            let record = EndpointRecord {
                vpc: vpc.to_owned(),
                namespace: meta.namespace.clone().unwrap_or_default(),
                service: service.to_owned(),
                address: address.clone(),
                node: e.node_name.clone().unwrap_or_default(),
                hostname: e.hostname.clone(),
                ready: conditions.ready,
                serving: conditions.serving,
                terminating: conditions.terminating.unwrap_or(false),
            };
            let context = format!(
                "endpoint {}/{}/{}/{}",
                record.vpc, record.namespace, record.service, record.address
            );
            model::Endpoint::try_from(record).map_err(|err| {
                let vpc = meta_field("labels", VPC_LABEL);
                let service = meta_field("labels", SERVICE_NAME_LABEL);
                let fields = [
                    ("vpc", vpc),
                    ("namespace", "metadata.namespace".to_owned()),
                    ("service", service),
                    ("address", format!("{at}.addresses[0]")),
                    ("node", format!("{at}.nodeName")),
                    ("hostname", format!("{at}.hostname")),
                    ("ready", format!("{at}.conditions.ready")),
                ];
                let fields: Vec<(&str, &str)> =
                    fields.iter().map(|(f, t)| (*f, t.as_str())).collect();
                rename(err, &context, &fields)
            })
        })
        .collect()
}

fn pod_records(lease: &Lease) -> Result<Vec<PodRecord>, FieldError> {
    json_annotation(&lease.metadata, PODS).map(Option::unwrap_or_default)
}

/// The pods on a node's Lease: each parsed, or the field that is wrong. A pod of
/// another node than the Lease's holder is not believed.
pub fn pods_from_lease(lease: &Lease) -> Vec<Result<model::Pod, FieldError>> {
    let records = match pod_records(lease) {
        Ok(records) => records,
        Err(e) => return vec![Err(e)],
    };
    let holder = crate::lease::holder(lease).unwrap_or_default();
    records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let at = format!("{}[{i}]", meta_field("annotations", PODS));
            let context = format!("pod {}/{}/{}", r.vpc, r.namespace, r.name);
            if r.node != holder {
                return Err(FieldError::new(
                    format!("{at}.node"),
                    format!("{:?} is not the Lease's holder {holder:?}", r.node),
                ));
            }
            model::Pod::try_from(r).map_err(|e| {
                let field = e.field.strip_prefix(&context).unwrap_or(&e.field);
                FieldError::new(format!("{at}{field}"), e.reason)
            })
        })
        .collect()
}

/// The merge patch that sets the Lease's pods to its own without the pod
/// `(vpc, namespace, name)`, plus `add`; `None` if that changes nothing.
pub fn pods_patch(
    lease: &Lease,
    remove: (&str, &str, &str),
    add: Option<&model::Pod>,
) -> Option<serde_json::Value> {
    let before = pod_records(lease).unwrap_or_default();
    let mut pods: Vec<PodRecord> = before
        .iter()
        .filter(|p| (p.vpc.as_str(), p.namespace.as_str(), p.name.as_str()) != remove)
        .cloned()
        .collect();
    pods.extend(add.map(PodRecord::from));
    pods.sort_by(|a, b| (&a.vpc, &a.namespace, &a.name).cmp(&(&b.vpc, &b.namespace, &b.name)));
    (pods != before || annotation(&lease.metadata, PODS).is_none()).then(|| {
        let json = serde_json::to_string(&pods).expect("records serialize");
        serde_json::json!({ "metadata": { "annotations": { PODS: json } } })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vpc() -> model::Vpc {
        model::Vpc::try_from(VpcRecord {
            name: "blue".into(),
            id: 7,
            pod_cidrs: vec!["10.10.0.0/16".into(), "fd10::/56".into()],
            service_cidr: "10.96.0.0/24".into(),
            dns_zone: "cluster.local".into(),
        })
        .unwrap()
    }

    fn service() -> model::Service {
        let record: ServiceRecord = serde_json::from_value(serde_json::json!({
            "vpc": "blue", "namespace": "web", "name": "db", "cluster_ip": "10.96.0.20",
            "ports": [{"name": "pg", "protocol": "TCP", "port": 5432, "target_port": 15432},
                      {"name": "dns", "protocol": "UDP", "port": 53}],
            "session_affinity": "ClientIP", "affinity_timeout_seconds": 60,
            "internal_traffic_policy": "Local",
            "access": {"allowed_cidrs": ["10.10.1.0/24"], "allowed_pods": [{"app": "web"}]},
            "selector": {"app": "db"},
        }))
        .unwrap();
        record.try_into().unwrap()
    }

    fn endpoint(address: &str) -> model::Endpoint {
        model::Endpoint {
            vpc: model::Label::parse("vpc", "blue").unwrap(),
            namespace: model::Label::parse("namespace", "web").unwrap(),
            service: model::Label::parse("service", "db").unwrap(),
            address: address.parse().unwrap(),
            node: "n1.example".parse().unwrap(),
            hostname: Some(model::Label::parse("hostname", "db-0").unwrap()),
            ready: false,
            serving: true,
            terminating: true,
        }
    }

    fn node(name: &str) -> NodeName {
        name.parse().unwrap()
    }

    #[test]
    fn round_trips_through_the_objects() {
        assert_eq!(vpc_from_kube(&vpc_to_kube(&vpc())).unwrap(), vpc());
        assert_eq!(
            service_from_kube(&service_to_kube(&service())).unwrap(),
            service()
        );
        let headless = model::Service {
            cluster_ip: None,
            access: None,
            selector: model::LabelSelector::default(),
            ..service()
        };
        assert_eq!(
            service_from_kube(&service_to_kube(&headless)).unwrap(),
            headless
        );
        for address in ["10.10.1.5", "fd10::5"] {
            let slice = endpoint_to_kube(&endpoint(address));
            assert_eq!(endpoints_from_kube(&slice), vec![Ok(endpoint(address))]);
        }
    }

    #[test]
    fn the_objects_use_kubernetes_spelling() {
        let json = serde_json::to_value(vpc_to_kube(&vpc())).unwrap();
        assert_eq!(json["apiVersion"], "wiremesh.io/v1alpha1");
        assert_eq!(json["spec"]["podCIDRs"][1], "fd10::/56");
        assert_eq!(json["spec"]["serviceCIDR"], "10.96.0.0/24");
        assert_eq!(json["spec"]["dnsZone"], "cluster.local");

        let svc = serde_json::to_value(service_to_kube(&service())).unwrap();
        // Kubernetes must not allocate from its own service CIDR.
        assert_eq!(svc["spec"]["clusterIP"], "None");
        assert_eq!(svc["spec"].get("selector"), None);
        assert_eq!(svc["metadata"]["annotations"][CLUSTER_IP], "10.96.0.20");
        assert_eq!(svc["metadata"]["labels"][VPC_LABEL], "blue");
        assert_eq!(svc["metadata"]["namespace"], "web");
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], 15432);
        assert_eq!(
            svc["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"],
            60
        );

        let slice = serde_json::to_value(endpoint_to_kube(&endpoint("fd10::5"))).unwrap();
        assert_eq!(
            slice["metadata"]["name"],
            "db-fd100000000000000000000000000005"
        );
        assert_eq!(slice["metadata"]["labels"][SERVICE_NAME_LABEL], "db");
        assert_eq!(slice["addressType"], "IPv6");
        let e = &slice["endpoints"][0];
        assert_eq!(e["nodeName"], "n1.example");
        assert_eq!(e["hostname"], "db-0");
        assert_eq!(
            e["conditions"],
            serde_json::json!({"ready": false, "serving": true, "terminating": true})
        );
    }

    #[test]
    fn errors_name_the_field() {
        let vpc_err = |edit: fn(&mut Vpc)| {
            let mut object = vpc_to_kube(&vpc());
            edit(&mut object);
            vpc_from_kube(&object).unwrap_err().field
        };
        assert_eq!(vpc_err(|v| v.spec.id = 0), "spec.id");
        assert_eq!(
            vpc_err(|v| v.spec.pod_cidrs[0] = "x".into()),
            "spec.podCIDRs[0]"
        );
        assert_eq!(
            vpc_err(|v| v.spec.service_cidr = "10.10.0.0/24".into()),
            "spec.serviceCIDR"
        );
        assert_eq!(vpc_err(|v| v.spec.dns_zone = "-".into()), "spec.dnsZone");

        let svc_err = |edit: fn(&mut core::Service)| {
            let mut object = service_to_kube(&service());
            edit(&mut object);
            service_from_kube(&object).unwrap_err().field
        };
        assert_eq!(
            svc_err(|s| {
                s.metadata
                    .annotations
                    .as_mut()
                    .unwrap()
                    .insert(CLUSTER_IP.into(), "x".into());
            }),
            "metadata.annotations[wiremesh.io/cluster-ip]"
        );
        assert_eq!(
            svc_err(
                |s| s.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].target_port =
                    Some(IntOrString::Int(0))
            ),
            "spec.ports[0].targetPort"
        );
        assert_eq!(
            svc_err(
                |s| s.spec.as_mut().unwrap().ports.as_mut().unwrap()[1].target_port =
                    Some(IntOrString::String("dns".into()))
            ),
            "spec.ports[1].targetPort"
        );
        assert_eq!(
            svc_err(|s| {
                s.metadata.labels = None;
            }),
            "metadata.labels[wiremesh.io/vpc]"
        );
        assert_eq!(
            svc_err(|s| {
                s.metadata
                    .annotations
                    .as_mut()
                    .unwrap()
                    .insert(ACCESS.into(), "[".into());
            }),
            "metadata.annotations[wiremesh.io/access]"
        );

        let mut slice = endpoint_to_kube(&endpoint("10.10.1.5"));
        slice.endpoints[0].node_name = Some("N1".into());
        assert_eq!(
            endpoints_from_kube(&slice)[0].as_ref().unwrap_err().field,
            "endpoints[0].nodeName"
        );
        slice.endpoints[0].addresses = vec!["10.10.1.5".into(), "10.10.1.6".into()];
        assert_eq!(
            endpoints_from_kube(&slice)[0].as_ref().unwrap_err().field,
            "endpoints[0].addresses"
        );

        let mut object = vpc_to_kube(&vpc());
        object.status = Some(VpcStatus {
            members: vec![VpcMemberStatus {
                node: "n1".into(),
                pod_cidrs: vec!["10.10.0.0/33".into()],
            }],
        });
        let members = members_from_kube(&object);
        assert_eq!(
            members[0].as_ref().unwrap_err().field,
            "status.members[0].podCIDRs[0]"
        );
    }

    #[test]
    fn pods_live_on_their_nodes_lease() {
        let n1 = node("n1");
        let pod = model::Pod {
            vpc: model::Label::parse("vpc", "blue").unwrap(),
            namespace: model::Label::parse("namespace", "web").unwrap(),
            name: model::PodName::parse("name", "db-0").unwrap(),
            address: "10.10.0.5".parse().unwrap(),
            address_v6: Some("fd10::5".parse().unwrap()),
            node: n1.clone(),
            labels: BTreeMap::from([("app".into(), "db".into())]),
        };
        let mut lease = crate::lease::lease_for(&n1, 1, std::time::Duration::from_secs(9));
        assert!(pods_from_lease(&lease).is_empty());
        let key = ("blue", "web", "db-0");
        let patch = pods_patch(&lease, key, Some(&pod)).unwrap();
        let json = patch["metadata"]["annotations"][PODS]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(json.contains(r#""address_v6":"fd10::5""#), "{json}");
        lease.metadata.annotations = Some(BTreeMap::from([(PODS.to_owned(), json)]));
        assert_eq!(pods_from_lease(&lease), vec![Ok(pod.clone())]);
        assert_eq!(
            pods_patch(&lease, key, Some(&pod)),
            None,
            "nothing to write"
        );
        let emptied = pods_patch(&lease, key, None).unwrap();
        assert_eq!(emptied["metadata"]["annotations"][PODS], "[]");
        // An annotation written before dual-stack VPCs (no `address_v6`) still parses.
        let old =
            r#"[{"vpc":"blue","namespace":"web","name":"db-0","address":"10.10.0.5","node":"n1"}]"#;
        lease.metadata.annotations = Some(BTreeMap::from([(PODS.to_owned(), old.to_owned())]));
        let v4_only = model::Pod {
            address_v6: None,
            labels: BTreeMap::new(),
            ..pod.clone()
        };
        assert_eq!(pods_from_lease(&lease), vec![Ok(v4_only)]);

        let stolen = model::Pod {
            node: node("n2"),
            ..pod
        };
        let json = serde_json::to_string(&[PodRecord::from(&stolen)]).unwrap();
        lease.metadata.annotations = Some(BTreeMap::from([(PODS.to_owned(), json)]));
        let err = pods_from_lease(&lease).remove(0).unwrap_err();
        assert_eq!(err.field, "metadata.annotations[wiremesh.io/pods][0].node");
    }

    #[test]
    fn a_node_keeps_its_blocks_and_never_takes_anothers() {
        let blue = vpc();
        let n1 = node("n1");
        let first = claim_blocks(&blue, &n1, &[]).unwrap();
        assert_eq!(
            first,
            [
                "10.10.0.0/24".parse().unwrap(),
                "fd10::/64".parse().unwrap()
            ]
        );
        let m1 = model::VpcMember {
            vpc: blue.name.clone(),
            node: n1.clone(),
            pod_cidrs: first.clone(),
        };
        assert_eq!(
            claim_blocks(&blue, &n1, std::slice::from_ref(&m1)).unwrap(),
            first
        );
        let second = claim_blocks(&blue, &node("n2"), std::slice::from_ref(&m1)).unwrap();
        assert_eq!(
            second,
            [
                "10.10.1.0/24".parse().unwrap(),
                "fd10:0:0:1::/64".parse().unwrap()
            ]
        );

        let mut object = vpc_to_kube(&blue);
        object.status = Some(with_member(&object, &n1, Some(&m1)));
        let parsed: Vec<_> = members_from_kube(&object)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(parsed, [m1]);
        assert_eq!(with_member(&object, &n1, None), VpcStatus::default());
    }
}
