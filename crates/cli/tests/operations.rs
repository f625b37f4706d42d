//! Running the mesh for real (issue 10): an external peer joins with a generated
//! wg-quick config on wireguard-go and is cut off when removed; a node's key is
//! rotated under a long TCP transfer; an underlay with a 1280-byte MTU carries
//! full-size TCP. Real agents, devices and tools in network namespaces.

mod support;

use std::hash::{DefaultHasher, Hasher};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::Mesh;
use wiremesh_host::{netns, probe};
use wiremesh_testkit::{random_suffix, require_root, require_tool, wait_until, Netns};

/// Deterministic payload: the byte at offset i.
fn byte_at(i: u64) -> u8 {
    (i.wrapping_mul(2654435761) >> 13) as u8
}

/// A TCP sink in `ns` on port 9000: reports (bytes, hash) of what it received.
fn sink(ns: &str) -> mpsc::Receiver<(u64, u64)> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    netns::spawn_in(ns, move || {
        let listener = TcpListener::bind(("0.0.0.0", 9000)).expect("sink bind");
        ready_tx.send(()).unwrap();
        let (mut stream, _) = listener.accept().expect("sink accept");
        let (mut n, mut hash) = (0u64, DefaultHasher::new());
        let mut buf = vec![0u8; 65536];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    hash.write(&buf[..k]);
                    n += k as u64;
                }
            }
        }
        let _ = done_tx.send((n, hash.finish()));
    })
    .expect("sink thread");
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("sink ready");
    done_rx
}

/// Send `total` bytes from `ns` to `dst`:9000 at about `rate` bytes/s; returns (bytes, hash).
fn send(ns: &str, dst: Ipv4Addr, total: u64, rate: u64) -> std::thread::JoinHandle<(u64, u64)> {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        netns::enter(&ns, move || {
            let mut stream =
                TcpStream::connect_timeout(&SocketAddr::from((dst, 9000)), Duration::from_secs(5))
                    .expect("connect");
            let (start, mut hash, mut sent) = (Instant::now(), DefaultHasher::new(), 0u64);
            let mut chunk = vec![0u8; 16384];
            while sent < total {
                let k = chunk.len().min((total - sent) as usize);
                for (j, b) in chunk[..k].iter_mut().enumerate() {
                    *b = byte_at(sent + j as u64);
                }
                stream.write_all(&chunk[..k]).expect("send");
                hash.write(&chunk[..k]);
                sent += k as u64;
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            (sent, hash.finish())
        })
        .expect("sender namespace")
    })
}

#[test]
fn external_peer_joins_with_wg_quick_and_is_cut_off_when_removed() {
    if !require_root() || !require_tool("wg-quick") || !require_tool("wireguard-go") {
        return;
    }
    let (mesh, a1, a2, b1) = Mesh::two_sites_started();
    let cluster = mesh.cluster();
    assert!(wait_until(Duration::from_secs(20), || cluster
        .snapshot()
        .is_ok_and(|(s, _, _)| s.nodes.len() == 3)));
    let config = mesh.wiremesh_ok(&["peer", "add", "laptop", "--keepalive", "5"]);
    assert!(
        config.contains("PrivateKey = ") && config.contains("[Peer]"),
        "{config}"
    );
    let record = mesh.cluster().snapshot().unwrap().0.peers;
    assert!(
        !format!("{record:?}").contains("PrivateKey"),
        "the registry holds only the public key"
    );

    let laptop = Netns::new("laptop").expect("netns");
    mesh.wire(&laptop, "eth0", "lan", "10.99.0.150/24");
    let ifname = format!("wmq{}", random_suffix(6));
    let conf = mesh.dir.path().join(format!("{ifname}.conf"));
    std::fs::write(&conf, &config).unwrap();
    let up = Command::new("ip")
        .args(["netns", "exec", laptop.name(), "wg-quick", "up"])
        .arg(&conf)
        .env("WG_QUICK_USERSPACE_IMPLEMENTATION", "wireguard-go")
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "wg-quick up: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let reaches = |i: usize, within: Duration| {
        let dst = mesh.pod_ip(i);
        wait_until(within, || {
            netns::enter(laptop.name(), move || {
                probe::ping(dst, Duration::from_secs(1)).is_ok()
            })
            .unwrap()
        })
    };
    for i in [a1, a2, b1] {
        assert!(
            reaches(i, Duration::from_secs(20)),
            "the laptop cannot reach {}'s pod",
            mesh.nodes[i].name
        );
    }
    mesh.wiremesh_ok(&["peer", "remove", "laptop"]);
    for i in [a1, a2, b1] {
        let dst = mesh.pod_ip(i);
        let cut = wait_until(Duration::from_secs(15), || {
            netns::enter(laptop.name(), move || {
                probe::ping(dst, Duration::from_millis(500)).is_err()
            })
            .unwrap()
        });
        assert!(
            cut,
            "the removed laptop still reaches {}'s pod",
            mesh.nodes[i].name
        );
    }
    let _ = Command::new("ip")
        .args(["netns", "exec", laptop.name(), "wg-quick", "down"])
        .arg(&conf)
        .env("WG_QUICK_USERSPACE_IMPLEMENTATION", "wireguard-go")
        .output();
}

#[test]
fn key_rotation_keeps_a_long_transfer_intact() {
    if !require_root() {
        return;
    }
    let (mesh, n1, n2) = Mesh::pair();
    let key_of = |mesh: &Mesh| {
        let (snapshot, _, _) = mesh.cluster().snapshot().unwrap();
        snapshot
            .nodes
            .iter()
            .find(|n| n.name.as_str() == "n1")
            .map(|n| n.public_key)
    };
    let old_key = key_of(&mesh);
    let received = sink(mesh.nodes[n2].pod.name());
    // 48 MB at 8 MB/s: six seconds, with the rotation one second in.
    let sender = send(
        mesh.nodes[n1].pod.name(),
        mesh.pod_ip(n2),
        48 << 20,
        8 << 20,
    );
    std::thread::sleep(Duration::from_secs(1));
    let state_dir = mesh.state_dir(n1);
    let out = Command::new(env!("CARGO_BIN_EXE_wiremesh"))
        .arg("rotate-key")
        .arg("--state-dir")
        .arg(&state_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rotate-key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(10), || key_of(&mesh) != old_key),
        "the new key was not published"
    );
    let (sent, sent_hash) = sender.join().expect("the transfer failed");
    let (got, got_hash) = received
        .recv_timeout(Duration::from_secs(60))
        .expect("the receiver finished");
    assert_eq!(
        (got, got_hash),
        (sent, sent_hash),
        "the data differs after the rotation"
    );
    assert!(mesh.log(n1).contains("rotated the node's key pair"));
}

#[test]
fn an_underlay_with_mtu_1280_carries_full_size_tcp() {
    if !require_root() {
        return;
    }
    let (mut mesh, n1, n2) = Mesh::two_nodes();
    for i in [n1, n2] {
        let ns = mesh.nodes[i].ns.name().to_owned();
        support::ip(&["-n", &ns, "link", "set", "eth0", "mtu", "1280"]);
        mesh.start(i);
    }
    let ifname = mesh.nodes[n1].ifname.clone();
    let mtu = || {
        mesh.nodes[n1]
            .ns
            .exec_ok(&["cat", &format!("/sys/class/net/{ifname}/mtu")])
            .unwrap_or_default()
    };
    assert!(
        wait_until(Duration::from_secs(20), || mtu().trim() == "1220"),
        "MTU {} instead of 1280 - 20 (IPv4) - 8 (UDP) - 32 (WireGuard) = 1220",
        mtu().trim()
    );
    assert!(mesh.eventually_pings(n1, n2, Duration::from_secs(20)));
    let received = sink(mesh.nodes[n2].pod.name());
    let sender = send(
        mesh.nodes[n1].pod.name(),
        mesh.pod_ip(n2),
        16 << 20,
        1 << 30,
    );
    let (sent, sent_hash) = sender.join().expect("the transfer failed");
    let (got, got_hash) = received
        .recv_timeout(Duration::from_secs(60))
        .expect("the receiver finished");
    assert_eq!((got, got_hash), (sent, sent_hash));
}
