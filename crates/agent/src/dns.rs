//! The DNS server of one VPC on this node: a thin adapter around the pure answers of
//! [`wiremesh_vpc::dns::DnsView`].
//!
//! Its UDP and TCP sockets on `<nameserver>:53` are made inside the VPC's namespace
//! (a socket stays in the namespace it was created in), then served by one thread
//! that stays in the agent's namespace: queries the VPC does not answer
//! ([`Answer::Forward`]) go from there to the node's upstream resolvers, which the
//! VPC's namespace cannot reach. Each forward, and each TCP connection, runs on a
//! short-lived thread of its own, at most [`MAX_TASKS`] at once, so a slow upstream
//! delays only its own query; a forward that fails within [`FORWARD_TRY`] per
//! upstream is answered SERVFAIL. The upstreams follow the node's resolv.conf
//! ([`Upstreams`]: looked at again at most once a second, when a forward needs them),
//! so a changed resolver needs no agent restart.
//!
//! The message translation ([`respond`]) is pure: query bytes in, response bytes (or
//! "forward", or "ignore") out; negative answers carry the zone's SOA (RFC 2308). A malformed query gets FORMERR or nothing; it never
//! stops the server. The agent swaps in a whole new view on every change
//! ([`DnsServer::set_view`]); dropping the server closes its sockets.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, Name, RData as WireData, Record};
use hickory_proto::ProtoError;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use wiremesh_host::{netns, HostError};
use wiremesh_vpc::dns::{Answer, DnsView, QueryType, RData};

/// The DNS port (RFC 1035 §4.2).
pub const PORT: u16 = 53;
/// What a UDP response may hold when the query does not say (RFC 1035 §4.2.1).
const UDP_DEFAULT: usize = 512;
/// The most this server puts in one UDP response (the DNS flag day 2020 size).
const UDP_MAX: u16 = 1232;
/// How long one upstream resolver has to answer a forwarded query.
pub const FORWARD_TRY: Duration = Duration::from_secs(1);
/// At most this many forwards and TCP connections at once; beyond, SERVFAIL or close.
pub const MAX_TASKS: usize = 64;
/// An idle TCP client is let go after this long.
const TCP_IDLE: Duration = Duration::from_secs(5);

/// How a query came: it bounds the response's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What to do with one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Send(Vec<u8>),
    /// Not the VPC's name: pass the query, as it is, to the upstream resolvers.
    Forward,
    /// No answer at all (a response, or bytes too short to hold a message id).
    Ignore,
}

/// The response to `query` from `view`.
pub fn respond(view: &DnsView, query: &[u8], transport: Transport) -> Reply {
    let Ok(request) = Message::from_vec(query) else {
        return error_header(query, ResponseCode::FormErr).map_or(Reply::Ignore, Reply::Send);
    };
    if request.metadata.message_type != MessageType::Query {
        return Reply::Ignore;
    }
    let mut response = response_to(&request);
    match (request.metadata.op_code, request.queries.as_slice()) {
        (OpCode::Query, [q]) if q.query_class() == DNSClass::IN => {
            let qtype = QueryType::from_u16(q.query_type().into());
            let (code, answers, authority) = match view.resolve(&q.name().to_ascii(), qtype) {
                Answer::Forward => return Reply::Forward,
                Answer::Records(records) => (ResponseCode::NoError, records, None),
                // The zone's SOA lets resolvers cache the negative answer (RFC 2308 §3).
                Answer::NoData(soa) => (ResponseCode::NoError, Vec::new(), Some(soa)),
                Answer::NxDomain(soa) => (ResponseCode::NXDomain, Vec::new(), Some(soa)),
            };
            response.metadata.authoritative = true;
            response.metadata.response_code = code;
            for r in answers {
                // The owner name as asked, case included (resolvers may check it).
                let Some(data) = wire_data(&r.data) else {
                    return failure(&request);
                };
                let record = Record::from_rdata(q.name().clone(), r.ttl, data);
                response.answers.push(record);
            }
            if let Some(soa) = authority {
                let (Ok(name), Some(data)) = (wire_name(&soa.name), wire_data(&soa.data)) else {
                    return failure(&request);
                };
                let record = Record::from_rdata(name, soa.ttl, data);
                response.authorities.push(record);
            }
        }
        (OpCode::Query, [_]) => response.metadata.response_code = ResponseCode::NotImp,
        (OpCode::Query, _) => response.metadata.response_code = ResponseCode::FormErr,
        _ => response.metadata.response_code = ResponseCode::NotImp,
    }
    encode(&response, size_limit(&request, transport))
        .map_or_else(|| failure(&request), Reply::Send)
}

/// SERVFAIL for `query` (a forward that got no answer); `None` if it holds no id.
pub fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    match Message::from_vec(query) {
        Ok(request) => match failure(&request) {
            Reply::Send(bytes) => Some(bytes),
            _ => None,
        },
        Err(_) => error_header(query, ResponseCode::ServFail),
    }
}

/// The response header and question of `request`, with EDNS if it had EDNS.
fn response_to(request: &Message) -> Message {
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata = Metadata::response_from_request(&request.metadata);
    // Other names are forwarded: recursion is available.
    response.metadata.recursion_available = true;
    response.queries = request.queries.clone();
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(UDP_MAX);
        response.edns = Some(edns);
    }
    response
}

fn failure(request: &Message) -> Reply {
    let mut response = response_to(request);
    response.metadata.response_code = ResponseCode::ServFail;
    response.to_vec().map_or(Reply::Ignore, Reply::Send)
}

/// A bare response header with `code`, for bytes that do not parse as a message:
/// the id, opcode and RD bit copied, no sections. `None` for a response or a runt.
fn error_header(query: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    let &[id0, id1, flags, ..] = query else {
        return None;
    };
    // A response is never answered (no loops between servers); 12 bytes is a header.
    if query.len() < 12 || flags & 0x80 != 0 {
        return None;
    }
    let mut header = vec![0u8; 12];
    header[..2].copy_from_slice(&[id0, id1]);
    // QR, the opcode and RD (RFC 1035 §4.1.1); RA; the 4-bit RCODE.
    header[2] = 0x80 | (flags & 0x79);
    header[3] = 0x80 | (u16::from(code) & 0x0f) as u8;
    Some(header)
}

/// The largest response `request` can take over `transport`.
fn size_limit(request: &Message, transport: Transport) -> usize {
    match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => request.edns.as_ref().map_or(UDP_DEFAULT, |e| {
            usize::from(e.max_payload().min(UDP_MAX)).max(UDP_DEFAULT)
        }),
    }
}

/// The response's bytes; a truncated one (TC set, the client retries over TCP) if it
/// does not fit.
fn encode(response: &Message, limit: usize) -> Option<Vec<u8>> {
    let bytes = response.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    response.truncate().to_vec().ok()
}

/// A view's name (lowercase, no final dot) as a fully qualified wire name.
fn wire_name(name: &str) -> Result<Name, ProtoError> {
    Name::from_ascii(format!("{name}."))
}

fn wire_data(data: &RData) -> Option<WireData> {
    let name = |n: &str| wire_name(n).ok();
    // SOA timers are 32-bit on the wire; hickory types them signed.
    let timer = |t: u32| i32::try_from(t).ok();
    Some(match data {
        RData::A(a) => WireData::A(A(*a)),
        RData::Aaaa(a) => WireData::AAAA(AAAA(*a)),
        RData::Srv {
            priority,
            weight,
            port,
            target,
        } => WireData::SRV(SRV::new(*priority, *weight, *port, name(target)?)),
        RData::Ptr(p) => WireData::PTR(PTR(name(p)?)),
        RData::Txt(t) => WireData::TXT(TXT::new(vec![t.clone()])),
        RData::Ns(n) => WireData::NS(NS(name(n)?)),
        RData::Soa(soa) => WireData::SOA(SOA::new(
            name(&soa.mname)?,
            name(&soa.rname)?,
            soa.serial,
            timer(soa.refresh)?,
            timer(soa.retry)?,
            timer(soa.expire)?,
            soa.minimum,
        )),
    })
}

/// The upstream resolvers in a `resolv.conf` (`nameserver` lines, port 53; a scoped
/// IPv6 address `fe80::1%eth0` is skipped).
fn upstreams(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then_some(())?;
            let ip: IpAddr = words.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, PORT))
        })
        .collect()
}

/// The node's resolv.conf is looked at (one `stat`) at most this often.
pub const RESOLV_RECHECK: Duration = Duration::from_secs(1);

/// What tells one version of a file from another without reading it: an in-place
/// rewrite changes the length or mtime, a replacement the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        let meta = std::fs::metadata(path).ok()?;
        Some(Stamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode: meta.ino(),
        })
    }
}

/// What looking at the resolv.conf again found.
#[derive(Debug, PartialEq, Eq)]
enum Reread {
    /// Not due, the same file, or the same resolvers.
    Unchanged,
    Changed,
    /// A new file without resolvers (unreadable, empty or half-written): the last
    /// good list stays.
    KeptLast,
}

/// The pure part of [`Upstreams`]: the list in use and the file it came from.
#[derive(Debug)]
struct ResolvWatch {
    list: Arc<[SocketAddr]>,
    stamp: Option<Stamp>,
    checked: Option<Instant>,
}

impl ResolvWatch {
    fn new(list: Vec<SocketAddr>) -> ResolvWatch {
        ResolvWatch {
            list: list.into(),
            stamp: None,
            checked: None,
        }
    }

    /// Takes the file as `stamp` shows it at `now` (reading it with `read` only if
    /// it changed), at most once per [`RESOLV_RECHECK`].
    fn observe(
        &mut self,
        now: Instant,
        stamp: impl FnOnce() -> Option<Stamp>,
        read: impl FnOnce() -> Option<String>,
    ) -> Reread {
        if self
            .checked
            .is_some_and(|at| now.saturating_duration_since(at) < RESOLV_RECHECK)
        {
            return Reread::Unchanged;
        }
        self.checked = Some(now);
        let stamp = stamp();
        if stamp == self.stamp {
            return Reread::Unchanged;
        }
        self.stamp = stamp;
        let found = read().map(|text| upstreams(&text)).unwrap_or_default();
        if found.is_empty() {
            return if self.list.is_empty() {
                Reread::Unchanged
            } else {
                Reread::KeptLast
            };
        }
        if *self.list == *found {
            return Reread::Unchanged;
        }
        self.list = found.into();
        Reread::Changed
    }
}

/// The node's upstream resolvers, as its resolv.conf lists them now: the file is
/// looked at again when a forward needs them, at most once per [`RESOLV_RECHECK`], so
/// a changed resolver is used without an agent restart. Clones share one watch.
#[derive(Debug, Clone)]
pub struct Upstreams {
    path: Arc<Path>,
    watch: Arc<Mutex<ResolvWatch>>,
}

impl Upstreams {
    /// Follows the resolv.conf at `path` (read now, then as it changes).
    pub fn watch(path: impl AsRef<Path>) -> Upstreams {
        let upstreams = Upstreams {
            path: path.as_ref().into(),
            watch: Arc::new(Mutex::new(ResolvWatch::new(Vec::new()))),
        };
        if upstreams.current().is_empty() {
            let path = upstreams.path.display();
            tracing::warn!("no nameserver in {path}: VPC DNS answers only its own names");
        }
        upstreams
    }

    /// The resolvers to forward to now.
    pub fn current(&self) -> Arc<[SocketAddr]> {
        // Nothing panics while holding the lock; a poisoned one still holds a list.
        let mut watch = self.watch.lock().unwrap_or_else(|e| e.into_inner());
        let path = &*self.path;
        let reread = watch.observe(
            Instant::now(),
            || Stamp::of(path),
            || std::fs::read_to_string(path).ok(),
        );
        match reread {
            Reread::Unchanged => {}
            Reread::Changed => tracing::info!(
                "VPC DNS forwards to {:?} from now on ({})",
                watch.list,
                path.display()
            ),
            Reread::KeptLast => tracing::warn!(
                "no nameserver in {}: VPC DNS keeps forwarding to {:?}",
                path.display(),
                watch.list
            ),
        }
        Arc::clone(&watch.list)
    }
}

/// Whether `reply` is the response to `query` (same id, QR set).
fn answers(query: &[u8], reply: &[u8]) -> bool {
    reply.len() >= 12 && query.len() >= 2 && reply[..2] == query[..2] && reply[2] & 0x80 != 0
}

/// `query` sent to each upstream in turn over `transport`; the first response.
fn forward(upstreams: &[SocketAddr], query: &[u8], transport: Transport) -> Option<Vec<u8>> {
    upstreams.iter().find_map(|&upstream| {
        let sent = match transport {
            Transport::Udp => forward_udp(upstream, query),
            Transport::Tcp => forward_tcp(upstream, query),
        };
        match sent {
            Ok(reply) => Some(reply),
            Err(e) => {
                tracing::debug!(%upstream, "forwarding a DNS query: {e}");
                None
            }
        }
    })
}

fn forward_udp(upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let any: IpAddr = match upstream {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind((any, 0))?;
    socket.connect(upstream)?;
    socket.send(query)?;
    let deadline = Instant::now() + FORWARD_TRY;
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        socket.set_read_timeout(Some(left))?;
        let n = socket.recv(&mut buf)?;
        // A stray datagram (a late answer to someone else) is not ours: keep waiting.
        if answers(query, &buf[..n]) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

fn forward_tcp(upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let mut conn = TcpStream::connect_timeout(&upstream, FORWARD_TRY)?;
    conn.set_read_timeout(Some(FORWARD_TRY))?;
    conn.set_write_timeout(Some(FORWARD_TRY))?;
    write_framed(&mut conn, query)?;
    let reply = read_framed(&mut conn)?;
    if answers(query, &reply) {
        Ok(reply)
    } else {
        Err(io::Error::new(io::ErrorKind::InvalidData, "not the answer"))
    }
}

/// One message over TCP: a two-byte length, then the message (RFC 1035 §4.2.2).
fn read_framed(conn: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    conn.read_exact(&mut len)?;
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    conn.read_exact(&mut message)?;
    Ok(message)
}

fn write_framed(conn: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "message over 64 KiB"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    conn.write_all(&framed)
}

/// The view the server answers from, replaced whole by the agent.
type SharedView = Arc<RwLock<Arc<DnsView>>>;

fn current(view: &SharedView) -> Arc<DnsView> {
    // Nothing panics while holding the lock; a poisoned one still holds a whole view.
    Arc::clone(&view.read().unwrap_or_else(|e| e.into_inner()))
}

/// A running DNS server; dropping it stops the server and closes its sockets.
pub struct DnsServer {
    view: SharedView,
    /// Dropping it wakes the server's thread, which then returns.
    stop: Option<io::PipeWriter>,
    thread: Option<JoinHandle<()>>,
    pub addr: SocketAddr,
}

impl DnsServer {
    /// Binds `<nameserver>:53` (UDP and TCP) inside namespace `ns`, and serves it.
    pub fn start(
        ns: &str,
        nameserver: IpAddr,
        upstreams: Upstreams,
        view: DnsView,
    ) -> Result<DnsServer, HostError> {
        let addr = SocketAddr::new(nameserver, PORT);
        let sockets = netns::enter(ns, move || {
            Ok::<_, io::Error>((UdpSocket::bind(addr)?, TcpListener::bind(addr)?))
        })?;
        let (udp, tcp) = sockets.map_err(|e| HostError::Netns {
            name: ns.into(),
            reason: format!("DNS server on {addr}: {e}"),
        })?;
        DnsServer::serve(udp, tcp, upstreams, view).map_err(|e| HostError::Netns {
            name: ns.into(),
            reason: format!("DNS server on {addr}: {e}"),
        })
    }

    /// Serves bound sockets on a thread of its own.
    pub fn serve(
        udp: UdpSocket,
        tcp: TcpListener,
        upstreams: Upstreams,
        view: DnsView,
    ) -> io::Result<DnsServer> {
        let addr = udp.local_addr()?;
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        let (stop_rx, stop) = io::pipe()?;
        let view: SharedView = Arc::new(RwLock::new(Arc::new(view)));
        let server = Server {
            udp,
            tcp,
            upstreams,
            view: Arc::clone(&view),
            tasks: Arc::new(AtomicUsize::new(0)),
        };
        let thread = std::thread::Builder::new()
            .name(format!("dns {addr}"))
            .spawn(move || server.run(&stop_rx))?;
        Ok(DnsServer {
            view,
            stop: Some(stop),
            thread: Some(thread),
            addr,
        })
    }

    /// Answers from `view` from now on (no-op if it is the one in use).
    pub fn set_view(&self, view: DnsView) {
        if *current(&self.view) != view {
            *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The serving thread's state.
struct Server {
    udp: UdpSocket,
    tcp: TcpListener,
    upstreams: Upstreams,
    view: SharedView,
    /// Forwards and TCP connections running now.
    tasks: Arc<AtomicUsize>,
}

/// A place among the [`MAX_TASKS`], given back on drop.
struct Task(Arc<AtomicUsize>);

impl Task {
    fn claim(tasks: &Arc<AtomicUsize>) -> Option<Task> {
        let claimed = tasks
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_TASKS).then_some(n + 1)
            })
            .is_ok();
        claimed.then(|| Task(Arc::clone(tasks)))
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Server {
    fn run(self, stop: &io::PipeReader) {
        let mut buf = vec![0u8; usize::from(u16::MAX)];
        loop {
            let mut fds = [
                PollFd::new(self.udp.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.tcp.as_fd(), PollFlags::POLLIN),
                PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    tracing::error!("DNS server on {:?}: poll: {e}", self.udp.local_addr());
                    return;
                }
            }
            // The write end is gone (or written to): stop.
            if fds[2].revents().is_some_and(|r| !r.is_empty()) {
                return;
            }
            // Non-blocking sockets: take whatever is queued, then poll again.
            while let Ok((n, client)) = self.udp.recv_from(&mut buf) {
                self.udp_query(&buf[..n], client);
            }
            while let Ok((conn, _)) = self.tcp.accept() {
                self.tcp_client(conn);
            }
        }
    }

    fn udp_query(&self, query: &[u8], client: SocketAddr) {
        let reply = match respond(&current(&self.view), query, Transport::Udp) {
            Reply::Send(bytes) => bytes,
            Reply::Ignore => return,
            Reply::Forward => {
                let task = Task::claim(&self.tasks);
                let socket = self.udp.try_clone();
                let (Some(task), Ok(socket)) = (task, socket) else {
                    // Too busy: say so now rather than let the client time out.
                    let _ = servfail(query).map(|b| self.udp.send_to(&b, client));
                    return;
                };
                let upstreams = self.upstreams.clone();
                let query = query.to_vec();
                let _ = std::thread::Builder::new()
                    .name("dns forward".into())
                    .spawn(move || {
                        let _task = task;
                        let reply = forward(&upstreams.current(), &query, Transport::Udp)
                            .or_else(|| servfail(&query));
                        let _ = reply.map(|b| socket.send_to(&b, client));
                    });
                return;
            }
        };
        let _ = self.udp.send_to(&reply, client);
    }

    fn tcp_client(&self, mut conn: TcpStream) {
        let Some(task) = Task::claim(&self.tasks) else {
            return; // dropped: closed
        };
        let upstreams = self.upstreams.clone();
        let view = Arc::clone(&self.view);
        let _ = std::thread::Builder::new()
            .name("dns tcp".into())
            .spawn(move || {
                let _task = task;
                let setup = conn
                    .set_nonblocking(false)
                    .and_then(|()| conn.set_read_timeout(Some(TCP_IDLE)))
                    .and_then(|()| conn.set_write_timeout(Some(TCP_IDLE)));
                if setup.is_err() {
                    return;
                }
                // Several queries may come on one connection (RFC 7766 §6.2.1).
                while let Ok(query) = read_framed(&mut conn) {
                    let reply = match respond(&current(&view), &query, Transport::Tcp) {
                        Reply::Send(bytes) => Some(bytes),
                        Reply::Forward => forward(&upstreams.current(), &query, Transport::Tcp)
                            .or_else(|| servfail(&query)),
                        Reply::Ignore => None,
                    };
                    let Some(reply) = reply else { return };
                    if write_framed(&mut conn, &reply).is_err() {
                        return;
                    }
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::RecordType;
    use wiremesh_testkit::wait_until;
    use wiremesh_vpc::snapshot::{Mesh, Records};
    use wiremesh_vpc::VpcSnapshot;
    use wiremesh_vpc::{EndpointRecord, NodeId, ServiceRecord, VpcMemberRecord, VpcRecord};

    fn view() -> DnsView {
        let vpc = VpcRecord {
            name: "blue".into(),
            id: 7,
            pod_cidrs: vec!["10.10.0.0/16".into()],
            service_cidr: "10.96.0.0/24".into(),
            dns_zone: "cluster.local".into(),
        };
        let member = VpcMemberRecord {
            vpc: "blue".into(),
            node: "n1".into(),
            pod_cidrs: vec!["10.10.1.0/24".into()],
        };
        let service = |json: serde_json::Value| {
            serde_json::from_value::<ServiceRecord>(json)
                .unwrap()
                .try_into()
                .unwrap()
        };
        let endpoints = (0..40)
            .map(|i| {
                EndpointRecord {
                    vpc: "blue".into(),
                    namespace: "web".into(),
                    service: "many".into(),
                    address: format!("10.10.1.{}", i + 10),
                    node: "n1".into(),
                    hostname: None,
                    ready: Some(true),
                    serving: None,
                    terminating: false,
                }
                .try_into()
                .unwrap()
            })
            .collect();
        let records = Records {
            vpcs: vec![vpc.try_into().unwrap()],
            members: vec![member.try_into().unwrap()],
            services: vec![
                service(
                    serde_json::json!({"vpc": "blue", "namespace": "web", "name": "db",
                    "cluster_ip": "10.96.0.11",
                    "ports": [{"name": "pg", "protocol": "TCP", "port": 5432}]}),
                ),
                service(
                    serde_json::json!({"vpc": "blue", "namespace": "web", "name": "many",
                    "cluster_ip": "None", "ports": [{"protocol": "TCP", "port": 80}]}),
                ),
            ],
            endpoints,
            ..Records::default()
        };
        let nodes = [("n1".parse().unwrap(), NodeId(1))].into_iter().collect();
        let mesh = Mesh {
            prefix: "fd5e:1d2c:9a00::/48".parse().unwrap(),
            nodes: &nodes,
        };
        let (snap, bad) = VpcSnapshot::build(records, mesh);
        assert!(bad.is_empty(), "{bad:?}");
        DnsView::new(&snap.vpcs["blue"])
    }

    fn query(name: &str, qtype: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0x1234;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        m.to_vec().unwrap()
    }

    fn sent(reply: Reply) -> Message {
        match reply {
            Reply::Send(bytes) => Message::from_vec(&bytes).unwrap(),
            other => panic!("no response: {other:?}"),
        }
    }

    /// The response as `RCODE flags` then one `TYPE data` line per answer.
    fn check(name: &str, qtype: RecordType, want: &str) {
        let r = sent(respond(&view(), &query(name, qtype), Transport::Udp));
        assert_eq!(r.metadata.id, 0x1234);
        assert_eq!(r.queries[0].name().to_ascii(), name);
        let mut got = vec![format!(
            "{:?}{}{}",
            r.metadata.response_code,
            if r.metadata.authoritative { " aa" } else { "" },
            if r.metadata.truncation { " tc" } else { "" },
        )];
        // `TYPE ttl data`; the SOA serial follows the records (the view's tests say how).
        let shown = |a: &Record| {
            let data = a.data.to_string();
            let mut words: Vec<&str> = data.split(' ').collect();
            if a.record_type() == RecordType::SOA {
                words[2] = "SERIAL";
            }
            format!("{} {} {}", a.record_type(), a.ttl, words.join(" "))
        };
        for a in &r.answers {
            assert_eq!(a.name.to_ascii(), name, "the owner name as asked");
            got.push(shown(a));
        }
        for a in &r.authorities {
            got.push(format!("authority {} {}", a.name.to_ascii(), shown(a)));
        }
        assert_eq!(got.join("\n"), want, "{name} {qtype}");
    }

    #[test]
    fn answers_from_the_view() {
        check(
            "db.web.svc.cluster.local.",
            RecordType::A,
            "NoError aa\nA 5 10.96.0.11",
        );
        check(
            "DB.Web.svc.CLUSTER.local.",
            RecordType::A,
            "NoError aa\nA 5 10.96.0.11",
        );
        check(
            "_pg._tcp.db.web.svc.cluster.local.",
            RecordType::SRV,
            "NoError aa\nSRV 5 0 100 5432 db.web.svc.cluster.local.",
        );
        check(
            "11.0.96.10.in-addr.arpa.",
            RecordType::PTR,
            "NoError aa\nPTR 5 db.web.svc.cluster.local.",
        );
        check(
            "dns-version.cluster.local.",
            RecordType::TXT,
            "NoError aa\nTXT 5 1.1.0",
        );
        check(
            "cluster.local.",
            RecordType::NS,
            "NoError aa\nNS 5 ns.dns.cluster.local.",
        );
        check(
            "cluster.local.",
            RecordType::SOA,
            "NoError aa\nSOA 5 ns.dns.cluster.local. hostmaster.cluster.local. \
             SERIAL 7200 1800 86400 5",
        );
    }

    /// NODATA and NXDOMAIN carry the zone's SOA in the authority section, its owner
    /// the zone apex, so resolvers cache them for 5 s (RFC 2308).
    #[test]
    fn negative_answers_carry_the_zones_soa() {
        let soa = "SOA 5 ns.dns.cluster.local. hostmaster.cluster.local. SERIAL 7200 1800 86400 5";
        check(
            "db.web.svc.cluster.local.",
            RecordType::MX,
            &format!("NoError aa\nauthority cluster.local. {soa}"),
        );
        check(
            "db.web.svc.cluster.local.",
            RecordType::AAAA,
            &format!("NoError aa\nauthority cluster.local. {soa}"),
        );
        check(
            "nope.web.svc.cluster.local.",
            RecordType::A,
            &format!("NXDomain aa\nauthority cluster.local. {soa}"),
        );
        check(
            "99.0.96.10.in-addr.arpa.",
            RecordType::PTR,
            &format!("NXDomain aa\nauthority 0.96.10.in-addr.arpa. {soa}"),
        );
    }

    #[test]
    fn other_names_are_forwarded() {
        let q = query("example.com.", RecordType::A);
        assert_eq!(respond(&view(), &q, Transport::Udp), Reply::Forward);
        let r = Message::from_vec(&servfail(&q).unwrap()).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
        assert_eq!((r.metadata.id, r.queries.len()), (0x1234, 1));
    }

    #[test]
    fn a_large_answer_is_truncated_over_udp_only() {
        let q = query("many.web.svc.cluster.local.", RecordType::A);
        let udp = sent(respond(&view(), &q, Transport::Udp));
        assert!(udp.metadata.truncation && udp.answers.is_empty());
        let tcp = sent(respond(&view(), &q, Transport::Tcp));
        assert!(!tcp.metadata.truncation);
        assert_eq!(tcp.answers.len(), 40);
        // A larger EDNS size lets 40 A records (~700 bytes) through UDP too.
        let mut m = Message::from_vec(&q).unwrap();
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        m.edns = Some(edns);
        let with_edns = sent(respond(&view(), &m.to_vec().unwrap(), Transport::Udp));
        assert_eq!(with_edns.answers.len(), 40);
        assert!(with_edns.edns.is_some());
    }

    #[test]
    fn malformed_queries_get_formerr_or_nothing() {
        let q = query("db.web.svc.cluster.local.", RecordType::A);
        // Cut in the middle of the question: FORMERR with the id.
        let r = sent(respond(&view(), &q[..q.len() - 3], Transport::Udp));
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
        assert_eq!(r.metadata.id, 0x1234);
        assert!(r.metadata.recursion_desired);
        // No room for a header: nothing to answer to.
        assert_eq!(respond(&view(), &q[..5], Transport::Udp), Reply::Ignore);
        // A response is never answered.
        let mut response = q.clone();
        response[2] |= 0x80;
        assert_eq!(respond(&view(), &response, Transport::Udp), Reply::Ignore);
        // Two questions: FORMERR; another class: NOTIMP.
        let mut two = Message::from_vec(&q).unwrap();
        two.add_query(two.queries[0].clone());
        let r = sent(respond(&view(), &two.to_vec().unwrap(), Transport::Udp));
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
        let mut chaos = Message::from_vec(&q).unwrap();
        chaos.queries[0].set_query_class(DNSClass::CH);
        let r = sent(respond(&view(), &chaos.to_vec().unwrap(), Transport::Udp));
        assert_eq!(r.metadata.response_code, ResponseCode::NotImp);
    }

    #[test]
    fn upstreams_come_from_resolv_conf() {
        let conf = "# comment\nnameserver 10.255.255.53\nsearch example\n\
                    nameserver fd00::53\nnameserver fe80::1%eth0\noptions ndots:2\n";
        assert_eq!(
            upstreams(conf),
            [
                "10.255.255.53:53".parse().unwrap(),
                "[fd00::53]:53".parse().unwrap()
            ]
        );
    }

    /// The resolv.conf is looked at once per [`RESOLV_RECHECK`] and read only when
    /// it changed; a new list replaces the old one, a file without one keeps it.
    #[test]
    fn upstreams_follow_resolv_conf() {
        let t0 = Instant::now();
        let at = |secs: f64| t0 + Duration::from_secs_f64(secs);
        let stamp = |n: u64| Stamp {
            modified: None,
            len: n,
            inode: 1,
        };
        let (one, two): (SocketAddr, SocketAddr) = (
            "10.0.0.1:53".parse().unwrap(),
            "10.0.0.2:53".parse().unwrap(),
        );
        let mut w = ResolvWatch::new(Vec::new());
        let mut step = |now, s: Option<Stamp>, text: Option<&str>| {
            let mut read = false;
            let r = w.observe(
                now,
                || s,
                || {
                    read = true;
                    text.map(str::to_owned)
                },
            );
            (r, read, w.list.to_vec())
        };
        let not_read = |r| (r, false);
        let first = step(at(0.0), Some(stamp(1)), Some("nameserver 10.0.0.1\n"));
        assert_eq!(first, (Reread::Changed, true, vec![one]));
        // Not due yet: not even looked at.
        let early = step(at(0.5), Some(stamp(2)), None);
        assert_eq!((early.0, early.1), not_read(Reread::Unchanged));
        // The same file: not read.
        let same = step(at(1.0), Some(stamp(1)), None);
        assert_eq!((same.0, same.1), not_read(Reread::Unchanged));
        // Emptied (or caught half-written), then gone: the last good list stays,
        // said once per version of the file.
        assert_eq!(
            step(at(2.0), Some(stamp(0)), Some("")),
            (Reread::KeptLast, true, vec![one])
        );
        assert_eq!(step(at(3.0), Some(stamp(0)), None).0, Reread::Unchanged);
        assert_eq!(
            step(at(4.0), None, None),
            (Reread::KeptLast, true, vec![one])
        );
        let conf = "nameserver 10.0.0.2\nnameserver 10.0.0.1\n";
        assert_eq!(
            step(at(5.0), Some(stamp(3)), Some(conf)),
            (Reread::Changed, true, vec![two, one])
        );
        // Rewritten with the same resolvers: nothing to say.
        assert_eq!(
            step(at(6.0), Some(stamp(4)), Some(conf)).0,
            Reread::Unchanged
        );
    }

    /// The shell over a real file, rewritten in place (as a bind-mounted
    /// resolv.conf must be): the new resolver is used within a bounded wait.
    #[test]
    fn upstreams_reread_a_rewritten_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(&path, "nameserver 192.0.2.1\n").unwrap();
        let upstreams = Upstreams::watch(&path);
        let first: SocketAddr = "192.0.2.1:53".parse().unwrap();
        assert_eq!(*upstreams.current(), [first]);
        std::fs::write(&path, "search example\nnameserver 192.0.2.2\n").unwrap();
        let second: SocketAddr = "192.0.2.2:53".parse().unwrap();
        let bound = RESOLV_RECHECK * 5;
        let followed = wait_until(bound, || *upstreams.current() == [second]);
        assert!(followed, "still {:?}", upstreams.current());
        // A clone shares the watch.
        assert_eq!(*upstreams.clone().current(), [second]);
    }

    fn exchange_udp(server: SocketAddr, q: &[u8]) -> io::Result<Vec<u8>> {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.send_to(q, server)?;
        let mut buf = vec![0u8; 65535];
        let n = s.recv(&mut buf)?;
        Ok(buf[..n].to_vec())
    }

    fn local_server(upstreams: Vec<SocketAddr>) -> DnsServer {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp = TcpListener::bind(udp.local_addr().unwrap()).unwrap();
        // Upstreams on test ports, which no resolv.conf can name: a file that never
        // exists keeps them.
        let upstreams = Upstreams {
            path: Path::new("/nonexistent/resolv.conf").into(),
            watch: Arc::new(Mutex::new(ResolvWatch::new(upstreams))),
        };
        DnsServer::serve(udp, tcp, upstreams, view()).unwrap()
    }

    /// The server over real sockets: garbage does not stop it, TCP works, a silent
    /// upstream gives SERVFAIL within the bound, a live one is relayed.
    #[test]
    fn the_server_survives_garbage_and_bounds_forwards() {
        // An upstream that never answers, and one that echoes the query as a response.
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = echo.recv_from(&mut buf) {
                buf[2] |= 0x80;
                let _ = echo.send_to(&buf[..n], from);
            }
        });
        let server = local_server(vec![silent.local_addr().unwrap()]);
        let addr = server.addr;
        for garbage in [&b""[..], b"\x01", &[0xff; 12], &[0x00; 300]] {
            let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
            probe.send_to(garbage, addr).unwrap();
        }
        let q = query("db.web.svc.cluster.local.", RecordType::A);
        let r = Message::from_vec(&exchange_udp(addr, &q).unwrap()).unwrap();
        assert_eq!(r.answers.len(), 1);

        let mut conn = TcpStream::connect(addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for _ in 0..2 {
            write_framed(&mut conn, &q).unwrap();
            let r = Message::from_vec(&read_framed(&mut conn).unwrap()).unwrap();
            assert_eq!(r.answers.len(), 1);
        }

        let started = Instant::now();
        let out = query("example.com.", RecordType::A);
        let r = Message::from_vec(&exchange_udp(addr, &out).unwrap()).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
        assert!(
            started.elapsed() < FORWARD_TRY * 2,
            "{:?}",
            started.elapsed()
        );
        drop(server);

        let server = local_server(vec![silent.local_addr().unwrap(), echo_addr]);
        let reply = exchange_udp(server.addr, &out).unwrap();
        assert_eq!(&reply[3..], &out[3..], "relayed as the upstream sent it");

        // Stopped: the port is free again at once.
        let addr = server.addr;
        drop(server);
        UdpSocket::bind(addr).unwrap();
    }
}
