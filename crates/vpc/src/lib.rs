//! The pure core of VPCs and services: isolated layer-3 networks that share one mesh,
//! and service VIPs that follow their backends.
//!
//! A VPC spans nodes; on each node it lives in its own network namespace, and its
//! packets cross the mesh inside an IPv6 header whose addresses carry the node and VPC
//! ids ([`wire`]). Services get a clusterIP that exists only as nftables DNAT rules in
//! every client's VPC namespace ([`nft`]), and names in a per-VPC DNS zone ([`dns`]).
//!
//! Everything here is a function of its inputs: no sockets, no clock, no RNG. The agent,
//! the data plane and the CNI plugin call it and apply what it computes.
//!
//! - [`record`]: the registry records (`*Record`, JSON) parsed into validated types.
//! - [`snapshot`]: the records checked against each other; clashes set aside, naming
//!   the field; clusterIP allocation.
//! - [`wire`]: outer addresses, encapsulation and the receiver's checks.
//! - [`mtu`]: the pod MTU under both headers.
//! - [`nft`]: the services ruleset of one VPC namespace, and UDP conntrack flushes.
//! - [`dns`]: answers of the Kubernetes DNS schema, and the pod search path.
//! - [`pods`]: what pods' labels decide: selector endpoints, access by label.

pub mod dns;
pub mod mtu;
pub mod nft;
pub mod pods;
pub mod record;
pub mod snapshot;
pub mod wire;

pub use record::{
    parse_labels, Endpoint, EndpointRecord, IpFamily, Label, LabelSelector, LocalPodRecord, NodeId,
    Pod, PodName, PodRecord, Protocol, Service, ServiceRecord, SessionAffinity, TrafficPolicy, Vpc,
    VpcId, VpcMember, VpcMemberRecord, VpcRecord,
};
pub use snapshot::{allocate_cluster_ip, dns_cluster_ip, BadRecord, VpcSnapshot, VpcState};
