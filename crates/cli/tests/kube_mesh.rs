//! The mesh end to end with `--registry kubernetes`: real `wiremesh agent` processes
//! in their nodes' namespaces, against the agent crate's FAKE Kubernetes API server
//! (in memory, served over HTTP on the bed's bridge, found through a kubeconfig).
//! No real API server runs here: this proves the agent and the CLI work through
//! kube's client against an API server that behaves like the fake, not against
//! Kubernetes itself. Prints `skipped: ...` and passes without root.

mod support;

use std::time::Duration;

use support::{Mesh, KUBE_NAMESPACE};
use wiremesh_testkit::{require_root, wait_until};

/// Two agents (one with a dotted name, as cloud providers name nodes) take their
/// pod CIDRs from their Node objects, find each other through annotations and
/// Leases, and their pods reach each other; `wiremesh status` on Kubernetes shows
/// both and their tunnels, from the reports on the Leases.
#[test]
fn agents_on_kubernetes_reach_each_other() {
    if !require_root() {
        return;
    }
    let mut mesh = Mesh::with_kubernetes("full");
    let n1 = mesh.add_node("n1", "site", true);
    let n2 = mesh.add_node("n2.example", "site", true);
    mesh.start(n1);
    mesh.start(n2);
    for (from, to) in [(n1, n2), (n2, n1)] {
        assert!(
            mesh.eventually_pings(from, to, Duration::from_secs(20)),
            "{} cannot reach {}:\n{}\n{}",
            mesh.nodes[from].name,
            mesh.nodes[to].name,
            mesh.log(from),
            mesh.log(to)
        );
    }
    assert_eq!(
        mesh.pod_ip(n2).octets()[..3],
        [10, 42, 2],
        "n2's Node podCIDR"
    );

    let kube = mesh.kube.as_ref().expect("kubernetes");
    let leases = format!("/apis/coordination.k8s.io/v1/namespaces/{KUBE_NAMESPACE}/leases");
    let reported = wait_until(Duration::from_secs(20), || {
        kube.server.get(&leases, "n2.example").is_some_and(|lease| {
            lease["metadata"]["annotations"]["wiremesh.io/status"]
                .as_str()
                .is_some_and(|s| s.contains("\"n1\""))
        })
    });
    assert!(
        reported,
        "no device report on n2's Lease:\n{}",
        mesh.log(n2)
    );
    let status = mesh.wiremesh_ok(&["status"]);
    assert!(status.contains("cluster: 2 nodes"), "{status}");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("n2.example") && l.contains("n1")),
        "no n2.example → n1 tunnel:\n{status}"
    );
}

/// `wiremesh vpc` and `service` write and read VPCs and services on Kubernetes
/// (a `Vpc` object, a labelled headless `Service`) as on the other registries.
#[test]
fn vpcs_and_services_from_the_cli_on_kubernetes() {
    if !require_root() {
        return;
    }
    let mesh = Mesh::with_kubernetes("full");
    mesh.wiremesh_ok(&[
        "vpc",
        "create",
        "blue",
        "--id",
        "7",
        "--pod-cidr",
        "10.10.0.0/16",
    ]);
    assert!(mesh.wiremesh_ok(&["vpc", "list"]).contains("blue"));
    let created = mesh.wiremesh_ok(&["service", "create", "blue/web/db", "--port", "http:80/tcp"]);
    let vip = created.trim().rsplit(' ').next().expect("a VIP").to_owned();
    let kube = mesh.kube.as_ref().expect("kubernetes");
    let service = kube
        .server
        .get("/api/v1/namespaces/web/services", "db")
        .expect("a Service object");
    assert_eq!(service["metadata"]["labels"]["wiremesh.io/vpc"], "blue");
    assert_eq!(
        service["metadata"]["annotations"]["wiremesh.io/cluster-ip"],
        vip.as_str()
    );
    assert!(mesh.wiremesh_ok(&["service", "list"]).contains(&vip));
}
