//! Shared set-up for the namespace tests: a WireGuard device (ours or wireguard-go) in
//! its own network namespace, two of them joined by a veth pair, and traffic helpers
//! that run inside the namespaces (UDP echo, a checksummed TCP bulk transfer).
#![allow(dead_code)]

use std::hash::Hasher;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use wiremesh_testkit::{unique_ifname, veth_pair, wait_until, Netns};
use wiremesh_uapi::{DeviceSnapshot, PeerConfig, PrivateKey, PublicKey, SetRequest, UapiError};

/// Which implementation runs a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    /// This crate's `wiremesh-wg`.
    Wiremesh,
    /// Debian's wireguard-go.
    WireguardGo,
}

/// True when the test can run here; prints `skipped: ...` otherwise.
pub fn can_run(impls: &[Impl]) -> bool {
    if !wiremesh_testkit::require_root() || !wiremesh_testkit::require_tool("wg") {
        return false;
    }
    if impls.contains(&Impl::WireguardGo) && !wiremesh_testkit::require_tool("wireguard-go") {
        return false;
    }
    true
}

pub fn wiremesh_bin() -> &'static str {
    env!("CARGO_BIN_EXE_wiremesh-wg")
}

/// A device in its own namespace.
pub struct Node {
    pub ifname: String,
    pub key: PrivateKey,
    pub imp: Impl,
    child: Option<Child>,
    // Last: dropping the namespace terminates the device.
    pub ns: Netns,
}

pub fn socket_path(ifname: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"))
}

impl Node {
    pub fn start(tag: &str, imp: Impl) -> io::Result<Node> {
        let ns = Netns::new(tag)?;
        let ifname = unique_ifname("wmt");
        let child = match imp {
            Impl::Wiremesh => ns.spawn(&[wiremesh_bin(), "-f", &ifname])?,
            Impl::WireguardGo => ns.spawn(&["wireguard-go", "-f", &ifname])?,
        };
        let node = Node {
            ifname,
            key: PrivateKey::generate(),
            imp,
            child: Some(child),
            ns,
        };
        node.wait_for_socket()?;
        node.set(&SetRequest {
            private_key: Some(node.key.clone()),
            ..Default::default()
        })
        .map_err(io::Error::other)?;
        Ok(node)
    }

    fn wait_for_socket(&self) -> io::Result<()> {
        if wait_until(Duration::from_secs(10), || {
            UnixStream::connect(socket_path(&self.ifname)).is_ok()
        }) {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "{} never opened its socket",
                self.ifname
            )))
        }
    }

    pub fn public_key(&self) -> PublicKey {
        self.key.public_key()
    }

    /// Sends one raw request on the UAPI socket; the reply up to its blank line.
    pub fn uapi(&self, request: &str) -> io::Result<String> {
        let mut s = UnixStream::connect(socket_path(&self.ifname))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(request.as_bytes())?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        // The reply ends at the blank line after `errno=`.
        while !String::from_utf8_lossy(&reply).contains("errno=") || !reply.ends_with(b"\n\n") {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&reply).into_owned())
    }

    pub fn set(&self, req: &SetRequest) -> Result<(), UapiError> {
        let reply = self
            .uapi(&req.render())
            .map_err(|_| UapiError::MissingErrno)?;
        match reply.trim() {
            "errno=0" => Ok(()),
            other => Err(UapiError::InvalidValue {
                key: "errno",
                reason: if other.is_empty() {
                    "no reply"
                } else {
                    "non-zero errno"
                },
            }),
        }
    }

    pub fn get(&self) -> DeviceSnapshot {
        let reply = self.uapi("get=1\n\n").expect("uapi get");
        DeviceSnapshot::parse(&reply).expect("parse get reply")
    }

    /// Runs `wg ARGS` in the node's namespace.
    pub fn wg(&self, args: &[&str]) -> io::Result<String> {
        let mut full = vec!["wg"];
        full.extend_from_slice(args);
        self.ns.exec_ok(&full)
    }

    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        let mut full = vec!["ip"];
        full.extend_from_slice(args);
        self.ns.exec_ok(&full)
    }

    /// Is the device process still running?
    pub fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("child")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM, so the device removes its socket. `ip netns exec` exec'd the
            // device, so the child's pid is the device's.
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Underlay family used between the two namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Two nodes joined by a veth pair and peered with each other.
pub struct Pair {
    pub a: Node,
    pub b: Node,
    pub veth_a: String,
    pub veth_b: String,
    /// Tunnel addresses.
    pub tun_a4: IpAddr,
    pub tun_b4: IpAddr,
    pub tun_a6: IpAddr,
    pub tun_b6: IpAddr,
}

pub const PORT_A: u16 = 51820;
pub const PORT_B: u16 = 51821;

pub fn underlay(family: Family, last: u8) -> IpAddr {
    match family {
        Family::V4 => IpAddr::from([192, 168, 50, last]),
        Family::V6 => format!("fd00:50::{last}").parse().expect("address"),
    }
}

impl Pair {
    pub fn new(imp_a: Impl, imp_b: Impl, family: Family) -> io::Result<Pair> {
        let a = Node::start("a", imp_a)?;
        let b = Node::start("b", imp_b)?;
        let (veth_a, veth_b) = veth_pair(&a.ns, &b.ns, "192.168.50.1/24", "192.168.50.2/24")?;
        a.ip(&["addr", "add", "fd00:50::1/64", "dev", &veth_a, "nodad"])?;
        b.ip(&["addr", "add", "fd00:50::2/64", "dev", &veth_b, "nodad"])?;
        let pair = Pair {
            a,
            b,
            veth_a,
            veth_b,
            tun_a4: "10.77.0.1".parse().expect("ip"),
            tun_b4: "10.77.0.2".parse().expect("ip"),
            tun_a6: "fd77::1".parse().expect("ip"),
            tun_b6: "fd77::2".parse().expect("ip"),
        };
        let peer_of = |other: &Node, endpoint: SocketAddr, v4: &str, v6: &str| {
            let mut p = PeerConfig::new(other.public_key());
            p.endpoint = Some(endpoint);
            p.allowed_ips = vec![v4.parse().expect("net"), v6.parse().expect("net")];
            p
        };
        pair.a
            .set(&SetRequest {
                listen_port: Some(PORT_A),
                peers: vec![peer_of(
                    &pair.b,
                    SocketAddr::new(underlay(family, 2), PORT_B),
                    "10.77.0.2/32",
                    "fd77::2/128",
                )],
                ..Default::default()
            })
            .map_err(io::Error::other)?;
        pair.b
            .set(&SetRequest {
                listen_port: Some(PORT_B),
                peers: vec![peer_of(
                    &pair.a,
                    SocketAddr::new(underlay(family, 1), PORT_A),
                    "10.77.0.1/32",
                    "fd77::1/128",
                )],
                ..Default::default()
            })
            .map_err(io::Error::other)?;
        for (n, v4, v6) in [
            (&pair.a, "10.77.0.1/24", "fd77::1/64"),
            (&pair.b, "10.77.0.2/24", "fd77::2/64"),
        ] {
            n.ip(&["addr", "add", v4, "dev", &n.ifname])?;
            n.ip(&["addr", "add", v6, "dev", &n.ifname, "nodad"])?;
            n.ip(&["link", "set", &n.ifname, "up"])?;
        }
        Ok(pair)
    }
}

/// Sends UDP datagrams from `from` to `to_addr` (an address in `to`'s namespace)
/// until one is echoed back, or `timeout` passes. The first datagram triggers the
/// handshake, so the first few may be lost.
pub fn udp_echo(
    from: &Netns,
    to: &Netns,
    to_addr: IpAddr,
    timeout: Duration,
) -> io::Result<Duration> {
    let server = to.run(|| UdpSocket::bind(SocketAddr::new(to_addr, 7)))??;
    let client = from.run(|| {
        UdpSocket::bind(SocketAddr::new(
            if to_addr.is_ipv4() {
                IpAddr::from([0, 0, 0, 0])
            } else {
                IpAddr::from([0u16; 8])
            },
            0,
        ))
    })??;
    server.set_read_timeout(Some(Duration::from_millis(100)))?;
    client.set_read_timeout(Some(Duration::from_millis(100)))?;
    let start = Instant::now();
    let mut buf = [0u8; 64];
    while start.elapsed() < timeout {
        client.send_to(b"ping", SocketAddr::new(to_addr, 7))?;
        if let Ok((n, src)) = server.recv_from(&mut buf) {
            server.send_to(&buf[..n], src)?;
            if let Ok((n, _)) = client.recv_from(&mut buf) {
                if &buf[..n] == b"ping" {
                    return Ok(start.elapsed());
                }
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "no echo through the tunnel",
    ))
}

/// A checksum of a byte stream that does not depend on how it was chunked.
#[derive(Default)]
pub struct StreamSum {
    hasher: std::collections::hash_map::DefaultHasher,
    pub len: u64,
}

impl StreamSum {
    pub fn update(&mut self, bytes: &[u8]) {
        // `Hasher::write` (unlike `Hash::hash`) is a pure streaming function.
        self.hasher.write(bytes);
        self.len += bytes.len() as u64;
    }
    pub fn finish(&self) -> (u64, u64) {
        (self.len, self.hasher.finish())
    }
}

/// Sends `total` pseudo-random bytes over TCP from `from` to `to_addr:port` in `to`,
/// and checks length and checksum at the receiver. `during` runs on the test thread
/// once the receiver has `trigger_at` bytes (e.g. to move an address mid-transfer).
pub fn tcp_transfer(
    from: &Netns,
    to: &Netns,
    to_addr: IpAddr,
    total: u64,
    trigger_at: u64,
    during: impl FnOnce() + Send,
) -> io::Result<Duration> {
    let listener = to.run(|| TcpListener::bind(SocketAddr::new(to_addr, 5001)))??;
    let start = Instant::now();
    let dst = SocketAddr::new(to_addr, 5001);
    let client = from.run(|| {
        // The first SYN starts the handshake; retry until the tunnel is up.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match TcpStream::connect_timeout(&dst, Duration::from_secs(2)) {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    })??;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        let sender = s.spawn(move || -> io::Result<(u64, u64)> {
            let mut client = client;
            client.set_write_timeout(Some(Duration::from_secs(20)))?;
            let mut block = vec![0u8; 64 * 1024];
            let mut x: u64 = 0x243f_6a88_85a3_08d3;
            for b in block.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let mut sum = StreamSum::default();
            let mut sent = 0u64;
            let mut i = 0u64;
            while sent < total {
                block[..8].copy_from_slice(&i.to_le_bytes());
                let n = (total - sent).min(block.len() as u64) as usize;
                client.write_all(&block[..n])?;
                sum.update(&block[..n]);
                sent += n as u64;
                i += 1;
            }
            client.shutdown(std::net::Shutdown::Write)?;
            Ok(sum.finish())
        });
        let receiver = s.spawn(move || -> io::Result<(u64, u64)> {
            let (mut conn, _) = listener.accept()?;
            conn.set_read_timeout(Some(Duration::from_secs(20)))?;
            let mut sum = StreamSum::default();
            let mut buf = vec![0u8; 256 * 1024];
            let mut triggered = false;
            loop {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                sum.update(&buf[..n]);
                if !triggered && sum.len >= trigger_at {
                    triggered = true;
                    let _ = tx.send(());
                }
            }
            Ok(sum.finish())
        });
        if rx.recv_timeout(Duration::from_secs(30)).is_ok() {
            during();
        }
        let sent = sender.join().expect("sender panicked")?;
        let received = receiver.join().expect("receiver panicked")?;
        if sent != received {
            return Err(io::Error::other(format!(
                "stream mismatch: sent {sent:?}, received {received:?}"
            )));
        }
        if received.0 != total {
            return Err(io::Error::other("short transfer"));
        }
        Ok(start.elapsed())
    })
}
