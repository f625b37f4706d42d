//! A userspace WAN emulator for testbeds in network namespaces.
//!
//! This kernel has no netem, so wiremesh carries its own: a [`Hub`] owns one TUN port
//! per host, each created inside that host's network namespace, and forwards IP
//! packets between the ports by destination address. Every directed link (port `a` to
//! port `b`) applies an [`Impairment`]: one-way delay, jitter with or without
//! reordering, random or bursty (Gilbert–Elliott) loss, a rate limit with a bounded
//! queue, and link down/up. Each link draws from its own seeded RNG stream, so the
//! same seed and the same packets on a link (sizes, arrival times, impairment
//! changes) give the same decisions; traffic on one link never shifts another's.
//!
//! [`Hub::watch_for`] counts packets carrying a byte pattern per link, so a benchmark
//! can prove that no plaintext crossed the underlay.
//!
//! - [`link`]: the pure per-direction model (no I/O, no clock: time is an argument).
//! - [`routes`], [`frame`]: which port a packet goes to; what a TUN read stands for
//!   on the wire (pure).
//! - [`hub`]: the shell (TUN ports, reader threads, one delivery scheduler); the ports
//!   are `wiremesh_wg::tun` devices with TCP and UDP segmentation offload.

pub mod frame;
pub mod hub;
pub mod link;
pub mod routes;

pub use hub::{Hub, LinkStats, PortSpec};
pub use link::{DropReason, Impairment, Link, Loss, Verdict};

/// What can go wrong setting up or reconfiguring a hub.
#[derive(Debug, thiserror::Error)]
pub enum WanemError {
    /// A value that makes no sense, named by its field (`loss.probability`, `mtu`, ...).
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    /// A port index beyond the hub's ports.
    #[error("no port {port}: the hub has {ports} ports")]
    NoSuchPort { port: usize, ports: usize },
    /// Creating or configuring a port's TUN interface failed.
    #[error("port {port} ({ifname} in netns {netns}): {reason}")]
    Port {
        port: usize,
        netns: String,
        ifname: String,
        reason: String,
    },
}
