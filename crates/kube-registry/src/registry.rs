//! [`KubeRegistry`]: the cluster read from and written to a Kubernetes API server.
//!
//! The I/O shell around the pure mappings ([`crate::node`], [`crate::peer`],
//! [`crate::lease`], [`crate::vpc`]): it lists Nodes, Peers and Leases (and VPCs,
//! Services and EndpointSlices) and hands back model types with the objects it could
//! not use set aside, sends this node's annotations as a JSON merge patch, renews its
//! Lease with server-side apply, claims VPC blocks under the Vpc object's
//! `resourceVersion`, and turns six `kube::runtime::watcher` streams into
//! "something that matters changed" signals.
//! Async, on kube's client: a blocking caller (the agent's std-thread loop) drives it
//! from a small runtime of its own, as the etcd backend does.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use wiremesh_model::{ClusterSettings, ExternalPeer, FieldError, Node, NodeName};
use wiremesh_vpc::snapshot::Records;
use wiremesh_vpc::{Endpoint, Label, Pod, PodName, Service, VpcMember};

use crate::vpc::{self, Vpc, SERVICE_NAME_LABEL, VPC_LABEL};
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
    #[error("service {namespace}/{name} exists and is not VPC {vpc}'s (label {VPC_LABEL}: {holder:?}): a Kubernetes namespace holds one service of a name")]
    ServiceTaken {
        namespace: String,
        name: String,
        vpc: String,
        holder: Option<String>,
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
    /// `node/<name>`, `peer/<name>`, `vpc/<name>`, `service/<namespace>/<name>` or
    /// `endpointslice/<namespace>/<name>`, as `kubectl get` names it (with the namespace).
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

/// Every VPC record, and the objects left out with the field that is wrong.
#[derive(Debug, Clone, Default)]
pub struct VpcListing {
    /// Endpoints only of nodes whose Lease is live.
    pub records: Records,
    pub bad: Vec<BadObject>,
}

/// What [`KubeRegistry::claim_vpc_member`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    Member(VpcMember),
    /// This pod CIDR of the VPC has no free block left.
    Exhausted(ipnet::IpNet),
}

/// How many watches [`KubeRegistry::changes`] runs (Nodes, Peers, Leases, Vpcs,
/// Services, EndpointSlices): as many [`Change::Relisted`] say they are all
/// established.
pub const WATCHED_KINDS: usize = 6;

/// What a watch saw change; each means "list again" to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A node's wiremesh annotations, pod CIDR or region label changed, or it was deleted.
    Node(String),
    Peer(String),
    /// A node's Lease appeared, changed holder or duration, or was deleted. Renewals
    /// are not changes; an expiry is noticed by listing again (the agent's resync).
    Lease(String),
    /// A VPC, its members, or one of its Services or EndpointSlices, by VPC name.
    Vpc(String),
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

    fn vpcs_api(&self) -> Api<Vpc> {
        Api::all(self.client.clone())
    }

    /// In `namespace`, or in every namespace.
    fn api<K>(&self, namespace: Option<&str>) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
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
        delete(&self.peers_api(), name).await
    }

    /// Every Vpc (with its members), VPC Service and EndpointSlice, mapped; an
    /// endpoint whose node's Lease is not live at `now` (unix seconds) is left out,
    /// as a store drops it with its node's lease.
    pub async fn vpc_records(&self, now: u64) -> Result<VpcListing, KubeError> {
        let (all, labelled) = (
            ListParams::default(),
            ListParams::default().labels(VPC_LABEL),
        );
        let (vpcs_api, services_api, slices_api, leases_api) = (
            self.vpcs_api(),
            self.api::<core::Service>(None),
            self.api::<EndpointSlice>(None),
            self.leases_api(),
        );
        let (vpcs, services, slices, leases) = futures::try_join!(
            vpcs_api.list(&all),
            services_api.list(&labelled),
            slices_api.list(&labelled),
            leases_api.list(&all),
        )?;
        let live_leases: Vec<&Lease> = leases
            .items
            .iter()
            .filter(|l| lease::is_live(l, now))
            .collect();
        let live: Vec<&str> = live_leases
            .iter()
            .filter_map(|l| lease::holder(l))
            .collect();
        let mut listing = VpcListing::default();
        let mut bad = |kind: &str, meta: &ObjectMeta, error: FieldError| {
            let name = meta.name.as_deref().unwrap_or("");
            let object = match &meta.namespace {
                Some(ns) => format!("{kind}/{ns}/{name}"),
                None => format!("{kind}/{name}"),
            };
            listing.bad.push(BadObject { object, error });
        };
        let records = &mut listing.records;
        for object in &vpcs.items {
            match vpc::vpc_from_kube(object) {
                Ok(v) => records.vpcs.push(v),
                Err(error) => bad("vpc", &object.metadata, error),
            }
            for member in vpc::members_from_kube(object) {
                match member {
                    Ok(m) => records.members.push(m),
                    Err(error) => bad("vpc", &object.metadata, error),
                }
            }
        }
        for object in &services.items {
            match vpc::service_from_kube(object) {
                Ok(s) => records.services.push(s),
                Err(error) => bad("service", &object.metadata, error),
            }
        }
        for object in &slices.items {
            for endpoint in vpc::endpoints_from_kube(object) {
                match endpoint {
                    Ok(e) if live.contains(&e.node.as_str()) => records.endpoints.push(e),
                    Ok(_) => {}
                    Err(error) => bad("endpointslice", &object.metadata, error),
                }
            }
        }
        for object in live_leases {
            for pod in vpc::pods_from_lease(object) {
                match pod {
                    Ok(p) => records.pods.push(p),
                    Err(error) => bad("lease", &object.metadata, error),
                }
            }
        }
        Ok(listing)
    }

    /// Creates the Vpc object; `false` if one of that name exists.
    pub async fn create_vpc(&self, v: &wiremesh_vpc::Vpc) -> Result<bool, KubeError> {
        let object = vpc::vpc_to_kube(v);
        match self
            .vpcs_api()
            .create(&PostParams::default(), &object)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes the Vpc object (its members with it), then its Services and
    /// EndpointSlices; `false` if there was no Vpc.
    pub async fn delete_vpc(&self, name: &Label) -> Result<bool, KubeError> {
        let existed = delete(&self.vpcs_api(), name.as_str()).await?;
        let of_vpc = ListParams::default().labels(&format!("{VPC_LABEL}={name}"));
        for s in self.api::<core::Service>(None).list(&of_vpc).await?.items {
            let ns = s.metadata.namespace.as_deref();
            let name = s.metadata.name.as_deref().unwrap_or_default();
            delete(&self.api::<core::Service>(ns), name).await?;
        }
        self.delete_slices(None, &of_vpc).await?;
        Ok(existed)
    }

    async fn delete_slices(
        &self,
        namespace: Option<&str>,
        selector: &ListParams,
    ) -> Result<(), KubeError> {
        for s in self
            .api::<EndpointSlice>(namespace)
            .list(selector)
            .await?
            .items
        {
            let ns = s.metadata.namespace.as_deref();
            let name = s.metadata.name.as_deref().unwrap_or_default();
            delete(&self.api::<EndpointSlice>(ns), name).await?;
        }
        Ok(())
    }

    /// `node`'s blocks of `v`: those it holds, else the lowest free
    /// ([`vpc::claim_blocks`]), written into the Vpc's `status.members` under the
    /// `resourceVersion` just read. A write that lost to another (409 Conflict)
    /// reads again, so two nodes never hold one block.
    pub async fn claim_vpc_member(
        &self,
        v: &wiremesh_vpc::Vpc,
        node: &NodeName,
    ) -> Result<Claim, KubeError> {
        loop {
            let object = self.vpcs_api().get(v.name.as_str()).await?;
            let members: Vec<VpcMember> = vpc::members_from_kube(&object)
                .into_iter()
                .filter_map(Result::ok)
                .collect();
            let pod_cidrs = match vpc::claim_blocks(v, node, &members) {
                Ok(blocks) => blocks,
                Err(cidr) => return Ok(Claim::Exhausted(cidr)),
            };
            let member = VpcMember {
                vpc: v.name.clone(),
                node: node.clone(),
                pod_cidrs,
            };
            if members.contains(&member) {
                return Ok(Claim::Member(member));
            }
            let status = vpc::with_member(&object, node, Some(&member));
            if self.replace_vpc_status(object, status).await? {
                return Ok(Claim::Member(member));
            }
        }
    }

    /// Gives `node`'s blocks of `vpc` back, under the `resourceVersion` as a claim.
    pub async fn leave_vpc(&self, name: &Label, node: &NodeName) -> Result<(), KubeError> {
        loop {
            let object = match self.vpcs_api().get(name.as_str()).await {
                Err(kube::Error::Api(status)) if status.code == 404 => return Ok(()),
                object => object?,
            };
            let status = vpc::with_member(&object, node, None);
            if object.status.clone().unwrap_or_default() == status
                || self.replace_vpc_status(object, status).await?
            {
                return Ok(());
            }
        }
    }

    /// Replaces `object`'s status if nobody wrote it since it was read; `false` if
    /// somebody did (409 Conflict).
    async fn replace_vpc_status(
        &self,
        mut object: Vpc,
        status: vpc::VpcStatus,
    ) -> Result<bool, KubeError> {
        let name = object.metadata.name.clone().unwrap_or_default();
        object.status = Some(status);
        match self
            .vpcs_api()
            .replace_status(&name, &PostParams::default(), &object)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates or replaces the VPC service's Service object; one of that namespace
    /// and name that is not this VPC's is left alone ([`KubeError::ServiceTaken`]).
    /// Written under the `resourceVersion` read, so a concurrent writer is noticed.
    pub async fn put_service(&self, service: &Service) -> Result<(), KubeError> {
        let api = self.api::<core::Service>(Some(service.namespace.as_str()));
        let mut object = vpc::service_to_kube(service);
        loop {
            let written = match api.get_opt(service.name.as_str()).await? {
                None => api.create(&PostParams::default(), &object).await,
                Some(existing) => {
                    let holder = vpc_of(&existing.metadata);
                    if holder != Some(service.vpc.as_str()) {
                        return Err(KubeError::ServiceTaken {
                            namespace: service.namespace.to_string(),
                            name: service.name.to_string(),
                            vpc: service.vpc.to_string(),
                            holder: holder.map(Into::into),
                        });
                    }
                    object.metadata.resource_version = existing.metadata.resource_version;
                    let name = service.name.as_str();
                    api.replace(name, &PostParams::default(), &object).await
                }
            };
            match written {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Deletes the VPC service's Service and its EndpointSlices; `false` if there
    /// was no such service in that VPC.
    pub async fn delete_service(
        &self,
        vpc: &Label,
        namespace: &Label,
        name: &Label,
    ) -> Result<bool, KubeError> {
        let api = self.api::<core::Service>(Some(namespace.as_str()));
        let existed = match api.get_opt(name.as_str()).await? {
            Some(s) if vpc_of(&s.metadata) == Some(vpc.as_str()) => {
                delete(&api, name.as_str()).await?
            }
            _ => false,
        };
        let selector = format!("{VPC_LABEL}={vpc},{SERVICE_NAME_LABEL}={name}");
        self.delete_slices(
            Some(namespace.as_str()),
            &ListParams::default().labels(&selector),
        )
        .await?;
        Ok(existed)
    }

    /// Creates or replaces the endpoint's EndpointSlice (server-side apply).
    pub async fn put_endpoint(&self, endpoint: &Endpoint) -> Result<(), KubeError> {
        let object = vpc::endpoint_to_kube(endpoint);
        let name = object.metadata.name.clone().unwrap_or_default();
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.api::<EndpointSlice>(Some(endpoint.namespace.as_str()))
            .patch(&name, &params, &Patch::Apply(&object))
            .await?;
        Ok(())
    }

    /// Publishes a VPC pod of `node` on the node's Lease ([`vpc::PODS`]).
    pub async fn publish_pod(&self, node: &NodeName, pod: &Pod) -> Result<(), KubeError> {
        let object = self.leases_api().get(node.as_str()).await?;
        let key = (pod.vpc.as_str(), pod.namespace.as_str(), pod.name.as_str());
        if let Some(patch) = vpc::pods_patch(&object, key, Some(pod)) {
            self.leases_api()
                .patch(node.as_str(), &PatchParams::default(), &Patch::Merge(patch))
                .await?;
        }
        Ok(())
    }

    /// Removes a VPC pod from whichever Lease holds it; `false` if none does.
    pub async fn delete_pod(
        &self,
        vpc: &Label,
        namespace: &Label,
        name: &PodName,
    ) -> Result<bool, KubeError> {
        let key = (vpc.as_str(), namespace.as_str(), name.as_str());
        for object in self.leases_api().list(&ListParams::default()).await?.items {
            let held = vpc::pods_from_lease(&object)
                .iter()
                .flatten()
                .any(|p| (p.vpc.as_str(), p.namespace.as_str(), p.name.as_str()) == key);
            if let (true, Some(patch)) = (held, vpc::pods_patch(&object, key, None)) {
                let name = object.metadata.name.clone().unwrap_or_default();
                self.leases_api()
                    .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Deletes the EndpointSlice of the endpoint at `address`; `false` if there was
    /// none in that VPC.
    pub async fn delete_endpoint(
        &self,
        vpc: &Label,
        namespace: &Label,
        service: &Label,
        address: std::net::IpAddr,
    ) -> Result<bool, KubeError> {
        let api = self.api::<EndpointSlice>(Some(namespace.as_str()));
        let name = vpc::slice_name(service, address);
        match api.get_opt(&name).await? {
            Some(s) if vpc_of(&s.metadata) == Some(vpc.as_str()) => delete(&api, &name).await,
            _ => Ok(false),
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
        let vpcs = watcher::watcher(self.vpcs_api(), config())
            .default_backoff()
            .map(|e| e.map(|e| vpc_change(e, |v| v.metadata.name.clone())));
        let labelled = || config().labels(VPC_LABEL);
        let services = watcher::watcher(self.api::<core::Service>(None), labelled())
            .default_backoff()
            .map(|e| e.map(|e| vpc_change(e, |s| vpc_of(&s.metadata).map(Into::into))));
        let slices = watcher::watcher(self.api::<EndpointSlice>(None), labelled())
            .default_backoff()
            .map(|e| e.map(|e| vpc_change(e, |s| vpc_of(&s.metadata).map(Into::into))));
        stream::select_all([
            nodes.boxed(),
            peers.boxed(),
            leases.boxed(),
            vpcs.boxed(),
            services.boxed(),
            slices.boxed(),
        ])
        .filter_map(|item| async move {
            match item {
                Ok(change) => change.map(Ok),
                Err(e) => Some(Err(KubeError::Watch(e))),
            }
        })
        .boxed()
    }
}

/// Deletes `name`; `false` if there was none.
async fn delete<K>(api: &Api<K>, name: &str) -> Result<bool, KubeError>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &Default::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The VPC a Service or EndpointSlice is labelled with.
fn vpc_of(meta: &ObjectMeta) -> Option<&str> {
    meta.labels.as_ref()?.get(VPC_LABEL).map(String::as_str)
}

/// A watch event on a VPC's object as a [`Change::Vpc`] of the VPC `vpc` names.
fn vpc_change<K>(event: watcher::Event<K>, vpc: impl Fn(&K) -> Option<String>) -> Option<Change> {
    match event {
        watcher::Event::Apply(o) | watcher::Event::Delete(o) => vpc(&o).map(Change::Vpc),
        watcher::Event::InitDone => Some(Change::Relisted),
        watcher::Event::Init | watcher::Event::InitApply(_) => None,
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
