//! wiremesh's Kubernetes registry: the cluster's nodes and peers kept in the
//! Kubernetes API, the way Kilo keeps them, instead of in etcd or a directory.
//!
//! # How the agent's records map
//!
//! | agent's key (etcd, embedded) | Kubernetes |
//! |---|---|
//! | `settings` | ConfigMap `wiremesh-settings` (key `settings.json`, the same JSON) in wiremesh's namespace |
//! | `nodes/<name>` | the Node object `<name>`: `wiremesh.io/*` annotations ([`node`]), pod CIDR from `spec.podCIDR`, mesh IP derived from it and the settings |
//! | the node record's lease | Lease `<name>` (`coordination.k8s.io/v1`) in wiremesh's namespace, renewed each heartbeat ([`lease`]) |
//! | `peers/<name>` | cluster-scoped custom resource `Peer` (`wiremesh.io/v1alpha1`) `<name>` ([`peer`]) |
//! | `ipam/<cidr>` | none: Kubernetes allocates pod CIDRs (`kube-controller-manager --allocate-node-cidrs`) |
//! | `status/<name>` | annotation `wiremesh.io/status` on the node's Lease (the same JSON), so it goes with the Lease |
//! | `vpcs/<vpc>/vpc` | cluster-scoped custom resource `Vpc` (`wiremesh.io/v1alpha1`) `<vpc>`, its `spec` ([`vpc`]) |
//! | `vpcs/<vpc>/members/<node>`, `blocks/*` | an entry of that Vpc's `status.members`, claimed under its `resourceVersion` |
//! | `vpcs/<vpc>/services/<ns>/<name>` | Service `<ns>/<name>`, label `wiremesh.io/vpc`, headless to Kubernetes, the VPC's clusterIP in an annotation |
//! | `vpcs/<vpc>/endpoints/<ns>/<svc>/<addr>` | EndpointSlice `<ns>/<svc>-<addr in hex>` of one endpoint; live while its node's Lease is |
//! | `vpcs/<vpc>/pods/<ns>/<name>` | an entry of the annotation `wiremesh.io/pods` on the node's Lease, so it goes with the Lease |
//!
//! Annotations: `wiremesh.io/public-key`, `wiremesh.io/location` (else the label
//! `topology.kubernetes.io/region`, else `default`), `wiremesh.io/public-endpoint`,
//! `wiremesh.io/private-endpoint`, `wiremesh.io/leader-preference`,
//! `wiremesh.io/persistent-keepalive`, `wiremesh.io/observed-endpoints` (JSON).
//!
//! # Why not a [`Store`](wiremesh_registry::Store)
//!
//! `Store` promises etcd v3: one revision counter over every key, compare-and-put on
//! a key's revision, leases that delete the keys under them, watches that resume from
//! a revision. Kubernetes has resourceVersions per object, not a store-wide counter
//! one can compare or resume across resource kinds; and deleting a Node object
//! because an agent stopped would be wrong (the kubelet owns it). Faking those
//! semantics on top of annotations would pass for etcd and break in the corners the
//! conformance suite is there to catch. So [`KubeRegistry`] offers what the agent
//! does with its registry instead, in model types: [`KubeRegistry::settings`],
//! [`KubeRegistry::list`] (nodes with a live Lease, peers, and the objects left out
//! with the annotation or field that is wrong), [`KubeRegistry::publish`] (this
//! node's annotations, one JSON merge patch), [`KubeRegistry::heartbeat`] (its Lease,
//! server-side apply), [`KubeRegistry::leave`], and [`KubeRegistry::changes`]
//! (`kube::runtime::watcher` on Nodes, Peers and Leases, and on Vpcs and the VPCs'
//! Services and EndpointSlices, filtered to what the mesh reads), plus device
//! reports on the Lease, external peers put and deleted, and the VPC records
//! ([`KubeRegistry::vpc_records`], claims under a `resourceVersion`).
//! The mapping itself is pure functions, tested both ways. The agent's `KubeCluster`
//! (crate `wiremesh-agent`) is the adapter from these to its `Registry` trait.
//! [`BlockingKubeRegistry`] is the same for a std-thread caller such as the agent's
//! loop: a private one-worker runtime, and changes on a std channel.
//!
//! [`manifests`] generates `deploy/` (CRDs, RBAC, settings, DaemonSet) from the same
//! types; the `wiremesh-kube-manifests` binary writes them.

mod blocking;
pub mod lease;
pub mod manifests;
pub mod node;
pub mod peer;
mod registry;
pub mod vpc;

pub use blocking::{BlockingKubeRegistry, Changes};
pub use peer::{Peer, PeerSpec};
pub use registry::{
    BadObject, Change, Claim, KubeError, KubeRegistry, Listing, VpcListing, FIELD_MANAGER,
    SETTINGS_CONFIG_MAP, SETTINGS_KEY, STATUS_ANNOTATION, WATCHED_KINDS,
};
