//! What pods' labels decide: the endpoints of services with a selector, and the
//! addresses an access policy's pod selectors admit.
//!
//! Kubernetes semantics: a service's selector picks the ready pods of its namespace
//! whose labels include it; a service without a selector keeps the endpoints written
//! by hand. Each node's agent publishes the selected pods on its own node (under its
//! lease), so an endpoint leaves with its node. Access is the other way round: a
//! policy's selector admits the VPC's pods in any namespace and on any node, and the
//! client's node and the backend's node resolve it from the same snapshot, so both
//! admit exactly the same pods.
//!
//! A dual-stack pod has an address of each family. A service is of its service
//! CIDR's family, so its endpoints are its pods' addresses of that family; a policy
//! admits a pod by both its addresses, so neither family lets a pod past it that the
//! other would stop, nor stops one the other admits.

use std::net::IpAddr;

use wiremesh_model::NodeName;

use crate::snapshot::VpcState;
use crate::{Endpoint, IpFamily, Label, LabelSelector};

/// The endpoints `node`'s agent owns in this VPC: for every service with a selector,
/// each pod on `node` in the service's namespace whose labels match it, by its
/// address of the service CIDR's family (a pod without one is no endpoint). Sorted
/// by service, then address.
pub fn selected_endpoints(state: &VpcState, node: &NodeName) -> Vec<Endpoint> {
    let family = IpFamily::of_net(&state.vpc.service_cidr);
    let mut endpoints: Vec<Endpoint> = state
        .services
        .values()
        .map(|s| &s.service)
        .filter(|s| !s.selector.0.is_empty())
        .flat_map(|s| {
            state
                .pods
                .values()
                .filter(move |p| {
                    p.node == *node && p.namespace == s.namespace && s.selector.matches(&p.labels)
                })
                .filter_map(move |p| Some((p, p.address_of(family)?)))
                .map(move |(p, address)| Endpoint {
                    vpc: s.vpc.clone(),
                    namespace: s.namespace.clone(),
                    service: s.name.clone(),
                    address,
                    node: p.node.clone(),
                    // A headless service's per-pod name, when the pod's name can be one.
                    hostname: Label::parse("hostname", p.name.as_str()).ok(),
                    ready: true,
                    serving: true,
                    terminating: false,
                })
        })
        .collect();
    endpoints.sort_by(|a, b| {
        (&a.namespace, &a.service, a.address).cmp(&(&b.namespace, &b.service, b.address))
    });
    endpoints
}

/// The addresses (of both families) of the VPC's pods (any node, any namespace)
/// whose labels match `selector`, sorted: what an access policy's `allowed_pods`
/// entry admits.
pub fn matching_addresses(state: &VpcState, selector: &LabelSelector) -> Vec<IpAddr> {
    let mut addresses: Vec<IpAddr> = state
        .pods
        .values()
        .filter(|p| selector.matches(&p.labels))
        .flat_map(|p| p.addresses())
        .collect();
    addresses.sort();
    addresses
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::{member, nodes, pod, prefix, vpc};
    use crate::snapshot::{Mesh, Records};
    use crate::{Service, ServiceRecord, VpcSnapshot};
    use proptest::prelude::*;

    fn service(name: &str, ns: &str, selector: serde_json::Value) -> Service {
        serde_json::from_value::<ServiceRecord>(serde_json::json!({
            "vpc": "blue", "namespace": ns, "name": name, "cluster_ip": "None",
            "ports": [{"protocol": "TCP", "port": 80}], "selector": selector,
        }))
        .unwrap()
        .try_into()
        .unwrap()
    }

    fn state(services: Vec<Service>, pods: Vec<crate::Pod>) -> VpcState {
        let records = Records {
            vpcs: vec![vpc("blue", 7, "10.10.0.0/16", "10.96.0.0/24")],
            members: vec![
                member("blue", "n1", "10.10.1.0/24"),
                member("blue", "n2", "10.10.2.0/24"),
            ],
            services,
            pods,
            ..Records::default()
        };
        built(records)
    }

    fn built(records: Records) -> VpcState {
        let (mut snap, bads) = VpcSnapshot::build(
            records,
            Mesh {
                prefix: prefix(),
                nodes: &nodes(),
            },
        );
        assert!(bads.is_empty(), "{bads:?}");
        snap.vpcs.remove("blue").unwrap()
    }

    /// VPC `blue` with pod CIDRs 10.10.0.0/16 and fd10::/56 (n1 has block 1 of
    /// each, n2 block 2), services from `service_cidr`.
    fn dual_records(service_cidr: &str, pods: Vec<crate::Pod>) -> Records {
        let member = |node: &str, i: u8| -> crate::VpcMember {
            crate::VpcMemberRecord {
                vpc: "blue".into(),
                node: node.into(),
                pod_cidrs: vec![format!("10.10.{i}.0/24"), format!("fd10:0:0:{i}::/64")],
            }
            .try_into()
            .unwrap()
        };
        let mut blue = vpc("blue", 7, "10.10.0.0/16", service_cidr);
        blue.pod_cidrs.push("fd10::/56".parse().unwrap());
        Records {
            vpcs: vec![blue],
            members: vec![member("n1", 1), member("n2", 2)],
            pods,
            ..Records::default()
        }
    }

    /// A pod with addresses `10.10.<node>.<host>` and `fd10:0:0:<node>::<host>`.
    fn dual_pod(name: &str, node: u8, host: u8, labels: &[(&str, &str)]) -> crate::Pod {
        let mut p = pod(
            "blue",
            name,
            &format!("10.10.{node}.{host}"),
            &format!("n{node}"),
            labels,
        );
        p.address_v6 = Some(format!("fd10:0:0:{node}::{host:x}").parse().unwrap());
        p
    }

    fn n(name: &str) -> NodeName {
        name.parse().unwrap()
    }

    #[test]
    fn a_selector_picks_matching_pods_of_its_namespace_on_this_node() {
        let s = state(
            vec![
                service("www", "web", serde_json::json!({"app": "web"})),
                service("manual", "web", serde_json::json!({})),
                service("other", "ops", serde_json::json!({"app": "web"})),
            ],
            vec![
                pod(
                    "blue",
                    "web-0",
                    "10.10.1.5",
                    "n1",
                    &[("app", "web"), ("v", "1")],
                ),
                pod("blue", "7f3a", "10.10.1.6", "n1", &[("app", "web")]),
                pod("blue", "db-0", "10.10.1.7", "n1", &[("app", "db")]),
                pod("blue", "web-1", "10.10.2.5", "n2", &[("app", "web")]),
            ],
        );
        let got: Vec<(String, String, Option<String>)> = selected_endpoints(&s, &n("n1"))
            .iter()
            .map(|e| {
                (
                    e.service.to_string(),
                    e.address.to_string(),
                    e.hostname.as_ref().map(ToString::to_string),
                )
            })
            .collect();
        // The pods are in `web`: `ops/other` selects none; `manual` has no selector.
        assert_eq!(
            got,
            [
                ("www".into(), "10.10.1.5".into(), Some("web-0".into())),
                ("www".into(), "10.10.1.6".into(), None),
            ]
        );
        let e = &selected_endpoints(&s, &n("n2"))[0];
        assert!(e.ready && e.serving && !e.terminating);
        assert_eq!(e.node, n("n2"));
    }

    #[test]
    fn access_selectors_match_pods_on_every_node() {
        let s = state(
            Vec::new(),
            vec![
                pod("blue", "api-0", "10.10.2.9", "n2", &[("role", "api")]),
                pod(
                    "blue",
                    "api-1",
                    "10.10.1.9",
                    "n1",
                    &[("role", "api"), ("x", "")],
                ),
                pod("blue", "web-0", "10.10.1.5", "n1", &[("role", "web")]),
            ],
        );
        let sel = |k: &str, v: &str| LabelSelector([(k.to_owned(), v.to_owned())].into());
        let addrs: Vec<String> = matching_addresses(&s, &sel("role", "api"))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(addrs, ["10.10.1.9", "10.10.2.9"]);
        assert!(matching_addresses(&s, &sel("role", "db")).is_empty());
    }

    /// A service's endpoints are its pods' addresses of the service CIDR's family;
    /// an access selector admits a dual-stack pod by both of its addresses.
    #[test]
    fn dual_stack_pods_serve_in_the_services_family_and_are_admitted_in_both() {
        let pods = vec![
            dual_pod("web-0", 1, 5, &[("app", "web")]),
            dual_pod("api-0", 2, 9, &[("app", "api")]),
        ];
        for (service_cidr, cluster_ip, want) in [
            ("10.96.0.0/24", "10.96.0.20", "10.10.1.5"),
            ("fd96::/112", "fd96::20", "fd10:0:0:1::5"),
            ("fd96::/112", "None", "fd10:0:0:1::5"),
        ] {
            let mut records = dual_records(service_cidr, pods.clone());
            let mut www = service("www", "web", serde_json::json!({"app": "web"}));
            www.cluster_ip = cluster_ip.parse().ok();
            records.services.push(www);
            let s = built(records);
            let got: Vec<String> = selected_endpoints(&s, &n("n1"))
                .iter()
                .map(|e| e.address.to_string())
                .collect();
            assert_eq!(got, [want], "service CIDR {service_cidr}");
            let sel = LabelSelector([("app".to_owned(), "api".to_owned())].into());
            let admitted: Vec<String> = matching_addresses(&s, &sel)
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(admitted, ["10.10.2.9", "fd10:0:0:2::9"]);
        }
    }

    /// A pod of another family than the service's is no endpoint of it.
    #[test]
    fn an_ipv4_only_pod_is_no_endpoint_of_an_ipv6_service() {
        let mut records = dual_records(
            "fd96::/112",
            vec![pod("blue", "web-0", "10.10.1.5", "n1", &[("app", "web")])],
        );
        records
            .services
            .push(service("www", "web", serde_json::json!({"app": "web"})));
        assert!(selected_endpoints(&built(records), &n("n1")).is_empty());
    }

    /// An IPv6-only VPC's pod, as the CNI plugin writes it (its IPv6 address as
    /// `address`, no `address_v6`), is accepted, backs an IPv6 service and is
    /// admitted by an access selector.
    #[test]
    fn ipv6_only_pods_serve_and_are_admitted() {
        let local = |name: &str, node: &str, address: &str, app: &str| -> crate::Pod {
            crate::LocalPodRecord {
                namespace: "web".into(),
                name: name.into(),
                address: address.into(),
                address_v6: None,
                labels: [("app".to_owned(), app.to_owned())].into(),
            }
            .into_pod(&Label::parse("vpc", "blue").unwrap(), &n(node))
            .unwrap()
        };
        let mut www = service("www", "web", serde_json::json!({"app": "web"}));
        www.cluster_ip = "fd96::20".parse().ok();
        let records = Records {
            vpcs: vec![vpc("blue", 7, "fd10::/56", "fd96::/112")],
            members: vec![
                member("blue", "n1", "fd10:0:0:1::/64"),
                member("blue", "n2", "fd10:0:0:2::/64"),
            ],
            services: vec![www],
            pods: vec![
                local("web-0", "n1", "fd10:0:0:1::1", "web"),
                local("api-0", "n2", "fd10:0:0:2::1", "api"),
            ],
            ..Records::default()
        };
        let s = built(records);
        let got: Vec<String> = selected_endpoints(&s, &n("n1"))
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        assert_eq!(got, ["fd10:0:0:1::1"]);
        let sel = LabelSelector([("app".to_owned(), "api".to_owned())].into());
        assert_eq!(
            matching_addresses(&s, &sel),
            ["fd10:0:0:2::1".parse::<IpAddr>().unwrap()]
        );
    }

    /// A pod's IPv6 address is checked as its IPv4 one is: inside its node's block
    /// of the VPC, and nobody else's.
    #[test]
    fn a_pods_ipv6_address_outside_its_block_or_taken_is_set_aside() {
        for (bad, why) in [
            ("fd10:0:0:2::6", "n2's block"),
            ("fd11::6", "outside the VPC"),
            ("fd10:0:0:1::5", "web-0's"),
        ] {
            let mut other = dual_pod("db-0", 1, 6, &[]);
            other.address_v6 = Some(bad.parse().unwrap());
            let records = dual_records("10.96.0.0/24", vec![dual_pod("web-0", 1, 5, &[]), other]);
            let (_, bads) = VpcSnapshot::build(
                records,
                Mesh {
                    prefix: prefix(),
                    nodes: &nodes(),
                },
            );
            assert_eq!(bads.len(), 1, "{why}: {bads:?}");
            assert!(
                bads[0].error.field.ends_with("address_v6"),
                "{why}: {bads:?}"
            );
        }
    }

    proptest! {
        /// Every selected endpoint is a pod on this node, of the service's namespace,
        /// whose labels include the selector; and every such pod is selected.
        #[test]
        fn selection_is_exactly_the_matching_local_pods(
            pods in proptest::collection::vec((0u8..2, 0u8..2, 0u8..3, 0u8..3), 0..12),
        ) {
            let labels = ["a", "b", "c"];
            let pods: Vec<crate::Pod> = pods
                .iter()
                .enumerate()
                .map(|(i, (node, ns, app, tier))| {
                    let mut p = pod(
                        "blue",
                        &format!("p{i}"),
                        &format!("10.10.{}.{}", node + 1, i + 1),
                        &format!("n{}", node + 1),
                        &[("app", labels[usize::from(*app)]), ("tier", labels[usize::from(*tier)])],
                    );
                    p.namespace = Label::parse("namespace", ["web", "ops"][usize::from(*ns)]).unwrap();
                    p
                })
                .collect();
            let svc = service("s", "web", serde_json::json!({"app": "a", "tier": "b"}));
            let s = state(vec![svc], pods.clone());
            let got: Vec<IpAddr> = selected_endpoints(&s, &n("n1")).iter().map(|e| e.address).collect();
            let mut want: Vec<IpAddr> = pods
                .iter()
                .filter(|p| p.node == n("n1") && p.namespace.as_str() == "web"
                    && p.labels["app"] == "a" && p.labels["tier"] == "b")
                .map(|p| p.address)
                .collect();
            want.sort();
            prop_assert_eq!(got, want);
        }
    }
}
