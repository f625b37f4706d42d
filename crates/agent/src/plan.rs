//! The difference between what this node should have and what its host has, as
//! values: a UAPI [`SetRequest`] touching only the peers that changed, and the
//! routes to add or remove. Pure: the agent's loop applies them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use wiremesh_host::route::InstalledRoute;
use wiremesh_topology::{Route, Topology};
use wiremesh_uapi::{DeviceSnapshot, PeerConfig, PeerSnapshot, PrivateKey, SetRequest};

/// How long after its last handshake a peer's endpoint is trusted over the
/// registry's: WireGuard roams to wherever the peer's authenticated packets come
/// from, which beats any published address while the session is alive
/// (REJECT_AFTER_TIME, whitepaper §6.1, plus a margin).
pub const ROAMED_ENDPOINT_TRUST_SECS: u64 = 180 + 15;

/// The device change that turns `actual` into `desired`, or `None` if it already is.
/// `now` is unix seconds.
pub fn plan_device(
    desired: &Topology,
    private_key: &PrivateKey,
    actual: &DeviceSnapshot,
    now: u64,
) -> Option<SetRequest> {
    let mut request = SetRequest::default();
    if actual.private_key.as_ref().map(|k| k.public_key()) != Some(private_key.public_key()) {
        request.private_key = Some(private_key.clone());
    }
    if actual.listen_port != desired.interface.listen_port {
        request.listen_port = Some(desired.interface.listen_port);
    }
    let current: BTreeMap<_, &PeerSnapshot> =
        actual.peers.iter().map(|p| (p.public_key, p)).collect();
    for want in &desired.peers {
        let keepalive = want.persistent_keepalive.unwrap_or(0);
        let Some(have) = current.get(&want.public_key) else {
            let mut add = PeerConfig::new(want.public_key);
            add.endpoint = want.endpoint;
            add.persistent_keepalive_interval = want.persistent_keepalive;
            add.replace_allowed_ips = true;
            add.allowed_ips = want.allowed_ips.clone();
            request.peers.push(add);
            continue;
        };
        let mut change = PeerConfig::new(want.public_key);
        change.update_only = true;
        let mut changed = false;
        let have_ips: BTreeSet<IpNet> = have.allowed_ips.iter().map(|n| n.trunc()).collect();
        let want_ips: BTreeSet<IpNet> = want.allowed_ips.iter().copied().collect();
        if have_ips != want_ips {
            change.replace_allowed_ips = true;
            change.allowed_ips = want.allowed_ips.clone();
            changed = true;
        }
        let session_alive = have.last_handshake_time_sec > 0
            && now.saturating_sub(have.last_handshake_time_sec) < ROAMED_ENDPOINT_TRUST_SECS;
        if want.endpoint.is_some()
            && want.endpoint != have.endpoint
            && (have.endpoint.is_none() || !session_alive)
        {
            change.endpoint = want.endpoint;
            changed = true;
        }
        if have.persistent_keepalive_interval != keepalive {
            change.persistent_keepalive_interval = Some(keepalive);
            changed = true;
        }
        if changed {
            request.peers.push(change);
        }
    }
    let wanted: BTreeSet<_> = desired.peers.iter().map(|p| p.public_key).collect();
    for have in &actual.peers {
        if !wanted.contains(&have.public_key) {
            let mut remove = PeerConfig::new(have.public_key);
            remove.remove = true;
            request.peers.push(remove);
        }
    }
    let unchanged =
        request.private_key.is_none() && request.listen_port.is_none() && request.peers.is_empty();
    (!unchanged).then_some(request)
}

/// Routes to install (or replace) and to remove.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    pub replace: Vec<InstalledRoute>,
    pub remove: Vec<InstalledRoute>,
}

impl RoutePlan {
    pub fn is_empty(&self) -> bool {
        self.replace.is_empty() && self.remove.is_empty()
    }
}

/// Routes: `Tunnel` routes go out `interface`; `Gateway` routes out `gateway_dev`
/// (how the gateway is reached, resolved by the caller). `actual` holds only
/// wiremesh's own routes.
pub fn plan_routes(
    desired: &[Route],
    interface: &str,
    gateway_dev: impl Fn(IpAddr) -> Option<String>,
    actual: &[InstalledRoute],
) -> RoutePlan {
    let want: BTreeMap<IpNet, InstalledRoute> = desired
        .iter()
        .filter_map(|r| match r {
            Route::Tunnel { dst } => Some(InstalledRoute {
                dst: *dst,
                dev: interface.to_owned(),
                via: None,
            }),
            Route::Gateway { dst, via } => Some(InstalledRoute {
                dst: *dst,
                dev: gateway_dev(*via)?,
                via: Some(*via),
            }),
        })
        .map(|r| (r.dst, r))
        .collect();
    let mut plan = RoutePlan::default();
    for have in actual {
        if want.get(&have.dst) != Some(have) {
            plan.remove.push(have.clone());
        }
    }
    for (dst, route) in &want {
        if !actual.iter().any(|a| a.dst == *dst && a == route) {
            plan.replace.push(route.clone());
        }
    }
    // A route being replaced is not also removed.
    plan.remove.retain(|r| !want.contains_key(&r.dst));
    plan
}
