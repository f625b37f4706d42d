//! Property: every request and snapshot survives render → parse unchanged, so the
//! device and the agent (which use opposite directions) can never disagree.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use proptest::prelude::*;
use wiremesh_uapi::{
    DeviceSnapshot, PeerConfig, PeerSnapshot, PresharedKey, PrivateKey, PublicKey, SetRequest,
};

fn key() -> impl Strategy<Value = [u8; 32]> {
    any::<[u8; 32]>()
}

fn endpoint() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::new(IpAddr::from(a), p)),
        (any::<[u16; 8]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::new(IpAddr::from(a), p)),
    ]
}

fn net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (any::<[u8; 4]>(), 0u8..=32)
            .prop_map(|(a, l)| IpNet::new(IpAddr::from(a), l).expect("len")),
        (any::<[u16; 8]>(), 0u8..=128)
            .prop_map(|(a, l)| IpNet::new(IpAddr::from(a), l).expect("len")),
    ]
}

fn peer_config() -> impl Strategy<Value = PeerConfig> {
    (
        key(),
        any::<[bool; 3]>(),
        proptest::option::of(key()),
        proptest::option::of(endpoint()),
        proptest::option::of(any::<u16>()),
        proptest::collection::vec(net(), 0..4),
        any::<bool>(),
    )
        .prop_map(|(k, flags, psk, ep, ka, ips, pv)| {
            let mut p = PeerConfig::new(PublicKey(k));
            p.remove = flags[0];
            p.update_only = flags[1];
            p.replace_allowed_ips = flags[2];
            p.preshared_key = psk.map(PresharedKey::from_bytes);
            p.endpoint = ep;
            p.persistent_keepalive_interval = ka;
            p.allowed_ips = ips;
            p.protocol_version = pv.then_some(1);
            p
        })
}

fn set_request() -> impl Strategy<Value = SetRequest> {
    (
        proptest::option::of(key()),
        proptest::option::of(any::<u16>()),
        proptest::option::of(any::<u32>()),
        any::<bool>(),
        proptest::collection::vec(peer_config(), 0..4),
    )
        .prop_map(|(pk, port, mark, replace, peers)| SetRequest {
            private_key: pk.map(PrivateKey::from_bytes),
            listen_port: port,
            fwmark: mark,
            replace_peers: replace,
            peers,
        })
}

fn snapshot() -> impl Strategy<Value = DeviceSnapshot> {
    let peer = (
        key(),
        proptest::option::of(key()),
        proptest::option::of(endpoint()),
        any::<(u16, u64, u32, u64, u64)>(),
        proptest::collection::vec(net(), 0..4),
    )
        .prop_map(|(k, psk, ep, (ka, sec, nsec, rx, tx), ips)| {
            let mut p = PeerSnapshot::new(PublicKey(k));
            // All-zero keys mean "none" on the wire.
            p.preshared_key = psk.map(PresharedKey::from_bytes).filter(|k| !k.is_zero());
            p.endpoint = ep;
            p.persistent_keepalive_interval = ka;
            p.last_handshake_time_sec = sec;
            p.last_handshake_time_nsec = nsec;
            p.rx_bytes = rx;
            p.tx_bytes = tx;
            p.allowed_ips = ips;
            p
        });
    (
        proptest::option::of(key()),
        any::<u16>(),
        any::<u32>(),
        proptest::collection::vec(peer, 0..4),
    )
        .prop_map(|(pk, port, mark, peers)| DeviceSnapshot {
            private_key: pk.map(PrivateKey::from_bytes).filter(|k| !k.is_zero()),
            listen_port: port,
            fwmark: mark,
            peers,
        })
}

proptest! {
    #[test]
    fn set_request_round_trips(req in set_request()) {
        prop_assert_eq!(SetRequest::parse(&req.render()), Ok(req));
    }

    #[test]
    fn snapshot_round_trips(snap in snapshot()) {
        prop_assert_eq!(DeviceSnapshot::parse(&snap.render()), Ok(snap));
    }

    #[test]
    fn parsing_arbitrary_text_never_panics(text in "(set=1\n)?([a-z_]{0,30}=[ -~]{0,80}\n){0,8}\n?") {
        let _ = SetRequest::parse(&text);
        let _ = DeviceSnapshot::parse(&text);
    }
}
