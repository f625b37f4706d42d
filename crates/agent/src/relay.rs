//! The relay's data path: for each pair of NATed nodes this node relays (see
//! `wiremesh_topology::relay`), two UDP ports on its public address, one facing
//! each end. Like a TURN server it learns each end's NAT mapping from the datagrams
//! arriving on that end's port and sends them on, from the other port, to the
//! other end's mapping. The datagrams are WireGuard's, encrypted end to end: the
//! relay holds no key and sees no plaintext.
//!
//! Each port is served by a thread blocked on its socket; the agent's loop only
//! says which pairs to serve ([`Relays::serve`]). A mapping is whatever address a
//! well-formed WireGuard message last came from: anyone who can reach the port can
//! redirect the pair's ciphertext (a denial of service, never a disclosure).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use wiremesh_model::NodePair;

/// The ports a relay allocates from, two per relayed pair.
pub const RELAY_PORTS: RangeInclusive<u16> = 51900..=51999;
/// How often a port's thread looks up from its socket to see if it should stop.
const STOP_CHECK: Duration = Duration::from_millis(250);

/// Whether `datagram` is a WireGuard message of types 1-4 (whitepaper §5.4) of the
/// size its type has: initiation 148, response 92, cookie reply 64 bytes, transport
/// data a 16-byte header and a 16-byte tag around a payload padded to 16.
pub fn is_wireguard(datagram: &[u8]) -> bool {
    let Some((&kind, rest)) = datagram.split_first() else {
        return false;
    };
    if rest.len() < 3 || rest[..3] != [0, 0, 0] {
        return false;
    }
    match kind {
        1 => datagram.len() == 148,
        2 => datagram.len() == 92,
        3 => datagram.len() == 64,
        4 => datagram.len() >= 32 && (datagram.len() - 32).is_multiple_of(16),
        _ => false,
    }
}

/// Datagrams a pair's relay forwarded or dropped (malformed, or no mapping yet for
/// the other end).
#[derive(Debug, Default)]
pub struct Counters {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
}

/// The pairs this node relays.
pub struct Relays {
    ip: Option<IpAddr>,
    pairs: BTreeMap<NodePair, Forwarder>,
}

impl Relays {
    /// Relays bound to `ip`, the node's public address; `None` for a node behind
    /// NAT, which never relays.
    pub fn new(ip: Option<IpAddr>) -> Relays {
        Relays {
            ip,
            pairs: BTreeMap::new(),
        }
    }

    /// Serve exactly `wanted`: a pair already served keeps its ports, a pair no
    /// longer wanted has its sockets closed. Returns the ports of every pair served,
    /// to publish; a pair whose ports could not be bound is left out (and retried
    /// on the next call).
    pub fn serve(&mut self, wanted: &BTreeSet<NodePair>) -> BTreeMap<NodePair, [u16; 2]> {
        self.pairs.retain(|pair, _| wanted.contains(pair));
        if let Some(ip) = self.ip {
            for pair in wanted {
                if self.pairs.contains_key(pair) {
                    continue;
                }
                let taken: BTreeSet<u16> = self.pairs.values().flat_map(|f| f.ports).collect();
                match Forwarder::start(ip, &taken) {
                    Ok(f) => {
                        tracing::info!(%pair, ports = ?f.ports, "relaying a pair of NATed nodes");
                        self.pairs.insert(pair.clone(), f);
                    }
                    Err(e) => tracing::warn!(%pair, "cannot relay: {e}"),
                }
            }
        }
        self.pairs
            .iter()
            .map(|(p, f)| (p.clone(), f.ports))
            .collect()
    }

    /// Forwarded and dropped datagrams per pair.
    pub fn counts(&self) -> BTreeMap<NodePair, (u64, u64)> {
        self.pairs
            .iter()
            .map(|(pair, f)| {
                let c = &f.counters;
                let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
                (pair.clone(), (load(&c.forwarded), load(&c.dropped)))
            })
            .collect()
    }
}

/// One pair's two ports and their threads; dropped, it closes both sockets.
struct Forwarder {
    /// Facing the pair's first node, then its second.
    ports: [u16; 2],
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Forwarder {
    fn start(ip: IpAddr, taken: &BTreeSet<u16>) -> std::io::Result<Forwarder> {
        let mut sockets = Vec::with_capacity(2);
        for port in RELAY_PORTS.filter(|p| !taken.contains(p)) {
            if let Ok(socket) = UdpSocket::bind(SocketAddr::new(ip, port)) {
                socket.set_read_timeout(Some(STOP_CHECK))?;
                sockets.push((port, Arc::new(socket)));
                if sockets.len() == 2 {
                    break;
                }
            }
        }
        let [(first_port, first), (second_port, second)]: [(u16, Arc<UdpSocket>); 2] = sockets
            .try_into()
            .map_err(|_| std::io::Error::other(format!("no two free ports in {RELAY_PORTS:?}")))?;
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mappings = Arc::new(Mutex::new([None; 2]));
        let side = |side: usize, from: &Arc<UdpSocket>, to: &Arc<UdpSocket>| {
            let end = End {
                side,
                from: from.clone(),
                to: to.clone(),
                mappings: mappings.clone(),
                counters: counters.clone(),
                stop: stop.clone(),
            };
            std::thread::Builder::new()
                .name(format!(
                    "relay-{}",
                    from.local_addr().map_or(0, |a| a.port())
                ))
                .spawn(move || end.run())
        };
        let threads = vec![side(0, &first, &second)?, side(1, &second, &first)?];
        Ok(Forwarder {
            ports: [first_port, second_port],
            counters,
            stop,
            threads,
        })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One direction of a pair: what arrives on `from` (the port facing end `side`)
/// goes out of `to` to the other end's mapping.
struct End {
    side: usize,
    from: Arc<UdpSocket>,
    to: Arc<UdpSocket>,
    mappings: Arc<Mutex<[Option<SocketAddr>; 2]>>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
}

impl End {
    fn run(self) {
        let mut buf = vec![0u8; 65_536];
        while !self.stop.load(Ordering::Relaxed) {
            let Ok((len, source)) = self.from.recv_from(&mut buf) else {
                continue;
            };
            let datagram = &buf[..len];
            let other = is_wireguard(datagram)
                .then(|| {
                    let mut m = self.mappings.lock().unwrap_or_else(PoisonError::into_inner);
                    m[self.side] = Some(source);
                    m[1 - self.side]
                })
                .flatten();
            let sent = other.is_some_and(|to| self.to.send_to(datagram, to).is_ok());
            let counter = if sent {
                &self.counters.forwarded
            } else {
                &self.counters.dropped
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8, len: usize) -> Vec<u8> {
        let mut m = vec![0u8; len];
        m[0] = kind;
        m
    }

    #[test]
    fn only_wireguard_messages_of_their_size_pass() {
        for (kind, len) in [(1, 148), (2, 92), (3, 64), (4, 32), (4, 32 + 1408)] {
            assert!(is_wireguard(&message(kind, len)), "type {kind}, {len} B");
        }
        for (kind, len) in [
            (1, 147),
            (2, 93),
            (3, 65),
            (4, 31),
            (4, 40),
            (5, 148),
            (0, 32),
        ] {
            assert!(!is_wireguard(&message(kind, len)), "type {kind}, {len} B");
        }
        let mut reserved = message(1, 148);
        reserved[2] = 1;
        assert!(!is_wireguard(&reserved));
        assert!(!is_wireguard(&[]));
    }

    /// Two "NATed ends" on loopback: each end's mapping is learned from its first
    /// datagram; junk is dropped; removing the pair frees its ports.
    #[test]
    fn forwards_between_learned_mappings() {
        let localhost = IpAddr::from([127, 0, 0, 1]);
        let mut relays = Relays::new(Some(localhost));
        let pair = NodePair::new("a".parse().unwrap(), "b".parse().unwrap()).unwrap();
        let wanted = BTreeSet::from([pair.clone()]);
        let ports = relays.serve(&wanted)[&pair];
        assert_eq!(relays.serve(&wanted)[&pair], ports, "ports are stable");
        let end = || {
            let s = UdpSocket::bind((localhost, 0)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s
        };
        let (a, b) = (end(), end());
        let at = |port| SocketAddr::new(localhost, port);
        let init = message(1, 148);
        // a first: b's mapping is unknown, so it is dropped; then b, then a again.
        a.send_to(&init, at(ports[0])).unwrap();
        a.send_to(b"junk", at(ports[0])).unwrap();
        poll_until(|| relays.counts()[&pair].1 == 2);
        let response = message(2, 92);
        b.send_to(&response, at(ports[1])).unwrap();
        let mut buf = [0u8; 256];
        let (n, from) = a.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&response[..], at(ports[0])));
        let data = message(4, 48);
        a.send_to(&data, at(ports[0])).unwrap();
        let (n, from) = b.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&data[..], at(ports[1])));
        // Counted just after sending: poll.
        poll_until(|| relays.counts()[&pair] == (2, 2));
        assert!(relays.serve(&BTreeSet::new()).is_empty());
        UdpSocket::bind(at(ports[0])).expect("the pair's port is closed");
    }

    /// Polls `done` for up to two seconds.
    fn poll_until(done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
