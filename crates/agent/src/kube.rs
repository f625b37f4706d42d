//! [`KubeCluster`]: the Kubernetes API as the agent's [`Registry`], over
//! [`BlockingKubeRegistry`].
//!
//! What differs from a store ([`crate::Cluster`]): Kubernetes owns the Node objects,
//! so a node's pod CIDR is its `spec.podCIDR` (nothing is claimed; a node whose CIDR
//! is not assigned yet waits), its record is a set of annotations on its Node, its
//! liveness is a Lease renewed at each heartbeat, and its device report is an
//! annotation on that Lease. Two Nodes given overlapping pod CIDRs are reported and
//! one is left out, as two clashing store records are ([`set_aside_conflicts`]).
//! Settings come from the `wiremesh-settings` ConfigMap that `deploy/` applies.
//!
//! VPCs are `Vpc` custom resources whose `status.members` hold the nodes' blocks
//! (claimed under the object's `resourceVersion`), services are Services labelled
//! with their VPC, endpoints are EndpointSlices that count only while their node's
//! Lease is live, and a node's VPC pods are an annotation on its Lease
//! (`wiremesh_kube::vpc`).

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use wiremesh_kube::node::node_preferences;
pub use wiremesh_kube::node::NodePreferences;
use wiremesh_kube::{BlockingKubeRegistry, Claim, WATCHED_KINDS};
use wiremesh_model::{ClusterSettings, ExternalPeer, FieldError, Node, NodeName, PeerName};
use wiremesh_topology::{ipam, Snapshot};
use wiremesh_vpc::snapshot::Records;
use wiremesh_vpc::{Endpoint, Label, Pod, PodName, Service, Vpc, VpcMember};

use crate::registry::{
    set_aside_conflicts, BadRecord, Change, Changes, Membership, NodeStatus, Registry,
    RegistryError, ServiceId,
};

/// How long [`Registry::changes`] waits for its watches to be established.
const ESTABLISH: Duration = Duration::from_secs(30);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A Kubernetes cluster as the agent's registry. Cheap to clone.
#[derive(Clone, Debug)]
pub struct KubeCluster {
    registry: BlockingKubeRegistry,
}

impl KubeCluster {
    pub fn new(registry: BlockingKubeRegistry) -> Self {
        KubeCluster { registry }
    }

    /// In a pod: its service account and namespace; elsewhere `KUBECONFIG` or
    /// `~/.kube/config`. `namespace` overrides where Leases and settings live.
    pub fn connect(namespace: Option<&str>) -> Result<Self, RegistryError> {
        Ok(KubeCluster::new(BlockingKubeRegistry::connect(namespace)?))
    }

    /// What the node's annotations and addresses say about it (location, endpoints
    /// at `port`, leader preference, keepalive), for the agent's defaults.
    pub fn node_preferences(
        &self,
        node: &NodeName,
        port: u16,
    ) -> Result<NodePreferences, RegistryError> {
        let object = self.registry.node_object(node)?;
        node_preferences(&object, port).map_err(|error| RegistryError::NodeObject {
            node: node.clone(),
            error,
        })
    }
}

impl Registry for KubeCluster {
    fn settings(&self) -> Result<ClusterSettings, RegistryError> {
        Ok(self.registry.settings()?)
    }

    /// The Node's `spec.podCIDR`: Kubernetes allocates, so there is nothing to claim
    /// and `previous` does not matter.
    fn claim_block(
        &self,
        node: &NodeName,
        settings: &ClusterSettings,
        _previous: Option<IpNet>,
    ) -> Result<ipam::NodeBlock, RegistryError> {
        let object = self.registry.node_object(node)?;
        let cidr = object
            .spec
            .and_then(|s| s.pod_cidr)
            .ok_or_else(|| RegistryError::NoPodCidr { node: node.clone() })?;
        let field_error = |reason: String| RegistryError::NodeObject {
            node: node.clone(),
            error: FieldError::new("spec.podCIDR", reason),
        };
        let pod_cidr: IpNet = cidr
            .parse()
            .map_err(|e| field_error(format!("{cidr:?}: {e}")))?;
        let mesh_ip =
            ipam::mesh_ip_of(settings, pod_cidr).map_err(|e| field_error(e.to_string()))?;
        Ok(ipam::NodeBlock { pod_cidr, mesh_ip })
    }

    /// The Lease first, then the annotations: the node is in the mesh once both are.
    fn join(&self, node: &Node, ttl: Duration) -> Result<Box<dyn Membership>, RegistryError> {
        self.registry.heartbeat(&node.name, unix_now(), ttl)?;
        self.registry.publish(node)?;
        Ok(Box::new(KubeMembership {
            registry: self.registry.clone(),
            name: node.name.clone(),
            ttl,
        }))
    }

    fn snapshot(&self) -> Result<(Snapshot, Vec<BadRecord>), RegistryError> {
        let settings = self.registry.settings()?;
        let listing = self.registry.list(&settings, unix_now())?;
        let mut bad: Vec<BadRecord> = listing
            .bad
            .into_iter()
            .map(|b| BadRecord {
                key: b.object,
                error: b.error,
            })
            .collect();
        let mut snapshot = Snapshot {
            settings,
            nodes: listing.nodes,
            peers: listing.peers,
        };
        set_aside_conflicts(
            &mut snapshot,
            &mut bad,
            |node| format!("node/{node}"),
            |peer| format!("peer/{peer}"),
        );
        Ok((snapshot, bad))
    }

    /// Returns once every watch has listed, so no later write is missed.
    fn changes(&self) -> Result<Box<dyn Changes>, RegistryError> {
        let changes = self.registry.changes();
        let deadline = Instant::now() + ESTABLISH;
        let mut established = 0;
        while established < WATCHED_KINDS {
            let left = deadline.saturating_duration_since(Instant::now());
            match changes.recv_timeout(left)? {
                Some(wiremesh_kube::Change::Relisted) => established += 1,
                Some(_) => {}
                None => return Err(RegistryError::WatchNotEstablished(ESTABLISH)),
            }
        }
        Ok(Box::new(KubeChanges { changes }))
    }

    fn statuses(&self) -> Result<Vec<NodeStatus>, RegistryError> {
        Ok(self
            .registry
            .status_reports(unix_now())?
            .into_iter()
            .filter_map(|(_, json)| serde_json::from_str(&json).ok())
            .collect())
    }

    fn put_peer(&self, peer: &ExternalPeer) -> Result<(), RegistryError> {
        Ok(self.registry.put_peer(peer)?)
    }

    fn delete_peer(&self, name: &PeerName) -> Result<bool, RegistryError> {
        Ok(self.registry.delete_peer(name.as_str())?)
    }

    fn vpc_records(&self) -> Result<(Records, Vec<BadRecord>), RegistryError> {
        let listing = self.registry.vpc_records(unix_now())?;
        let bad = listing
            .bad
            .into_iter()
            .map(|b| BadRecord {
                key: b.object,
                error: b.error,
            })
            .collect();
        Ok((listing.records, bad))
    }

    fn create_vpc(&self, vpc: &Vpc) -> Result<bool, RegistryError> {
        Ok(self.registry.create_vpc(vpc)?)
    }

    fn delete_vpc(&self, name: &Label) -> Result<bool, RegistryError> {
        Ok(self.registry.delete_vpc(name)?)
    }

    fn claim_vpc_member(&self, vpc: &Vpc, node: &NodeName) -> Result<VpcMember, RegistryError> {
        match self.registry.claim_vpc_member(vpc, node)? {
            Claim::Member(member) => Ok(member),
            Claim::Exhausted(cidr) => Err(RegistryError::VpcExhausted {
                vpc: vpc.name.clone(),
                cidr,
                node: node.clone(),
            }),
        }
    }

    fn leave_vpc(&self, vpc: &Label, node: &NodeName) -> Result<(), RegistryError> {
        Ok(self.registry.leave_vpc(vpc, node)?)
    }

    fn put_service(&self, service: &Service) -> Result<(), RegistryError> {
        Ok(self.registry.put_service(service)?)
    }

    fn delete_service(&self, id: &ServiceId) -> Result<bool, RegistryError> {
        Ok(self
            .registry
            .delete_service(&id.vpc, &id.namespace, &id.name)?)
    }

    /// An EndpointSlice counts only while its node's Lease is live, whoever wrote it.
    fn put_endpoint(&self, endpoint: &Endpoint) -> Result<(), RegistryError> {
        Ok(self.registry.put_endpoint(endpoint)?)
    }

    fn delete_endpoint(&self, id: &ServiceId, address: IpAddr) -> Result<bool, RegistryError> {
        Ok(self
            .registry
            .delete_endpoint(&id.vpc, &id.namespace, &id.name, address)?)
    }

    fn delete_pod(
        &self,
        vpc: &Label,
        namespace: &Label,
        name: &PodName,
    ) -> Result<bool, RegistryError> {
        Ok(self.registry.delete_pod(vpc, namespace, name)?)
    }
}

/// A node's annotations and Lease.
struct KubeMembership {
    registry: BlockingKubeRegistry,
    name: NodeName,
    ttl: Duration,
}

impl Membership for KubeMembership {
    fn publish(&mut self, node: &Node) -> Result<(), RegistryError> {
        Ok(self.registry.publish(node)?)
    }

    /// Server-side apply makes the Lease again if it was deleted or had expired; the
    /// annotations outlive the Lease (and the agent republishes its record whenever
    /// the snapshot lacks it), so there is nothing else to restore.
    fn heartbeat(&mut self, _node: &Node) -> Result<(), RegistryError> {
        Ok(self.registry.heartbeat(&self.name, unix_now(), self.ttl)?)
    }

    fn report(&mut self, status: &NodeStatus) -> Result<(), RegistryError> {
        let json = serde_json::to_string(status).expect("status always serializes");
        Ok(self.registry.report_status(&self.name, &json)?)
    }

    /// An EndpointSlice: it lives with this node's Lease because a reader leaves out
    /// the endpoints of nodes whose Lease is not live (Kubernetes deletes nothing
    /// when a Lease ends).
    fn publish_endpoint(&mut self, endpoint: &Endpoint) -> Result<(), RegistryError> {
        Ok(self.registry.put_endpoint(endpoint)?)
    }

    /// On the node's Lease, so it goes with the Lease.
    fn publish_pod(&mut self, pod: &Pod) -> Result<(), RegistryError> {
        Ok(self.registry.publish_pod(&self.name, pod)?)
    }

    fn leave(self: Box<Self>) -> Result<(), RegistryError> {
        Ok(self.registry.leave(&self.name)?)
    }
}

struct KubeChanges {
    changes: wiremesh_kube::Changes,
}

impl Changes for KubeChanges {
    /// A failed watch request is logged and skipped: the watches retry on their own
    /// (with backoff) and say [`Change::Resync`] once they have listed again.
    fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Change>, RegistryError> {
        use wiremesh_kube::Change as Kube;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.changes.recv_timeout(left) {
                Ok(Some(change)) => {
                    return Ok(Some(match change {
                        // A Lease is its node's liveness.
                        Kube::Node(name) | Kube::Lease(name) => Change::Node(name),
                        Kube::Peer(name) => Change::Peer(name),
                        Kube::Vpc(name) => Change::Vpc(name),
                        Kube::Relisted => Change::Resync,
                    }));
                }
                Ok(None) => return Ok(None),
                Err(e) => {
                    tracing::warn!("{e}; the watch retries");
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                }
            }
        }
    }
}
