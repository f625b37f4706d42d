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

/// Between echo requests of one probe: a request lost while a route, neighbour or
/// address is still settling (an address added a moment ago stays tentative until
/// the kernel's DAD work has run) is followed by another, as `ping` does.
const ECHO_INTERVAL: Duration = Duration::from_millis(200);

/// Send ICMP (or ICMPv6) echo requests to `dst`, one every [`ECHO_INTERVAL`], until
/// one is answered or `timeout` has passed. Returns the answered request's round-trip
/// time.
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
    let deadline = Instant::now() + timeout;
    // When each request (by sequence number, from 0) went out.
    let mut sent: Vec<Instant> = Vec::new();
    let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        if sent.last().is_none_or(|t| now >= *t + ECHO_INTERVAL) {
            let seq = sent.len() as u16;
            socket.send_to(
                &echo_request(dst, request_type, id, seq),
                &SocketAddr::new(dst, 0).into(),
            )?;
            sent.push(now);
        }
        let wake = deadline.min(sent[sent.len() - 1] + ECHO_INTERVAL);
        let left = wake
            .saturating_duration_since(now)
            .max(Duration::from_millis(1));
        socket.set_read_timeout(Some(left))?;
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
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
            let seq = usize::from(u16::from_be_bytes([icmp[6], icmp[7]]));
            if let Some(at) = sent.get(seq) {
                return Ok(at.elapsed());
            }
        }
    }
}

fn echo_request(dst: IpAddr, request_type: u8, id: u16, seq: u16) -> Vec<u8> {
    // Type, code, checksum (zero until computed), identifier, sequence number.
    let mut request = vec![request_type, 0, 0, 0];
    request.extend_from_slice(&id.to_be_bytes());
    request.extend_from_slice(&seq.to_be_bytes());
    request.extend_from_slice(b"wiremesh-probe");
    // The kernel fills in an ICMPv6 checksum itself (it covers the IPv6 pseudo-header).
    if dst.is_ipv4() {
        let sum = checksum(&request);
        request[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    request
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
