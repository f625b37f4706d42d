//! The difference between what this node should have and what its host has, as
//! values: a UAPI [`SetRequest`] touching only the peers that changed, and the
//! routes to add or remove. Pure: the agent's loop applies them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use wiremesh_host::route::InstalledRoute;
use wiremesh_topology::{Route, Topology};
use wiremesh_uapi::{DeviceSnapshot, PeerConfig, PeerSnapshot, PrivateKey, PublicKey, SetRequest};

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

/// The UAPI request that makes a device send each of `peers` one keepalive now and
/// leave its persistent-keepalive interval at the one given: per peer, off, on
/// (turning it on sends one at once on the kernel's device, wireguard-go and
/// `wiremesh-wg` alike), then back. A peer removed meanwhile is not brought back.
/// `None` for no peers.
pub fn keepalive_request(peers: impl IntoIterator<Item = (PublicKey, u16)>) -> Option<SetRequest> {
    let mut request = SetRequest::default();
    for (peer, interval) in peers {
        request.peers.extend([0, 1, interval].map(|i| {
            let mut step = PeerConfig::new(peer);
            step.update_only = true;
            step.persistent_keepalive_interval = Some(i);
            step
        }));
    }
    (!request.peers.is_empty()).then_some(request)
}

/// A keepalive to each peer that `request` adds with an endpoint, to be sent once it
/// is applied. Without a session, a keepalive starts a handshake. When two nodes
/// add each other (a node joins, a location elects a new leader), the first one's
/// initiation is dropped by the other, which does not know its key yet, and is
/// retried only after REKEY_TIMEOUT (5 s, whitepaper §6.4); the second one's
/// succeeds at once, so the pair has a session as soon as both have applied.
pub fn greet_new_peers(request: &SetRequest) -> Option<SetRequest> {
    keepalive_request(
        request
            .peers
            .iter()
            .filter(|p| !p.update_only && !p.remove && p.endpoint.is_some())
            .map(|p| (p.public_key, p.persistent_keepalive_interval.unwrap_or(0))),
    )
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use wiremesh_topology::{Interface, Peer, PeerKind};
    use wiremesh_uapi::PublicKey;

    fn key(n: u8) -> PublicKey {
        PrivateKey::from_bytes([n; 32]).public_key()
    }

    fn peer(n: u8, endpoint: Option<&str>, ips: &[&str]) -> Peer {
        Peer {
            name: format!("n{n}"),
            kind: PeerKind::Node,
            public_key: key(n),
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            allowed_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            persistent_keepalive: None,
        }
    }

    fn topology(peers: Vec<Peer>) -> Topology {
        Topology {
            this: "me".parse().unwrap(),
            leaders: Default::default(),
            interface: Interface {
                address: "100.64.0.1/16".parse().unwrap(),
                listen_port: 51820,
                mtu: 1420,
            },
            routes: peers
                .iter()
                .flat_map(|p| p.allowed_ips.iter().map(|d| Route::Tunnel { dst: *d }))
                .collect(),
            peers,
        }
    }

    /// `(peer, keepalive interval)` of each step of a keepalive request, which
    /// touches nothing else and never adds a peer.
    pub(crate) fn keepalive_steps_of(request: &SetRequest) -> Vec<(PublicKey, Option<u16>)> {
        request
            .peers
            .iter()
            .map(|p| {
                assert!(p.update_only && p.endpoint.is_none() && p.allowed_ips.is_empty());
                (p.public_key, p.persistent_keepalive_interval)
            })
            .collect()
    }

    /// What a device reports after applying `request` to an empty device.
    fn device_after(request: &SetRequest) -> DeviceSnapshot {
        DeviceSnapshot {
            private_key: request.private_key.clone(),
            listen_port: request.listen_port.unwrap_or(0),
            fwmark: 0,
            peers: request
                .peers
                .iter()
                .map(|p| PeerSnapshot {
                    endpoint: p.endpoint,
                    allowed_ips: p.allowed_ips.clone(),
                    persistent_keepalive_interval: p.persistent_keepalive_interval.unwrap_or(0),
                    ..PeerSnapshot::new(p.public_key)
                })
                .collect(),
        }
    }

    #[test]
    fn applying_the_plan_leaves_nothing_to_do() {
        let me = PrivateKey::from_bytes([9; 32]);
        let want = topology(vec![
            peer(1, Some("10.0.0.1:51820"), &["10.42.1.0/24"]),
            peer(2, None, &["10.42.2.0/24"]),
        ]);
        let first = plan_device(&want, &me, &DeviceSnapshot::default(), 1000)
            .expect("an empty device needs everything");
        assert_eq!(first.peers.len(), 2);
        assert_eq!(plan_device(&want, &me, &device_after(&first), 1000), None);
    }

    #[test]
    fn only_changed_peers_are_touched() {
        let me = PrivateKey::from_bytes([9; 32]);
        let before = topology(vec![
            peer(1, Some("10.0.0.1:51820"), &["10.42.1.0/24"]),
            peer(2, None, &["10.42.2.0/24"]),
        ]);
        let device =
            device_after(&plan_device(&before, &me, &DeviceSnapshot::default(), 0).unwrap());
        let after = topology(vec![
            peer(1, Some("10.0.0.1:51820"), &["10.42.1.0/24", "10.42.7.0/24"]),
            peer(3, None, &["10.42.3.0/24"]),
        ]);
        let plan = plan_device(&after, &me, &device, 0).unwrap();
        let touched: Vec<(PublicKey, bool, bool)> = plan
            .peers
            .iter()
            .map(|p| (p.public_key, p.update_only, p.remove))
            .collect();
        assert_eq!(
            touched,
            vec![
                (key(1), true, false),
                (key(3), false, false),
                (key(2), false, true)
            ]
        );
        assert!(plan.private_key.is_none() && plan.listen_port.is_none());
    }

    #[test]
    fn only_added_peers_with_an_endpoint_are_greeted() {
        let me = PrivateKey::from_bytes([9; 32]);
        let before = topology(vec![peer(1, Some("10.0.0.1:51820"), &["10.42.1.0/24"])]);
        let device =
            device_after(&plan_device(&before, &me, &DeviceSnapshot::default(), 0).unwrap());
        let mut nat = peer(3, Some("10.0.0.3:51820"), &["10.42.3.0/24"]);
        nat.persistent_keepalive = Some(25);
        let after = topology(vec![
            // Changed, not added: it has its session (or its own timers) already.
            peer(1, Some("10.0.0.1:51820"), &["10.42.1.0/24", "10.42.7.0/24"]),
            // Added without an endpoint: nowhere to send to; it will call us.
            peer(2, None, &["10.42.2.0/24"]),
            nat,
        ]);
        let plan = plan_device(&after, &me, &device, 0).unwrap();
        let greet = greet_new_peers(&plan).expect("peer 3 is greeted");
        // Its own keepalive interval is left as planned.
        assert_eq!(
            keepalive_steps_of(&greet),
            [(key(3), Some(0)), (key(3), Some(1)), (key(3), Some(25))]
        );
        assert_eq!(greet_new_peers(&SetRequest::default()), None);
    }

    #[test]
    fn a_roamed_endpoint_wins_while_its_session_lives() {
        let me = PrivateKey::from_bytes([9; 32]);
        let want = topology(vec![peer(1, Some("10.0.0.1:51820"), &["10.42.1.0/24"])]);
        let mut device =
            device_after(&plan_device(&want, &me, &DeviceSnapshot::default(), 0).unwrap());
        device.peers[0].endpoint = Some("198.51.100.7:40000".parse().unwrap());
        device.peers[0].last_handshake_time_sec = 1000;
        assert_eq!(
            plan_device(&want, &me, &device, 1010),
            None,
            "fresh session: keep the roamed endpoint"
        );
        let stale = plan_device(&want, &me, &device, 1000 + ROAMED_ENDPOINT_TRUST_SECS).unwrap();
        assert_eq!(
            stale.peers[0].endpoint,
            Some("10.0.0.1:51820".parse().unwrap())
        );
    }

    #[test]
    fn routes_diff() {
        let have = vec![
            InstalledRoute {
                dst: "10.42.1.0/24".parse().unwrap(),
                dev: "wm0".into(),
                via: None,
            },
            InstalledRoute {
                dst: "10.42.2.0/24".parse().unwrap(),
                dev: "wm0".into(),
                via: None,
            },
        ];
        let want = [
            Route::Tunnel {
                dst: "10.42.1.0/24".parse().unwrap(),
            },
            Route::Tunnel {
                dst: "10.42.3.0/24".parse().unwrap(),
            },
        ];
        let plan = plan_routes(&want, "wm0", |_| None, &have);
        assert_eq!(plan.remove, vec![have[1].clone()]);
        assert_eq!(
            plan.replace
                .iter()
                .map(|r| r.dst.to_string())
                .collect::<Vec<_>>(),
            vec!["10.42.3.0/24"]
        );
        let same = plan_routes(&want[..1], "wm0", |_| None, &have[..1]);
        assert!(same.is_empty());
    }
}
