//! A Kubernetes `Node` object ⇄ a [`wiremesh_model::Node`], as pure functions.
//!
//! Kilo's layout: what wiremesh knows about a node rides on the Node object itself,
//! as `wiremesh.io/*` annotations, and the pod CIDR is the one Kubernetes gave the
//! node (`spec.podCIDR`). The mesh IP is not stored at all: it follows from the pod
//! CIDR and the cluster settings (`ipam::mesh_ip_of`), as it does with every other
//! registry. A Node without `wiremesh.io/public-key` has no agent yet and is simply
//! not part of the mesh.
//!
//! Parsing reuses the model's own checks (through [`NodeRecord`]), then translates
//! the model's field names back into the annotation or field the user can fix
//! (`metadata.annotations[wiremesh.io/public-key]`, `spec.podCIDR`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1 as core;
use wiremesh_model::{ClusterSettings, FieldError, Location, Node, NodeRecord};
use wiremesh_topology::ipam;

/// The node's WireGuard public key (published by its agent).
pub const PUBLIC_KEY: &str = "wiremesh.io/public-key";
/// The node's location; without it, the `topology.kubernetes.io/region` label.
pub const LOCATION: &str = "wiremesh.io/location";
/// `IP:port` where nodes of other locations reach this node; absent behind NAT.
pub const PUBLIC_ENDPOINT: &str = "wiremesh.io/public-endpoint";
/// `IP:port` where nodes of the same location reach this node.
pub const PRIVATE_ENDPOINT: &str = "wiremesh.io/private-endpoint";
/// Integer; the highest wins its location's leader election (default 0).
pub const LEADER_PREFERENCE: &str = "wiremesh.io/leader-preference";
/// Seconds, 1 to 65535: keepalive this node asks for on its tunnels.
pub const PERSISTENT_KEEPALIVE: &str = "wiremesh.io/persistent-keepalive";
/// JSON object `{"node": "IP:port"}`: endpoints this node learned for NATed peers.
pub const OBSERVED_ENDPOINTS: &str = "wiremesh.io/observed-endpoints";
/// Comma-separated node names: leaders this node's probes failed through.
pub const SUSPECTED_LEADERS: &str = "wiremesh.io/suspected-leaders";
/// Comma-separated node names: NATed nodes this node reaches only through a relay.
pub const UNREACHABLE_DIRECT: &str = "wiremesh.io/unreachable-direct";
/// JSON object `{"a/b": [port facing a, port facing b]}`: the pairs this node relays.
pub const RELAY_PORTS: &str = "wiremesh.io/relay-ports";

/// Every annotation wiremesh reads or writes on a Node, in the order they are documented.
pub const ANNOTATIONS: [&str; 10] = [
    PUBLIC_KEY,
    LOCATION,
    PUBLIC_ENDPOINT,
    PRIVATE_ENDPOINT,
    LEADER_PREFERENCE,
    PERSISTENT_KEEPALIVE,
    OBSERVED_ENDPOINTS,
    SUSPECTED_LEADERS,
    UNREACHABLE_DIRECT,
    RELAY_PORTS,
];

/// The well-known label a node's location falls back to.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// The location of a node that names none (the CLI's `--location` default).
pub const DEFAULT_LOCATION: &str = "default";

/// How an error names an annotation: the path `kubectl` users know.
pub fn annotation_field(annotation: &str) -> String {
    format!("metadata.annotations[{annotation}]")
}

fn label_field(label: &str) -> String {
    format!("metadata.labels[{label}]")
}

/// The Node object as a mesh node, `Ok(None)` if it has no agent yet (no public key).
/// `last_seen` comes from the node's liveness lease ([`crate::lease`]). Errors name
/// the annotation or field that is wrong.
pub fn node_from_kube(
    object: &core::Node,
    settings: &ClusterSettings,
    last_seen: u64,
) -> Result<Option<Node>, FieldError> {
    let empty = BTreeMap::new();
    let annotations = object.metadata.annotations.as_ref().unwrap_or(&empty);
    let labels = object.metadata.labels.as_ref().unwrap_or(&empty);
    let Some(public_key) = annotations.get(PUBLIC_KEY) else {
        return Ok(None);
    };
    let name = object.metadata.name.clone().unwrap_or_default();
    let (location, location_field) = match (annotations.get(LOCATION), labels.get(REGION_LABEL)) {
        (Some(location), _) => (location.clone(), annotation_field(LOCATION)),
        (None, Some(region)) => (region.clone(), label_field(REGION_LABEL)),
        (None, None) => (DEFAULT_LOCATION.to_owned(), annotation_field(LOCATION)),
    };
    let pod_cidr = object
        .spec
        .as_ref()
        .and_then(|spec| spec.pod_cidr.clone())
        .ok_or_else(|| {
            FieldError::new(
                "spec.podCIDR",
                "is not set: the cluster must allocate node CIDRs (kube-controller-manager --allocate-node-cidrs)",
            )
        })?;
    // Dual-stack: Kubernetes lists the IPv4 CIDR first in spec.podCIDRs, then the IPv6 one.
    let pod_cidr_v6 = object
        .spec
        .as_ref()
        .and_then(|spec| spec.pod_cidrs.as_ref())
        .and_then(|cidrs| cidrs.get(1).cloned());
    let leader_preference = annotations
        .get(LEADER_PREFERENCE)
        .map(|s| {
            s.trim().parse::<i32>().map_err(|_| {
                FieldError::new(
                    annotation_field(LEADER_PREFERENCE),
                    format!("{s:?} is not an integer"),
                )
            })
        })
        .transpose()?
        .unwrap_or(0);
    let persistent_keepalive = annotations
        .get(PERSISTENT_KEEPALIVE)
        .map(|s| {
            s.trim().parse::<u16>().map_err(|_| {
                FieldError::new(
                    annotation_field(PERSISTENT_KEEPALIVE),
                    format!("{s:?} is not a number of seconds from 1 to 65535"),
                )
            })
        })
        .transpose()?;
    let observed_endpoints: BTreeMap<String, String> = annotations
        .get(OBSERVED_ENDPOINTS)
        .map(|s| {
            serde_json::from_str(s).map_err(|e| {
                FieldError::new(
                    annotation_field(OBSERVED_ENDPOINTS),
                    format!("not a JSON object of node name to \"IP:port\": {e}"),
                )
            })
        })
        .transpose()?
        .unwrap_or_default();
    let relay_ports: BTreeMap<String, [u16; 2]> = annotations
        .get(RELAY_PORTS)
        .map(|s| {
            serde_json::from_str(s).map_err(|e| {
                FieldError::new(
                    annotation_field(RELAY_PORTS),
                    format!("not a JSON object of \"a/b\" to [port, port]: {e}"),
                )
            })
        })
        .transpose()?
        .unwrap_or_default();
    let names = |annotation: &str| -> Vec<String> {
        annotations
            .get(annotation)
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let record = NodeRecord {
        name: name.clone(),
        location,
        public_key: public_key.clone(),
        public_endpoint: annotations.get(PUBLIC_ENDPOINT).cloned(),
        private_endpoint: annotations.get(PRIVATE_ENDPOINT).cloned(),
        pod_cidr,
        pod_cidr_v6,
        // Replaced below, once the pod CIDR is known to be one.
        mesh_ip: "0.0.0.0".into(),
        persistent_keepalive,
        leader_preference,
        observed_endpoints,
        suspected_leaders: names(SUSPECTED_LEADERS),
        unreachable_direct: names(UNREACHABLE_DIRECT),
        relay_ports,
        last_seen,
    };
    let mut node = Node::try_from(record).map_err(|e| {
        let model_field = e
            .field
            .strip_prefix(&format!("node {name}."))
            .unwrap_or(&e.field);
        FieldError::new(kube_field(model_field, &location_field), e.reason)
    })?;
    node.mesh_ip = ipam::mesh_ip_of(settings, node.pod_cidr)
        .map_err(|e| FieldError::new("spec.podCIDR", e))?;
    ipam::check_pod_cidr_v6(settings, &node)
        .map_err(|e| FieldError::new(POD_CIDR_V6_FIELD, e.reason))?;
    Ok(Some(node))
}

/// A node's IPv6 pod CIDR on Kubernetes: the second entry of `spec.podCIDRs`.
const POD_CIDR_V6_FIELD: &str = "spec.podCIDRs[1]";

/// Where a field of the model's node record lives on a Node object.
fn kube_field(model_field: &str, location_field: &str) -> String {
    match model_field {
        "name" => "metadata.name".into(),
        "location" => location_field.into(),
        "public_key" => annotation_field(PUBLIC_KEY),
        "public_endpoint" => annotation_field(PUBLIC_ENDPOINT),
        "private_endpoint" => annotation_field(PRIVATE_ENDPOINT),
        "pod_cidr" => "spec.podCIDR".into(),
        "pod_cidr_v6" => POD_CIDR_V6_FIELD.into(),
        "persistent_keepalive" => annotation_field(PERSISTENT_KEEPALIVE),
        f if f.starts_with("observed_endpoints") => annotation_field(OBSERVED_ENDPOINTS),
        f if f.starts_with("suspected_leaders") => annotation_field(SUSPECTED_LEADERS),
        f if f.starts_with("unreachable_direct") => annotation_field(UNREACHABLE_DIRECT),
        f if f.starts_with("relay_ports") => annotation_field(RELAY_PORTS),
        other => other.into(),
    }
}

/// The annotations that describe `node`, every one of [`ANNOTATIONS`]: `None` for
/// those it leaves out (a JSON merge patch removes them). Pod CIDR, mesh IP and
/// last-seen are not annotations: Kubernetes, the settings and the lease hold them.
pub fn node_annotations(node: &Node) -> BTreeMap<&'static str, Option<String>> {
    let observed = (!node.observed_endpoints.is_empty()).then(|| {
        let map: BTreeMap<String, String> = node
            .observed_endpoints
            .iter()
            .map(|(peer, endpoint)| (peer.to_string(), endpoint.to_string()))
            .collect();
        serde_json::to_string(&map).expect("a map of strings always serializes")
    });
    let relay_ports = (!node.relay_ports.is_empty()).then(|| {
        let map: BTreeMap<String, [u16; 2]> = node
            .relay_ports
            .iter()
            .map(|(pair, ports)| (pair.to_string(), *ports))
            .collect();
        serde_json::to_string(&map).expect("a map of ports always serializes")
    });
    let names = |set: &std::collections::BTreeSet<wiremesh_model::NodeName>| {
        (!set.is_empty()).then(|| {
            let names: Vec<String> = set.iter().map(|n| n.to_string()).collect();
            names.join(",")
        })
    };
    BTreeMap::from([
        (PUBLIC_KEY, Some(node.public_key.to_string())),
        (LOCATION, Some(node.location.to_string())),
        (PUBLIC_ENDPOINT, node.public_endpoint.map(|e| e.to_string())),
        (
            PRIVATE_ENDPOINT,
            node.private_endpoint.map(|e| e.to_string()),
        ),
        (
            LEADER_PREFERENCE,
            (node.leader_preference != 0).then(|| node.leader_preference.to_string()),
        ),
        (
            PERSISTENT_KEEPALIVE,
            node.persistent_keepalive.map(|k| k.to_string()),
        ),
        (OBSERVED_ENDPOINTS, observed),
        (SUSPECTED_LEADERS, names(&node.suspected_leaders)),
        (UNREACHABLE_DIRECT, names(&node.unreachable_direct)),
        (RELAY_PORTS, relay_ports),
    ])
}

/// The JSON merge patch (RFC 7396) that makes a Node object describe `node`: it sets
/// wiremesh's annotations, removes the ones `node` leaves out, and touches nothing else.
pub fn node_patch(node: &Node) -> serde_json::Value {
    serde_json::json!({ "metadata": { "annotations": node_annotations(node) } })
}

/// The merge patch that takes a node out of the mesh: the annotations its agent
/// learned (public key, observed endpoints, suspected leaders, relay state) removed; those an administrator sets
/// (location, endpoints, leader preference, keepalive) stay for the next agent to
/// read. A Node without a public key is not in the mesh.
pub fn leave_patch() -> serde_json::Value {
    let none: BTreeMap<&str, Option<String>> = [
        PUBLIC_KEY,
        OBSERVED_ENDPOINTS,
        SUSPECTED_LEADERS,
        UNREACHABLE_DIRECT,
        RELAY_PORTS,
    ]
    .into_iter()
    .map(|a| (a, None))
    .collect();
    serde_json::json!({ "metadata": { "annotations": none } })
}

/// What an administrator set on a Node for its agent, and the Node's addresses as
/// endpoints where no annotation names one (`InternalIP` private, `ExternalIP`
/// public, at `port`), as Kilo does. The agent's flags override these.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodePreferences {
    pub location: Option<Location>,
    pub public_endpoint: Option<SocketAddr>,
    pub private_endpoint: Option<SocketAddr>,
    pub leader_preference: Option<i32>,
    pub persistent_keepalive: Option<u16>,
}

/// The [`NodePreferences`] of a Node object; errors name the annotation or label.
pub fn node_preferences(object: &core::Node, port: u16) -> Result<NodePreferences, FieldError> {
    let empty = BTreeMap::new();
    let annotations = object.metadata.annotations.as_ref().unwrap_or(&empty);
    let labels = object.metadata.labels.as_ref().unwrap_or(&empty);
    fn parse<T: std::str::FromStr>(
        map: &BTreeMap<String, String>,
        key: &str,
        field: String,
        what: &str,
    ) -> Result<Option<T>, FieldError> {
        map.get(key)
            .map(|s| {
                s.trim()
                    .parse()
                    .map_err(|_| FieldError::new(&field, format!("{s:?} is not {what}")))
            })
            .transpose()
    }
    let location = match parse(
        annotations,
        LOCATION,
        annotation_field(LOCATION),
        "a DNS label",
    )? {
        Some(location) => Some(location),
        None => parse(
            labels,
            REGION_LABEL,
            label_field(REGION_LABEL),
            "a DNS label",
        )?,
    };
    let endpoint = |annotation| {
        parse(
            annotations,
            annotation,
            annotation_field(annotation),
            "IP:port",
        )
    };
    let (internal, external) = node_addresses(object);
    let at_port = |ip: Option<IpAddr>| ip.map(|ip| SocketAddr::new(ip, port));
    Ok(NodePreferences {
        location,
        public_endpoint: endpoint(PUBLIC_ENDPOINT)?.or(at_port(external)),
        private_endpoint: endpoint(PRIVATE_ENDPOINT)?.or(at_port(internal)),
        leader_preference: parse(
            annotations,
            LEADER_PREFERENCE,
            annotation_field(LEADER_PREFERENCE),
            "an integer",
        )?,
        persistent_keepalive: parse::<u16>(
            annotations,
            PERSISTENT_KEEPALIVE,
            annotation_field(PERSISTENT_KEEPALIVE),
            "a number of seconds from 1 to 65535",
        )?
        .filter(|k| *k > 0),
    })
}

/// The addresses Kubernetes reports for a node (`status.addresses`): its first
/// `InternalIP` and first `ExternalIP`. An agent can default its private and public
/// endpoint to them (`IP:port`), as Kilo does, when the annotations name none.
pub fn node_addresses(object: &core::Node) -> (Option<IpAddr>, Option<IpAddr>) {
    let addresses = object
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let first = |kind: &str| {
        addresses
            .iter()
            .filter(|a| a.type_ == kind)
            .find_map(|a| a.address.parse().ok())
    };
    (first("InternalIP"), first("ExternalIP"))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    const KEY: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    fn settings() -> ClusterSettings {
        ClusterSettings::default()
    }

    fn model_node() -> Node {
        Node {
            name: "a1".parse().unwrap(),
            location: "cloud-a".parse().unwrap(),
            public_key: KEY.parse().unwrap(),
            public_endpoint: Some("203.0.113.1:51820".parse().unwrap()),
            private_endpoint: Some("10.0.0.1:51820".parse().unwrap()),
            pod_cidr: "10.42.3.0/24".parse().unwrap(),
            pod_cidr_v6: None,
            mesh_ip: ipam::mesh_ip_of(&settings(), "10.42.3.0/24".parse().unwrap()).unwrap(),
            persistent_keepalive: Some(25),
            leader_preference: -2,
            observed_endpoints: BTreeMap::from([(
                "b1".parse().unwrap(),
                "198.51.100.7:40000".parse().unwrap(),
            )]),
            suspected_leaders: ["a2".parse().unwrap()].into(),
            unreachable_direct: ["c1".parse().unwrap()].into(),
            relay_ports: BTreeMap::from([("b1/c1".parse().unwrap(), [51900, 51901])]),
            last_seen: 1_700_000_000,
        }
    }

    /// A Node object as the API server would hold it after `node_patch`.
    fn object(name: &str, pod_cidr: Option<&str>, annotations: &[(&str, &str)]) -> core::Node {
        core::Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(core::NodeSpec {
                pod_cidr: pod_cidr.map(Into::into),
                ..core::NodeSpec::default()
            }),
            status: None,
        }
    }

    fn annotated(node: &Node) -> core::Node {
        let mut o = object(node.name.as_str(), Some(&node.pod_cidr.to_string()), &[]);
        o.metadata.annotations = Some(
            node_annotations(node)
                .into_iter()
                .filter_map(|(k, v)| Some((k.to_string(), v?)))
                .collect(),
        );
        o
    }

    #[test]
    fn dual_stack_reads_the_second_pod_cidr() {
        let dual = ClusterSettings {
            cluster_cidr_v6: Some("fd42::/48".parse().unwrap()),
            ..settings()
        };
        let node = model_node();
        let mut o = annotated(&node);
        let spec = o.spec.as_mut().unwrap();
        spec.pod_cidrs = Some(vec!["10.42.3.0/24".into(), "fd42:0:0:3::/64".into()]);
        let back = node_from_kube(&o, &dual, node.last_seen).unwrap().unwrap();
        assert_eq!(back.pod_cidr_v6, Some("fd42:0:0:3::/64".parse().unwrap()));
        for bad in ["fd42:0:0:4::/64", "10.42.4.0/24", "fd42::1/64"] {
            let spec = o.spec.as_mut().unwrap();
            spec.pod_cidrs = Some(vec!["10.42.3.0/24".into(), bad.into()]);
            let err = node_from_kube(&o, &dual, 0).unwrap_err();
            assert_eq!(err.field, "spec.podCIDRs[1]", "{bad}: {err}");
        }
    }

    #[test]
    fn round_trips_through_annotations() {
        let node = model_node();
        let back = node_from_kube(&annotated(&node), &settings(), node.last_seen).unwrap();
        assert_eq!(back, Some(node));
    }

    #[test]
    fn round_trips_with_only_the_required_annotations() {
        let mut node = model_node();
        node.public_endpoint = None;
        node.private_endpoint = None;
        node.persistent_keepalive = None;
        node.leader_preference = 0;
        node.observed_endpoints.clear();
        node.suspected_leaders.clear();
        node.unreachable_direct.clear();
        node.relay_ports.clear();
        let o = annotated(&node);
        assert_eq!(
            o.metadata.annotations.as_ref().unwrap().len(),
            2,
            "{:?}",
            o.metadata.annotations
        );
        assert_eq!(
            node_from_kube(&o, &settings(), node.last_seen).unwrap(),
            Some(node)
        );
    }

    #[test]
    fn a_node_without_a_key_has_no_agent_yet() {
        let o = object("c1", Some("10.42.9.0/24"), &[(LOCATION, "x")]);
        assert_eq!(node_from_kube(&o, &settings(), 0), Ok(None));
    }

    #[test]
    fn location_falls_back_to_the_region_label_then_default() {
        let mut o = object("c1", Some("10.42.9.0/24"), &[(PUBLIC_KEY, KEY)]);
        let node = node_from_kube(&o, &settings(), 0).unwrap().unwrap();
        assert_eq!(node.location.as_str(), DEFAULT_LOCATION);
        o.metadata.labels = Some(BTreeMap::from([(REGION_LABEL.into(), "eu-west-1".into())]));
        let node = node_from_kube(&o, &settings(), 0).unwrap().unwrap();
        assert_eq!(node.location.as_str(), "eu-west-1");
        o.metadata.labels = Some(BTreeMap::from([(REGION_LABEL.into(), "EU West".into())]));
        let err = node_from_kube(&o, &settings(), 0).unwrap_err();
        assert_eq!(err.field, "metadata.labels[topology.kubernetes.io/region]");
    }

    /// Each malformed annotation or field is named in the error.
    #[test]
    fn errors_name_the_annotation() {
        let check = |name: &str, pod_cidr: Option<&str>, bad: (&str, &str), field: &str| {
            let mut annotations = vec![(PUBLIC_KEY, KEY), (LOCATION, "cloud-a")];
            annotations.retain(|(k, _)| *k != bad.0);
            annotations.push(bad);
            let o = object(name, pod_cidr, &annotations);
            let err = node_from_kube(&o, &settings(), 0).unwrap_err();
            assert_eq!(err.field, field, "{bad:?}: {err}");
        };
        let cidr = Some("10.42.3.0/24");
        let a = annotation_field;
        check("a1", cidr, (PUBLIC_KEY, "not-a-key"), &a(PUBLIC_KEY));
        check("a1", cidr, (LOCATION, "Cloud A"), &a(LOCATION));
        check(
            "a1",
            cidr,
            (PUBLIC_ENDPOINT, "1.2.3.4"),
            &a(PUBLIC_ENDPOINT),
        );
        check(
            "a1",
            cidr,
            (PUBLIC_ENDPOINT, "1.2.3.4:0"),
            &a(PUBLIC_ENDPOINT),
        );
        check(
            "a1",
            cidr,
            (PRIVATE_ENDPOINT, "host:1"),
            &a(PRIVATE_ENDPOINT),
        );
        check(
            "a1",
            cidr,
            (LEADER_PREFERENCE, "high"),
            &a(LEADER_PREFERENCE),
        );
        check(
            "a1",
            cidr,
            (PERSISTENT_KEEPALIVE, "-1"),
            &a(PERSISTENT_KEEPALIVE),
        );
        check(
            "a1",
            cidr,
            (PERSISTENT_KEEPALIVE, "0"),
            &a(PERSISTENT_KEEPALIVE),
        );
        check(
            "a1",
            cidr,
            (OBSERVED_ENDPOINTS, "[1]"),
            &a(OBSERVED_ENDPOINTS),
        );
        let bad_peer = r#"{"B1": "1.2.3.4:5"}"#;
        check(
            "a1",
            cidr,
            (OBSERVED_ENDPOINTS, bad_peer),
            &a(OBSERVED_ENDPOINTS),
        );
        let bad_endpoint = r#"{"b1": "1.2.3.4"}"#;
        check(
            "a1",
            cidr,
            (OBSERVED_ENDPOINTS, bad_endpoint),
            &a(OBSERVED_ENDPOINTS),
        );
        check(
            "a1",
            cidr,
            (UNREACHABLE_DIRECT, "b1,C1"),
            &a(UNREACHABLE_DIRECT),
        );
        check("a1", cidr, (RELAY_PORTS, "[1]"), &a(RELAY_PORTS));
        for bad_ports in [r#"{"c1/b1": [1, 2]}"#, r#"{"b1/c1": [0, 2]}"#] {
            check("a1", cidr, (RELAY_PORTS, bad_ports), &a(RELAY_PORTS));
        }
        // Not annotations, but named the same way.
        check("a1", None, (LOCATION, "x"), "spec.podCIDR");
        check("a1", Some("10.42.3.1/24"), (LOCATION, "x"), "spec.podCIDR");
        // Outside the settings' cluster CIDR: no mesh IP for it.
        check("a1", Some("10.244.1.0/24"), (LOCATION, "x"), "spec.podCIDR");
        check("ip_10_0_0_1", cidr, (LOCATION, "x"), "metadata.name");
    }

    /// Cloud providers name nodes with DNS subdomains; they join as they are.
    #[test]
    fn dotted_node_names_map() {
        let mut node = model_node();
        node.name = "ip-10-0-0-1.ec2.internal".parse().unwrap();
        let back = node_from_kube(&annotated(&node), &settings(), node.last_seen).unwrap();
        assert_eq!(back, Some(node));
    }

    #[test]
    fn the_patch_sets_and_removes_only_wiremesh_annotations() {
        let mut node = model_node();
        node.private_endpoint = None;
        node.observed_endpoints.clear();
        node.leader_preference = 0;
        node.suspected_leaders.clear();
        node.relay_ports.clear();
        let expected = serde_json::json!({"metadata": {"annotations": {
            "wiremesh.io/public-key": KEY,
            "wiremesh.io/location": "cloud-a",
            "wiremesh.io/public-endpoint": "203.0.113.1:51820",
            "wiremesh.io/private-endpoint": null,
            "wiremesh.io/leader-preference": null,
            "wiremesh.io/persistent-keepalive": "25",
            "wiremesh.io/observed-endpoints": null,
            "wiremesh.io/suspected-leaders": null,
            "wiremesh.io/unreachable-direct": "c1",
            "wiremesh.io/relay-ports": null,
        }}});
        assert_eq!(node_patch(&node), expected);
        let leave = leave_patch();
        let removed = leave["metadata"]["annotations"].as_object().unwrap();
        let keys: Vec<&str> = removed.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                OBSERVED_ENDPOINTS,
                PUBLIC_KEY,
                RELAY_PORTS,
                SUSPECTED_LEADERS,
                UNREACHABLE_DIRECT
            ]
        );
        assert!(removed.values().all(|v| v.is_null()));
    }

    /// Annotations win over the Node's addresses; a bad one is named.
    #[test]
    fn preferences_come_from_annotations_then_addresses() {
        let mut o = object("a1", None, &[]);
        assert_eq!(node_preferences(&o, 51820), Ok(NodePreferences::default()));
        o.metadata.labels = Some(BTreeMap::from([(REGION_LABEL.into(), "eu-1".into())]));
        o.status = Some(core::NodeStatus {
            addresses: Some(vec![core::NodeAddress {
                type_: "InternalIP".into(),
                address: "10.0.0.1".into(),
            }]),
            ..core::NodeStatus::default()
        });
        let p = node_preferences(&o, 51820).unwrap();
        assert_eq!(p.location.unwrap().as_str(), "eu-1");
        assert_eq!(p.private_endpoint, Some("10.0.0.1:51820".parse().unwrap()));
        assert_eq!(p.public_endpoint, None);
        o.metadata.annotations = Some(BTreeMap::from([
            (LOCATION.into(), "edge".into()),
            (PRIVATE_ENDPOINT.into(), "192.168.1.5:4000".into()),
            (PUBLIC_ENDPOINT.into(), "203.0.113.9:51820".into()),
            (LEADER_PREFERENCE.into(), "-3".into()),
            (PERSISTENT_KEEPALIVE.into(), "25".into()),
        ]));
        let p = node_preferences(&o, 51820).unwrap();
        assert_eq!(p.location.unwrap().as_str(), "edge");
        assert_eq!(
            p.private_endpoint,
            Some("192.168.1.5:4000".parse().unwrap())
        );
        assert_eq!(
            p.public_endpoint,
            Some("203.0.113.9:51820".parse().unwrap())
        );
        assert_eq!(p.leader_preference, Some(-3));
        assert_eq!(p.persistent_keepalive, Some(25));
        for (annotation, value) in [
            (LOCATION, "Edge 1"),
            (PUBLIC_ENDPOINT, "host:1"),
            (LEADER_PREFERENCE, "high"),
            (PERSISTENT_KEEPALIVE, "70000"),
        ] {
            let mut bad = o.clone();
            bad.metadata
                .annotations
                .as_mut()
                .unwrap()
                .insert(annotation.into(), value.into());
            let err = node_preferences(&bad, 51820).unwrap_err();
            assert_eq!(err.field, annotation_field(annotation), "{err}");
        }
    }

    #[test]
    fn addresses_come_from_the_node_status() {
        let mut o = object("a1", None, &[]);
        assert_eq!(node_addresses(&o), (None, None));
        let address = |type_: &str, address: &str| core::NodeAddress {
            type_: type_.into(),
            address: address.into(),
        };
        o.status = Some(core::NodeStatus {
            addresses: Some(vec![
                address("Hostname", "a1"),
                address("InternalIP", "10.0.0.1"),
                address("ExternalIP", "203.0.113.1"),
                address("InternalIP", "fd00::1"),
            ]),
            ..core::NodeStatus::default()
        });
        let (internal, external) = node_addresses(&o);
        assert_eq!(internal, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(external, Some("203.0.113.1".parse().unwrap()));
    }
}
