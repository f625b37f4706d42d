//! The cluster's records in a registry [`Store`]: where each lives, how it is parsed.
//!
//! Key layout under `/wiremesh/<cluster>/`:
//! - `settings`: [`ClusterSettings`], written once by `wiremesh init`;
//! - `nodes/<name>`: each node's [`Node`] record, under the node's lease;
//! - `peers/<name>`: external peers;
//! - `ipam/<pod-cidr>`: which node holds a pod CIDR (no lease: survives restarts);
//! - `status/<name>`: what each node's device reports (handshakes, bytes), under its lease;
//! - `vpcs/<vpc>/vpc`: a VPC; `vpcs/<vpc>/members/<node>`: a node's blocks of its pod
//!   CIDRs, each claimed first at `vpcs/<vpc>/blocks/<cidr>` (compare-and-swap, like
//!   `ipam/`); `vpcs/<vpc>/services/<ns>/<name>` and
//!   `vpcs/<vpc>/endpoints/<ns>/<service>/<address>`; `vpcs/<vpc>/pods/<ns>/<name>`
//!   (under the pod's node's lease, like the endpoints that node publishes). One
//!   prefix per VPC, so a VPC is listed, watched and deleted as one.
//!
//! A record that fails to parse is reported with its key and the field, and left
//! out of the snapshot: it never stops the rest of the mesh.
//!
//! [`Cluster`] is the [`Registry`] of every store backend; `wiremesh demo`, the
//! benchmarks and the tests also reach its keys directly.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use wiremesh_model::{ClusterSettings, ExternalPeer, FieldError, Node, NodeName, PeerName};
use wiremesh_registry::{Address, EtcdOptions, Event, LeaseId, Revision, Store, StoreError, Watch};
use wiremesh_topology::{ipam, Snapshot};
use wiremesh_vpc::record::from_json;
use wiremesh_vpc::snapshot::Records;
use wiremesh_vpc::{
    Endpoint, EndpointRecord, Label, Pod, PodName, PodRecord, Service, ServiceRecord, Vpc,
    VpcMember, VpcMemberRecord, VpcRecord,
};

use crate::registry::{
    set_aside_conflicts, BadRecord, Change, Changes, Membership, NodeStatus, Registry,
    RegistryError, ServiceId,
};

/// Open a registry from its address: `dir:/path` (or a bare path) for the embedded
/// store, `etcd://host:port,...` (or `etcd+https://`) for etcd with default options.
pub fn open_store(address: &str) -> Result<Arc<dyn Store>, StoreError> {
    open_store_with(address, EtcdOptions::default())
}

/// [`open_store`] with etcd credentials and TLS.
pub fn open_store_with(address: &str, etcd: EtcdOptions) -> Result<Arc<dyn Store>, StoreError> {
    address.parse::<Address>()?.open(etcd)
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the cluster {0:?} has no settings: run `wiremesh init` first")]
    NotInitialised(String),
    #[error("settings record: {0}")]
    Settings(FieldError),
    #[error(transparent)]
    Ipam(#[from] ipam::IpamError),
}

/// One cluster's records in a store.
#[derive(Clone)]
pub struct Cluster {
    pub store: Arc<dyn Store>,
    pub name: String,
}

impl Cluster {
    pub fn new(store: Arc<dyn Store>, name: &str) -> Self {
        Cluster {
            store,
            name: name.to_owned(),
        }
    }

    /// Prefix of every key of this cluster.
    pub fn prefix(&self) -> String {
        format!("/wiremesh/{}/", self.name)
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix())
    }

    /// Write the settings if there are none; returns the settings in force.
    pub fn init(&self, settings: &ClusterSettings) -> Result<ClusterSettings, ClusterError> {
        self.store
            .compare_and_put(&self.key("settings"), None, &settings.to_json(), None)?;
        self.settings()
    }

    pub fn settings(&self) -> Result<ClusterSettings, ClusterError> {
        let kv = self
            .store
            .get(&self.key("settings"))?
            .ok_or_else(|| ClusterError::NotInitialised(self.name.clone()))?;
        ClusterSettings::from_json(&kv.value).map_err(ClusterError::Settings)
    }

    /// Every usable node and peer, the records that were not usable, and the revision read.
    pub fn snapshot(&self) -> Result<(Snapshot, Vec<BadRecord>, Revision), ClusterError> {
        let settings = self.settings()?;
        let nodes_prefix = self.key("nodes/");
        let peers_prefix = self.key("peers/");
        // Only what the topology reads: `status/*` is most of a big cluster's bytes.
        let (mut kvs, revision) = self.store.list(&nodes_prefix)?;
        kvs.extend(self.store.list(&peers_prefix)?.0);
        let mut snapshot = Snapshot {
            settings,
            nodes: Vec::new(),
            peers: Vec::new(),
        };
        let mut bad = Vec::new();
        for kv in kvs {
            if kv.key.starts_with(&nodes_prefix) {
                match Node::from_json(&kv.value) {
                    Ok(node) if node.name.as_str() == &kv.key[nodes_prefix.len()..] => {
                        snapshot.nodes.push(node)
                    }
                    Ok(node) => bad.push(BadRecord {
                        key: kv.key.clone(),
                        error: FieldError::new(
                            "node.name",
                            format!("{} does not match its key", node.name),
                        ),
                    }),
                    Err(error) => bad.push(BadRecord {
                        key: kv.key.clone(),
                        error,
                    }),
                }
            } else if kv.key.starts_with(&peers_prefix) {
                match ExternalPeer::from_json(&kv.value) {
                    Ok(peer) => snapshot.peers.push(peer),
                    Err(error) => bad.push(BadRecord {
                        key: kv.key.clone(),
                        error,
                    }),
                }
            }
        }
        set_aside_conflicts(
            &mut snapshot,
            &mut bad,
            |node| format!("{nodes_prefix}{node}"),
            |peer| format!("{peers_prefix}{peer}"),
        );
        Ok((snapshot, bad, revision))
    }

    /// Claim a pod CIDR for `node`: its previous one if it still holds it, else the
    /// lowest free block. Compare-and-swap on `ipam/<cidr>` makes two nodes racing
    /// for one block impossible.
    pub fn claim_block(
        &self,
        node: &NodeName,
        settings: &ClusterSettings,
        previous: Option<IpNet>,
    ) -> Result<ipam::NodeBlock, ClusterError> {
        let ipam_key =
            |cidr: &IpNet| self.key(&format!("ipam/{}", cidr.to_string().replace('/', "_")));
        if let Some(cidr) = previous {
            match self.store.get(&ipam_key(&cidr))? {
                Some(kv) if kv.value == node.as_str().as_bytes() => {
                    return Ok(ipam::NodeBlock {
                        pod_cidr: cidr,
                        mesh_ip: ipam::mesh_ip_of(settings, cidr)?,
                    })
                }
                Some(_) => {}
                None => {
                    if self.store.compare_and_put(
                        &ipam_key(&cidr),
                        None,
                        node.as_str().as_bytes(),
                        None,
                    )? {
                        return Ok(ipam::NodeBlock {
                            pod_cidr: cidr,
                            mesh_ip: ipam::mesh_ip_of(settings, cidr)?,
                        });
                    }
                }
            }
        }
        loop {
            let (kvs, _) = self.store.list(&self.key("ipam/"))?;
            // A node that already holds a block (say, its state dir was wiped) keeps it.
            if let Some(kv) = kvs.iter().find(|kv| kv.value == node.as_str().as_bytes()) {
                let cidr: Option<IpNet> = kv
                    .key
                    .rsplit('/')
                    .next()
                    .and_then(|s| s.replace('_', "/").parse().ok());
                if let Some(cidr) = cidr {
                    return Ok(ipam::NodeBlock {
                        pod_cidr: cidr,
                        mesh_ip: ipam::mesh_ip_of(settings, cidr)?,
                    });
                }
            }
            let taken: Vec<IpNet> = kvs
                .iter()
                .filter_map(|kv| kv.key.rsplit('/').next()?.replace('_', "/").parse().ok())
                .collect();
            let block = ipam::allocate(settings, &taken)?;
            if self.store.compare_and_put(
                &ipam_key(&block.pod_cidr),
                None,
                node.as_str().as_bytes(),
                None,
            )? {
                return Ok(block);
            }
            // Lost a race for this block: look again.
        }
    }

    pub fn put_node(&self, node: &Node, lease: LeaseId) -> Result<(), ClusterError> {
        self.store.put(
            &self.key(&format!("nodes/{}", node.name)),
            &node.to_json(),
            Some(lease),
        )?;
        Ok(())
    }

    pub fn delete_node(&self, name: &NodeName) -> Result<(), ClusterError> {
        self.store.delete(&self.key(&format!("nodes/{name}")))?;
        self.store.delete(&self.key(&format!("status/{name}")))?;
        Ok(())
    }

    pub fn put_peer(&self, peer: &ExternalPeer) -> Result<(), ClusterError> {
        self.store.put(
            &self.key(&format!("peers/{}", peer.name)),
            &peer.to_json(),
            None,
        )?;
        Ok(())
    }

    pub fn delete_peer(&self, name: &str) -> Result<bool, ClusterError> {
        Ok(self.store.delete(&self.key(&format!("peers/{name}")))?)
    }

    pub fn put_status(&self, status: &NodeStatus, lease: LeaseId) -> Result<(), ClusterError> {
        let json = serde_json::to_vec(status).expect("status always serializes");
        self.store.put(
            &self.key(&format!("status/{}", status.node)),
            &json,
            Some(lease),
        )?;
        Ok(())
    }

    /// Every node's last published status (unparseable ones are skipped).
    pub fn statuses(&self) -> Result<Vec<NodeStatus>, ClusterError> {
        let (kvs, _) = self.store.list(&self.key("status/"))?;
        Ok(kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect())
    }

    fn vpc_key(&self, vpc: &Label, rest: &str) -> String {
        self.key(&format!("vpcs/{vpc}/{rest}"))
    }

    fn service_key(&self, id: &ServiceId) -> String {
        self.vpc_key(&id.vpc, &format!("services/{}/{}", id.namespace, id.name))
    }

    fn endpoint_key(&self, id: &ServiceId, address: IpAddr) -> String {
        self.vpc_key(
            &id.vpc,
            &format!("endpoints/{}/{}/{address}", id.namespace, id.name),
        )
    }

    fn pod_key(&self, vpc: &Label, namespace: &Label, name: &PodName) -> String {
        self.vpc_key(vpc, &format!("pods/{namespace}/{name}"))
    }

    /// Every VPC record under `vpcs/`; one whose key does not match its contents is bad
    /// (a record filed under another VPC's or service's key is not believed).
    pub fn vpc_records(&self) -> Result<(Records, Vec<BadRecord>), ClusterError> {
        let prefix = self.key("vpcs/");
        let (kvs, _) = self.store.list(&prefix)?;
        let mut records = Records::default();
        let mut bad = Vec::new();
        for kv in kvs {
            let kind = kv.key[prefix.len()..].split('/').nth(1).unwrap_or_default();
            let parsed =
                match kind {
                    "vpc" => from_json::<VpcRecord, _>("vpc", &kv.value).map(VpcRecordKind::Vpc),
                    "members" => from_json::<VpcMemberRecord, _>("member", &kv.value)
                        .map(VpcRecordKind::Member),
                    "services" => from_json::<ServiceRecord, _>("service", &kv.value)
                        .map(VpcRecordKind::Service),
                    "endpoints" => from_json::<EndpointRecord, _>("endpoint", &kv.value)
                        .map(VpcRecordKind::Endpoint),
                    "pods" => from_json::<PodRecord, _>("pod", &kv.value).map(VpcRecordKind::Pod),
                    "blocks" => continue,
                    other => Err(FieldError::new(
                        "key",
                        format!("unknown VPC record kind {other:?}"),
                    )),
                };
            let error = match parsed {
                Ok(record) => {
                    let key = self.key_of(&record);
                    if key == kv.key {
                        record.add_to(&mut records);
                        continue;
                    }
                    FieldError::new("key", format!("its contents belong at {key}"))
                }
                Err(error) => error,
            };
            bad.push(BadRecord {
                key: kv.key.clone(),
                error,
            });
        }
        Ok((records, bad))
    }

    fn key_of(&self, record: &VpcRecordKind) -> String {
        match record {
            VpcRecordKind::Vpc(v) => self.vpc_key(&v.name, "vpc"),
            VpcRecordKind::Member(m) => self.vpc_key(&m.vpc, &format!("members/{}", m.node)),
            VpcRecordKind::Service(s) => self.service_key(&ServiceId::from(s)),
            VpcRecordKind::Endpoint(e) => self.endpoint_key(&ServiceId::of(e), e.address),
            VpcRecordKind::Pod(p) => self.pod_key(&p.vpc, &p.namespace, &p.name),
        }
    }

    pub fn create_vpc(&self, vpc: &Vpc) -> Result<bool, ClusterError> {
        let json = serde_json::to_vec_pretty(&VpcRecord::from(vpc)).expect("records serialize");
        Ok(self
            .store
            .compare_and_put(&self.vpc_key(&vpc.name, "vpc"), None, &json, None)?)
    }

    /// Deletes the VPC record first, so a reader never sees members of no VPC as valid.
    pub fn delete_vpc(&self, name: &Label) -> Result<bool, ClusterError> {
        let existed = self.store.delete(&self.vpc_key(name, "vpc"))?;
        let (kvs, _) = self.store.list(&self.vpc_key(name, ""))?;
        for kv in kvs {
            self.store.delete(&kv.key)?;
        }
        Ok(existed)
    }

    /// `node`'s member record of `vpc`: one block of each of its pod CIDRs, the block
    /// it holds if any, else the lowest free one (compare-and-swap on the block's key).
    pub fn claim_vpc_member(&self, vpc: &Vpc, node: &NodeName) -> Result<VpcMember, RegistryError> {
        let member_key = self.vpc_key(&vpc.name, &format!("members/{node}"));
        if let Some(kv) = self.store.get(&member_key).map_err(ClusterError::from)? {
            if let Ok(m) = from_json::<VpcMemberRecord, VpcMember>("member", &kv.value) {
                let inside = m.pod_cidrs.len() == vpc.pod_cidrs.len()
                    && m.pod_cidrs
                        .iter()
                        .all(|b| vpc.pod_cidrs.iter().any(|c| c.contains(b)));
                if &m.node == node && inside {
                    return Ok(m);
                }
            }
        }
        let block_key = |cidr: &IpNet| {
            self.vpc_key(
                &vpc.name,
                &format!("blocks/{}", cidr.to_string().replace('/', "_")),
            )
        };
        let mut pod_cidrs = Vec::new();
        for &cidr in &vpc.pod_cidrs {
            let block = loop {
                let (kvs, _) = self
                    .store
                    .list(&self.vpc_key(&vpc.name, "blocks/"))
                    .map_err(ClusterError::from)?;
                let blocks: Vec<(IpNet, &[u8])> = kvs
                    .iter()
                    .filter_map(|kv| {
                        let cidr = kv.key.rsplit('/').next()?.replace('_', "/").parse().ok()?;
                        Some((cidr, kv.value.as_slice()))
                    })
                    .collect();
                if let Some((held, _)) = blocks
                    .iter()
                    .find(|(b, owner)| cidr.contains(b) && *owner == node.as_str().as_bytes())
                {
                    break *held;
                }
                let taken: Vec<IpNet> = blocks.iter().map(|(b, _)| *b).collect();
                let free = ipam::allocate_member(cidr, &taken).ok_or_else(|| {
                    RegistryError::VpcExhausted {
                        vpc: vpc.name.clone(),
                        cidr,
                        node: node.clone(),
                    }
                })?;
                if self
                    .store
                    .compare_and_put(&block_key(&free), None, node.as_str().as_bytes(), None)
                    .map_err(ClusterError::from)?
                {
                    break free;
                }
                // Lost a race for this block: look again.
            };
            pod_cidrs.push(block);
        }
        let member = VpcMember {
            vpc: vpc.name.clone(),
            node: node.clone(),
            pod_cidrs,
        };
        let json =
            serde_json::to_vec_pretty(&VpcMemberRecord::from(&member)).expect("records serialize");
        self.store
            .put(&member_key, &json, None)
            .map_err(ClusterError::from)?;
        Ok(member)
    }

    pub fn leave_vpc(&self, vpc: &Label, node: &NodeName) -> Result<(), ClusterError> {
        self.store
            .delete(&self.vpc_key(vpc, &format!("members/{node}")))?;
        let (kvs, _) = self.store.list(&self.vpc_key(vpc, "blocks/"))?;
        for kv in kvs.iter().filter(|kv| kv.value == node.as_str().as_bytes()) {
            self.store.delete(&kv.key)?;
        }
        Ok(())
    }

    pub fn put_service(&self, service: &Service) -> Result<(), ClusterError> {
        let json =
            serde_json::to_vec_pretty(&ServiceRecord::from(service)).expect("records serialize");
        self.store
            .put(&self.service_key(&ServiceId::from(service)), &json, None)?;
        Ok(())
    }

    pub fn delete_service(&self, id: &ServiceId) -> Result<bool, ClusterError> {
        let existed = self.store.delete(&self.service_key(id))?;
        let endpoints = self.vpc_key(&id.vpc, &format!("endpoints/{}/{}/", id.namespace, id.name));
        for kv in self.store.list(&endpoints)?.0 {
            self.store.delete(&kv.key)?;
        }
        Ok(existed)
    }

    /// Under `lease` if given: the owning node's, so the endpoint expires with it.
    pub fn put_endpoint(
        &self,
        endpoint: &Endpoint,
        lease: Option<LeaseId>,
    ) -> Result<(), ClusterError> {
        let id = ServiceId::of(endpoint);
        let json =
            serde_json::to_vec_pretty(&EndpointRecord::from(endpoint)).expect("records serialize");
        self.store
            .put(&self.endpoint_key(&id, endpoint.address), &json, lease)?;
        Ok(())
    }

    pub fn delete_endpoint(&self, id: &ServiceId, address: IpAddr) -> Result<bool, ClusterError> {
        Ok(self.store.delete(&self.endpoint_key(id, address))?)
    }

    /// Under `lease` if given: the pod's node's.
    pub fn put_pod(&self, pod: &Pod, lease: Option<LeaseId>) -> Result<(), ClusterError> {
        let json = serde_json::to_vec_pretty(&PodRecord::from(pod)).expect("records serialize");
        self.store.put(
            &self.pod_key(&pod.vpc, &pod.namespace, &pod.name),
            &json,
            lease,
        )?;
        Ok(())
    }

    pub fn delete_pod(
        &self,
        vpc: &Label,
        namespace: &Label,
        name: &PodName,
    ) -> Result<bool, ClusterError> {
        Ok(self.store.delete(&self.pod_key(vpc, namespace, name))?)
    }

    /// What a write to `key` changed; `None` for keys no reader follows (`ipam/*`).
    fn change_of(&self, key: &str) -> Option<Change> {
        let rest = key.strip_prefix(&self.prefix())?;
        if rest == "settings" {
            return Some(Change::Settings);
        }
        let (kind, name) = rest.split_once('/')?;
        let name = name.to_owned();
        match kind {
            "nodes" => Some(Change::Node(name)),
            "peers" => Some(Change::Peer(name)),
            "status" => Some(Change::Status(name)),
            // Block claims change nothing a reader follows; the member record does.
            "vpcs" if name.split('/').nth(1) == Some("blocks") => None,
            "vpcs" => Some(Change::Vpc(name.split('/').next()?.to_owned())),
            _ => None,
        }
    }
}

impl Registry for Cluster {
    fn settings(&self) -> Result<ClusterSettings, RegistryError> {
        Ok(Cluster::settings(self)?)
    }

    fn claim_block(
        &self,
        node: &NodeName,
        settings: &ClusterSettings,
        previous: Option<IpNet>,
    ) -> Result<ipam::NodeBlock, RegistryError> {
        Ok(Cluster::claim_block(self, node, settings, previous)?)
    }

    fn join(&self, node: &Node, ttl: Duration) -> Result<Box<dyn Membership>, RegistryError> {
        let lease = self.store.grant_lease(ttl)?;
        self.put_node(node, lease)?;
        Ok(Box::new(StoreMembership {
            cluster: self.clone(),
            name: node.name.clone(),
            lease,
            ttl,
        }))
    }

    fn snapshot(&self) -> Result<(Snapshot, Vec<BadRecord>), RegistryError> {
        let (snapshot, bad, _) = Cluster::snapshot(self)?;
        Ok((snapshot, bad))
    }

    fn changes(&self) -> Result<Box<dyn Changes>, RegistryError> {
        let (_, revision) = self.store.list(&self.prefix())?;
        let watch = self.store.watch(&self.prefix(), revision)?;
        Ok(Box::new(StoreChanges {
            cluster: self.clone(),
            watch,
            waiting: VecDeque::new(),
        }))
    }

    fn statuses(&self) -> Result<Vec<NodeStatus>, RegistryError> {
        Ok(Cluster::statuses(self)?)
    }

    fn put_peer(&self, peer: &ExternalPeer) -> Result<(), RegistryError> {
        Ok(Cluster::put_peer(self, peer)?)
    }

    fn delete_peer(&self, name: &PeerName) -> Result<bool, RegistryError> {
        Ok(Cluster::delete_peer(self, name.as_str())?)
    }

    fn vpc_records(&self) -> Result<(Records, Vec<BadRecord>), RegistryError> {
        Ok(Cluster::vpc_records(self)?)
    }

    fn create_vpc(&self, vpc: &Vpc) -> Result<bool, RegistryError> {
        Ok(Cluster::create_vpc(self, vpc)?)
    }

    fn delete_vpc(&self, name: &Label) -> Result<bool, RegistryError> {
        Ok(Cluster::delete_vpc(self, name)?)
    }

    fn claim_vpc_member(&self, vpc: &Vpc, node: &NodeName) -> Result<VpcMember, RegistryError> {
        Cluster::claim_vpc_member(self, vpc, node)
    }

    fn leave_vpc(&self, vpc: &Label, node: &NodeName) -> Result<(), RegistryError> {
        Ok(Cluster::leave_vpc(self, vpc, node)?)
    }

    fn put_service(&self, service: &Service) -> Result<(), RegistryError> {
        Ok(Cluster::put_service(self, service)?)
    }

    fn delete_service(&self, id: &ServiceId) -> Result<bool, RegistryError> {
        Ok(Cluster::delete_service(self, id)?)
    }

    fn put_endpoint(&self, endpoint: &Endpoint) -> Result<(), RegistryError> {
        Ok(Cluster::put_endpoint(self, endpoint, None)?)
    }

    fn delete_endpoint(&self, id: &ServiceId, address: IpAddr) -> Result<bool, RegistryError> {
        Ok(Cluster::delete_endpoint(self, id, address)?)
    }

    fn delete_pod(
        &self,
        vpc: &Label,
        namespace: &Label,
        name: &PodName,
    ) -> Result<bool, RegistryError> {
        Ok(Cluster::delete_pod(self, vpc, namespace, name)?)
    }
}

/// One parsed record of `vpcs/`.
enum VpcRecordKind {
    Vpc(Vpc),
    Member(VpcMember),
    Service(Service),
    Endpoint(Endpoint),
    Pod(Pod),
}

impl VpcRecordKind {
    fn add_to(self, records: &mut Records) {
        match self {
            VpcRecordKind::Vpc(v) => records.vpcs.push(v),
            VpcRecordKind::Member(m) => records.members.push(m),
            VpcRecordKind::Service(s) => records.services.push(s),
            VpcRecordKind::Endpoint(e) => records.endpoints.push(e),
            VpcRecordKind::Pod(p) => records.pods.push(p),
        }
    }
}

/// A node's records under a store lease.
struct StoreMembership {
    cluster: Cluster,
    name: NodeName,
    lease: LeaseId,
    ttl: Duration,
}

impl Membership for StoreMembership {
    fn publish(&mut self, node: &Node) -> Result<(), RegistryError> {
        Ok(self.cluster.put_node(node, self.lease)?)
    }

    fn heartbeat(&mut self, node: &Node) -> Result<(), RegistryError> {
        match self.cluster.store.keep_alive(self.lease) {
            Ok(()) => Ok(()),
            Err(StoreError::LeaseNotFound { .. }) => {
                tracing::warn!("lease ended; rejoining");
                self.lease = self.cluster.store.grant_lease(self.ttl)?;
                Ok(self.cluster.put_node(node, self.lease)?)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn report(&mut self, status: &NodeStatus) -> Result<(), RegistryError> {
        Ok(self.cluster.put_status(status, self.lease)?)
    }

    fn publish_endpoint(&mut self, endpoint: &Endpoint) -> Result<(), RegistryError> {
        Ok(self.cluster.put_endpoint(endpoint, Some(self.lease))?)
    }

    fn publish_pod(&mut self, pod: &Pod) -> Result<(), RegistryError> {
        Ok(self.cluster.put_pod(pod, Some(self.lease))?)
    }

    fn leave(self: Box<Self>) -> Result<(), RegistryError> {
        self.cluster.delete_node(&self.name)?;
        // The records are gone already; a lease that cannot be revoked just expires.
        let _ = self.cluster.store.revoke_lease(self.lease);
        Ok(())
    }
}

/// A store watch on the cluster's prefix, one [`Change`] per event.
struct StoreChanges {
    cluster: Cluster,
    watch: Watch,
    /// The rest of the last batch.
    waiting: VecDeque<Change>,
}

impl Changes for StoreChanges {
    fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Change>, RegistryError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(change) = self.waiting.pop_front() {
                return Ok(Some(change));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let batch = if left.is_zero() {
                self.watch.try_recv()?
            } else {
                self.watch.recv_timeout(left)?
            };
            let Some(batch) = batch else {
                return Ok(None);
            };
            self.waiting.extend(
                batch
                    .events
                    .iter()
                    .filter_map(|e: &Event| self.cluster.change_of(e.key())),
            );
            if self.waiting.is_empty() && Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(dir: &tempfile::TempDir) -> Cluster {
        let store = open_store(&format!("dir:{}", dir.path().display())).unwrap();
        Cluster::new(store, "c")
    }

    fn vpc(name: &str, id: u32) -> Vpc {
        serde_json::from_value::<VpcRecord>(serde_json::json!({
            "name": name, "id": id, "pod_cidrs": ["10.10.0.0/16"],
            "service_cidr": "10.96.0.0/16", "dns_zone": "cluster.local",
        }))
        .unwrap()
        .try_into()
        .unwrap()
    }

    #[test]
    fn member_blocks_are_claimed_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let c = cluster(&dir);
        let blue = vpc("blue", 7);
        assert!(c.create_vpc(&blue).unwrap());
        assert!(!c.create_vpc(&vpc("blue", 8)).unwrap(), "names are unique");
        let (n1, n2): (NodeName, NodeName) = ("n1".parse().unwrap(), "n2".parse().unwrap());
        let m1 = c.claim_vpc_member(&blue, &n1).unwrap();
        let m2 = c.claim_vpc_member(&blue, &n2).unwrap();
        assert_eq!(m1.pod_cidrs, ["10.10.0.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(m2.pod_cidrs, ["10.10.1.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(
            c.claim_vpc_member(&blue, &n1).unwrap(),
            m1,
            "a claim is kept"
        );
        // A lost member record (crash after the block's claim) finds its block again.
        c.store
            .delete(&c.vpc_key(&blue.name, "members/n1"))
            .unwrap();
        assert_eq!(c.claim_vpc_member(&blue, &n1).unwrap(), m1);
        c.leave_vpc(&blue.name, &n1).unwrap();
        let (records, bad) = c.vpc_records().unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(records.vpcs, std::slice::from_ref(&blue));
        assert_eq!(records.members, [m2]);
        assert!(c.delete_vpc(&blue.name).unwrap());
        assert!(c.store.list(&c.key("vpcs/")).unwrap().0.is_empty());
    }

    #[test]
    fn pods_are_filed_by_namespace_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let c = cluster(&dir);
        let pod: Pod = serde_json::from_value::<PodRecord>(serde_json::json!({
            "vpc": "blue", "namespace": "web", "name": "web-0", "address": "10.10.0.5",
            "node": "n1", "labels": {"app": "web"},
        }))
        .unwrap()
        .try_into()
        .unwrap();
        c.put_pod(&pod, None).unwrap();
        assert!(c
            .store
            .get(&c.key("vpcs/blue/pods/web/web-0"))
            .unwrap()
            .is_some());
        let (records, bad) = c.vpc_records().unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(records.pods, std::slice::from_ref(&pod));
        assert!(c.delete_pod(&pod.vpc, &pod.namespace, &pod.name).unwrap());
        assert!(c.vpc_records().unwrap().0.pods.is_empty());
    }

    #[test]
    fn bad_and_misfiled_records_are_set_aside_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let c = cluster(&dir);
        c.create_vpc(&vpc("blue", 7)).unwrap();
        let green = serde_json::to_vec(&VpcRecord::from(&vpc("green", 9))).unwrap();
        c.store
            .put(&c.key("vpcs/blue/members/n1"), &green, None)
            .unwrap();
        c.store.put(&c.key("vpcs/red/vpc"), &green, None).unwrap();
        let (records, bad) = c.vpc_records().unwrap();
        assert_eq!(records.vpcs.len(), 1);
        let mut errors: Vec<String> = bad.iter().map(ToString::to_string).collect();
        errors.sort();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].starts_with("/wiremesh/c/vpcs/blue/members/n1: invalid `member`"),
            "{errors:?}"
        );
        assert!(
            errors[1].contains("/wiremesh/c/vpcs/red/vpc: invalid `key`"),
            "{errors:?}"
        );
        assert!(
            errors[1].contains("belong at /wiremesh/c/vpcs/green/vpc"),
            "{errors:?}"
        );
    }
}
