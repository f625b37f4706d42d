//! [`Registry`]: what the agent and the CLI do with the cluster's registry, whatever
//! holds it.
//!
//! Two kinds of registry sit behind it. A key-value [`Store`](wiremesh_registry::Store)
//! (embedded directory, etcd) through [`Cluster`](crate::Cluster), where wiremesh owns
//! every record: a pod CIDR is claimed by compare-and-swap and liveness is a store
//! lease. And the Kubernetes API through [`KubeCluster`](crate::KubeCluster), where
//! Kubernetes owns the Node objects: the pod CIDR is the Node's `spec.podCIDR` and
//! liveness is a `coordination.k8s.io` Lease. Neither fakes the other's semantics;
//! both promise what this trait says, and `tests/conformance` checks the promises
//! against each backend.
//!
//! Snapshots from both go through [`set_aside_conflicts`], so a record that clashes
//! with another (a key used twice, overlapping pod CIDRs) is reported the same way
//! wherever it came from.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use wiremesh_kube::KubeError;
use wiremesh_model::{ClusterSettings, ExternalPeer, FieldError, Node, NodeName, PeerName};
use wiremesh_registry::StoreError;
use wiremesh_topology::{ipam, Snapshot};
use wiremesh_vpc::snapshot::Records;
use wiremesh_vpc::{Endpoint, Label, Pod, PodName, Service, Vpc, VpcMember};

use crate::cluster::ClusterError;

/// The cluster's registry, as the agent and the CLI use it. Cheap calls block.
pub trait Registry: Send + Sync {
    /// The cluster settings.
    fn settings(&self) -> Result<ClusterSettings, RegistryError>;

    /// This node's pod CIDR and the mesh IP derived from it. `previous` is the CIDR
    /// the node had before (kept in its state directory); a registry that allocates
    /// gives it back if the node still holds it, and never gives one CIDR to two nodes.
    fn claim_block(
        &self,
        node: &NodeName,
        settings: &ClusterSettings,
        previous: Option<IpNet>,
    ) -> Result<ipam::NodeBlock, RegistryError>;

    /// Publishes `node` and makes it live for `ttl` past each heartbeat.
    fn join(&self, node: &Node, ttl: Duration) -> Result<Box<dyn Membership>, RegistryError>;

    /// Every live node and every external peer, and the records that could not be
    /// used (unparseable, or clashing with another), each named with the field.
    fn snapshot(&self) -> Result<(Snapshot, Vec<BadRecord>), RegistryError>;

    /// Changes from now on: every write that completes after this returns is
    /// reported, in order per record (or covered by a [`Change::Resync`]).
    fn changes(&self) -> Result<Box<dyn Changes>, RegistryError>;

    /// Every live node's last device report.
    fn statuses(&self) -> Result<Vec<NodeStatus>, RegistryError>;

    /// Adds or replaces an external peer.
    fn put_peer(&self, peer: &ExternalPeer) -> Result<(), RegistryError>;

    /// Removes an external peer; `false` if there was none of that name.
    fn delete_peer(&self, name: &PeerName) -> Result<bool, RegistryError>;

    // VPCs and services. A backend without VPC records keeps these defaults, which
    // say so.

    /// Every VPC, member, service, endpoint and pod record that parses, and those that
    /// do not (checking them against each other is `VpcSnapshot::build`'s).
    fn vpc_records(&self) -> Result<(Records, Vec<BadRecord>), RegistryError> {
        Err(RegistryError::NoVpcs)
    }

    /// Creates a VPC; `false` if one of that name exists.
    fn create_vpc(&self, _vpc: &Vpc) -> Result<bool, RegistryError> {
        Err(RegistryError::NoVpcs)
    }

    /// Removes a VPC with its members, services and endpoints; `false` if there was none.
    fn delete_vpc(&self, _name: &Label) -> Result<bool, RegistryError> {
        Err(RegistryError::NoVpcs)
    }

    /// `node`'s blocks of `vpc`'s pod CIDRs: the ones it holds, else the lowest free,
    /// claimed by compare-and-swap so two nodes never share one.
    fn claim_vpc_member(&self, _vpc: &Vpc, _node: &NodeName) -> Result<VpcMember, RegistryError> {
        Err(RegistryError::NoVpcs)
    }

    /// Gives `node`'s blocks of `vpc` back (its last pod left).
    fn leave_vpc(&self, _vpc: &Label, _node: &NodeName) -> Result<(), RegistryError> {
        Err(RegistryError::NoVpcs)
    }

    /// Adds or replaces a service.
    fn put_service(&self, _service: &Service) -> Result<(), RegistryError> {
        Err(RegistryError::NoVpcs)
    }

    /// Removes a service and its endpoints; `false` if there was none.
    fn delete_service(&self, _id: &ServiceId) -> Result<bool, RegistryError> {
        Err(RegistryError::NoVpcs)
    }

    /// Adds or replaces an endpoint of a service.
    fn put_endpoint(&self, _endpoint: &Endpoint) -> Result<(), RegistryError> {
        Err(RegistryError::NoVpcs)
    }

    /// Removes an endpoint; `false` if there was none.
    fn delete_endpoint(&self, _id: &ServiceId, _address: IpAddr) -> Result<bool, RegistryError> {
        Err(RegistryError::NoVpcs)
    }

    /// Removes a pod of `vpc` (its node's agent, once the pod is gone); `false` if
    /// there was none.
    fn delete_pod(
        &self,
        _vpc: &Label,
        _namespace: &Label,
        _name: &PodName,
    ) -> Result<bool, RegistryError> {
        Err(RegistryError::NoVpcs)
    }
}

/// A service's name: `VPC/NAMESPACE/NAME`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceId {
    pub vpc: Label,
    pub namespace: Label,
    pub name: Label,
}

impl std::str::FromStr for ServiceId {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Self, FieldError> {
        let parts: Vec<&str> = s.split('/').collect();
        let [vpc, namespace, name] = parts[..] else {
            return Err(FieldError::new(
                "service",
                format!("{s:?} is not VPC/NAMESPACE/NAME"),
            ));
        };
        Ok(ServiceId {
            vpc: Label::parse("vpc", vpc)?,
            namespace: Label::parse("namespace", namespace)?,
            name: Label::parse("name", name)?,
        })
    }
}

impl std::fmt::Display for ServiceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.vpc, self.namespace, self.name)
    }
}

impl ServiceId {
    /// The service an endpoint belongs to.
    pub fn of(endpoint: &Endpoint) -> ServiceId {
        ServiceId {
            vpc: endpoint.vpc.clone(),
            namespace: endpoint.namespace.clone(),
            name: endpoint.service.clone(),
        }
    }
}

impl From<&Service> for ServiceId {
    fn from(s: &Service) -> Self {
        ServiceId {
            vpc: s.vpc.clone(),
            namespace: s.namespace.clone(),
            name: s.name.clone(),
        }
    }
}

/// A node in the mesh, from [`Registry::join`] until [`Membership::leave`]. Dropping
/// it without leaving lets the node expire, as a crash would.
pub trait Membership: Send {
    /// Replaces the node's record (new key, new observed endpoints).
    fn publish(&mut self, node: &Node) -> Result<(), RegistryError>;

    /// Keeps the node live; if its liveness had ended (the registry was away longer
    /// than the TTL), starts it again and republishes `node`.
    fn heartbeat(&mut self, node: &Node) -> Result<(), RegistryError>;

    /// Publishes what the node's device reports, for `wiremesh status`; it lives as
    /// long as the node does.
    fn report(&mut self, status: &NodeStatus) -> Result<(), RegistryError>;

    /// Publishes an endpoint on this node under the node's liveness, so it goes
    /// (and every VIP stops choosing it) when the node does.
    fn publish_endpoint(&mut self, _endpoint: &Endpoint) -> Result<(), RegistryError> {
        Err(RegistryError::NoVpcs)
    }

    /// Publishes a pod on this node (its address and labels) under the node's
    /// liveness, so label selectors stop matching it when the node goes.
    fn publish_pod(&mut self, _pod: &Pod) -> Result<(), RegistryError> {
        Err(RegistryError::NoVpcs)
    }

    /// Takes the node out of the mesh at once: its record and report go.
    fn leave(self: Box<Self>) -> Result<(), RegistryError>;
}

/// A stream of [`Change`]s.
pub trait Changes: Send {
    /// The next change, or `Ok(None)` if none came within `timeout`. An `Err` means
    /// the stream ended: take a new one from [`Registry::changes`] (and read again).
    fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Change>, RegistryError>;

    /// A change if one is waiting.
    fn try_recv(&mut self) -> Result<Option<Change>, RegistryError> {
        self.recv_timeout(Duration::ZERO)
    }
}

/// What changed in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Settings,
    /// A node's record or its liveness, by the name the registry holds it under.
    Node(String),
    Peer(String),
    /// A node's device report: never changes the topology.
    Status(String),
    /// A VPC's record, or one of its members, services or endpoints, by VPC name.
    Vpc(String),
    /// The stream started over: anything may have changed.
    Resync,
}

impl Change {
    /// Whether the change calls for a reconcile: it can alter a node's topology or
    /// its VPCs.
    pub fn affects_topology(&self) -> bool {
        !matches!(self, Change::Status(_))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error(transparent)]
    Ipam(#[from] ipam::IpamError),
    #[error("node {node} has no spec.podCIDR yet (Kubernetes assigns it: kube-controller-manager --allocate-node-cidrs)")]
    NoPodCidr { node: NodeName },
    #[error("node {node}: {error}")]
    NodeObject { node: NodeName, error: FieldError },
    #[error("the registry's watches were not established within {0:?}")]
    WatchNotEstablished(Duration),
    #[error(
        "this registry holds no VPC records yet (VPCs need a store registry: dir: or etcd://)"
    )]
    NoVpcs,
    #[error("the cluster settings have no mesh_ula (written before VPCs existed): VPCs are unavailable; `wiremesh init` gives a new cluster one, on Kubernetes set it in the wiremesh-settings ConfigMap (deploy/30-settings.yaml)")]
    NoMeshUla,
    #[error("VPC {vpc} has no free block of {cidr} left for node {node}")]
    VpcExhausted {
        vpc: Label,
        cidr: IpNet,
        node: NodeName,
    },
}

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        RegistryError::Cluster(e.into())
    }
}

impl RegistryError {
    /// Whether waiting may cure it: the registry was unreachable, or the node is not
    /// ready yet (no pod CIDR). The agent retries these at start-up.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Cluster(ClusterError::Store(StoreError::Unavailable { .. })) => true,
            RegistryError::Kube(e) => e.is_transient(),
            RegistryError::NoPodCidr { .. } | RegistryError::WatchNotEstablished(_) => true,
            _ => false,
        }
    }
}

/// A record the registry holds but wiremesh could not use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// Where it is: a store key, or `node/<name>`, `peer/<name>` on Kubernetes.
    pub key: String,
    pub error: FieldError,
}

impl std::fmt::Display for BadRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.error)
    }
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

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// A node's IPv6 pod CIDR must be the block its IPv4 one implies. Two nodes may not
/// claim one public key or overlapping pod CIDRs, and an external
/// peer may not claim a node's prefixes, another peer's addresses, or a key in use:
/// the later record (by name) is set aside as bad, so a forged or stale record cannot
/// hijack traffic, and the rest stays. `node_key`/`peer_key` say where a record lives.
pub fn set_aside_conflicts(
    snapshot: &mut Snapshot,
    bad: &mut Vec<BadRecord>,
    node_key: impl Fn(&NodeName) -> String,
    peer_key: impl Fn(&PeerName) -> String,
) {
    snapshot.nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let mut nodes: Vec<Node> = Vec::new();
    for node in std::mem::take(&mut snapshot.nodes) {
        let misplaced = wiremesh_topology::ipam::check_pod_cidr_v6(&snapshot.settings, &node).err();
        let clash = misplaced.or_else(|| {
            nodes.iter().find_map(|k| {
                if k.public_key == node.public_key {
                    Some(FieldError::new(
                        "public_key",
                        format!("already used by node {}", k.name),
                    ))
                } else if overlaps(&k.pod_cidr, &node.pod_cidr) {
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
            })
        });
        match clash {
            Some(error) => bad.push(BadRecord {
                key: node_key(&node.name),
                error: error.within(&format!("node {}", node.name)),
            }),
            None => nodes.push(node),
        }
    }
    snapshot.nodes = nodes;

    snapshot.peers.sort_by(|a, b| a.name.cmp(&b.name));
    let node_prefixes: Vec<(String, IpNet)> = snapshot
        .nodes
        .iter()
        .flat_map(|n| {
            [n.pod_cidr, IpNet::from(n.mesh_ip)]
                .into_iter()
                .chain(n.pod_cidr_v6.map(IpNet::V6))
                .map(|p| (n.name.to_string(), p))
        })
        .collect();
    let mut peers: Vec<ExternalPeer> = Vec::new();
    for peer in std::mem::take(&mut snapshot.peers) {
        let taken_key = snapshot
            .nodes
            .iter()
            .any(|n| n.public_key == peer.public_key)
            || peers.iter().any(|k| k.public_key == peer.public_key);
        let clash = peer.allowed_ips.iter().find_map(|ip| {
            let owner = node_prefixes
                .iter()
                .find(|(_, p)| overlaps(p, ip))
                .map(|(n, _)| format!("node {n}"));
            owner
                .or_else(|| {
                    peers
                        .iter()
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
            Some(error) => bad.push(BadRecord {
                key: peer_key(&peer.name),
                error: error.within(&format!("peer {}", peer.name)),
            }),
            None => peers.push(peer),
        }
    }
    snapshot.peers = peers;
}
