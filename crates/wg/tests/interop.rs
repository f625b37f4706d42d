//! wiremesh-wg against Debian's wireguard-go and against itself, in real network
//! namespaces: handshake, traffic, IPv6 over IPv4 and IPv4 over IPv6, a checksummed
//! bulk TCP transfer, roaming mid-transfer, and silence towards unknown keys.
//!
//! Each test builds its own namespaces and uniquely named interfaces and tears them
//! down on drop; each prints `skipped: ...` when it cannot run (not root, no tools).

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use common::{can_run, tcp_transfer, udp_echo, underlay, Family, Impl, Pair, PORT_A};

const MB: u64 = 1 << 20;

fn traffic(imp_a: Impl, imp_b: Impl, family: Family, bytes: u64) {
    if !can_run(&[imp_a, imp_b]) {
        return;
    }
    let p = Pair::new(imp_a, imp_b, family).expect("set up pair");
    // A initiates.
    let rtt = udp_echo(&p.a.ns, &p.b.ns, p.tun_b4, Duration::from_secs(10)).expect("echo v4");
    println!("first echo after {rtt:?}");
    udp_echo(&p.b.ns, &p.a.ns, p.tun_a6, Duration::from_secs(5)).expect("echo v6");
    let took = tcp_transfer(&p.a.ns, &p.b.ns, p.tun_b4, bytes, u64::MAX, || {}).expect("tcp a→b");
    println!(
        "{} MiB a→b in {took:?} ({:.0} Mbit/s)",
        bytes / MB,
        bytes as f64 * 8.0 / took.as_secs_f64() / 1e6
    );
    tcp_transfer(&p.b.ns, &p.a.ns, p.tun_a6, bytes / 4, u64::MAX, || {}).expect("tcp b→a over v6");
    // Both sides saw the handshake and count traffic.
    for n in [&p.a, &p.b] {
        let s = n.get();
        assert_eq!(s.peers.len(), 1);
        assert!(
            s.peers[0].last_handshake_time_sec > 0,
            "{:?} no handshake",
            n.imp
        );
        assert!(
            s.peers[0].rx_bytes + s.peers[0].tx_bytes > bytes,
            "{:?} counters",
            n.imp
        );
    }
    let shown = p.a.wg(&["show", &p.a.ifname]).expect("wg show");
    assert!(shown.contains("latest handshake"), "{shown}");
}

#[test]
fn wiremesh_to_wireguard_go_v4_underlay() {
    traffic(Impl::Wiremesh, Impl::WireguardGo, Family::V4, 100 * MB);
}

#[test]
fn wireguard_go_to_wiremesh_v6_underlay() {
    traffic(Impl::WireguardGo, Impl::Wiremesh, Family::V6, 32 * MB);
}

#[test]
fn wiremesh_to_wiremesh_v4_underlay() {
    traffic(Impl::Wiremesh, Impl::Wiremesh, Family::V4, 100 * MB);
}

#[test]
fn wiremesh_to_wiremesh_v6_underlay() {
    traffic(Impl::Wiremesh, Impl::Wiremesh, Family::V6, 16 * MB);
}

/// How the roaming peer moves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Move {
    /// To a new IP address on the same link.
    Address,
    /// To a new UDP port (like a NAT rebinding).
    Port,
}

/// B moves in the middle of an A → B transfer; A (ours) must follow B's
/// authenticated packets to the new endpoint.
fn roaming(imp_b: Impl, how: Move) {
    if !can_run(&[Impl::Wiremesh, imp_b]) {
        return;
    }
    let p = Pair::new(Impl::Wiremesh, imp_b, Family::V4).expect("set up pair");
    p.a.ip(&["addr", "add", "192.168.51.1/24", "dev", &p.veth_a])
        .expect("addr");
    udp_echo(&p.a.ns, &p.b.ns, p.tun_b4, Duration::from_secs(10)).expect("echo");
    let move_endpoint = || match how {
        Move::Address => {
            // B's traffic to A's endpoint leaves from the new address from now on (a
            // host route with a preferred source), then the old address goes away.
            p.b.ip(&["addr", "add", "192.168.51.2/24", "dev", &p.veth_b])
                .expect("new addr");
            p.b.ip(&[
                "route",
                "add",
                "192.168.50.1/32",
                "dev",
                &p.veth_b,
                "src",
                "192.168.51.2",
            ])
            .expect("route");
            p.b.ip(&["addr", "del", "192.168.50.2/24", "dev", &p.veth_b])
                .expect("del old addr");
        }
        Move::Port => {
            p.b.wg(&["set", &p.b.ifname, "listen-port", "51999"])
                .expect("new port");
        }
    };
    let move_b = || {
        move_endpoint();
        // WireGuard learns a peer's new endpoint from its next authenticated packet;
        // a TCP receiver whose segments stopped arriving may never send one, so B
        // says something (as an application or a persistent keepalive would).
        p.b.ns
            .run(|| {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.send_to(b"moved", SocketAddr::new(p.tun_a4, 9))
            })
            .expect("enter ns")
            .expect("send from new endpoint");
    };
    tcp_transfer(&p.a.ns, &p.b.ns, p.tun_b4, 24 * MB, 4 * MB, move_b)
        .expect("transfer survives the move");
    let want = match how {
        Move::Address => SocketAddr::new(IpAddr::from([192, 168, 51, 2]), common::PORT_B),
        Move::Port => SocketAddr::new(underlay(Family::V4, 2), 51999),
    };
    assert_eq!(
        p.a.get().peers[0].endpoint,
        Some(want),
        "endpoint did not roam"
    );
}

/// wireguard-go's sticky source address keeps it sending from a deleted address, so
/// against it the move is a port change.
#[test]
fn roaming_wireguard_go_peer_new_port() {
    roaming(Impl::WireguardGo, Move::Port);
}

#[test]
fn roaming_wiremesh_peer_new_address() {
    roaming(Impl::Wiremesh, Move::Address);
}

#[test]
fn roaming_wiremesh_peer_new_port() {
    roaming(Impl::Wiremesh, Move::Port);
}

/// Nothing comes back on the UDP port for handshakes from unknown keys, handshakes
/// for another key, or garbage; and the device keeps working afterwards.
#[test]
fn unknown_keys_and_garbage_get_no_answer() {
    if !can_run(&[Impl::Wiremesh]) {
        return;
    }
    let p = Pair::new(Impl::Wiremesh, Impl::Wiremesh, Family::V4).expect("set up pair");
    let target = SocketAddr::new(underlay(Family::V4, 1), PORT_A);
    let probe =
        p.b.ns
            .run(|| UdpSocket::bind("192.168.50.2:0"))
            .expect("enter ns")
            .expect("bind");
    probe
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");

    use gotatun::noise::index_table::IndexTable;
    use gotatun::noise::rate_limiter::RateLimiter;
    use gotatun::noise::Tunn;
    use gotatun::packet::Packet;
    use gotatun::x25519::{PublicKey, StaticSecret};
    use std::sync::Arc;
    let initiation = |ours: [u8; 32], theirs: [u8; 32]| -> Vec<u8> {
        let secret = StaticSecret::from(ours);
        let rl = Arc::new(RateLimiter::new(&PublicKey::from(&secret), 10));
        let mut t = Tunn::new(
            secret,
            PublicKey::from(theirs),
            None,
            None,
            IndexTable::from_os_rng(),
            rl,
        );
        let init: Packet = t.format_handshake_initiation(false).expect("init").into();
        init.to_vec()
    };
    let stranger = wiremesh_uapi::PrivateKey::generate();
    let a_pub = *p.a.public_key().as_bytes();
    let wrong_pub = *wiremesh_uapi::PrivateKey::generate()
        .public_key()
        .as_bytes();
    let mut probes = vec![
        initiation(*stranger.as_bytes(), a_pub),
        initiation(*p.b.key.as_bytes(), wrong_pub),
        vec![],
        vec![0xff; 1],
        vec![1, 0, 0, 0],
        vec![4; 16],
        vec![4; 1400],
        vec![0u8; 148],
        vec![0x45; 60],
    ];
    let mut resp = vec![0u8; 92];
    resp[0] = 2;
    probes.push(resp);
    let mut cookie = vec![0u8; 64];
    cookie[0] = 3;
    probes.push(cookie);
    for probe_bytes in &probes {
        probe.send_to(probe_bytes, target).expect("send");
    }
    let mut buf = [0u8; 2048];
    match probe.recv_from(&mut buf) {
        Ok((n, from)) => panic!("device answered {n} bytes from {from}"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{e}"
        ),
    }
    // Still alive and serving its real peer.
    udp_echo(&p.b.ns, &p.a.ns, p.tun_a4, Duration::from_secs(10)).expect("echo after probes");
    // And every probe was counted as dropped, for the operator's metrics.
    let stats = wiremesh_uapi::DeviceStats::parse(&p.a.uapi("get_stats=1\n\n").expect("get_stats"))
        .expect("stats reply");
    let dropped: u64 = ["rejected", "unknown_peer"]
        .iter()
        .map(|r| stats.dropped.get(*r).copied().unwrap_or(0))
        .sum();
    assert!(
        dropped >= 2,
        "the unknown-key initiations were not counted: {:?}",
        stats.dropped
    );
}

/// Reconfiguration while traffic flows: peers added and removed, allowed IPs
/// replaced, keepalive changed, the listen port moved, `get` in between. The
/// transfer must complete intact and nothing may deadlock.
#[test]
fn config_churn_during_transfer() {
    if !can_run(&[Impl::Wiremesh]) {
        return;
    }
    let p = Pair::new(Impl::Wiremesh, Impl::Wiremesh, Family::V4).expect("set up pair");
    udp_echo(&p.a.ns, &p.b.ns, p.tun_b4, Duration::from_secs(10)).expect("echo");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let b_key = p.b.public_key();
    std::thread::scope(|s| {
        let churn = s.spawn(|| {
            let mut rounds = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && rounds < 2000 {
                let extra = wiremesh_uapi::PrivateKey::generate().public_key();
                let mut add = wiremesh_uapi::PeerConfig::new(extra);
                add.allowed_ips = vec![format!("10.200.{}.0/24", rounds % 250)
                    .parse()
                    .expect("net")];
                let mut b = wiremesh_uapi::PeerConfig::new(b_key);
                b.persistent_keepalive_interval = Some((rounds % 3) as u16);
                b.replace_allowed_ips = true;
                b.allowed_ips = vec![
                    "10.77.0.2/32".parse().expect("net"),
                    "fd77::2/128".parse().expect("net"),
                ];
                let listen_port = (rounds % 50 == 49).then_some(40000 + (rounds % 1000) as u16);
                p.a.set(&wiremesh_uapi::SetRequest {
                    listen_port,
                    peers: vec![add, b],
                    ..Default::default()
                })
                .expect("set during traffic");
                let mut rm = wiremesh_uapi::PeerConfig::new(extra);
                rm.remove = true;
                p.a.set(&wiremesh_uapi::SetRequest {
                    peers: vec![rm],
                    ..Default::default()
                })
                .expect("remove during traffic");
                assert_eq!(p.a.get().peers.len(), 1);
                rounds += 1;
            }
            rounds
        });
        tcp_transfer(&p.a.ns, &p.b.ns, p.tun_b4, 48 * MB, u64::MAX, || {})
            .expect("transfer during churn");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let rounds = churn.join().expect("churn thread");
        println!("{rounds} reconfiguration rounds during the transfer");
        assert!(rounds > 0);
    });
}

/// The device's TUN interface has several queues, and every one is read: new
/// connections' SYNs land on a queue by flow hash, so a queue nobody drained would
/// strand its share of 64 connections (their SYN retries hash to the same queue).
#[test]
fn every_tun_queue_carries_new_connections() {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    if !can_run(&[Impl::Wiremesh]) {
        return;
    }
    let p = Pair::new(Impl::Wiremesh, Impl::Wiremesh, Family::V4).expect("set up pair");
    let queues =
        p.a.ns
            .exec_ok(&["ls", &format!("/sys/class/net/{}/queues", p.a.ifname)])
            .expect("list queues");
    let tx_queues = queues
        .split_whitespace()
        .filter(|q| q.starts_with("tx-"))
        .count();
    assert!(tx_queues >= 2, "a single-queue TUN interface: {queues}");
    udp_echo(&p.a.ns, &p.b.ns, p.tun_b4, Duration::from_secs(10)).expect("tunnel up");

    let addr = SocketAddr::new(p.tun_b4, 7007);
    let listener =
        p.b.ns
            .run(|| TcpListener::bind(addr))
            .unwrap()
            .expect("listen");
    const CONNECTIONS: usize = 64;
    // The server gives up at a deadline, so a stranded connection fails the test
    // instead of hanging it.
    listener.set_nonblocking(true).expect("nonblocking");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut served = 0;
            while served < CONNECTIONS && std::time::Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        c.set_nonblocking(false).expect("blocking");
                        c.set_read_timeout(Some(Duration::from_secs(5)))
                            .expect("timeout");
                        let mut b = [0u8; 8];
                        if c.read_exact(&mut b).is_ok() {
                            let _ = c.write_all(&b);
                        }
                        served += 1;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        for i in 0..CONNECTIONS {
            let mut c =
                p.a.ns
                    .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
                    .unwrap()
                    .unwrap_or_else(|e| panic!("connection {i} of {CONNECTIONS}: {e}"));
            c.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let msg = (i as u64).to_le_bytes();
            c.write_all(&msg).expect("send");
            let mut back = [0u8; 8];
            c.read_exact(&mut back).expect("echo back");
            assert_eq!(back, msg);
        }
    });
}
