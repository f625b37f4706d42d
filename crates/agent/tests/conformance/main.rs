//! The registry conformance suite ([`cases`], and [`vpc_cases`] for VPC records) against every backend the agent runs
//! on: the embedded store (a directory per case), a real etcd (Debian's etcd-server,
//! one member on a loopback address, started here; `skipped: ...` without it), and
//! Kubernetes, where no API server can run on this machine: there the registry talks
//! to [`fake_kube`], an in-memory FAKE API server, once behind kube's mock service and
//! once over HTTP on 127.0.0.1 through a kubeconfig. The Kubernetes results prove the
//! adapter against that fake, not against a real API server.

mod cases;
mod vpc_cases;
// Shared with the CLI's test bed (crates/cli/tests/support), which uses other parts.
#[allow(dead_code)]
mod fake_kube;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use ipnet::IpNet;
use serde_json::json;
use wiremesh_agent::{Cluster, KubeCluster, Registry};
use wiremesh_kube::node::{annotation_field, node_annotations, PUBLIC_KEY};
use wiremesh_kube::{lease, peer, vpc, BlockingKubeRegistry, SETTINGS_CONFIG_MAP, SETTINGS_KEY};
use wiremesh_model::{ClusterSettings, ExternalPeer, Node, NodeName};
use wiremesh_registry::Store;

use cases::Bed;
use vpc_cases::VpcBed;

/// A cluster in a key-value store, under a name of its own, settings written.
struct StoreBed {
    open_store: Box<dyn Fn() -> Arc<dyn Store> + Sync>,
    cluster: String,
}

impl StoreBed {
    fn new(open_store: impl Fn() -> Arc<dyn Store> + Sync + 'static) -> Self {
        static CLUSTERS: AtomicU32 = AtomicU32::new(0);
        let n = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let bed = StoreBed {
            open_store: Box::new(open_store),
            cluster: format!("conformance-{}-{n}", std::process::id()),
        };
        bed.cluster()
            .init(&ClusterSettings::default())
            .expect("write the settings");
        bed
    }

    fn cluster(&self) -> Cluster {
        Cluster::new((self.open_store)(), &self.cluster)
    }
}

impl Bed for StoreBed {
    fn open(&self) -> Box<dyn Registry> {
        Box::new(self.cluster())
    }

    fn allocates(&self) -> bool {
        true
    }

    /// Nothing to do: the store allocates when the node claims.
    fn add_machine(&self, _node: &NodeName, _pod_cidr: IpNet) {}

    fn write_malformed_node(&self, node: &NodeName, good: &Node) -> String {
        let cluster = self.cluster();
        let mut record: serde_json::Value = serde_json::from_slice(&good.to_json()).unwrap();
        record["public_key"] = "not-a-key".into();
        let key = format!("{}nodes/{node}", cluster.prefix());
        let store = &cluster.store;
        store
            .put(&key, record.to_string().as_bytes(), None)
            .unwrap();
        format!("node {node}.public_key")
    }

    fn write_malformed_peer(&self, peer: &ExternalPeer) -> String {
        let cluster = self.cluster();
        let mut record: serde_json::Value = serde_json::from_slice(&peer.to_json()).unwrap();
        record["allowed_ips"] = json!(["10.99.0.7"]);
        let key = format!("{}peers/{}", cluster.prefix(), peer.name);
        let store = &cluster.store;
        store
            .put(&key, record.to_string().as_bytes(), None)
            .unwrap();
        format!("peer {}.allowed_ips", peer.name)
    }
}

impl VpcBed for StoreBed {
    fn write_malformed_vpc(&self) -> (String, String) {
        let cluster = self.cluster();
        let mut record =
            serde_json::to_value(wiremesh_vpc::VpcRecord::from(&vpc_cases::vpc("red", 9))).unwrap();
        record["service_cidr"] = "10.10.1.0/24".into();
        let key = format!("{}vpcs/red/vpc", cluster.prefix());
        cluster
            .store
            .put(&key, record.to_string().as_bytes(), None)
            .unwrap();
        (key, "vpc red.service_cidr".into())
    }

    fn write_malformed_service(&self) -> (String, String) {
        let cluster = self.cluster();
        let record = json!({"vpc": "blue", "namespace": "web", "name": "bad",
            "cluster_ip": "10.96.0.30", "ports": [{"protocol": "TCP", "port": 0}]});
        let key = format!("{}vpcs/blue/services/web/bad", cluster.prefix());
        cluster
            .store
            .put(&key, record.to_string().as_bytes(), None)
            .unwrap();
        (key, "service blue/web/bad.ports[0].port".into())
    }
}

mod embedded {
    use super::*;
    use wiremesh_registry::EmbeddedStore;

    fn bed() -> StoreBed {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        StoreBed::new(move || {
            Arc::new(EmbeddedStore::open(dir.path().join("registry")).expect("open"))
        })
    }

    crate::conformance_tests!(bed());
    crate::vpc_conformance_tests!(bed());
}

#[path = "../../../registry/tests/etcd_cluster/mod.rs"]
#[allow(dead_code)]
mod etcd_cluster;

/// All cases in one test, on one etcd member (each case in a cluster of its own).
#[test]
fn conformance_on_etcd() {
    let Some(etcd) = etcd_cluster::EtcdCluster::start(1) else {
        return;
    };
    let etcd = Arc::new(etcd);
    for (name, case) in cases::CASES {
        eprintln!("conformance on etcd: {name}");
        let etcd = etcd.clone();
        case(&StoreBed::new(move || {
            Arc::new(etcd.connect()) as Arc<dyn Store>
        }));
    }
    for (name, case) in vpc_cases::CASES {
        eprintln!("conformance on etcd: {name}");
        let etcd = etcd.clone();
        case(&StoreBed::new(move || {
            Arc::new(etcd.connect()) as Arc<dyn Store>
        }));
    }
}

/// The fake API server, with the settings ConfigMap `deploy/` would apply.
struct KubeBed {
    server: fake_kube::FakeApiServer,
    transport: Transport,
}

/// A client of `server` through kube's mock service. Call it inside a tokio
/// runtime: the task that answers the client's requests is spawned there.
fn mock_client(server: &fake_kube::FakeApiServer) -> kube::Client {
    use http::{Request, Response};
    let (service, mut handle) =
        tower_test::mock::pair::<Request<kube::client::Body>, Response<fake_kube::ResponseBody>>();
    let server = server.clone();
    tokio::spawn(async move {
        while let Some((request, reply)) = handle.next_request().await {
            reply.send_response(server.respond(request).await);
        }
    });
    kube::Client::new(service, "wiremesh")
}

/// How clients reach the fake.
enum Transport {
    /// kube's mock service, in process.
    Mock,
    /// HTTP on 127.0.0.1, served from `_server`, found through a kubeconfig.
    Http {
        _server: tokio::runtime::Runtime,
        kubeconfig: Box<kube::config::Kubeconfig>,
    },
}

const NAMESPACE: &str = "wiremesh";

impl KubeBed {
    fn mock() -> Self {
        Self::new(|_| Transport::Mock)
    }

    fn http() -> Self {
        Self::new(|server| {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("a runtime");
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
            let yaml = server.serve_http(&runtime, listener, NAMESPACE);
            let kubeconfig =
                Box::new(kube::config::Kubeconfig::from_yaml(&yaml).expect("a kubeconfig"));
            Transport::Http {
                _server: runtime,
                kubeconfig,
            }
        })
    }

    fn new(transport: impl FnOnce(&fake_kube::FakeApiServer) -> Transport) -> Self {
        let server = fake_kube::FakeApiServer::new();
        let settings = String::from_utf8(ClusterSettings::default().to_json()).unwrap();
        server.put(
            &format!("/api/v1/namespaces/{NAMESPACE}/configmaps"),
            json!({"metadata": {"name": SETTINGS_CONFIG_MAP}, "data": {SETTINGS_KEY: settings}}),
        );
        KubeBed {
            transport: transport(&server),
            server,
        }
    }

    fn registry(&self) -> BlockingKubeRegistry {
        let client = || match &self.transport {
            Transport::Mock => mock_client(&self.server),
            Transport::Http { kubeconfig, .. } => {
                let config = futures::executor::block_on(kube::Config::from_custom_kubeconfig(
                    (**kubeconfig).clone(),
                    &Default::default(),
                ))
                .expect("a client configuration");
                kube::Client::try_from(config).expect("a client")
            }
        };
        BlockingKubeRegistry::with_client(NAMESPACE, client).expect("client")
    }
}

impl Bed for KubeBed {
    fn open(&self) -> Box<dyn Registry> {
        Box::new(KubeCluster::new(self.registry()))
    }

    fn allocates(&self) -> bool {
        false
    }

    /// The Node as the kubelet registers it and the controller manager assigns its CIDR.
    fn add_machine(&self, node: &NodeName, pod_cidr: IpNet) {
        self.server.put(
            "/api/v1/nodes",
            json!({"metadata": {"name": node.as_str()}, "spec": {"podCIDR": pod_cidr.to_string()}}),
        );
    }

    /// Annotations as an agent's, with a broken key, and a live Lease.
    fn write_malformed_node(&self, node: &NodeName, good: &Node) -> String {
        let mut annotations: serde_json::Map<String, serde_json::Value> = node_annotations(good)
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_owned(), v?.into())))
            .collect();
        annotations.insert(PUBLIC_KEY.into(), "not-a-key".into());
        self.server.put(
            "/api/v1/nodes",
            json!({"metadata": {"name": node.as_str(), "annotations": annotations},
                   "spec": {"podCIDR": good.pod_cidr.to_string()}}),
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let lease = lease::lease_for(node, now, std::time::Duration::from_secs(60));
        self.server.put(
            &format!("/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases"),
            serde_json::to_value(lease).unwrap(),
        );
        annotation_field(PUBLIC_KEY)
    }

    fn write_malformed_peer(&self, peer: &ExternalPeer) -> String {
        let mut object = serde_json::to_value(peer::peer_to_kube(peer)).unwrap();
        object["spec"]["allowedIPs"] = json!(["10.99.0.7"]);
        self.server.put("/apis/wiremesh.io/v1alpha1/peers", object);
        "spec.allowedIPs".into()
    }
}

impl VpcBed for KubeBed {
    fn write_malformed_vpc(&self) -> (String, String) {
        let mut object = serde_json::to_value(vpc::vpc_to_kube(&vpc_cases::vpc("red", 9))).unwrap();
        object["spec"]["serviceCIDR"] = "10.10.1.0/24".into();
        self.server.put("/apis/wiremesh.io/v1alpha1/vpcs", object);
        ("vpc/red".into(), "spec.serviceCIDR".into())
    }

    fn write_malformed_service(&self) -> (String, String) {
        let good: wiremesh_vpc::Service = serde_json::from_value::<wiremesh_vpc::ServiceRecord>(
            json!({"vpc": "blue", "namespace": "web", "name": "bad",
                   "cluster_ip": "10.96.0.30", "ports": [{"protocol": "TCP", "port": 80}]}),
        )
        .unwrap()
        .try_into()
        .unwrap();
        let mut object = serde_json::to_value(vpc::service_to_kube(&good)).unwrap();
        object["spec"]["ports"][0]["port"] = 0.into();
        self.server.put("/api/v1/namespaces/web/services", object);
        ("service/web/bad".into(), "spec.ports[0].port".into())
    }
}

mod kubernetes {
    use super::*;

    crate::conformance_tests!(KubeBed::mock());
    crate::vpc_conformance_tests!(KubeBed::mock());
}

/// The same fake over real HTTP: kube's own client stack (hyper, chunked watch
/// streams) and a kubeconfig, as the CLI connects outside a pod.
mod kubernetes_http {
    use super::*;

    crate::conformance_tests!(KubeBed::http());
    crate::vpc_conformance_tests!(KubeBed::http());
}
