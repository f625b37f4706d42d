//! wiremesh-wg driven by the stock tools and as a process: `wg setconf`/`showconf`/
//! `syncconf`/`set`, `wg-quick up`/`down`, detaching, and every way it must exit
//! (SIGTERM, `ip link del`, socket removed), plus hostile UAPI clients.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::{can_run, socket_path, wiremesh_bin, Impl, Node};
use wiremesh_testkit::{unique_ifname, wait_until, Netns};
use wiremesh_uapi::{PresharedKey, PrivateKey};

fn write_conf(dir: &Path, name: &str, text: &str) -> String {
    std::fs::create_dir_all(dir).expect("mkdir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write conf");
    path.to_string_lossy().into_owned()
}

fn tmpdir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("wmt-{}", wiremesh_testkit::random_suffix(8)))
}

#[test]
fn setconf_then_showconf_reads_back_exactly() {
    if !can_run(&[Impl::Wiremesh]) {
        return;
    }
    let node = Node::start("conf", Impl::Wiremesh).expect("start");
    let (k, p1, p2, psk) = (
        PrivateKey::generate(),
        PrivateKey::generate().public_key(),
        PrivateKey::generate().public_key(),
        PresharedKey::generate(),
    );
    // Written in `wg showconf`'s own order and spelling.
    let conf = format!(
        "[Interface]\nListenPort = 51820\nFwMark = 0x42\nPrivateKey = {}\n\n\
         [Peer]\nPublicKey = {p1}\nPresharedKey = {}\nAllowedIPs = 10.1.0.0/24, fd01::/64, 10.9.9.9/32\n\
         Endpoint = 192.168.1.2:51820\nPersistentKeepalive = 25\n\n\
         [Peer]\nPublicKey = {p2}\nAllowedIPs = 10.2.0.1/32\nEndpoint = [fd00::2]:1234\n",
        k.to_base64(),
        psk.to_base64(),
    );
    let dir = tmpdir();
    let path = write_conf(&dir, "a.conf", &conf);
    node.wg(&["setconf", &node.ifname, &path]).expect("setconf");
    let shown = node.wg(&["showconf", &node.ifname]).expect("showconf");
    assert_eq!(shown, conf);
    // The sockets moved to the new port at once (the old ones are closed) and carry
    // the mark.
    let ss = node.ns.exec_ok(&["ss", "-uaneH"]).expect("ss");
    let lines: Vec<&str> = ss.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 2, "{ss}");
    for l in lines {
        assert!(l.contains(":51820 ") && l.contains("fwmark:0x42"), "{l}");
    }

    // syncconf: drop a peer, change the other's allowed IPs and endpoint.
    let conf2 = format!(
        "[Interface]\nListenPort = 51821\nPrivateKey = {}\n\n\
         [Peer]\nPublicKey = {p2}\nAllowedIPs = 10.2.0.0/24, 10.1.0.0/24\nEndpoint = 192.168.1.3:1\n",
        k.to_base64(),
    );
    let path2 = write_conf(&dir, "b.conf", &conf2);
    node.wg(&["syncconf", &node.ifname, &path2])
        .expect("syncconf");
    assert_eq!(
        node.wg(&["showconf", &node.ifname]).expect("showconf"),
        conf2
    );

    // wg set: remove the last peer, clear fwmark; and the listen port really moved.
    node.wg(&["set", &node.ifname, "peer", &p2.to_string(), "remove"])
        .expect("remove");
    let shown = node
        .wg(&["show", &node.ifname, "peers"])
        .expect("show peers");
    assert_eq!(shown.trim(), "");
    let port = node
        .wg(&["show", &node.ifname, "listen-port"])
        .expect("port");
    assert_eq!(port.trim(), "51821");
    let bound = node
        .ns
        .exec_ok(&["cat", "/proc/net/udp"])
        .expect("udp table");
    let hex_port = format!(":{:04X} ", 51821);
    assert!(bound.contains(&hex_port), "port 51821 not bound: {bound}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn wg_quick_up_and_down() {
    if !can_run(&[Impl::Wiremesh]) || !wiremesh_testkit::require_tool("wg-quick") {
        return;
    }
    let ns = Netns::new("quick").expect("netns");
    let ifname = unique_ifname("wmq");
    let key = PrivateKey::generate();
    let peer = PrivateKey::generate().public_key();
    let conf = format!(
        "[Interface]\nAddress = 10.3.0.1/24\nListenPort = 51830\nPrivateKey = {}\n\n\
         [Peer]\nPublicKey = {peer}\nAllowedIPs = 10.3.1.0/24\nEndpoint = 127.0.0.1:51831\n",
        key.to_base64()
    );
    let dir = tmpdir();
    let path = write_conf(&dir, &format!("{ifname}.conf"), &conf);
    let env = [("WG_QUICK_USERSPACE_IMPLEMENTATION", wiremesh_bin())];
    let up = ns
        .exec_env(&env, &["wg-quick", "up", &path])
        .expect("wg-quick up");
    assert!(
        up.status.success(),
        "wg-quick up failed: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let show = ns
        .exec_ok(&["wg", "show", &ifname, "allowed-ips"])
        .expect("wg show");
    assert!(show.contains("10.3.1.0/24"), "{show}");
    let addr = ns
        .exec_ok(&["ip", "-o", "addr", "show", "dev", &ifname])
        .expect("ip addr");
    assert!(addr.contains("10.3.0.1/24"), "{addr}");
    let route = ns
        .exec_ok(&["ip", "route", "get", "10.3.1.7"])
        .expect("route");
    assert!(route.contains(&ifname), "{route}");
    let down = ns
        .exec_env(&env, &["wg-quick", "down", &path])
        .expect("wg-quick down");
    assert!(
        down.status.success(),
        "wg-quick down failed: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    // The device notices its interface is gone, exits and removes its socket.
    assert!(
        wait_until(Duration::from_secs(5), || !socket_path(&ifname).exists()),
        "socket left behind"
    );
    assert!(
        wait_until(Duration::from_secs(5), || ns.pids().is_empty()),
        "device still running"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Without `-f` the command returns once the socket exists, leaving a daemon.
#[test]
fn detaches_and_exits_when_interface_deleted() {
    if !can_run(&[Impl::Wiremesh]) {
        return;
    }
    let ns = Netns::new("daemon").expect("netns");
    let ifname = unique_ifname("wmd");
    ns.exec_ok(&[wiremesh_bin(), &ifname])
        .expect("start daemon");
    assert!(UnixStream::connect(socket_path(&ifname)).is_ok());
    let mtu = ns
        .exec_ok(&["ip", "-o", "link", "show", &ifname])
        .expect("link");
    assert!(mtu.contains("mtu 1420"), "{mtu}");
    // A second device for the same interface fails instead of claiming success.
    let again = ns.exec(&[wiremesh_bin(), &ifname]).expect("second start");
    assert!(!again.status.success(), "second instance reported success");
    assert!(
        UnixStream::connect(socket_path(&ifname)).is_ok(),
        "first device hurt"
    );
    ns.exec_ok(&["ip", "link", "del", &ifname])
        .expect("del link");
    assert!(
        wait_until(Duration::from_secs(5), || !socket_path(&ifname).exists()),
        "device did not exit after ip link del"
    );
}

#[test]
fn exits_when_socket_removed_and_on_sigterm() {
    if !can_run(&[Impl::Wiremesh]) {
        return;
    }
    let mut node = Node::start("exit", Impl::Wiremesh).expect("start");
    std::fs::remove_file(socket_path(&node.ifname)).expect("rm socket");
    assert!(
        wait_until(Duration::from_secs(5), || !node.alive()),
        "still running"
    );
    assert!(node
        .ns
        .exec_ok(&["ip", "link", "show", &node.ifname])
        .is_err());

    let mut node = Node::start("term", Impl::Wiremesh).expect("start");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(node.child().id() as i32, libc::SIGTERM) };
    assert!(
        wait_until(Duration::from_secs(5), || !node.alive()),
        "ignored SIGTERM"
    );
    assert!(node.child().wait().expect("status").success());
    assert!(!socket_path(&node.ifname).exists(), "socket left behind");
}

/// Hostile clients get an errno or a hang-up, never a crash, and do not block others.
#[test]
fn hostile_uapi_clients() {
    if !can_run(&[Impl::Wiremesh]) {
        return;
    }
    let mut node = Node::start("uapi", Impl::Wiremesh).expect("start");
    let path = socket_path(&node.ifname);
    // An idle client holding a connection open.
    let idle = UnixStream::connect(&path).expect("connect");
    let mut half = UnixStream::connect(&path).expect("connect");
    half.write_all(b"set=1\nlisten_port=").expect("partial");

    let ask = |req: &[u8]| -> String {
        let mut s = UnixStream::connect(&path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let _ = s.write_all(req);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let huge = [b"set=1\n".as_slice(), &vec![b'a'; 1 << 20]].concat();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"set=1\nlisten_port=99999\n\n".to_vec(), "errno=-22\n\n"),
        (b"set=1\nprivate_key=00\n\n".to_vec(), "errno=-22\n\n"),
        (b"set=1\npublic_key=zz\n\n".to_vec(), "errno=-22\n\n"),
        (b"set=1\nbogus=1\n\n".to_vec(), "errno=-22\n\n"),
        (b"set=1\n\x00\xff\x01\n\n".to_vec(), "errno=-22\n\n"),
        (huge, "errno=-71\n\n"),
        (b"nonsense\n\n".to_vec(), ""),
        (b"get=1\n\n".to_vec(), "errno=0\n\n"),
    ];
    for (req, want_end) in cases {
        let reply = ask(&req);
        assert!(
            reply.ends_with(want_end),
            "{:.40?} → {reply:?}",
            String::from_utf8_lossy(&req)
        );
    }
    // The device still works and the key is unchanged.
    let snap = node.get();
    assert_eq!(snap.private_key, Some(node.key.clone()));
    assert!(node.alive());
    drop(idle);
    drop(half);
    // A listen port that is taken is refused with EADDRINUSE; the old port stays.
    let before = node.get().listen_port;
    let squatter = node
        .ns
        .run(|| std::net::UdpSocket::bind("0.0.0.0:0"))
        .expect("enter ns")
        .expect("bind");
    let taken = squatter.local_addr().expect("addr").port().to_string();
    let out = node
        .ns
        .exec(&["wg", "set", &node.ifname, "listen-port", &taken])
        .expect("wg");
    assert!(!out.status.success(), "taking a used port succeeded");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(node.get().listen_port, before);
    // `wg` sees errors as errors.
    let err = node
        .ns
        .exec(&[
            "wg",
            "set",
            &node.ifname,
            "listen-port",
            "0",
            "peer",
            "not-a-key",
        ])
        .expect("wg");
    assert!(!err.status.success());
}

/// The in-process API: a device started by a library call inside a namespace,
/// configured without the socket, seen by `wg`, and cleaned up by `shutdown`.
#[test]
fn in_process_device() {
    if !can_run(&[Impl::Wiremesh]) {
        return;
    }
    let ns = Netns::new("lib").expect("netns");
    let ifname = unique_ifname("wml");
    // Threads started from a thread inside the namespace stay in it.
    let dev = ns
        .run(|| wiremesh_wg::RunningDevice::start(&wiremesh_wg::Config::new(&ifname)))
        .expect("enter ns")
        .expect("start device");
    let key = PrivateKey::generate();
    let peer = PrivateKey::generate().public_key();
    let mut pc = wiremesh_uapi::PeerConfig::new(peer);
    pc.allowed_ips = vec!["10.4.0.0/16".parse().expect("net")];
    let errno = dev.configure(&wiremesh_uapi::SetRequest {
        private_key: Some(key.clone()),
        listen_port: Some(51840),
        peers: vec![pc],
        ..Default::default()
    });
    assert_eq!(errno, wiremesh_uapi::Errno::OK);
    assert_eq!(dev.snapshot().listen_port, 51840);
    assert_eq!(
        dev.device().route("10.4.1.1".parse().expect("ip")),
        Some(peer)
    );
    let shown = ns
        .exec_ok(&["wg", "show", &ifname, "dump"])
        .expect("wg show");
    assert!(
        shown.contains(&key.public_key().to_string()) && shown.contains("51840"),
        "{shown}"
    );
    assert!(shown.contains("10.4.0.0/16"), "{shown}");
    assert!(dev.poll_exit().is_none());
    let socket = dev.socket_path().to_path_buf();
    dev.shutdown();
    assert!(!socket.exists(), "socket left behind");
    assert!(
        ns.exec_ok(&["ip", "link", "show", &ifname]).is_err(),
        "interface left behind"
    );
}
