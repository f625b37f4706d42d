//! Hostile datagrams and TUN reads (plain, and with a vnet header to split) through
//! the device core: never a panic, and nothing answered except (under load) cookie
//! replies.
#![no_main]

use std::sync::OnceLock;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use wiremesh_uapi::{PeerConfig, PrivateKey, SetRequest};
use wiremesh_wg::{Device, Output};

fn device() -> &'static Device {
    static DEVICE: OnceLock<Device> = OnceLock::new();
    DEVICE.get_or_init(|| {
        let dev = Device::new(1420);
        let mut peer = PeerConfig::new(PrivateKey::generate().public_key());
        peer.endpoint = Some("192.0.2.2:51820".parse().expect("addr"));
        peer.allowed_ips = vec![
            "0.0.0.0/0".parse().expect("net"),
            "::/0".parse().expect("net"),
        ];
        dev.apply(&SetRequest {
            private_key: Some(PrivateKey::generate()),
            peers: vec![peer],
            ..Default::default()
        });
        dev
    })
}

fuzz_target!(|data: &[u8]| {
    let dev = device();
    let mut out = Vec::new();
    dev.handle_datagram(
        BytesMut::from(data),
        "192.0.2.9:1".parse().expect("addr"),
        &mut out,
    );
    for o in &out {
        if let Output::Network { payload, .. } = o {
            assert_eq!(
                payload.first(),
                Some(&3),
                "answered something other than a cookie"
            );
        } else {
            panic!("unauthenticated bytes reached the tunnel");
        }
    }
    let _ = dev.handle_tun_packet(BytesMut::from(data));
    // The same bytes as a TUN read with a vnet header (offloads on).
    let mut segments = Vec::new();
    if wiremesh_wg::offload::split(data, &mut segments).is_ok() {
        // What the receiving side would merge back for its TUN must split again.
        let mut frames = Vec::new();
        wiremesh_wg::offload::coalesce(&segments, &mut frames);
        for f in &frames {
            let mut again = Vec::new();
            wiremesh_wg::offload::split(f, &mut again).expect("coalesced frame splits");
        }
        for seg in segments {
            let _ = dev.handle_tun_packet(seg);
        }
    }
    // Arbitrary bytes as decrypted packets to merge.
    let mut frames = Vec::new();
    let half = data.len() / 2;
    wiremesh_wg::offload::coalesce(&[&data[..half], &data[half..]], &mut frames);
    dev.tick(std::time::SystemTime::UNIX_EPOCH, &mut out);
});
