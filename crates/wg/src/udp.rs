//! The device's UDP sockets: one IPv4 and one IPv6 (`IPV6_V6ONLY`) socket on the same
//! port, like wireguard-go, each optionally carrying a firewall mark (`SO_MARK`).
//!
//! Receives time out so reader threads can notice shutdown or a rebind. IPv6 is
//! optional (hosts without it still work over IPv4).
//!
//! Batching: [`UdpSockets::send_batch`] hands runs of equal-sized datagrams for one
//! destination to the kernel in one `sendmsg` with `UDP_SEGMENT` (UDP GSO), and
//! sockets ask for `UDP_GRO`, so [`recv`] may return several datagrams coalesced,
//! each `segment` bytes long. Both fall back to one datagram a call when the kernel
//! or the path does not support them.

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use socket2::{Domain, MaybeUninitSlice, MsgHdr, MsgHdrMut, Protocol, SockAddr, Socket, Type};

// From <linux/udp.h>; not exported by libc for glibc targets.
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Most datagrams one GSO send may carry (the kernel's `UDP_MAX_SEGMENTS`).
const MAX_GSO_SEGMENTS: usize = 64;
/// Most payload bytes one GSO send may carry (an IP packet is at most 64 KiB).
const MAX_GSO_BYTES: usize = 65_000;
/// Size of a `cmsghdr` rounded to its alignment (`CMSG_ALIGN(sizeof(struct cmsghdr))`).
const CMSG_HDR: usize = (std::mem::size_of::<libc::cmsghdr>() + 7) & !7;

/// How long a receive blocks before the reader re-checks for shutdown.
pub const RECV_TIMEOUT: Duration = Duration::from_millis(200);

/// Socket buffer size requested.
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
    /// UDP GSO works here; cleared after the first send the kernel refuses.
    gso: AtomicBool,
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
    // Larger buffers ride out bursts (a thousand connections' packets arriving while
    // the reader waits for a core); failure only costs throughput.
    set_buffer(&s, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF);
    set_buffer(&s, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF);
    s.set_read_timeout(Some(RECV_TIMEOUT))?;
    // Coalesced receives; without kernel support datagrams just come one by one.
    set_int(&s, SOL_UDP, UDP_GRO, 1);
    s.bind(&addr.into())?;
    Ok(s)
}

/// Sets a socket buffer to [`SOCKET_BUFFER`]: with `force` (CAP_NET_ADMIN) past
/// `net.core.rmem_max`/`wmem_max`, whose distribution default (208 KiB) a burst
/// overflows, as wireguard-go does; else with `plain`, which the kernel caps.
fn set_buffer(s: &Socket, force: libc::c_int, plain: libc::c_int) {
    let size = SOCKET_BUFFER as libc::c_int;
    let _ = set_int(s, libc::SOL_SOCKET, force, size) || set_int(s, libc::SOL_SOCKET, plain, size);
}

/// Sets an integer socket option; whether the kernel took it.
fn set_int(s: &Socket, level: libc::c_int, option: libc::c_int, value: libc::c_int) -> bool {
    // SAFETY: setsockopt reads one c_int from a live local.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            level,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
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
                        gso: AtomicBool::new(true),
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
                        gso: AtomicBool::new(true),
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

    fn socket_for(&self, dst: SocketAddr) -> io::Result<&Socket> {
        let s = match dst {
            SocketAddr::V4(_) => self.v4.as_ref(),
            SocketAddr::V6(_) => self.v6.as_ref(),
        };
        s.ok_or_else(|| io::Error::from(io::ErrorKind::AddrNotAvailable))
    }

    /// Sends one datagram through the socket of `dst`'s family.
    pub fn send_to(&self, payload: &[u8], dst: SocketAddr) -> io::Result<()> {
        self.socket_for(dst)?
            .send_to(payload, &SockAddr::from(dst))?;
        Ok(())
    }

    /// Sends datagrams to one destination, in order, batching runs of equal size
    /// (a shorter last one may end a run) into single UDP GSO sends.
    pub fn send_batch<P: AsRef<[u8]>>(&self, datagrams: &[P], dst: SocketAddr) -> io::Result<()> {
        let mut rest = datagrams;
        while let Some(first) = rest.first() {
            let seg = first.as_ref().len();
            let mut n = 1;
            let mut bytes = seg;
            while let Some(next) = rest.get(n) {
                let len = next.as_ref().len();
                if len > seg || n >= MAX_GSO_SEGMENTS || bytes + len > MAX_GSO_BYTES || seg == 0 {
                    break;
                }
                n += 1;
                bytes += len;
                if len < seg {
                    break; // only the last segment may be short
                }
            }
            let (run, tail) = rest.split_at(n);
            rest = tail;
            if run.len() > 1 && self.gso.load(Ordering::Relaxed) {
                match self.send_gso(run, seg, dst) {
                    Ok(()) => continue,
                    // EIO: the route's device cannot checksum; EINVAL/EOPNOTSUPP: no GSO.
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EIO | libc::EINVAL | libc::EOPNOTSUPP)
                        ) =>
                    {
                        tracing::info!(error = %e, "UDP GSO unavailable; sending one by one");
                        self.gso.store(false, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e),
                }
            }
            for d in run {
                self.send_to(d.as_ref(), dst)?;
            }
        }
        Ok(())
    }

    fn send_gso<P: AsRef<[u8]>>(&self, run: &[P], seg: usize, dst: SocketAddr) -> io::Result<()> {
        let s = self.socket_for(dst)?;
        let iov: Vec<IoSlice<'_>> = run.iter().map(|d| IoSlice::new(d.as_ref())).collect();
        let seg = u16::try_from(seg).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // One cmsg: SOL_UDP / UDP_SEGMENT / u16 segment size, laid out like CMSG_*.
        let mut control = [0u8; CMSG_HDR + 8];
        let cmsg_len = CMSG_HDR + std::mem::size_of::<u16>();
        let hdr = libc::cmsghdr {
            cmsg_len: cmsg_len as _,
            cmsg_level: SOL_UDP,
            cmsg_type: UDP_SEGMENT,
        };
        // SAFETY: `control` has room for a cmsghdr; the write is unaligned-safe.
        unsafe { std::ptr::write_unaligned(control.as_mut_ptr().cast::<libc::cmsghdr>(), hdr) };
        control[CMSG_HDR..CMSG_HDR + 2].copy_from_slice(&seg.to_ne_bytes());
        let addr = SockAddr::from(dst);
        let msg = MsgHdr::new()
            .with_addr(&addr)
            .with_buffers(&iov)
            .with_control(&control);
        s.sendmsg(&msg, 0)?;
        Ok(())
    }
}

/// Datagrams from one receive: `len` bytes in the buffer from `src`, each `segment`
/// bytes long (the last may be shorter); one datagram unless the kernel coalesced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes in the buffer.
    pub len: usize,
    /// Where they came from.
    pub src: SocketAddr,
    /// Size of each datagram.
    pub segment: usize,
}

/// The `UDP_GRO` segment size in a received control buffer, if present.
fn gro_segment(control: &[u8]) -> Option<usize> {
    let mut at = 0;
    while at + CMSG_HDR <= control.len() {
        // SAFETY: `at + CMSG_HDR` bytes are in bounds; the read is unaligned-safe.
        let hdr: libc::cmsghdr =
            unsafe { std::ptr::read_unaligned(control.as_ptr().add(at).cast()) };
        let len = hdr.cmsg_len as usize;
        if len < CMSG_HDR {
            return None;
        }
        if hdr.cmsg_level == SOL_UDP && hdr.cmsg_type == UDP_GRO {
            let b = control.get(at + CMSG_HDR..at + CMSG_HDR + 4)?;
            let size = libc::c_int::from_ne_bytes(b.try_into().ok()?);
            return usize::try_from(size).ok().filter(|s| *s > 0);
        }
        at += (len + 7) & !7;
    }
    None
}

/// Receives into `buf`: `Ok(None)` on timeout.
pub fn recv(s: &Socket, buf: &mut [u8]) -> io::Result<Option<Received>> {
    let mut addr = SockAddr::from(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)));
    // SAFETY: `MaybeUninit<u8>` has the layout of `u8`, and the kernel only writes
    // into the slice; initialised bytes stay initialised.
    let uninit: &mut [MaybeUninit<u8>] =
        unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast(), buf.len()) };
    let mut bufs = [MaybeUninitSlice::new(uninit)];
    const CONTROL_LEN: usize = 64;
    let mut control = [MaybeUninit::<u8>::uninit(); CONTROL_LEN];
    let mut msg = MsgHdrMut::new()
        .with_addr(&mut addr)
        .with_buffers(&mut bufs)
        .with_control(&mut control);
    let n = match s.recvmsg(&mut msg, 0) {
        Ok(n) => n,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let control_len = msg.control_len().min(CONTROL_LEN);
    // SAFETY: the kernel initialised the first `control_len` bytes.
    let control: &[u8] =
        unsafe { std::slice::from_raw_parts(control.as_ptr().cast(), control_len) };
    let Some(src) = addr.as_socket() else {
        return Ok(None);
    };
    let segment = gro_segment(control).unwrap_or(n).max(1);
    Ok(Some(Received {
        len: n,
        src: canonical(src),
        segment,
    }))
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
            let r = recv(sock, &mut buf).expect("recv").expect("datagram");
            let (n, from) = (r.len, r.src);
            assert_eq!(&buf[..n], b"hi");
            assert_eq!(from, peer.local_addr().expect("addr"));
            s.send_to(b"back", from).expect("reply");
            let (n, _) = peer.recv_from(&mut buf).expect("peer recv");
            assert_eq!(&buf[..n], b"back");
        }
    }

    /// Batches keep datagram boundaries end to end, coalesced (GSO, GRO) or not.
    #[test]
    fn batches_keep_datagram_boundaries() {
        let a = UdpSockets::bind(0, 0).expect("bind");
        let b = UdpSockets::bind(0, 0).expect("bind");
        let dst = SocketAddr::from(([127, 0, 0, 1], b.port));
        let mut sent: Vec<Vec<u8>> = (0..70u8).map(|i| vec![i; 100]).collect();
        sent.push(vec![200; 40]);
        sent.push(vec![201; 100]); // after a short one: starts a new run
        a.send_batch(&sent, dst).expect("send");
        let sock = b.v4.as_ref().expect("v4");
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut buf = vec![0u8; 65536];
        let mut receives = 0;
        while got.len() < sent.len() {
            let r = recv(sock, &mut buf)
                .expect("recv")
                .expect("datagrams before timeout");
            assert_eq!(r.src.port(), a.port);
            got.extend(buf[..r.len].chunks(r.segment).map(<[u8]>::to_vec));
            receives += 1;
        }
        assert_eq!(got, sent);
        // Which paths ran (GSO send, GRO receive) depends on the kernel.
        println!(
            "{} datagrams in {receives} receives, gso {}",
            sent.len(),
            a.gso.load(Ordering::Relaxed)
        );
    }

    #[test]
    fn gro_control_message_is_parsed() {
        let mut control = vec![0u8; CMSG_HDR + 8];
        let hdr = libc::cmsghdr {
            cmsg_len: (CMSG_HDR + 4) as _,
            cmsg_level: SOL_UDP,
            cmsg_type: UDP_GRO,
        };
        // SAFETY: the buffer has room for a cmsghdr.
        unsafe { std::ptr::write_unaligned(control.as_mut_ptr().cast::<libc::cmsghdr>(), hdr) };
        control[CMSG_HDR..CMSG_HDR + 4].copy_from_slice(&1452i32.to_ne_bytes());
        assert_eq!(gro_segment(&control), Some(1452));
        assert_eq!(gro_segment(&control[..CMSG_HDR]), None);
        assert_eq!(gro_segment(&[]), None);
        assert_eq!(gro_segment(&[0xff; 7]), None);
        assert_eq!(gro_segment(&[0; 40]), None);
    }

    #[test]
    fn receive_times_out_instead_of_blocking() {
        let s = UdpSockets::bind(0, 0).expect("bind");
        let sock = s.v4.as_ref().expect("v4");
        let start = std::time::Instant::now();
        assert!(recv(sock, &mut [0u8; 16]).expect("recv").is_none());
        assert!(start.elapsed() < RECV_TIMEOUT * 10);
    }

    /// A burst larger than the distribution's default `rmem_max` still fits: the
    /// buffers reach the requested size even where the sysctl is lower.
    #[test]
    fn buffers_hold_a_burst() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return; // without CAP_NET_ADMIN the kernel caps the size at its sysctl
        }
        let s = UdpSockets::bind(0, 0).expect("bind");
        let sock = s.v4.as_ref().expect("v4");
        assert!(sock.recv_buffer_size().expect("SO_RCVBUF") >= SOCKET_BUFFER);
        assert!(sock.send_buffer_size().expect("SO_SNDBUF") >= SOCKET_BUFFER);
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
