//! The device's UDP sockets: one IPv4 and one IPv6 (`IPV6_V6ONLY`) socket on the same
//! port, like wireguard-go, each optionally carrying a firewall mark (`SO_MARK`).
//!
//! Receives time out so reader threads can notice shutdown or a rebind. IPv6 is
//! optional (hosts without it still work over IPv4).

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// How long a receive blocks before the reader re-checks for shutdown.
pub const RECV_TIMEOUT: Duration = Duration::from_millis(200);

/// Socket buffer size requested; the kernel caps it at `net.core.rmem_max`.
const SOCKET_BUFFER: usize = 4 << 20;

/// The bound socket pair.
#[derive(Debug)]
pub struct UdpSockets {
    /// The IPv4 socket.
    pub v4: Option<Socket>,
    /// The IPv6-only socket.
    pub v6: Option<Socket>,
    /// The port both are bound to.
    pub port: u16,
}

fn bind_one(addr: SocketAddr, fwmark: u32) -> io::Result<Socket> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    if fwmark != 0 {
        s.set_mark(fwmark)?;
    }
    // Larger buffers ride out bursts; failure only costs throughput.
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    s.set_read_timeout(Some(RECV_TIMEOUT))?;
    s.bind(&addr.into())?;
    Ok(s)
}

fn local_port(s: &Socket) -> io::Result<u16> {
    s.local_addr()?
        .as_socket()
        .map(|a| a.port())
        .ok_or_else(|| io::Error::other("socket has no IP address"))
}

impl UdpSockets {
    /// Binds both sockets to `port` (0: a random port shared by both).
    pub fn bind(port: u16, fwmark: u32) -> io::Result<Self> {
        // With port 0 the kernel picks the IPv4 port; if that port is taken on IPv6,
        // try again with a fresh one, as wireguard-go does.
        let mut last_err = None;
        for _ in 0..10 {
            let v4 = bind_one(
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into(),
                fwmark,
            )?;
            let bound = local_port(&v4)?;
            match bind_one(
                SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, bound, 0, 0).into(),
                fwmark,
            ) {
                Ok(v6) => {
                    return Ok(Self {
                        v4: Some(v4),
                        v6: Some(v6),
                        port: bound,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && port == 0 => {
                    last_err = Some(e);
                }
                // No IPv6 on this host: carry on with IPv4 alone.
                Err(e)
                    if e.raw_os_error() == Some(libc::EAFNOSUPPORT)
                        || e.raw_os_error() == Some(libc::EADDRNOTAVAIL) =>
                {
                    return Ok(Self {
                        v4: Some(v4),
                        v6: None,
                        port: bound,
                    })
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)))
    }

    /// Sets the firewall mark on both sockets (0 clears it).
    pub fn set_fwmark(&self, mark: u32) -> io::Result<()> {
        for s in self.v4.iter().chain(self.v6.iter()) {
            s.set_mark(mark)?;
        }
        Ok(())
    }

    /// Sends one datagram through the socket of `dst`'s family.
    pub fn send_to(&self, payload: &[u8], dst: SocketAddr) -> io::Result<()> {
        let s = match dst {
            SocketAddr::V4(_) => self.v4.as_ref(),
            SocketAddr::V6(_) => self.v6.as_ref(),
        };
        let s = s.ok_or_else(|| io::Error::from(io::ErrorKind::AddrNotAvailable))?;
        s.send_to(payload, &SockAddr::from(dst))?;
        Ok(())
    }
}

/// Receives one datagram into `buf`: `Ok(None)` on timeout.
pub fn recv_from(s: &Socket, buf: &mut [u8]) -> io::Result<Option<(usize, SocketAddr)>> {
    // SAFETY: `MaybeUninit<u8>` has the layout of `u8`, and socket2 only writes into
    // the slice; initialised bytes stay initialised.
    let uninit: &mut [MaybeUninit<u8>] =
        unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast(), buf.len()) };
    match s.recv_from(uninit) {
        Ok((n, addr)) => Ok(addr.as_socket().map(|a| (n, canonical(a)))),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// IPv4-mapped IPv6 sources cannot occur on an `IPV6_V6ONLY` socket, but map them
/// back anyway so an endpoint is always in the family of the socket that sends to it.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_port_is_shared_and_both_families_work() {
        let s = UdpSockets::bind(0, 0).expect("bind");
        assert_ne!(s.port, 0);
        for (s_addr, peer_bind) in [
            (SocketAddr::from(([127, 0, 0, 1], s.port)), "127.0.0.1:0"),
            (SocketAddr::from((Ipv6Addr::LOCALHOST, s.port)), "[::1]:0"),
        ] {
            let family_sock = if s_addr.is_ipv4() { &s.v4 } else { &s.v6 };
            let Some(sock) = family_sock else {
                continue; // no IPv6 on this host
            };
            let peer = std::net::UdpSocket::bind(peer_bind).expect("peer");
            peer.send_to(b"hi", s_addr).expect("send");
            let mut buf = [0u8; 16];
            let (n, from) = recv_from(sock, &mut buf).expect("recv").expect("datagram");
            assert_eq!(&buf[..n], b"hi");
            assert_eq!(from, peer.local_addr().expect("addr"));
            s.send_to(b"back", from).expect("reply");
            let (n, _) = peer.recv_from(&mut buf).expect("peer recv");
            assert_eq!(&buf[..n], b"back");
        }
    }

    #[test]
    fn receive_times_out_instead_of_blocking() {
        let s = UdpSockets::bind(0, 0).expect("bind");
        let sock = s.v4.as_ref().expect("v4");
        let start = std::time::Instant::now();
        assert!(recv_from(sock, &mut [0u8; 16]).expect("recv").is_none());
        assert!(start.elapsed() < RECV_TIMEOUT * 10);
    }

    #[test]
    fn port_in_use_is_reported() {
        let a = UdpSockets::bind(0, 0).expect("bind");
        let err = UdpSockets::bind(a.port, 0).expect_err("second bind");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn canonical_unmaps_v4_mapped_sources() {
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:7".parse().expect("addr");
        assert_eq!(
            canonical(mapped),
            "192.0.2.1:7".parse::<SocketAddr>().expect("addr")
        );
        let v6: SocketAddr = "[2001:db8::1]:7".parse().expect("addr");
        assert_eq!(canonical(v6), v6);
    }
}
