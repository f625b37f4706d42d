//! The device core: peers, cryptokey routing and the WireGuard protocol, without I/O.
//!
//! [`Device`] takes bytes read from the TUN device or a UDP socket and returns what to
//! write where ([`Output`]); it never touches a file descriptor, so the same core runs
//! under the threaded runtime in [`crate::runtime`] and in in-memory tests. The Noise
//! handshake, sessions, replay window, cookies and timers are gotatun's `noise`
//! module (one [`Tunn`] per peer); this module owns the peer table, the index →
//! peer map used to dispatch incoming packets, the allowed-IPs table, endpoint
//! roaming, and configuration through UAPI.
//!
//! Locking: one `RwLock` over the configuration (written only by UAPI `set`), one
//! `Mutex` per peer, and one `Mutex` over the session-index map. Order, always:
//! state → peer → index map. The data path takes the state lock for reading only.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use gotatun::noise::handshake::parse_handshake_anon;
use gotatun::noise::index_table::IndexTable;
use gotatun::noise::rate_limiter::RateLimiter;
use gotatun::noise::{Tunn, TunnResult};
use gotatun::packet::{Packet, WgKind};
use gotatun::tun::MtuWatcher;
use gotatun::x25519;
use ipnet::IpNet;
use wiremesh_uapi::{DeviceSnapshot, PeerConfig, PeerSnapshot, PrivateKey, PublicKey, SetRequest};

use crate::allowed_ips::AllowedIps;

/// Handshake initiations or responses accepted per source IP per second before the
/// device answers with cookie replies instead (whitepaper §5.3). gotatun's value.
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// Something the I/O layer must write.
#[derive(Debug)]
pub enum Output {
    /// An encrypted datagram for `dst`.
    Network {
        /// Where to send it.
        dst: SocketAddr,
        /// The WireGuard message.
        payload: Packet,
    },
    /// A decrypted IP packet for the TUN device.
    Tunnel(Packet),
}

/// What a configuration change requires of the I/O layer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConfigOutcome {
    /// The listen port changed: rebind the UDP sockets.
    pub rebind: bool,
    /// The firewall mark changed: set it on the sockets.
    pub fwmark_changed: bool,
}

struct KeyPair {
    private: PrivateKey,
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
}

struct Peer {
    public_key: PublicKey,
    tunn: Tunn,
    endpoint: Option<SocketAddr>,
    /// Remembered so `get` still reports the last handshake after its session expired.
    last_handshake: Option<SystemTime>,
    /// Whole WireGuard messages (UDP payloads) to and from this peer, counted like
    /// wireguard-go so `wg show` transfer totals agree on both ends.
    rx_bytes: u64,
    tx_bytes: u64,
    /// Persistent keepalive was turned on: one keepalive goes at the next tick even
    /// if the same request turned it off again, as wireguard-go and the kernel send
    /// it while applying the request (the agent's keepalive pulse relies on that).
    keepalive_owed: bool,
}

type PeerRef = Arc<Mutex<Peer>>;

struct PeerEntry {
    peer: PeerRef,
    /// In the order configured, so `wg showconf` gives back what `wg setconf` got.
    allowed_ips: Vec<IpNet>,
}

#[derive(Default)]
struct State {
    key: Option<KeyPair>,
    rate_limiter: Option<Arc<RateLimiter>>,
    listen_port: u16,
    bound_port: u16,
    fwmark: u32,
    peers: HashMap<PublicKey, PeerEntry>,
    /// Peer keys in creation order (for `get`).
    order: Vec<PublicKey>,
    routes: AllowedIps<PeerRef>,
}

/// Why the device dropped a packet; one counter each, reported by `get_stats=1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketDrop {
    /// The device has no private key yet.
    NoKey,
    /// A datagram that failed the MAC check, or a handshake refused under load.
    Rejected,
    /// A handshake from an unknown key, or data for an unknown session.
    UnknownPeer,
    /// Data that did not decrypt, replayed, or for an expired session.
    InvalidData,
    /// A decrypted packet that is not a valid IP packet.
    MalformedInner,
    /// A decrypted packet whose source the sending peer may not use (cryptokey routing).
    DisallowedSource,
    /// An outgoing packet for an address no peer is allowed.
    NoRoute,
    /// An outgoing packet for a peer whose endpoint is unknown.
    NoEndpoint,
}

impl PacketDrop {
    pub const ALL: [PacketDrop; 8] = [
        PacketDrop::NoKey,
        PacketDrop::Rejected,
        PacketDrop::UnknownPeer,
        PacketDrop::InvalidData,
        PacketDrop::MalformedInner,
        PacketDrop::DisallowedSource,
        PacketDrop::NoRoute,
        PacketDrop::NoEndpoint,
    ];

    /// A metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PacketDrop::NoKey => "no_key",
            PacketDrop::Rejected => "rejected",
            PacketDrop::UnknownPeer => "unknown_peer",
            PacketDrop::InvalidData => "invalid_data",
            PacketDrop::MalformedInner => "malformed_inner",
            PacketDrop::DisallowedSource => "disallowed_source",
            PacketDrop::NoRoute => "no_route",
            PacketDrop::NoEndpoint => "no_endpoint",
        }
    }
}

/// A WireGuard device's protocol state. Shared by all I/O threads (`&self` methods).
pub struct Device {
    state: RwLock<State>,
    by_index: Mutex<HashMap<u32, PeerRef>>,
    index_table: IndexTable,
    /// The TUN MTU, followed by the runtime (`ip link set mtu` may change it).
    mtu: AtomicU16,
    drops: [AtomicU64; PacketDrop::ALL.len()],
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a peer lock must not take the whole device down with it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The destination address of a raw IP packet, if it is one.
pub fn ip_destination(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => {
            let b: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        6 => {
            let b: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        _ => None,
    }
}

impl Device {
    /// A device with no key and no peers, whose TUN device has this MTU (used to
    /// pad packets to a multiple of 16 bytes without exceeding it).
    pub fn new(mtu: u16) -> Self {
        Self {
            state: RwLock::new(State::default()),
            by_index: Mutex::new(HashMap::new()),
            index_table: IndexTable::from_os_rng(),
            mtu: AtomicU16::new(mtu),
            drops: Default::default(),
        }
    }

    fn drop_packet(&self, why: PacketDrop) {
        self.drops[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Packets dropped so far, by reason.
    pub fn drops(&self) -> impl Iterator<Item = (PacketDrop, u64)> + '_ {
        PacketDrop::ALL
            .into_iter()
            .map(|why| (why, self.drops[why as usize].load(Ordering::Relaxed)))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The configured listen port (0: any).
    pub fn listen_port(&self) -> u16 {
        self.read().listen_port
    }

    /// The configured firewall mark (0: none).
    pub fn fwmark(&self) -> u32 {
        self.read().fwmark
    }

    /// Updates the TUN MTU that outgoing packets are padded up to (never beyond).
    pub fn set_mtu(&self, mtu: u16) {
        self.mtu.store(mtu, Ordering::Relaxed);
    }

    /// Records the port the sockets actually bound, reported by `get`.
    pub fn set_bound_port(&self, port: u16) {
        self.write().bound_port = port;
    }

    /// Applies a UAPI `set` request, in order.
    pub fn apply(&self, req: &SetRequest) -> ConfigOutcome {
        let mut out = ConfigOutcome::default();
        let mut st = self.write();
        if let Some(k) = &req.private_key {
            self.set_private_key(&mut st, k);
        }
        if let Some(p) = req.listen_port {
            if p != st.listen_port {
                st.listen_port = p;
                out.rebind = true;
            }
        }
        if let Some(m) = req.fwmark {
            if m != st.fwmark {
                st.fwmark = m;
                out.fwmark_changed = true;
            }
        }
        if req.replace_peers {
            st.peers.clear();
            st.order.clear();
            st.routes.clear();
            lock(&self.by_index).clear();
        }
        for pc in &req.peers {
            self.apply_peer(&mut st, pc);
        }
        out
    }

    fn set_private_key(&self, st: &mut State, k: &PrivateKey) {
        if k.is_zero() {
            st.key = None;
            st.rate_limiter = None;
            for e in st.peers.values() {
                lock(&e.peer).tunn.reset();
            }
            return;
        }
        if st.key.as_ref().is_some_and(|kp| kp.private == *k) {
            return;
        }
        let secret = x25519::StaticSecret::from(*k.as_bytes());
        let public = x25519::PublicKey::from(&secret);
        let rl = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        // A peer with our own public key would be talking to ourselves; wireguard-go
        // drops it too.
        let own = PublicKey(public.to_bytes());
        if st.peers.contains_key(&own) {
            Self::remove_peer(st, &self.by_index, &own);
        }
        for e in st.peers.values() {
            lock(&e.peer)
                .tunn
                .set_static_private(secret.clone(), public, Arc::clone(&rl));
        }
        st.key = Some(KeyPair {
            private: k.clone(),
            secret,
            public,
        });
        st.rate_limiter = Some(rl);
    }

    fn remove_peer(st: &mut State, by_index: &Mutex<HashMap<u32, PeerRef>>, key: &PublicKey) {
        if let Some(e) = st.peers.remove(key) {
            st.order.retain(|k| k != key);
            st.routes.retain(|p| !Arc::ptr_eq(p, &e.peer));
            lock(by_index).retain(|_, p| !Arc::ptr_eq(p, &e.peer));
        }
    }

    fn apply_peer(&self, st: &mut State, pc: &PeerConfig) {
        if pc.remove {
            Self::remove_peer(st, &self.by_index, &pc.public_key);
            return;
        }
        if st
            .key
            .as_ref()
            .is_some_and(|k| k.public.as_bytes() == pc.public_key.as_bytes())
        {
            return;
        }
        if !st.peers.contains_key(&pc.public_key) {
            if pc.update_only {
                return;
            }
            let peer = self.new_peer(st, &pc.public_key);
            st.peers.insert(
                pc.public_key,
                PeerEntry {
                    peer,
                    allowed_ips: Vec::new(),
                },
            );
            st.order.push(pc.public_key);
        }
        let Some(entry) = st.peers.get_mut(&pc.public_key) else {
            return;
        };
        let peer_ref = Arc::clone(&entry.peer);
        {
            let mut peer = lock(&peer_ref);
            if let Some(psk) = &pc.preshared_key {
                peer.tunn
                    .set_preshared_key((!psk.is_zero()).then(|| *psk.as_bytes()));
            }
            if let Some(e) = pc.endpoint {
                peer.endpoint = Some(e);
            }
            if let Some(k) = pc.persistent_keepalive_interval {
                peer.keepalive_owed |= k > 0 && peer.tunn.persistent_keepalive().is_none();
                peer.tunn.set_persistent_keepalive(Some(k));
            }
        }
        if pc.replace_allowed_ips {
            entry.allowed_ips.clear();
            st.routes.retain(|p| !Arc::ptr_eq(p, &peer_ref));
        }
        let mut stolen = Vec::new();
        let mut added = Vec::new();
        for net in &pc.allowed_ips {
            let net = net.trunc();
            // The table and the per-peer lists agree, so the previous owner says whether
            // the list already has this prefix (keeps big syncconfs linear).
            match st.routes.insert(net, Arc::clone(&peer_ref)) {
                Some(old) if Arc::ptr_eq(&old, &peer_ref) => {}
                Some(old) => {
                    stolen.push((old, net));
                    added.push(net);
                }
                None => added.push(net),
            }
        }
        if let Some(entry) = st.peers.get_mut(&pc.public_key) {
            entry.allowed_ips.extend(added);
        }
        // A prefix has one owner: moving it to this peer takes it from the other.
        for (old, net) in stolen {
            for e in st.peers.values_mut() {
                if Arc::ptr_eq(&e.peer, &old) {
                    e.allowed_ips.retain(|n| *n != net);
                }
            }
        }
    }

    fn new_peer(&self, st: &State, key: &PublicKey) -> PeerRef {
        let peer_public = x25519::PublicKey::from(*key.as_bytes());
        // Without a device key the tunnel gets a throwaway one; the data path drops
        // everything until a real key is set, which replaces it.
        let (secret, rl) = match (&st.key, &st.rate_limiter) {
            (Some(k), Some(rl)) => (k.secret.clone(), Arc::clone(rl)),
            _ => {
                let s = x25519::StaticSecret::from(*PrivateKey::generate().as_bytes());
                let p = x25519::PublicKey::from(&s);
                (s, Arc::new(RateLimiter::new(&p, HANDSHAKE_RATE_LIMIT)))
            }
        };
        let tunn = Tunn::new(
            secret,
            peer_public,
            None,
            None,
            self.index_table.clone(),
            rl,
        );
        Arc::new(Mutex::new(Peer {
            public_key: *key,
            tunn,
            endpoint: None,
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            keepalive_owed: false,
        }))
    }

    /// The device's state for a UAPI `get`, with handshake times relative to `now`.
    pub fn snapshot(&self, now: SystemTime) -> DeviceSnapshot {
        let st = self.read();
        let mut snap = DeviceSnapshot {
            private_key: st.key.as_ref().map(|k| k.private.clone()),
            listen_port: st.bound_port,
            fwmark: st.fwmark,
            peers: Vec::with_capacity(st.order.len()),
        };
        for key in &st.order {
            let Some(entry) = st.peers.get(key) else {
                continue;
            };
            let mut peer = lock(&entry.peer);
            let (since, _, _, _, _) = peer.tunn.stats();
            if let Some(since) = since {
                peer.last_handshake = now.checked_sub(since);
            }
            let mut p = PeerSnapshot::new(*key);
            p.preshared_key = peer
                .tunn
                .preshared_key()
                .map(wiremesh_uapi::PresharedKey::from_bytes);
            p.endpoint = peer.endpoint;
            p.persistent_keepalive_interval = peer.tunn.persistent_keepalive().unwrap_or(0);
            let t = peer
                .last_handshake
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .unwrap_or(Duration::ZERO);
            p.last_handshake_time_sec = t.as_secs();
            p.last_handshake_time_nsec = t.subsec_nanos();
            p.tx_bytes = peer.tx_bytes;
            p.rx_bytes = peer.rx_bytes;
            p.allowed_ips = entry.allowed_ips.clone();
            snap.peers.push(p);
        }
        snap
    }

    /// The peer an outgoing packet to `dst` is routed to (cryptokey routing), if any.
    pub fn route(&self, dst: IpAddr) -> Option<PublicKey> {
        let st = self.read();
        let peer = st.routes.lookup(dst)?;
        let key = lock(peer).public_key;
        Some(key)
    }

    /// Remembers which peer owns the session index we just announced in a handshake
    /// message, so replies and data addressed to it find the peer.
    fn register_index(&self, packet: &WgKind, peer: &PeerRef) {
        let idx = match packet {
            WgKind::HandshakeInit(p) => p.sender_idx.get(),
            WgKind::HandshakeResp(p) => p.sender_idx.get(),
            _ => return,
        };
        lock(&self.by_index).insert(idx, Arc::clone(peer));
    }

    fn peer_by_index(&self, idx: u32) -> Option<PeerRef> {
        lock(&self.by_index).get(&idx).cloned()
    }

    /// Handles one UDP datagram from `src`, appending what to send and what to hand to
    /// the TUN device. Anything unauthenticated is dropped without an answer, except a
    /// cookie reply when under load.
    pub fn handle_datagram(&self, datagram: BytesMut, src: SocketAddr, out: &mut Vec<Output>) {
        let len = datagram.len() as u64;
        let st = self.read();
        let (Some(key), Some(rl)) = (&st.key, &st.rate_limiter) else {
            self.drop_packet(PacketDrop::NoKey);
            return;
        };
        let packet = match rl.verify_packet(src, Packet::from_bytes(datagram)) {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                out.push(Output::Network {
                    dst: src,
                    payload: cookie.into(),
                });
                return;
            }
            Err(_) => {
                self.drop_packet(PacketDrop::Rejected);
                return;
            }
        };
        let peer_ref = match &packet {
            WgKind::HandshakeInit(p) => parse_handshake_anon(&key.secret, &key.public, p)
                .ok()
                .and_then(|h| st.peers.get(&PublicKey(h.peer_static_public)))
                .map(|e| Arc::clone(&e.peer)),
            WgKind::HandshakeResp(p) => self.peer_by_index(p.receiver_idx.get()),
            WgKind::CookieReply(p) => self.peer_by_index(p.receiver_idx.get()),
            WgKind::Data(p) => self.peer_by_index(p.header.receiver_idx.get()),
        };
        let Some(peer_ref) = peer_ref else {
            self.drop_packet(PacketDrop::UnknownPeer);
            return;
        };
        let mut peer = lock(&peer_ref);
        match peer.tunn.handle_incoming_packet(packet) {
            TunnResult::Done => peer.rx_bytes += len,
            TunnResult::Err(e) => {
                self.drop_packet(PacketDrop::InvalidData);
                tracing::trace!(error = ?e, %src, "dropped packet");
            }
            TunnResult::WriteToNetwork(reply) => {
                // Authenticated: the peer is at `src` now (roaming, whitepaper §2.1).
                peer.endpoint = Some(src);
                peer.rx_bytes += len;
                self.register_index(&reply, &peer_ref);
                let reply: Packet = reply.into();
                peer.tx_bytes += reply.len() as u64;
                out.push(Output::Network {
                    dst: src,
                    payload: reply,
                });
                let mut mtu = MtuWatcher::new(self.mtu.load(Ordering::Relaxed));
                let queued: Vec<WgKind> = peer.tunn.get_queued_packets(&mut mtu).collect();
                for p in queued {
                    self.register_index(&p, &peer_ref);
                    let p: Packet = p.into();
                    peer.tx_bytes += p.len() as u64;
                    out.push(Output::Network {
                        dst: src,
                        payload: p,
                    });
                }
            }
            TunnResult::WriteToTunnel(inner) => {
                peer.endpoint = Some(src);
                peer.rx_bytes += len;
                if inner.is_empty() {
                    return; // keepalive
                }
                // Validates the IP header and trims the padding (whitepaper §5.4.6).
                let Ok(ip) = inner.try_into_ipvx() else {
                    self.drop_packet(PacketDrop::MalformedInner);
                    return;
                };
                let (source, bytes): (IpAddr, Packet) = ip.either(
                    |v4| (v4.header.source().into(), v4.into()),
                    |v6| (v6.header.source().into(), v6.into()),
                );
                // Cryptokey routing: only accept sources this peer is allowed to use.
                if st
                    .routes
                    .lookup(source)
                    .is_some_and(|owner| Arc::ptr_eq(owner, &peer_ref))
                {
                    out.push(Output::Tunnel(bytes));
                } else {
                    self.drop_packet(PacketDrop::DisallowedSource);
                    tracing::trace!(%source, "dropped packet from disallowed source");
                }
            }
        }
    }

    /// Handles one IP packet read from the TUN device: returns the encrypted datagram
    /// (or handshake initiation) to send, if any.
    pub fn handle_tun_packet(&self, packet: BytesMut) -> Option<(SocketAddr, Packet)> {
        let dst = ip_destination(&packet)?;
        let st = self.read();
        if st.key.is_none() {
            self.drop_packet(PacketDrop::NoKey);
            return None;
        }
        let Some(peer_ref) = st.routes.lookup(dst).map(Arc::clone) else {
            self.drop_packet(PacketDrop::NoRoute);
            return None;
        };
        let mut peer = lock(&peer_ref);
        let Some(endpoint) = peer.endpoint else {
            self.drop_packet(PacketDrop::NoEndpoint);
            return None;
        };
        let mut mtu = MtuWatcher::new(self.mtu.load(Ordering::Relaxed));
        let wg = peer
            .tunn
            .handle_outgoing_packet(Packet::from_bytes(packet), Some(&mut mtu))?;
        self.register_index(&wg, &peer_ref);
        let wg: Packet = wg.into();
        peer.tx_bytes += wg.len() as u64;
        Some((endpoint, wg))
    }

    /// Runs every peer's timers (call every ~100-250 ms): handshake retries, rekeys,
    /// keepalives, session expiry. Appends what to send. `now` is the wall-clock time,
    /// used to remember when each peer's last handshake happened.
    pub fn tick(&self, now: SystemTime, out: &mut Vec<Output>) {
        let st = self.read();
        if let Some(rl) = &st.rate_limiter {
            rl.try_reset_count();
        }
        // Indices of expired sessions were freed from the table; forget them here too.
        lock(&self.by_index).retain(|idx, _| self.index_table.in_use(*idx));
        if st.key.is_none() {
            return;
        }
        for entry in st.peers.values() {
            let mut peer = lock(&entry.peer);
            // Noted while the session lives, so `get` still reports the handshake
            // after the session has expired, as wireguard-go does.
            if let Some(since) = peer.tunn.time_since_last_handshake() {
                peer.last_handshake = now.checked_sub(since);
            }
            let Some(dst) = peer.endpoint else {
                continue;
            };
            let owed = std::mem::take(&mut peer.keepalive_owed);
            let timers = match peer.tunn.update_timers() {
                // An empty packet is a keepalive (or, with no session, a handshake).
                Ok(None) if owed => Ok(peer
                    .tunn
                    .handle_outgoing_packet(Packet::from_bytes(BytesMut::new()), None)),
                other => other,
            };
            match timers {
                Ok(Some(p)) => {
                    self.register_index(&p, &entry.peer);
                    let p: Packet = p.into();
                    peer.tx_bytes += p.len() as u64;
                    out.push(Output::Network { dst, payload: p });
                }
                Ok(None) => {}
                Err(e) => tracing::trace!(error = ?e, "timer"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Two device cores (or a device and a bare gotatun tunnel) handing bytes to each
    //! other in memory.
    use super::*;
    use wiremesh_uapi::PresharedKey;

    const A_ADDR: &str = "192.0.2.1:51820";
    const B_ADDR: &str = "192.0.2.2:51820";

    struct Side {
        dev: Device,
        key: PrivateKey,
    }

    fn side() -> Side {
        let key = PrivateKey::generate();
        let dev = Device::new(1420);
        dev.apply(&SetRequest {
            private_key: Some(key.clone()),
            ..Default::default()
        });
        Side { dev, key }
    }

    fn add_peer(
        on: &Side,
        other: &Side,
        endpoint: &str,
        allowed: &str,
        psk: Option<&PresharedKey>,
    ) {
        let mut p = PeerConfig::new(other.key.public_key());
        p.endpoint = Some(endpoint.parse().unwrap());
        p.allowed_ips = vec![allowed.parse().unwrap()];
        p.preshared_key = psk.cloned();
        on.dev.apply(&SetRequest {
            peers: vec![p],
            ..Default::default()
        });
    }

    /// A and B peered: A is 10.0.0.1 and reachable at `A_ADDR`, B 10.0.0.2 at `B_ADDR`.
    fn pair() -> (Side, Side) {
        let (a, b) = (side(), side());
        let psk = PresharedKey::generate();
        add_peer(&a, &b, B_ADDR, "10.0.0.2/32", Some(&psk));
        add_peer(&b, &a, A_ADDR, "10.0.0.1/32", Some(&psk));
        (a, b)
    }

    fn ipv4_udp(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> BytesMut {
        let total = 28 + payload.len();
        let mut p = vec![
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0x40,
            0,
            64,
            17,
            0,
            0,
        ];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        let udp_len = 8 + payload.len();
        p.extend_from_slice(&[
            0x30,
            0x39,
            0x30,
            0x39,
            (udp_len >> 8) as u8,
            udp_len as u8,
            0,
            0,
        ]);
        p.extend_from_slice(payload);
        BytesMut::from(&p[..])
    }

    fn network(out: Vec<Output>) -> Vec<(SocketAddr, BytesMut)> {
        out.into_iter()
            .filter_map(|o| match o {
                Output::Network { dst, payload } => Some((dst, BytesMut::from(&payload[..]))),
                Output::Tunnel(_) => None,
            })
            .collect()
    }

    fn tunnel(out: &[Output]) -> Vec<Vec<u8>> {
        out.iter()
            .filter_map(|o| match o {
                Output::Tunnel(p) => Some(p.to_vec()),
                Output::Network { .. } => None,
            })
            .collect()
    }

    /// Runs the handshake started by B sending `packet` to A; returns the data
    /// messages B sent after the handshake and what A delivered to its TUN.
    fn handshake_via_first_packet(a: &Side, b: &Side, packet: BytesMut) -> Vec<Vec<u8>> {
        let a_addr: SocketAddr = A_ADDR.parse().unwrap();
        let b_addr: SocketAddr = B_ADDR.parse().unwrap();
        let (dst, init) = b
            .dev
            .handle_tun_packet(packet)
            .expect("handshake initiation");
        assert_eq!(dst, a_addr);
        assert_eq!(init.len(), 148);
        let mut out = Vec::new();
        a.dev
            .handle_datagram(BytesMut::from(&init[..]), b_addr, &mut out);
        let resp = network(std::mem::take(&mut out));
        assert_eq!(resp.len(), 1);
        assert_eq!(resp[0].1.len(), 92);
        b.dev.handle_datagram(resp[0].1.clone(), a_addr, &mut out);
        // B answers with a keepalive, then the queued packet.
        let msgs = network(out);
        assert_eq!(msgs.len(), 2);
        let mut delivered = Vec::new();
        for (_, m) in msgs {
            let mut out = Vec::new();
            a.dev.handle_datagram(m, b_addr, &mut out);
            delivered.extend(tunnel(&out));
        }
        delivered
    }

    #[test]
    fn handshake_and_data_both_ways() {
        let (a, b) = pair();
        let pkt = ipv4_udp([10, 0, 0, 2], [10, 0, 0, 1], b"hello");
        let delivered = handshake_via_first_packet(&a, &b, pkt.clone());
        assert_eq!(delivered, vec![pkt.to_vec()]);
        // A → B on the established session.
        let back = ipv4_udp([10, 0, 0, 1], [10, 0, 0, 2], b"world");
        let (dst, msg) = a.dev.handle_tun_packet(back.clone()).expect("data");
        assert_eq!(dst, B_ADDR.parse::<SocketAddr>().unwrap());
        let mut out = Vec::new();
        b.dev
            .handle_datagram(BytesMut::from(&msg[..]), A_ADDR.parse().unwrap(), &mut out);
        assert_eq!(tunnel(&out), vec![back.to_vec()]);
        let snap = a.dev.snapshot(SystemTime::now());
        assert!(snap.peers[0].last_handshake_time_sec > 0);
        assert!(snap.peers[0].rx_bytes > 0 && snap.peers[0].tx_bytes > 0);
    }

    #[test]
    fn turning_keepalive_on_sends_one_at_once_even_if_turned_off_again() {
        let (a, b) = pair();
        handshake_via_first_packet(&a, &b, ipv4_udp([10, 0, 0, 2], [10, 0, 0, 1], b"x"));
        let tick = |side: &Side| {
            let mut out = Vec::new();
            side.dev.tick(SystemTime::now(), &mut out);
            network(out)
        };
        // A is quiet: nothing is due.
        assert!(tick(&a).is_empty());
        // On, then off, in one request (wireguard-go sends while applying the first).
        let pulse = |k| {
            let mut p = PeerConfig::new(b.key.public_key());
            p.update_only = true;
            p.persistent_keepalive_interval = Some(k);
            p
        };
        a.dev.apply(&SetRequest {
            peers: vec![pulse(1), pulse(0)],
            ..Default::default()
        });
        let sent = tick(&a);
        assert_eq!(sent.len(), 1, "one keepalive: {sent:?}");
        assert_eq!(sent[0].0, B_ADDR.parse::<SocketAddr>().unwrap());
        // B takes it as a keepalive from A (nothing for its TUN), and A owes no more.
        let mut out = Vec::new();
        b.dev
            .handle_datagram(sent[0].1.clone(), A_ADDR.parse().unwrap(), &mut out);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(
            a.dev.snapshot(SystemTime::now()).peers[0].persistent_keepalive_interval,
            0
        );
        assert!(tick(&a).is_empty());
        // Setting an interval that is already on owes nothing extra.
        a.dev.apply(&SetRequest {
            peers: vec![pulse(25)],
            ..Default::default()
        });
        assert_eq!(tick(&a).len(), 1);
        a.dev.apply(&SetRequest {
            peers: vec![pulse(25)],
            ..Default::default()
        });
        assert!(tick(&a).is_empty());
    }

    #[test]
    fn replayed_data_is_rejected() {
        let (a, b) = pair();
        handshake_via_first_packet(&a, &b, ipv4_udp([10, 0, 0, 2], [10, 0, 0, 1], b"x"));
        let pkt = ipv4_udp([10, 0, 0, 2], [10, 0, 0, 1], b"once");
        let (_, msg) = b.dev.handle_tun_packet(pkt.clone()).expect("data");
        let from: SocketAddr = B_ADDR.parse().unwrap();
        let mut out = Vec::new();
        a.dev
            .handle_datagram(BytesMut::from(&msg[..]), from, &mut out);
        assert_eq!(tunnel(&out), vec![pkt.to_vec()]);
        let mut out = Vec::new();
        a.dev
            .handle_datagram(BytesMut::from(&msg[..]), from, &mut out);
        assert!(out.is_empty(), "replay was accepted: {out:?}");
        // A replay from elsewhere must not move the endpoint either.
        let mut out = Vec::new();
        a.dev.handle_datagram(
            BytesMut::from(&msg[..]),
            "198.51.100.9:1".parse().unwrap(),
            &mut out,
        );
        assert!(out.is_empty());
        assert_eq!(
            a.dev.snapshot(SystemTime::now()).peers[0].endpoint,
            Some(from)
        );
    }

    #[test]
    fn endpoint_roams_to_source_of_authenticated_packets() {
        let (a, b) = pair();
        handshake_via_first_packet(&a, &b, ipv4_udp([10, 0, 0, 2], [10, 0, 0, 1], b"x"));
        let (_, msg) = b
            .dev
            .handle_tun_packet(ipv4_udp([10, 0, 0, 2], [10, 0, 0, 1], b"moved"))
            .expect("data");
        let new_addr: SocketAddr = "[2001:db8::2]:4000".parse().unwrap();
        let mut out = Vec::new();
        a.dev
            .handle_datagram(BytesMut::from(&msg[..]), new_addr, &mut out);
        assert_eq!(tunnel(&out).len(), 1);
        let (dst, _) = a
            .dev
            .handle_tun_packet(ipv4_udp([10, 0, 0, 1], [10, 0, 0, 2], b"reply"))
            .expect("data");
        assert_eq!(dst, new_addr);
    }

    #[test]
    fn disallowed_inner_source_is_dropped() {
        let (a, b) = pair();
        handshake_via_first_packet(&a, &b, ipv4_udp([10, 0, 0, 2], [10, 0, 0, 1], b"x"));
        // B may send as 10.0.0.2 only; B routes 10.0.0.1 to A, so this encrypts fine.
        let (_, msg) = b
            .dev
            .handle_tun_packet(ipv4_udp([10, 9, 9, 9], [10, 0, 0, 1], b"spoof"))
            .expect("data");
        let mut out = Vec::new();
        a.dev
            .handle_datagram(BytesMut::from(&msg[..]), B_ADDR.parse().unwrap(), &mut out);
        assert!(tunnel(&out).is_empty());
    }

    #[test]
    fn unknown_peer_and_garbage_get_no_answer() {
        let (a, _b) = pair();
        let stranger = side();
        add_peer(&stranger, &a, A_ADDR, "10.0.0.1/32", None);
        let (_, init) = stranger
            .dev
            .handle_tun_packet(ipv4_udp([10, 0, 0, 3], [10, 0, 0, 1], b"x"))
            .expect("initiation");
        let from: SocketAddr = "192.0.2.3:1".parse().unwrap();
        let mut inputs: Vec<Vec<u8>> =
            vec![init.to_vec(), vec![], vec![1], vec![4; 32], vec![4; 2000]];
        for t in 1u8..=4 {
            for len in [4usize, 16, 32, 64, 92, 148, 1500] {
                let mut v = vec![0u8; len];
                v[0] = t;
                inputs.push(v);
            }
        }
        for input in inputs {
            let mut out = Vec::new();
            a.dev
                .handle_datagram(BytesMut::from(&input[..]), from, &mut out);
            assert!(
                out.is_empty(),
                "answered {} bytes of type {:?}",
                input.len(),
                input.first()
            );
        }
    }

    #[test]
    fn cookie_reply_under_handshake_flood() {
        let (a, b) = pair();
        // The attacker-controlled initiator is B's own tunnel, so its handshakes are
        // valid: under load even valid ones must first prove their address.
        let b_secret = x25519::StaticSecret::from(*b.key.as_bytes());
        let a_public = x25519::PublicKey::from(*a.key.public_key().as_bytes());
        let rl = Arc::new(RateLimiter::new(&x25519::PublicKey::from(&b_secret), 100));
        let mut tunn = Tunn::new(
            b_secret,
            a_public,
            None,
            None,
            IndexTable::from_os_rng(),
            rl,
        );
        let from: SocketAddr = B_ADDR.parse().unwrap();
        let mut cookie = None;
        for _ in 0..(HANDSHAKE_RATE_LIMIT + 5) {
            let init: Packet = tunn.format_handshake_initiation(true).expect("init").into();
            let mut out = Vec::new();
            a.dev
                .handle_datagram(BytesMut::from(&init[..]), from, &mut out);
            let msgs = network(out);
            assert_eq!(msgs.len(), 1);
            if msgs[0].1[0] == 3 {
                cookie = Some(msgs[0].1.clone());
                break;
            }
            assert_eq!(msgs[0].1[0], 2, "expected a handshake response");
        }
        let cookie = cookie.expect("no cookie reply under flood");
        assert_eq!(cookie.len(), 64);
        let cookie = Packet::from_bytes(cookie)
            .try_into_wg()
            .expect("cookie parses");
        assert!(matches!(
            tunn.handle_incoming_packet(cookie),
            TunnResult::Done
        ));
        // With the cookie, the next initiation carries a valid mac2 and is answered.
        let init: Packet = tunn.format_handshake_initiation(true).expect("init").into();
        let mut out = Vec::new();
        a.dev
            .handle_datagram(BytesMut::from(&init[..]), from, &mut out);
        let msgs = network(out);
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].1[0], 2, "handshake with cookie not answered");
    }

    #[test]
    fn routes_to_the_peer_owning_the_longest_prefix() {
        let a = side();
        let (b, c) = (side(), side());
        add_peer(&a, &b, B_ADDR, "10.0.0.0/8", None);
        add_peer(&a, &c, "192.0.2.3:1", "10.1.0.0/16", None);
        let to = |dst: [u8; 4]| a.dev.route(IpAddr::from(dst));
        let (kb, kc) = (Some(b.key.public_key()), Some(c.key.public_key()));
        assert_eq!(to([10, 2, 0, 1]), kb);
        assert_eq!(to([10, 1, 0, 1]), kc);
        assert_eq!(to([11, 0, 0, 1]), None);
        // The first packet to each peer starts a handshake with that peer's endpoint.
        let first = |dst: [u8; 4]| {
            a.dev
                .handle_tun_packet(ipv4_udp([10, 0, 0, 1], dst, b"x"))
                .map(|(ep, _)| ep)
        };
        assert_eq!(first([10, 2, 0, 1]), Some(B_ADDR.parse().unwrap()));
        assert_eq!(first([10, 1, 0, 1]), Some("192.0.2.3:1".parse().unwrap()));
        assert_eq!(first([11, 0, 0, 1]), None);
        // Moving 10.1.0.0/16 to B takes it from C, in the table and in `get`.
        add_peer(&a, &b, B_ADDR, "10.1.0.0/16", None);
        assert_eq!(to([10, 1, 0, 1]), kb);
        let s = a.dev.snapshot(SystemTime::now());
        assert_eq!(s.peers[0].allowed_ips.len(), 2);
        assert!(s.peers[1].allowed_ips.is_empty());
        // Garbage from the TUN side is dropped.
        for junk in [&[][..], &[0x45][..], &[0x60; 20][..], &[0x10; 60][..]] {
            assert!(a.dev.handle_tun_packet(BytesMut::from(junk)).is_none());
        }
    }

    #[test]
    fn config_semantics() {
        let a = side();
        let k1 = PrivateKey::generate().public_key();
        let k2 = PrivateKey::generate().public_key();
        let mut p1 = PeerConfig::new(k1);
        // 10.0.0.9/24 is 10.0.0.0/24 again (host bits dropped): listed once.
        p1.allowed_ips = vec![
            "10.0.0.0/24".parse().unwrap(),
            "10.0.1.5/24".parse().unwrap(),
            "10.0.0.9/24".parse().unwrap(),
        ];
        let mut p2 = PeerConfig::new(k2);
        p2.allowed_ips = vec!["10.0.1.0/24".parse().unwrap()];
        p2.persistent_keepalive_interval = Some(25);
        a.dev.apply(&SetRequest {
            listen_port: Some(5555),
            peers: vec![p1, p2],
            ..Default::default()
        });
        let s = a.dev.snapshot(SystemTime::now());
        assert_eq!(s.peers.len(), 2);
        assert_eq!(
            s.peers[0].allowed_ips,
            vec!["10.0.0.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            s.peers[1].allowed_ips,
            vec!["10.0.1.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(s.peers[1].persistent_keepalive_interval, 25);
        assert_eq!(a.dev.listen_port(), 5555);
        // update_only on an unknown peer creates nothing; remove removes.
        let mut p3 = PeerConfig::new(PrivateKey::generate().public_key());
        p3.update_only = true;
        let mut rm = PeerConfig::new(k1);
        rm.remove = true;
        a.dev.apply(&SetRequest {
            peers: vec![p3, rm],
            ..Default::default()
        });
        let s = a.dev.snapshot(SystemTime::now());
        assert_eq!(s.peers.len(), 1);
        assert_eq!(s.peers[0].public_key, k2);
        // A peer with our own key is ignored.
        a.dev.apply(&SetRequest {
            peers: vec![PeerConfig::new(a.key.public_key())],
            ..Default::default()
        });
        assert_eq!(a.dev.snapshot(SystemTime::now()).peers.len(), 1);
        // replace_peers empties the table, and the key can be removed.
        a.dev.apply(&SetRequest {
            replace_peers: true,
            private_key: Some(PrivateKey::from_bytes([0; 32])),
            ..Default::default()
        });
        let s = a.dev.snapshot(SystemTime::now());
        assert!(s.peers.is_empty() && s.private_key.is_none());
    }
}
