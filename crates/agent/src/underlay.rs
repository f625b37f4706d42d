//! The host's own underlay addresses, watched so that a move is noticed at once.
//!
//! WireGuard roams a peer to wherever that peer's authenticated packets come from,
//! but only once the moved node sends something. A node that mostly answers (a
//! worker serving requests) sends nothing while its peers' packets go to its old
//! address and are lost, so they keep sending there until a handshake timer or a
//! persistent keepalive brings a packet from the new one: 15 s and more. Instead,
//! when this host's addresses change, the agent has its device send a keepalive to
//! every peer at once ([`keepalive_pulse`]), and moves its own published endpoints
//! with the address they named ([`moved_endpoint`]).
//!
//! Polled once a second by the agent's loop (`ip -json address`); the decisions
//! are pure functions of the two address lists.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;
use wiremesh_host::{run, uapi_client, HostError};
use wiremesh_model::Node;
use wiremesh_uapi::{DeviceSnapshot, SetRequest};

use crate::plan::keepalive_request;

/// How often the host's addresses are read.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// Keepalive pulses after a change, one a poll: a keepalive is one datagram, and
/// one lost must not cost the peers a handshake timeout.
const PULSES: u8 = 3;

/// One address of the host, on its interface.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostAddress {
    pub interface: String,
    pub ip: IpAddr,
}

/// The UAPI request that makes the device send a keepalive to every peer with an
/// endpoint, leaving each peer's persistent-keepalive interval as it was.
pub fn keepalive_pulse(device: &DeviceSnapshot) -> Option<SetRequest> {
    keepalive_request(
        device
            .peers
            .iter()
            .filter(|p| p.endpoint.is_some())
            .map(|p| (p.public_key, p.persistent_keepalive_interval)),
    )
}

/// Where `endpoint` (one of this node's own) goes when the host's addresses change
/// from `before` to `after`: its address left the interface that held it, and that
/// interface now holds exactly one new address of the same family, so the endpoint
/// follows it (same port). `None` when the endpoint still holds, or when the move
/// is not that clear (the endpoint was not a local address, as behind a NAT or a
/// cloud's 1:1 mapping, or several addresses appeared).
pub fn moved_endpoint(
    endpoint: SocketAddr,
    before: &[HostAddress],
    after: &[HostAddress],
) -> Option<SocketAddr> {
    if after.iter().any(|a| a.ip == endpoint.ip()) {
        return None;
    }
    let interface = &before.iter().find(|a| a.ip == endpoint.ip())?.interface;
    let mut appeared = after.iter().filter(|a| {
        &a.interface == interface
            && a.ip.is_ipv4() == endpoint.is_ipv4()
            && !before.iter().any(|b| b.ip == a.ip)
    });
    match (appeared.next(), appeared.next()) {
        (Some(new), None) => Some(SocketAddr::new(new.ip, endpoint.port())),
        _ => None,
    }
}

/// Addresses that can carry the underlay: not loopback, not link-local, not on the
/// WireGuard interface itself.
fn underlay_addresses(all: Vec<HostAddress>, wireguard_interface: &str) -> Vec<HostAddress> {
    let mut kept: Vec<HostAddress> = all
        .into_iter()
        .filter(|a| a.interface != wireguard_interface && !a.ip.is_loopback())
        .filter(|a| match a.ip {
            IpAddr::V4(v4) => !v4.is_link_local(),
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
        })
        .collect();
    kept.sort();
    kept
}

/// Every address of the host (`ip -json address show`).
fn read_addresses() -> Result<Vec<HostAddress>, HostError> {
    #[derive(Deserialize)]
    struct Link {
        ifname: String,
        #[serde(default)]
        addr_info: Vec<Info>,
    }
    #[derive(Deserialize)]
    struct Info {
        local: Option<IpAddr>,
    }
    let out = run(&["ip", "-json", "address", "show"])?;
    let links: Vec<Link> = serde_json::from_str(&out).map_err(|e| HostError::Output {
        command: "ip -json address show".into(),
        reason: e.to_string(),
    })?;
    Ok(links
        .into_iter()
        .flat_map(|l| {
            let interface = l.ifname;
            l.addr_info.into_iter().filter_map(move |i| {
                Some(HostAddress {
                    interface: interface.clone(),
                    ip: i.local?,
                })
            })
        })
        .collect())
}

/// Has the device at `socket` send every peer a keepalive.
fn pulse(socket: &Path) {
    match uapi_client::get(socket).map(|d| keepalive_pulse(&d)) {
        Ok(Some(request)) => {
            if let Err(e) = uapi_client::set(socket, &request) {
                tracing::warn!("sending keepalives after an address change: {e}");
            }
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("reading the device after an address change: {e}"),
    }
}

/// The agent's watch on this host's underlay addresses.
pub struct UnderlayWatch {
    wireguard_interface: String,
    addresses: Option<Vec<HostAddress>>,
    last_poll: Option<Instant>,
    pulses_left: u8,
}

impl UnderlayWatch {
    pub fn new(wireguard_interface: &str) -> UnderlayWatch {
        UnderlayWatch {
            wireguard_interface: wireguard_interface.to_owned(),
            addresses: None,
            last_poll: None,
            pulses_left: 0,
        }
    }

    /// At most once a second: if the host's addresses changed since the last look,
    /// sends every peer a keepalive through the device at `socket` (on this poll and
    /// the next two) and moves `me`'s endpoints that followed an address. True when
    /// `me` changed (publish it).
    pub fn follow(&mut self, socket: &Path, me: &mut Node) -> bool {
        if self.last_poll.is_some_and(|t| t.elapsed() < POLL_EVERY) {
            return false;
        }
        self.last_poll = Some(Instant::now());
        let now = match read_addresses() {
            Ok(all) => underlay_addresses(all, &self.wireguard_interface),
            Err(e) => {
                tracing::debug!("reading the host's addresses: {e}");
                return false;
            }
        };
        let Some(before) = self.addresses.replace(now.clone()) else {
            return false;
        };
        if before != now {
            tracing::info!(?before, after = ?now, "the host's underlay addresses changed: telling every peer");
            self.pulses_left = PULSES;
        }
        if self.pulses_left > 0 {
            self.pulses_left -= 1;
            pulse(socket);
        }
        if before == now {
            return false;
        }
        let mut changed = false;
        for endpoint in [&mut me.public_endpoint, &mut me.private_endpoint]
            .into_iter()
            .flatten()
        {
            if let Some(moved) = moved_endpoint(*endpoint, &before, &now) {
                tracing::info!(from = %endpoint, to = %moved, "this node's endpoint moved");
                *endpoint = moved;
                changed = true;
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wiremesh_uapi::{PeerSnapshot, PrivateKey};

    fn at(interface: &str, ip: &str) -> HostAddress {
        HostAddress {
            interface: interface.into(),
            ip: ip.parse().unwrap(),
        }
    }

    fn check(endpoint: &str, before: &[HostAddress], after: &[HostAddress], want: Option<&str>) {
        let got = moved_endpoint(endpoint.parse().unwrap(), before, after);
        assert_eq!(
            got,
            want.map(|w| w.parse().unwrap()),
            "{before:?} -> {after:?}"
        );
    }

    #[test]
    fn an_endpoint_follows_its_address_to_the_one_new_address() {
        let old = [at("eth0", "10.0.0.2"), at("eth1", "192.168.1.5")];
        let moved = [at("eth0", "10.0.0.102"), at("eth1", "192.168.1.5")];
        check("10.0.0.2:51820", &old, &moved, Some("10.0.0.102:51820"));
        // The address is still there (another one was added): nothing moves.
        let added = [at("eth0", "10.0.0.2"), at("eth0", "10.0.0.7")];
        check("10.0.0.2:51820", &old, &added, None);
        // Not a local address (a NAT's or a cloud's public address): nothing moves.
        check("203.0.113.9:51820", &old, &moved, None);
        // Two new addresses on its interface: which one is unclear.
        let two = [at("eth0", "10.0.0.102"), at("eth0", "10.0.0.103")];
        check("10.0.0.2:51820", &old, &two, None);
        // The new address on another interface, or of the other family, is not it.
        let elsewhere = [at("eth1", "192.168.1.5"), at("eth1", "192.168.1.6")];
        check("10.0.0.2:51820", &old, &elsewhere, None);
        let v6 = [at("eth0", "2001:db8::2"), at("eth1", "192.168.1.5")];
        check("10.0.0.2:51820", &old, &v6, None);
        // Gone, with nothing in its place.
        check("10.0.0.2:51820", &old, &old[1..], None);
    }

    #[test]
    fn only_addresses_that_can_carry_the_underlay_are_watched() {
        let all = vec![
            at("wg0", "10.4.0.1"),
            at("lo", "127.0.0.1"),
            at("pod0", "169.254.1.1"),
            at("eth0", "fe80::1"),
            at("eth0", "2001:db8::2"),
            at("eth0", "10.0.0.2"),
        ];
        assert_eq!(
            underlay_addresses(all, "wg0"),
            vec![at("eth0", "10.0.0.2"), at("eth0", "2001:db8::2")]
        );
    }

    #[test]
    fn the_pulse_turns_every_reachable_peers_keepalive_off_on_and_back() {
        let key = |_| PrivateKey::generate().public_key();
        let (quiet, kept, unknown) = (key(1), key(2), key(3));
        let mut device = DeviceSnapshot::default();
        for (k, interval, endpoint) in [
            (quiet, 0, Some("192.0.2.1:51820")),
            (kept, 25, Some("192.0.2.2:51820")),
            (unknown, 0, None),
        ] {
            let mut p = PeerSnapshot::new(k);
            p.persistent_keepalive_interval = interval;
            p.endpoint = endpoint.map(|e| e.parse().unwrap());
            device.peers.push(p);
        }
        let request = keepalive_pulse(&device).expect("a pulse");
        assert_eq!(
            crate::plan::tests::keepalive_steps_of(&request),
            [
                (quiet, Some(0)),
                (quiet, Some(1)),
                (quiet, Some(0)),
                (kept, Some(0)),
                (kept, Some(1)),
                (kept, Some(25)),
            ]
        );
        assert!(keepalive_pulse(&DeviceSnapshot::default()).is_none());
    }
}
