//! Thin adapters between wiremesh and the host it runs on.
//!
//! Nothing here decides anything: callers compute what the host should look like
//! (pure code, elsewhere) and these functions make it so. Links, addresses and routes
//! go through iproute2 (`ip -json`), rules through `nft -f -` (one atomic transaction
//! per call), WireGuard devices through their UAPI socket. Every call returns a
//! [`HostError`] that carries the command and what it printed, so a failed reconcile
//! can be logged once, at the loop, with enough to act on.

mod cmd;
pub mod netns;
pub mod nft;
pub mod pod;
pub mod probe;
pub mod route;
pub mod uapi_client;

pub use cmd::{run, HostError};
