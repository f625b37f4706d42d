//! [`BlockingKubeRegistry`]: [`KubeRegistry`] for a std-thread caller.
//!
//! The agent is a std-thread event loop and the other registries are blocking, so
//! this face runs the async client on a small private tokio runtime (one worker,
//! as the etcd backend does) and delivers watch changes on a std channel, which the
//! loop can `recv_timeout` beside its tick. Must not be called from inside a tokio
//! runtime: blocking there would panic.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::Client;
use tokio::runtime::Runtime;
use wiremesh_model::{ClusterSettings, ExternalPeer, Node, NodeName};
use wiremesh_vpc::{Endpoint, Label, Pod, PodName, Service, Vpc};

use crate::{Change, Claim, KubeError, KubeRegistry, Listing, VpcListing};

/// A [`KubeRegistry`] whose calls block. Cheap to clone; clones share the runtime.
#[derive(Clone, Debug)]
pub struct BlockingKubeRegistry {
    runtime: Arc<Runtime>,
    inner: KubeRegistry,
}

/// Changes from [`BlockingKubeRegistry::changes`]; dropping it stops the watches.
/// It keeps the runtime they run on, so it outlives the registry it came from.
#[derive(Debug)]
pub struct Changes {
    rx: mpsc::Receiver<Result<Change, KubeError>>,
    task: tokio::task::JoinHandle<()>,
    _runtime: Arc<Runtime>,
}

impl Changes {
    /// The next change, or `Ok(None)` if none came within `timeout`. An `Err` is a
    /// failed watch request; the watches go on (they retry with backoff).
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Change>, KubeError> {
        match self.rx.recv_timeout(timeout) {
            Ok(item) => item.map(Some),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => Ok(None),
        }
    }

    /// A change if one is waiting.
    pub fn try_recv(&self) -> Result<Option<Change>, KubeError> {
        match self.rx.try_recv() {
            Ok(item) => item.map(Some),
            Err(_) => Ok(None),
        }
    }
}

impl Drop for Changes {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn runtime() -> Result<Runtime, KubeError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("registry-kube")
        .enable_all()
        .build()
        .map_err(|e| KubeError::Connect(format!("cannot start the client runtime: {e}")))
}

impl BlockingKubeRegistry {
    /// [`KubeRegistry::connect`]: in a pod, its service account and namespace.
    pub fn connect(namespace: Option<&str>) -> Result<Self, KubeError> {
        let runtime = runtime()?;
        let inner = runtime.block_on(KubeRegistry::connect(namespace))?;
        Ok(BlockingKubeRegistry {
            runtime: Arc::new(runtime),
            inner,
        })
    }

    /// A registry on the client `make_client` builds inside the private runtime
    /// (kube's client spawns its worker there); for tests with a mock service.
    pub fn with_client(
        namespace: &str,
        make_client: impl FnOnce() -> Client,
    ) -> Result<Self, KubeError> {
        let runtime = runtime()?;
        let client = {
            let _entered = runtime.enter();
            make_client()
        };
        Ok(BlockingKubeRegistry {
            runtime: Arc::new(runtime),
            inner: KubeRegistry::new(client, namespace),
        })
    }

    /// The async registry, e.g. to spawn on [`Self::runtime`].
    pub fn inner(&self) -> &KubeRegistry {
        &self.inner
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    pub fn settings(&self) -> Result<ClusterSettings, KubeError> {
        self.runtime.block_on(self.inner.settings())
    }

    pub fn node_object(
        &self,
        name: &NodeName,
    ) -> Result<k8s_openapi::api::core::v1::Node, KubeError> {
        self.runtime.block_on(self.inner.node_object(name))
    }

    pub fn list(&self, settings: &ClusterSettings, now: u64) -> Result<Listing, KubeError> {
        self.runtime.block_on(self.inner.list(settings, now))
    }

    pub fn publish(&self, node: &Node) -> Result<(), KubeError> {
        self.runtime.block_on(self.inner.publish(node))
    }

    pub fn heartbeat(&self, name: &NodeName, now: u64, ttl: Duration) -> Result<(), KubeError> {
        self.runtime.block_on(self.inner.heartbeat(name, now, ttl))
    }

    pub fn leave(&self, name: &NodeName) -> Result<(), KubeError> {
        self.runtime.block_on(self.inner.leave(name))
    }

    pub fn report_status(&self, name: &NodeName, report: &str) -> Result<(), KubeError> {
        self.runtime
            .block_on(self.inner.report_status(name, report))
    }

    pub fn status_reports(&self, now: u64) -> Result<Vec<(String, String)>, KubeError> {
        self.runtime.block_on(self.inner.status_reports(now))
    }

    pub fn put_peer(&self, peer: &ExternalPeer) -> Result<(), KubeError> {
        self.runtime.block_on(self.inner.put_peer(peer))
    }

    pub fn delete_peer(&self, name: &str) -> Result<bool, KubeError> {
        self.runtime.block_on(self.inner.delete_peer(name))
    }

    pub fn vpc_records(&self, now: u64) -> Result<VpcListing, KubeError> {
        self.runtime.block_on(self.inner.vpc_records(now))
    }

    pub fn create_vpc(&self, vpc: &Vpc) -> Result<bool, KubeError> {
        self.runtime.block_on(self.inner.create_vpc(vpc))
    }

    pub fn delete_vpc(&self, name: &Label) -> Result<bool, KubeError> {
        self.runtime.block_on(self.inner.delete_vpc(name))
    }

    pub fn claim_vpc_member(&self, vpc: &Vpc, node: &NodeName) -> Result<Claim, KubeError> {
        self.runtime
            .block_on(self.inner.claim_vpc_member(vpc, node))
    }

    pub fn leave_vpc(&self, vpc: &Label, node: &NodeName) -> Result<(), KubeError> {
        self.runtime.block_on(self.inner.leave_vpc(vpc, node))
    }

    pub fn put_service(&self, service: &Service) -> Result<(), KubeError> {
        self.runtime.block_on(self.inner.put_service(service))
    }

    pub fn delete_service(
        &self,
        vpc: &Label,
        namespace: &Label,
        name: &Label,
    ) -> Result<bool, KubeError> {
        self.runtime
            .block_on(self.inner.delete_service(vpc, namespace, name))
    }

    pub fn put_endpoint(&self, endpoint: &Endpoint) -> Result<(), KubeError> {
        self.runtime.block_on(self.inner.put_endpoint(endpoint))
    }

    pub fn delete_endpoint(
        &self,
        vpc: &Label,
        namespace: &Label,
        service: &Label,
        address: std::net::IpAddr,
    ) -> Result<bool, KubeError> {
        self.runtime
            .block_on(self.inner.delete_endpoint(vpc, namespace, service, address))
    }

    pub fn publish_pod(&self, node: &NodeName, pod: &Pod) -> Result<(), KubeError> {
        self.runtime.block_on(self.inner.publish_pod(node, pod))
    }

    pub fn delete_pod(
        &self,
        vpc: &Label,
        namespace: &Label,
        name: &PodName,
    ) -> Result<bool, KubeError> {
        self.runtime
            .block_on(self.inner.delete_pod(vpc, namespace, name))
    }

    /// [`KubeRegistry::changes`] on a std channel.
    pub fn changes(&self) -> Changes {
        let (tx, rx) = mpsc::channel();
        let mut stream = self.inner.changes();
        let task = self.runtime.spawn(async move {
            while let Some(item) = stream.next().await {
                if tx.send(item).is_err() {
                    break;
                }
            }
        });
        Changes {
            rx,
            task,
            _runtime: self.runtime.clone(),
        }
    }
}
