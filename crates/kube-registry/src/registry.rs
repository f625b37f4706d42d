//! [`KubeRegistry`]: the cluster read from and written to a Kubernetes API server.
//!
//! The I/O shell around the pure mappings ([`crate::node`], [`crate::peer`],
//! [`crate::lease`]): it lists Nodes, Peers and Leases and hands back model types
//! with the objects it could not use set aside, sends this node's annotations as a
//! JSON merge patch, renews its Lease with server-side apply, and turns three
//! `kube::runtime::watcher` streams into "something that matters changed" signals.
//! Async, on kube's client: a blocking caller (the agent's std-thread loop) drives it
//! from a small runtime of its own, as the etcd backend does.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1 as core;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use wiremesh_model::{ClusterSettings, ExternalPeer, FieldError, Node, NodeName};

use crate::{lease, node, peer, Peer};

/// The ConfigMap, in wiremesh's namespace, that holds the cluster settings.
pub const SETTINGS_CONFIG_MAP: &str = "wiremesh-settings";
/// Its key: a `ClusterSettings` JSON record, as `wiremesh init` writes to other registries.
pub const SETTINGS_KEY: &str = "settings.json";
/// The field manager wiremesh's writes are recorded under (`kubectl get --show-managed-fields`).
pub const FIELD_MANAGER: &str = "wiremesh";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("kubernetes watch: {0}")]
    Watch(#[from] watcher::Error),
    #[error("cannot connect to the kubernetes API: {0}")]
    Connect(String),
    #[error("configmap {namespace}/{SETTINGS_CONFIG_MAP} has no key {SETTINGS_KEY:?}: apply deploy/ first")]
    NoSettings { namespace: String },
    #[error("configmap {namespace}/{SETTINGS_CONFIG_MAP}, key {SETTINGS_KEY}: {error}")]
    Settings {
        namespace: String,
        error: FieldError,
    },
}

impl KubeError {
    /// Whether retrying may help: the API server was unreachable, overloaded or failing.
    pub fn is_transient(&self) -> bool {
        match self {
            KubeError::Api(kube::Error::Api(status)) => status.code >= 500 || status.code == 429,
            KubeError::Api(kube::Error::HyperError(_) | kube::Error::Service(_)) => true,
            KubeError::Watch(_) => true,
            _ => false,
        }
    }
}

/// The annotation on a node's Lease that holds its agent's last device report
/// (JSON, opaque here): it lives and dies with the Lease, as `status/<name>` does
/// under an etcd lease, and keeps the Node object from being rewritten every minute.
pub const STATUS_ANNOTATION: &str = "wiremesh.io/status";

/// An object the API server holds but wiremesh could not use, e.g. `node/a1` with
/// the annotation that is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadObject {
    /// `node/<name>` or `peer/<name>`, as `kubectl get` names it.
    pub object: String,
    pub error: FieldError,
}

impl std::fmt::Display for BadObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.error)
    }
}

/// The mesh as the API server holds it right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Nodes with an agent whose Lease is live; sorted by name.
    pub nodes: Vec<Node>,
    /// Sorted by name.
    pub peers: Vec<ExternalPeer>,
    /// Objects left out, with the field that is wrong.
    pub bad: Vec<BadObject>,
    /// Annotated nodes whose Lease is missing or expired: their agent is gone.
    pub stale: Vec<NodeName>,
    /// Nodes with no `wiremesh.io/public-key` yet: no agent has joined from them.
    pub without_agent: Vec<String>,
}

/// How many watches [`KubeRegistry::changes`] runs (Nodes, Peers, Leases): as many
/// [`Change::Relisted`] say they are all established.
pub const WATCHED_KINDS: usize = 3;

/// What a watch saw change; each means "list again" to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A node's wiremesh annotations, pod CIDR or region label changed, or it was deleted.
    Node(String),
    Peer(String),
    /// A node's Lease appeared, changed holder or duration, or was deleted. Renewals
    /// are not changes; an expiry is noticed by listing again (the agent's resync).
    Lease(String),
    /// A watch (re)started from a fresh listing: anything may have changed.
    Relisted,
}

/// A Kubernetes cluster as wiremesh's registry. Cheap to clone.
#[derive(Clone)]
pub struct KubeRegistry {
    client: Client,
    namespace: String,
}

impl std::fmt::Debug for KubeRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeRegistry")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl KubeRegistry {
    /// Uses `client`; Leases and settings live in `namespace`.
    pub fn new(client: Client, namespace: impl Into<String>) -> Self {
        KubeRegistry {
            client,
            namespace: namespace.into(),
        }
    }

    /// Connects as a pod does (its service account) or, outside a cluster, as
    /// `kubectl` does (`KUBECONFIG`, `~/.kube/config`). Without `namespace`, the
    /// pod's own namespace (or the kubeconfig context's).
    pub async fn connect(namespace: Option<&str>) -> Result<Self, KubeError> {
        let client = Client::try_default()
            .await
            .map_err(|e| KubeError::Connect(e.to_string()))?;
        let namespace = namespace.map_or_else(|| client.default_namespace().to_owned(), Into::into);
        Ok(KubeRegistry::new(client, namespace))
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn nodes_api(&self) -> Api<core::Node> {
        Api::all(self.client.clone())
    }

    fn peers_api(&self) -> Api<Peer> {
        Api::all(self.client.clone())
    }

    fn leases_api(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The cluster settings, from the `wiremesh-settings` ConfigMap.
    pub async fn settings(&self) -> Result<ClusterSettings, KubeError> {
        let maps: Api<core::ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let map = maps.get(SETTINGS_CONFIG_MAP).await?;
        let json = map
            .data
            .as_ref()
            .and_then(|d| d.get(SETTINGS_KEY))
            .ok_or_else(|| KubeError::NoSettings {
                namespace: self.namespace.clone(),
            })?;
        ClusterSettings::from_json(json.as_bytes()).map_err(|error| KubeError::Settings {
            namespace: self.namespace.clone(),
            error,
        })
    }

    /// One Node object, e.g. this node's own, for its addresses and for the
    /// annotations an administrator set on it ([`node::node_addresses`]).
    pub async fn node_object(&self, name: &NodeName) -> Result<core::Node, KubeError> {
        Ok(self.nodes_api().get(name.as_str()).await?)
    }

    /// Every node and peer, mapped; what cannot be used is in [`Listing::bad`] and
    /// the rest maps regardless. `now` (unix seconds) decides which Leases are live.
    pub async fn list(&self, settings: &ClusterSettings, now: u64) -> Result<Listing, KubeError> {
        let all = ListParams::default();
        let (nodes_api, peers_api, leases_api) =
            (self.nodes_api(), self.peers_api(), self.leases_api());
        let (nodes, peers, leases) = futures::try_join!(
            nodes_api.list(&all),
            peers_api.list(&all),
            leases_api.list(&all),
        )?;
        let leases: HashMap<&str, &Lease> = leases
            .items
            .iter()
            .filter_map(|l| Some((lease::holder(l)?, l)))
            .collect();
        let mut listing = Listing::default();
        for object in &nodes.items {
            let name = object.metadata.name.clone().unwrap_or_default();
            let lease = leases.get(name.as_str());
            let last_seen = lease.and_then(|l| lease::last_renewed(l)).unwrap_or(0);
            match node::node_from_kube(object, settings, last_seen) {
                Ok(Some(node)) if lease.is_some_and(|l| lease::is_live(l, now)) => {
                    listing.nodes.push(node)
                }
                Ok(Some(node)) => listing.stale.push(node.name),
                Ok(None) => listing.without_agent.push(name),
                Err(error) => listing.bad.push(BadObject {
                    object: format!("node/{name}"),
                    error,
                }),
            }
        }
        for object in &peers.items {
            match peer::peer_from_kube(object) {
                Ok(peer) => listing.peers.push(peer),
                Err(error) => listing.bad.push(BadObject {
                    object: format!("peer/{}", object.metadata.name.as_deref().unwrap_or("")),
                    error,
                }),
            }
        }
        listing.nodes.sort_by(|a, b| a.name.cmp(&b.name));
        listing.peers.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(listing)
    }

    /// Publishes `node` on its Node object: one JSON merge patch that sets wiremesh's
    /// annotations and removes those `node` leaves out ([`node::node_patch`]).
    pub async fn publish(&self, node: &Node) -> Result<(), KubeError> {
        let patch = Patch::Merge(node::node_patch(node));
        self.nodes_api()
            .patch(node.name.as_str(), &PatchParams::default(), &patch)
            .await?;
        Ok(())
    }

    /// Renews the node's Lease (creates it the first time): server-side apply.
    pub async fn heartbeat(
        &self,
        name: &NodeName,
        now: u64,
        ttl: Duration,
    ) -> Result<(), KubeError> {
        let lease = lease::lease_for(name, now, ttl);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.leases_api()
            .patch(name.as_str(), &params, &Patch::Apply(&lease))
            .await?;
        Ok(())
    }

    /// Takes the node out of the mesh: its Lease deleted, its public key and observed
    /// endpoints removed ([`node::leave_patch`]).
    pub async fn leave(&self, name: &NodeName) -> Result<(), KubeError> {
        match self
            .leases_api()
            .delete(name.as_str(), &Default::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        let patch = Patch::Merge(node::leave_patch());
        self.nodes_api()
            .patch(name.as_str(), &PatchParams::default(), &patch)
            .await?;
        Ok(())
    }

    /// Publishes the node's device report (`report`, JSON) on its Lease, as the
    /// [`STATUS_ANNOTATION`] (a JSON merge patch: the heartbeat's server-side apply
    /// owns the Lease's other fields and leaves this one alone).
    pub async fn report_status(&self, name: &NodeName, report: &str) -> Result<(), KubeError> {
        let patch =
            serde_json::json!({ "metadata": { "annotations": { STATUS_ANNOTATION: report } } });
        self.leases_api()
            .patch(name.as_str(), &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        Ok(())
    }

    /// The device reports on live Leases (`now`, unix seconds), by holder.
    pub async fn status_reports(&self, now: u64) -> Result<Vec<(String, String)>, KubeError> {
        let leases = self.leases_api().list(&ListParams::default()).await?;
        Ok(leases
            .items
            .iter()
            .filter(|l| lease::is_live(l, now))
            .filter_map(|l| {
                let report = l.metadata.annotations.as_ref()?.get(STATUS_ANNOTATION)?;
                Some((lease::holder(l)?.to_owned(), report.clone()))
            })
            .collect())
    }

    /// Creates or replaces an external peer's `Peer` object (server-side apply).
    pub async fn put_peer(&self, peer: &ExternalPeer) -> Result<(), KubeError> {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.peers_api()
            .patch(
                peer.name.as_str(),
                &params,
                &Patch::Apply(&peer::peer_to_kube(peer)),
            )
            .await?;
        Ok(())
    }

    /// Deletes an external peer's `Peer` object; `false` if there was none.
    pub async fn delete_peer(&self, name: &str) -> Result<bool, KubeError> {
        match self.peers_api().delete(name, &Default::default()).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Changes that matter to the mesh, from watches on Nodes, Peers and this
    /// namespace's Leases. The watches reconnect on their own (with backoff); an
    /// error item is worth a log line, not a restart. Kubelet status updates and
    /// Lease renewals are filtered out, so a quiet cluster yields nothing. Each of
    /// the [`WATCHED_KINDS`] watches says [`Change::Relisted`] once it is established.
    pub fn changes(&self) -> BoxStream<'static, Result<Change, KubeError>> {
        let config = watcher::Config::default;
        let mut nodes = NodeFilter::default();
        let nodes = watcher::watcher(self.nodes_api(), config())
            .default_backoff()
            .map(move |e| e.map(|e| nodes.handle(e)));
        let peers = watcher::watcher(self.peers_api(), config())
            .default_backoff()
            .map(|e| {
                e.map(|e| match e {
                    watcher::Event::Apply(p) | watcher::Event::Delete(p) => {
                        Some(Change::Peer(p.metadata.name.unwrap_or_default()))
                    }
                    watcher::Event::InitDone => Some(Change::Relisted),
                    _ => None,
                })
            });
        let mut leases = LeaseFilter::default();
        let leases = watcher::watcher(self.leases_api(), config())
            .default_backoff()
            .map(move |e| e.map(|e| leases.handle(e)));
        stream::select_all([nodes.boxed(), peers.boxed(), leases.boxed()])
            .filter_map(|item| async move {
                match item {
                    Ok(change) => change.map(Ok),
                    Err(e) => Some(Err(KubeError::Watch(e))),
                }
            })
            .boxed()
    }
}

/// What of a Node object the mesh depends on: wiremesh's annotations, the pod CIDR
/// and the region label. Two objects with the same projection map to the same node.
fn node_projection(object: &core::Node) -> BTreeMap<String, String> {
    let mut seen: BTreeMap<String, String> = object
        .metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("wiremesh.io/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(cidr) = object.spec.as_ref().and_then(|s| s.pod_cidr.as_ref()) {
        seen.insert("spec.podCIDR".into(), cidr.clone());
    }
    if let Some(region) = object
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(node::REGION_LABEL))
    {
        seen.insert(node::REGION_LABEL.into(), region.clone());
    }
    seen
}

/// Turns Node watch events into [`Change`]s, dropping those that leave the
/// projection alone (the kubelet updates its Node's status every few seconds).
#[derive(Default)]
struct NodeFilter {
    seen: HashMap<String, BTreeMap<String, String>>,
}

impl NodeFilter {
    fn handle(&mut self, event: watcher::Event<core::Node>) -> Option<Change> {
        match event {
            watcher::Event::Init => {
                self.seen.clear();
                None
            }
            watcher::Event::InitApply(object) => {
                let name = object.metadata.name.clone().unwrap_or_default();
                self.seen.insert(name, node_projection(&object));
                None
            }
            watcher::Event::InitDone => Some(Change::Relisted),
            watcher::Event::Apply(object) => {
                let name = object.metadata.name.clone().unwrap_or_default();
                let projection = node_projection(&object);
                let changed = self.seen.get(&name) != Some(&projection);
                self.seen.insert(name.clone(), projection);
                changed.then_some(Change::Node(name))
            }
            watcher::Event::Delete(object) => {
                let name = object.metadata.name.unwrap_or_default();
                self.seen.remove(&name);
                Some(Change::Node(name))
            }
        }
    }
}

/// Turns Lease watch events into [`Change`]s, dropping renewals.
#[derive(Default)]
struct LeaseFilter {
    seen: HashMap<String, (Option<String>, Option<i32>)>,
}

impl LeaseFilter {
    fn handle(&mut self, event: watcher::Event<Lease>) -> Option<Change> {
        let key = |l: &Lease| {
            let spec = l.spec.as_ref();
            (
                spec.and_then(|s| s.holder_identity.clone()),
                spec.and_then(|s| s.lease_duration_seconds),
            )
        };
        match event {
            watcher::Event::Init => {
                self.seen.clear();
                None
            }
            watcher::Event::InitApply(l) => {
                self.seen
                    .insert(l.metadata.name.clone().unwrap_or_default(), key(&l));
                None
            }
            watcher::Event::InitDone => Some(Change::Relisted),
            watcher::Event::Apply(l) => {
                let name = l.metadata.name.clone().unwrap_or_default();
                let changed = self.seen.insert(name.clone(), key(&l)) != Some(key(&l));
                changed.then_some(Change::Lease(name))
            }
            watcher::Event::Delete(l) => {
                let name = l.metadata.name.unwrap_or_default();
                self.seen.remove(&name);
                Some(Change::Lease(name))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn node_object(annotations: &[(&str, &str)], ready: bool) -> core::Node {
        core::Node {
            metadata: ObjectMeta {
                name: Some("a1".into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .chain([("kubeadm.alpha/x".to_string(), ready.to_string())])
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(core::NodeSpec {
                pod_cidr: Some("10.42.1.0/24".into()),
                ..Default::default()
            }),
            status: Some(core::NodeStatus {
                conditions: Some(vec![core::NodeCondition {
                    type_: "Ready".into(),
                    status: ready.to_string(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn node_changes_ignore_what_the_mesh_does_not_read() {
        use watcher::Event::*;
        let mut filter = NodeFilter::default();
        let key = [(node::PUBLIC_KEY, "k1")];
        assert_eq!(filter.handle(Init), None);
        assert_eq!(filter.handle(InitApply(node_object(&key, true))), None);
        assert_eq!(filter.handle(InitDone), Some(Change::Relisted));
        // Status and foreign annotations only: nothing to do.
        assert_eq!(filter.handle(Apply(node_object(&key, false))), None);
        let moved = [(node::PUBLIC_KEY, "k1"), (node::LOCATION, "b")];
        assert_eq!(
            filter.handle(Apply(node_object(&moved, false))),
            Some(Change::Node("a1".into()))
        );
        assert_eq!(filter.handle(Apply(node_object(&moved, true))), None);
        assert_eq!(
            filter.handle(Delete(node_object(&moved, true))),
            Some(Change::Node("a1".into()))
        );
    }

    #[test]
    fn lease_renewals_are_not_changes() {
        use watcher::Event::*;
        let a1: NodeName = "a1".parse().unwrap();
        let mut filter = LeaseFilter::default();
        let ttl = Duration::from_secs(15);
        assert_eq!(
            filter.handle(Apply(lease::lease_for(&a1, 1, ttl))),
            Some(Change::Lease("a1".into()))
        );
        assert_eq!(filter.handle(Apply(lease::lease_for(&a1, 6, ttl))), None);
        assert_eq!(
            filter.handle(Apply(lease::lease_for(&a1, 7, Duration::from_secs(30)))),
            Some(Change::Lease("a1".into()))
        );
        assert_eq!(
            filter.handle(Delete(lease::lease_for(&a1, 7, ttl))),
            Some(Change::Lease("a1".into()))
        );
    }
}
