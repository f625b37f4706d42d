//! `wiremesh-wg`: a userspace WireGuard device, a drop-in for wireguard-go.
//!
//! Code map:
//! - [`device`]: the protocol core — peers, cryptokey routing, roaming, UAPI config —
//!   with no I/O; the handshake, sessions, replay and cookies are gotatun's `noise`.
//! - [`allowed_ips`]: the longest-prefix-match table.
//! - [`tun`], [`udp`]: the Linux TUN interface and the UDP sockets; [`offload`] splits
//!   the TUN's TCP segmentation-offload super-packets.
//! - [`uapi_server`]: the `/var/run/wireguard/IFNAME.sock` protocol server.
//! - [`runtime`]: threads wiring the above; [`RunningDevice`] is the in-process API.
//!
//! Architecture invariant: `device` and `allowed_ips` never touch a file descriptor,
//! so everything about the protocol is testable in memory.

pub mod allowed_ips;
pub mod device;
pub mod offload;
pub mod runtime;
pub mod tun;
pub mod uapi_server;
pub mod udp;
mod vpc;

pub use device::{ConfigOutcome, Device, Output};
pub use runtime::{Config, ExitReason, RunningDevice, StartError};
