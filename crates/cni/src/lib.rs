//! `wiremesh-cni`: a CNI plugin (spec 1.1) that plugs a container into its wiremesh
//! node. ADD makes a veth pair into the container's namespace, gives the container an
//! address from the pod CIDR the node's agent claimed, and routes it: a /32 on the
//! node, a default route via the link-local gateway 169.254.1.1 in the container. The
//! agent routes every other node's pod CIDR over WireGuard, so that is all a pod
//! needs to reach pods on any node.
//!
//! Pure parts (tested without namespaces): [`config`] and [`request`] parse what the
//! runtime sends, [`ipam`] decides addresses, [`result`] renders replies, [`veth`]
//! names links and reads `ip -json`. The shell: [`store`] (the flocked IPAM folder)
//! and [`commands`] (running ADD, DEL, CHECK, GC, STATUS and VERSION).

pub mod commands;
pub mod config;
pub mod error;
pub mod ipam;
pub mod request;
pub mod result;
pub mod store;
pub mod version;
pub mod veth;

pub use error::CniError;
