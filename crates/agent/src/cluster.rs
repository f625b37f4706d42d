//! The cluster's records in a registry [`Store`]: where each lives, how it is parsed.
//!
//! Key layout under `/wiremesh/<cluster>/`:
//! - `settings`: [`ClusterSettings`], written once by `wiremesh init`;
//! - `nodes/<name>`: each node's [`Node`] record, under the node's lease;
//! - `peers/<name>`: external peers;
//! - `ipam/<pod-cidr>`: which node holds a pod CIDR (no lease: survives restarts);
//! - `status/<name>`: what each node's device reports (handshakes, bytes), under its lease.
//!
//! A record that fails to parse is reported with its key and the field, and left
//! out of the snapshot: it never stops the rest of the mesh.
//!
//! [`Cluster`] is the [`Registry`] of every store backend; `wiremesh demo`, the
//! benchmarks and the tests also reach its keys directly.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use wiremesh_model::{ClusterSettings, ExternalPeer, FieldError, Node, NodeName, PeerName};
use wiremesh_registry::{Address, EtcdOptions, Event, LeaseId, Revision, Store, StoreError, Watch};
use wiremesh_topology::{ipam, Snapshot};

use crate::registry::{
    set_aside_conflicts, BadRecord, Change, Changes, Membership, NodeStatus, Registry,
    RegistryError,
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
