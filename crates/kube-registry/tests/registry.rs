//! [`KubeRegistry`] against kube's mock service.
//!
//! No Kubernetes API server can run on this machine or in CI (no cluster, no images
//! to pull), so these tests stand in for one: `tower_test::mock::pair` gives the
//! kube `Client` a service whose requests the test receives, checks (method, path,
//! content type, body) and answers with canned API objects. What they prove is the
//! HTTP conversation and the mapping; a real API server's admission, RBAC and
//! server-side apply are not exercised here.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{Method, Request, Response};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use wiremesh_kube::node::{
    annotation_field, node_patch, LOCATION, PERSISTENT_KEEPALIVE, PUBLIC_KEY,
};
use wiremesh_kube::{lease, peer, BadObject, KubeError, KubeRegistry};
use wiremesh_model::{ClusterSettings, ExternalPeer, Node, NodeName};

const KEY_A: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
const KEY_B: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
const KEY_D: &str = "gN65BkIKy1eCE9pP1wdc8ROUtkHLF2PfAqYdO1NKxZQ=";
const KEY_P: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";
const NOW: u64 = 1_700_000_000;

/// One request the client sent.
#[derive(Debug)]
struct Sent {
    method: Method,
    /// Path and query, e.g. `/api/v1/nodes/a1?`.
    uri: String,
    content_type: String,
    body: Value,
}

/// Answers every request with `answer(method, path)` (status and JSON body) until
/// the client is dropped; returns what was sent, in order.
fn serve(
    answer: impl Fn(&Method, &str) -> (u16, Value) + Send + 'static,
) -> (Client, tokio::task::JoinHandle<Vec<Sent>>) {
    serve_text(move |method, path, _query| {
        let (status, body) = answer(method, path);
        Some((status, serde_json::to_string(&body).unwrap()))
    })
}

/// [`serve`] with the query string too, any response text, and `None` to leave a
/// request unanswered (a watch that stays open and quiet).
fn serve_text(
    answer: impl Fn(&Method, &str, &str) -> Option<(u16, String)> + Send + 'static,
) -> (Client, tokio::task::JoinHandle<Vec<Sent>>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        let mut sent = Vec::new();
        let mut open = Vec::new();
        while let Some((request, reply)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.expect("request body");
            let body = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).expect("request body is JSON")
            };
            let query = parts.uri.query().unwrap_or("").to_owned();
            let answer = answer(&parts.method, parts.uri.path(), &query);
            sent.push(Sent {
                uri: parts.uri.to_string(),
                method: parts.method,
                content_type: parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default(),
                body,
            });
            let Some((status, text)) = answer else {
                open.push(reply);
                continue;
            };
            let response = Response::builder()
                .status(status)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Body::from(text.into_bytes()))
                .unwrap();
            reply.send_response(response);
        }
        sent
    });
    (Client::new(service, "wiremesh"), server)
}

fn list(kind: &str, api_version: &str, items: Vec<Value>) -> Value {
    json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"resourceVersion": "7"},
        "items": items,
    })
}

fn node_object(name: &str, pod_cidr: &str, annotations: &[(&str, &str)]) -> Value {
    let mut object = serde_json::to_value(core::Node {
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
            pod_cidr: Some(pod_cidr.into()),
            ..core::NodeSpec::default()
        }),
        status: None,
    })
    .unwrap();
    object["apiVersion"] = "v1".into();
    object["kind"] = "Node".into();
    object
}

fn lease_object(node: &str, renewed: u64) -> Value {
    let name: NodeName = node.parse().unwrap();
    let mut object =
        serde_json::to_value(lease::lease_for(&name, renewed, Duration::from_secs(15))).unwrap();
    object["apiVersion"] = "coordination.k8s.io/v1".into();
    object["kind"] = "Lease".into();
    object
}

fn peer_object(peer: &ExternalPeer) -> Value {
    serde_json::to_value(peer::peer_to_kube(peer)).unwrap()
}

fn not_found() -> (u16, Value) {
    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": "not found", "reason": "NotFound", "code": 404});
    (404, status)
}

/// Nodes: a1 fine and live; b1 with a malformed keepalive; c1 with no agent; d1 fine
/// but its Lease expired. Peers: one fine, one with a bad allowed IP.
#[tokio::test]
async fn list_maps_objects_and_names_the_bad_annotation() {
    let laptop = ExternalPeer {
        name: "laptop".parse().unwrap(),
        public_key: KEY_P.parse().unwrap(),
        allowed_ips: vec!["10.99.0.1/32".parse().unwrap()],
        endpoint: None,
        persistent_keepalive: Some(25),
    };
    let mut broken = peer_object(&ExternalPeer {
        name: "phone".parse().unwrap(),
        ..laptop.clone()
    });
    broken["spec"]["allowedIPs"] = json!(["10.99.0.2"]);
    let peers = list(
        "PeerList",
        "wiremesh.io/v1alpha1",
        vec![peer_object(&laptop), broken],
    );
    let (client, server) = serve(move |method, path| {
        assert_eq!(method, Method::GET);
        match path {
            "/api/v1/nodes" => (
                200,
                list(
                    "NodeList",
                    "v1",
                    vec![
                        node_object(
                            "a1",
                            "10.42.1.0/24",
                            &[(PUBLIC_KEY, KEY_A), (LOCATION, "cloud-a")],
                        ),
                        node_object(
                            "b1",
                            "10.42.2.0/24",
                            &[(PUBLIC_KEY, KEY_B), (PERSISTENT_KEEPALIVE, "often")],
                        ),
                        node_object("c1", "10.42.3.0/24", &[]),
                        node_object("d1", "10.42.4.0/24", &[(PUBLIC_KEY, KEY_D)]),
                    ],
                ),
            ),
            "/apis/wiremesh.io/v1alpha1/peers" => (200, peers.clone()),
            "/apis/coordination.k8s.io/v1/namespaces/wiremesh/leases" => (
                200,
                list(
                    "LeaseList",
                    "coordination.k8s.io/v1",
                    vec![
                        lease_object("a1", NOW - 3),
                        lease_object("b1", NOW - 3),
                        lease_object("d1", NOW - 60),
                    ],
                ),
            ),
            other => panic!("unexpected request for {other}"),
        }
    });
    let registry = KubeRegistry::new(client, "wiremesh");
    let listing = registry
        .list(&ClusterSettings::default(), NOW)
        .await
        .unwrap();
    drop(registry);
    assert_eq!(server.await.unwrap().len(), 3, "one list per kind");

    let names: Vec<&str> = listing.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["a1"]);
    let a1 = &listing.nodes[0];
    assert_eq!(a1.public_key.to_string(), KEY_A);
    assert_eq!(a1.location.as_str(), "cloud-a");
    assert_eq!(a1.pod_cidr.to_string(), "10.42.1.0/24");
    assert_eq!(a1.mesh_ip.to_string(), "100.64.0.2");
    assert_eq!(a1.last_seen, NOW - 3);
    assert_eq!(listing.peers, [laptop]);
    assert_eq!(listing.stale, ["d1".parse::<NodeName>().unwrap()]);
    assert_eq!(listing.without_agent, ["c1"]);
    let bad: Vec<(&str, &str)> = listing
        .bad
        .iter()
        .map(|b: &BadObject| (b.object.as_str(), b.error.field.as_str()))
        .collect();
    let keepalive = annotation_field(PERSISTENT_KEEPALIVE);
    assert_eq!(
        bad,
        [
            ("node/b1", keepalive.as_str()),
            ("peer/phone", "spec.allowedIPs")
        ]
    );
    assert_eq!(
        listing.bad[0].to_string(),
        "node/b1: invalid `metadata.annotations[wiremesh.io/persistent-keepalive]`: \
         \"often\" is not a number of seconds from 1 to 65535"
    );
}

#[tokio::test]
async fn publish_sends_one_merge_patch_of_the_annotations() {
    let node = Node {
        name: "a1".parse().unwrap(),
        location: "cloud-a".parse().unwrap(),
        public_key: KEY_A.parse().unwrap(),
        public_endpoint: Some("203.0.113.1:51820".parse().unwrap()),
        private_endpoint: None,
        pod_cidr: "10.42.1.0/24".parse().unwrap(),
        pod_cidr_v6: None,
        mesh_ip: "100.64.0.2".parse().unwrap(),
        persistent_keepalive: None,
        leader_preference: 3,
        observed_endpoints: BTreeMap::from([(
            "b1".parse().unwrap(),
            "198.51.100.7:40000".parse().unwrap(),
        )]),
        suspected_leaders: Default::default(),
        unreachable_direct: Default::default(),
        relay_ports: Default::default(),
        last_seen: NOW,
    };
    let (client, server) = serve(|_, _| (200, node_object("a1", "10.42.1.0/24", &[])));
    KubeRegistry::new(client, "wiremesh")
        .publish(&node)
        .await
        .unwrap();
    let sent = server.await.unwrap();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].method, Method::PATCH);
    assert_eq!(sent[0].uri, "/api/v1/nodes/a1?");
    assert_eq!(sent[0].content_type, "application/merge-patch+json");
    let expected = json!({"metadata": {"annotations": {
        "wiremesh.io/public-key": KEY_A,
        "wiremesh.io/location": "cloud-a",
        "wiremesh.io/public-endpoint": "203.0.113.1:51820",
        "wiremesh.io/private-endpoint": null,
        "wiremesh.io/leader-preference": "3",
        "wiremesh.io/persistent-keepalive": null,
        "wiremesh.io/observed-endpoints": "{\"b1\":\"198.51.100.7:40000\"}",
        "wiremesh.io/suspected-leaders": null,
        "wiremesh.io/unreachable-direct": null,
        "wiremesh.io/relay-ports": null,
    }}});
    assert_eq!(sent[0].body, expected);
    assert_eq!(sent[0].body, node_patch(&node));
}

#[tokio::test]
async fn heartbeat_applies_the_lease_server_side() {
    let (client, server) = serve(|_, _| (200, lease_object("a1", NOW)));
    let a1: NodeName = "a1".parse().unwrap();
    KubeRegistry::new(client, "wiremesh")
        .heartbeat(&a1, NOW, Duration::from_secs(15))
        .await
        .unwrap();
    let sent = server.await.unwrap();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].method, Method::PATCH);
    assert_eq!(
        sent[0].uri,
        "/apis/coordination.k8s.io/v1/namespaces/wiremesh/leases/a1?&force=true&fieldManager=wiremesh"
    );
    assert_eq!(sent[0].content_type, "application/apply-patch+yaml");
    assert_eq!(sent[0].body["spec"]["holderIdentity"], "a1");
    assert_eq!(sent[0].body["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(
        sent[0].body["spec"]["renewTime"],
        "2023-11-14T22:13:20.000000Z"
    );
    let lease: Lease = serde_json::from_value(sent[0].body.clone()).unwrap();
    assert!(lease::is_live(&lease, NOW + 14));
}

#[tokio::test]
async fn leave_deletes_the_lease_and_removes_the_annotations() {
    // The Lease is already gone: a 404 is fine.
    let (client, server) = serve(|method, _| match *method {
        Method::DELETE => not_found(),
        _ => (200, node_object("a1", "10.42.1.0/24", &[])),
    });
    let a1: NodeName = "a1".parse().unwrap();
    KubeRegistry::new(client, "wiremesh")
        .leave(&a1)
        .await
        .unwrap();
    let sent = server.await.unwrap();
    let calls: Vec<(Method, &str)> = sent
        .iter()
        .map(|s| (s.method.clone(), s.uri.as_str()))
        .collect();
    assert_eq!(
        calls,
        [
            (
                Method::DELETE,
                "/apis/coordination.k8s.io/v1/namespaces/wiremesh/leases/a1?"
            ),
            (Method::PATCH, "/api/v1/nodes/a1?"),
        ]
    );
    let annotations = sent[1].body["metadata"]["annotations"].as_object().unwrap();
    assert_eq!(annotations.len(), 5, "the administrator's annotations stay");
    assert!(annotations.values().all(Value::is_null));
}

#[tokio::test]
async fn settings_come_from_the_config_map() {
    let json = String::from_utf8(ClusterSettings::default().to_json()).unwrap();
    let (client, server) = serve(move |_, path| {
        assert_eq!(
            path,
            "/api/v1/namespaces/wiremesh/configmaps/wiremesh-settings"
        );
        let map = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "wiremesh-settings", "namespace": "wiremesh"},
            "data": {"settings.json": json}});
        (200, map)
    });
    let registry = KubeRegistry::new(client, "wiremesh");
    assert_eq!(
        registry.settings().await.unwrap(),
        ClusterSettings::default()
    );
    drop(registry);
    server.await.unwrap();

    let (client, server) = serve(|_, _| {
        let map = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "wiremesh-settings", "namespace": "wiremesh"},
            "data": {"settings.json": "{\"cluster_cidr\": \"10.42.0.0/16\"}"}});
        (200, map)
    });
    let registry = KubeRegistry::new(client, "wiremesh");
    let err = registry.settings().await.unwrap_err();
    assert!(matches!(err, KubeError::Settings { .. }), "{err}");
    drop(registry);
    server.await.unwrap();
}

/// The watches list, then watch; a kubelet status update is not a change, a new
/// location is, and so is a new Peer.
#[tokio::test]
async fn changes_report_what_the_mesh_reads_and_nothing_else() {
    use futures::StreamExt;
    use wiremesh_kube::Change;

    let a1 = [(PUBLIC_KEY, KEY_A), (LOCATION, "cloud-a")];
    let mut status_only = node_object("a1", "10.42.1.0/24", &a1);
    status_only["status"] = json!({"conditions": [{"type": "Ready", "status": "True"}]});
    let moved = node_object(
        "a1",
        "10.42.1.0/24",
        &[(PUBLIC_KEY, KEY_A), (LOCATION, "cloud-b")],
    );
    let laptop = peer_object(&ExternalPeer {
        name: "laptop".parse().unwrap(),
        public_key: KEY_P.parse().unwrap(),
        allowed_ips: vec!["10.99.0.1/32".parse().unwrap()],
        endpoint: None,
        persistent_keepalive: None,
    });
    let event = |kind: &str, object: &Value| {
        let mut object = object.clone();
        object["metadata"]["resourceVersion"] = "8".into();
        json!({"type": kind, "object": object}).to_string()
    };
    let node_events = [event("MODIFIED", &status_only), event("MODIFIED", &moved)].join("\n");
    let peer_events = event("ADDED", &laptop);
    let watched = std::sync::Mutex::new(std::collections::HashSet::new());
    let (client, server) = serve_text(move |method, path, query| {
        assert_eq!(method, Method::GET);
        if !query.contains("watch=true") {
            let (kind, version) = empty_list_kind(path);
            let items = match path {
                "/api/v1/nodes" => vec![node_object("a1", "10.42.1.0/24", &a1)],
                _ => vec![],
            };
            return Some((200, list(kind, version, items).to_string()));
        }
        // Each watch answers once, then stays open and quiet.
        if !watched.lock().unwrap().insert(path.to_owned()) {
            return None;
        }
        match path {
            "/api/v1/nodes" => Some((200, node_events.clone())),
            "/apis/wiremesh.io/v1alpha1/peers" => Some((200, peer_events.clone())),
            _ => None,
        }
    });
    let mut changes = KubeRegistry::new(client, "wiremesh").changes();
    // Bounded waits: eight changes are expected (a relisting per watch), then quiet.
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while seen.len() < 8 {
        match tokio::time::timeout_at(deadline, changes.next()).await {
            Ok(Some(change)) => seen.push(change.unwrap()),
            _ => panic!("only {seen:?} within 15 s"),
        }
    }
    let quiet = Duration::from_millis(300);
    if let Ok(Some(extra)) = tokio::time::timeout(quiet, changes.next()).await {
        seen.push(extra.unwrap());
    }
    drop(changes);
    server.abort();
    let count = |c: &Change| seen.iter().filter(|s| *s == c).count();
    assert_eq!(count(&Change::Relisted), 6, "{seen:?}");
    assert_eq!(count(&Change::Node("a1".into())), 1, "{seen:?}");
    assert_eq!(count(&Change::Peer("laptop".into())), 1, "{seen:?}");
    assert_eq!(seen.len(), 8, "{seen:?}");
}

/// The kind and version of a list at `path`, as the watches ask for it.
fn empty_list_kind(path: &str) -> (&'static str, &'static str) {
    match path {
        "/api/v1/nodes" => ("NodeList", "v1"),
        "/api/v1/services" => ("ServiceList", "v1"),
        "/apis/wiremesh.io/v1alpha1/peers" => ("PeerList", "wiremesh.io/v1alpha1"),
        "/apis/wiremesh.io/v1alpha1/vpcs" => ("VpcList", "wiremesh.io/v1alpha1"),
        "/apis/discovery.k8s.io/v1/endpointslices" => ("EndpointSliceList", "discovery.k8s.io/v1"),
        _ => ("LeaseList", "coordination.k8s.io/v1"),
    }
}

/// The agent's loop is a plain thread: the blocking face runs the client on a
/// runtime of its own and hands watch changes over a std channel.
#[test]
fn the_blocking_face_works_from_a_plain_thread() {
    use wiremesh_kube::{BlockingKubeRegistry, Change};

    let a1: NodeName = "a1".parse().unwrap();
    let answer = |method: &Method, path: &str, query: &str| {
        let leases = "/apis/coordination.k8s.io/v1/namespaces/wiremesh/leases";
        if query.contains("watch=true") {
            return None;
        }
        let body = match (method.as_str(), path) {
            ("PATCH", p) if p == format!("{leases}/a1") => lease_object("a1", NOW),
            ("GET", "/api/v1/nodes") => list(
                "NodeList",
                "v1",
                vec![node_object("a1", "10.42.1.0/24", &[(PUBLIC_KEY, KEY_A)])],
            ),
            ("GET", p) if p == leases => list(
                "LeaseList",
                "coordination.k8s.io/v1",
                vec![lease_object("a1", NOW)],
            ),
            ("GET", p)
                if p.ends_with("/peers")
                    || p.ends_with("/vpcs")
                    || p.ends_with("/services")
                    || p.ends_with("/endpointslices") =>
            {
                let (kind, version) = empty_list_kind(p);
                list(kind, version, vec![])
            }
            other => panic!("unexpected {other:?}"),
        };
        Some((200, body.to_string()))
    };
    let registry = BlockingKubeRegistry::with_client("wiremesh", || serve_text(answer).0).unwrap();
    registry
        .heartbeat(&a1, NOW, Duration::from_secs(15))
        .unwrap();
    let listing = registry.list(&ClusterSettings::default(), NOW + 1).unwrap();
    assert_eq!(listing.nodes.len(), 1, "{listing:?}");
    assert_eq!(listing.nodes[0].name, a1);
    let changes = registry.changes();
    assert_eq!(
        changes.recv_timeout(Duration::from_secs(15)).unwrap(),
        Some(Change::Relisted)
    );
}
