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

use std::net::SocketAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use wiremesh_model::{ClusterSettings, ExternalPeer, FieldError, Node, NodeName};
use wiremesh_registry::{Address, EtcdOptions, LeaseId, Revision, Store, StoreError};
use wiremesh_topology::{ipam, Snapshot};

/// Open a registry from its address: `dir:/path` (or a bare path) for the embedded
/// store, `etcd://host:port,...` (or `etcd+https://`) for etcd with default options.
pub fn open_store(address: &str) -> Result<Arc<dyn Store>, StoreError> {
    open_store_with(address, EtcdOptions::default())
}

/// [`open_store`] with etcd credentials and TLS.
pub fn open_store_with(address: &str, etcd: EtcdOptions) -> Result<Arc<dyn Store>, StoreError> {
    address.parse::<Address>()?.open(etcd)
}

/// A record the registry holds but wiremesh could not use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    pub key: String,
    pub error: FieldError,
}

/// What one node's device reported last: published for `wiremesh status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub interface: String,
    pub peers: Vec<PeerStatus>,
    /// Records this node rejected, as `key: error`.
    #[serde(default)]
    pub rejected: Vec<String>,
    pub updated: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    /// Unix seconds of the last handshake, 0 if none.
    pub last_handshake: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
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
        drop_conflicting_nodes(&mut snapshot, &mut bad, &nodes_prefix);
        drop_conflicting_peers(&mut snapshot, &mut bad, &peers_prefix);
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

    /// Whether a key change can alter any node's topology (status updates cannot).
    pub fn affects_topology(&self, key: &str) -> bool {
        let rest = key.strip_prefix(&self.prefix()).unwrap_or("");
        rest == "settings" || rest.starts_with("nodes/") || rest.starts_with("peers/")
    }
}

/// Two records may not claim one public key or overlapping pod CIDRs: the later
/// (by name) is dropped as bad, so a forged or stale record cannot hijack traffic.
fn drop_conflicting_nodes(snapshot: &mut Snapshot, bad: &mut Vec<BadRecord>, nodes_prefix: &str) {
    snapshot.nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let mut kept: Vec<Node> = Vec::new();
    for node in std::mem::take(&mut snapshot.nodes) {
        let clash = kept.iter().find_map(|k| {
            if k.public_key == node.public_key {
                Some(FieldError::new(
                    "public_key",
                    format!("already used by node {}", k.name),
                ))
            } else if k.pod_cidr.contains(&node.pod_cidr.network())
                || node.pod_cidr.contains(&k.pod_cidr.network())
            {
                Some(FieldError::new(
                    "pod_cidr",
                    format!(
                        "{} overlaps node {}'s {}",
                        node.pod_cidr, k.name, k.pod_cidr
                    ),
                ))
            } else {
                None
            }
        });
        match clash {
            Some(error) => {
                let name = node.name.to_string();
                bad.push(BadRecord {
                    key: format!("{nodes_prefix}{name}"),
                    error: error.within(&format!("node {name}")),
                })
            }
            None => kept.push(node),
        }
    }
    snapshot.nodes = kept;
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// An external peer may not claim a node's prefixes, another peer's addresses, or
/// a key already in use: such a record is dropped as bad, the rest stays.
fn drop_conflicting_peers(snapshot: &mut Snapshot, bad: &mut Vec<BadRecord>, peers_prefix: &str) {
    snapshot.peers.sort_by(|a, b| a.name.cmp(&b.name));
    let node_prefixes: Vec<(String, IpNet)> = snapshot
        .nodes
        .iter()
        .flat_map(|n| {
            [
                (n.name.to_string(), n.pod_cidr),
                (n.name.to_string(), IpNet::from(n.mesh_ip)),
            ]
        })
        .collect();
    let mut kept: Vec<ExternalPeer> = Vec::new();
    for peer in std::mem::take(&mut snapshot.peers) {
        let taken_key = snapshot
            .nodes
            .iter()
            .any(|n| n.public_key == peer.public_key)
            || kept.iter().any(|k| k.public_key == peer.public_key);
        let clash = peer.allowed_ips.iter().find_map(|ip| {
            let owner = node_prefixes
                .iter()
                .find(|(_, p)| overlaps(p, ip))
                .map(|(n, _)| format!("node {n}"));
            owner
                .or_else(|| {
                    kept.iter()
                        .find(|k| k.allowed_ips.iter().any(|o| overlaps(o, ip)))
                        .map(|k| format!("peer {}", k.name))
                })
                .map(|owner| {
                    FieldError::new("allowed_ips", format!("{ip} overlaps {owner}'s addresses"))
                })
        });
        let error = if taken_key {
            Some(FieldError::new(
                "public_key",
                "already used by another node or peer",
            ))
        } else {
            clash
        };
        match error {
            Some(error) => {
                let name = peer.name.to_string();
                bad.push(BadRecord {
                    key: format!("{peers_prefix}{name}"),
                    error: error.within(&format!("peer {name}")),
                })
            }
            None => kept.push(peer),
        }
    }
    snapshot.peers = kept;
}
