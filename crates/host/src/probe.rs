//! Reachability probes: ICMP echo and a TCP echo round trip, run from inside a
//! namespace (see [`crate::netns::enter`]). No external `ping` needed.

use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Send one ICMP (or ICMPv6) echo request to `dst` and wait up to `timeout` for its
/// reply. Returns the round-trip time.
pub fn ping(dst: impl Into<IpAddr>, timeout: Duration) -> std::io::Result<Duration> {
    let dst = dst.into();
    // (socket, echo request type, echo reply type): RFC 792 and RFC 4443 §4.
    let (socket, request_type, reply_type) = match dst {
        IpAddr::V4(_) => (
            Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?,
            8u8,
            0u8,
        ),
        IpAddr::V6(_) => (
            Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?,
            128,
            129,
        ),
    };
    let id = (std::process::id() as u16) ^ (rand_id() as u16);
    let mut request = vec![request_type, 0, 0, 0, (id >> 8) as u8, id as u8, 0, 1];
    request.extend_from_slice(b"wiremesh-probe");
    // The kernel fills in an ICMPv6 checksum itself (it covers the IPv6 pseudo-header).
    if dst.is_ipv4() {
        let sum = checksum(&request);
        request[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    let start = Instant::now();
    socket.send_to(&request, &SocketAddr::new(dst, 0).into())?;
    let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
    loop {
        let left = timeout
            .checked_sub(start.elapsed())
            .filter(|d| !d.is_zero());
        let Some(left) = left else {
            return Err(std::io::ErrorKind::TimedOut.into());
        };
        socket.set_read_timeout(Some(left))?;
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(std::io::ErrorKind::TimedOut.into())
            }
            Err(e) => return Err(e),
        };
        // SAFETY: recv_from initialised the first n bytes.
        let packet: Vec<u8> = buf[..n]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        // Raw IPv4 sockets see the IP header; raw IPv6 sockets do not.
        let header = match dst {
            IpAddr::V4(_) => usize::from(packet.first().map_or(0, |b| b & 0x0f)) * 4,
            IpAddr::V6(_) => 0,
        };
        let icmp = packet.get(header..).unwrap_or_default();
        let from_dst = from.as_socket().map(|s| s.ip()) == Some(dst);
        if from_dst
            && icmp.len() >= 8
            && icmp[0] == reply_type
            && u16::from_be_bytes([icmp[4], icmp[5]]) == id
        {
            return Ok(start.elapsed());
        }
    }
}

fn rand_id() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

/// Serve TCP echo on `listener` until the process ends: each connection gets back
/// what it sent (up to 64 KiB), then is closed.
pub fn serve_echo(listener: TcpListener) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 65536];
            if let Ok(n) = stream.read(&mut buf) {
                let _ = stream.write_all(&buf[..n]);
            }
        });
    }
}

/// Connect to a TCP echo server, send a token, and check it comes back unchanged.
pub fn tcp_echo(dst: SocketAddr, timeout: Duration) -> std::io::Result<Duration> {
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&dst, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let token = format!("wiremesh {dst} {}", rand_id());
    stream.write_all(token.as_bytes())?;
    let mut back = vec![0u8; token.len()];
    stream.read_exact(&mut back)?;
    if back != token.as_bytes() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "echo differs from what was sent",
        ));
    }
    Ok(start.elapsed())
}
