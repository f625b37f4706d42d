//! The hub: TUN ports in the hosts' network namespaces, forwarding between them.
//!
//! Each port's TUN interface is opened by a thread that joined the host's namespace,
//! so the interface lives there while its file descriptor works from any thread. The
//! ports use TCP and UDP segmentation offload when the kernel grants it
//! ([`crate::port`], [`crate::frame`]).
//! One reader thread per port reads packets, routes them by destination address
//! ([`crate::routes`]) and asks the directed link's model ([`crate::link`]) for their
//! fate. On a link with no impairment a read goes on whole, super-packet or not (the
//! fast path); otherwise it is split into wire packets, each decided on its own. A
//! packet due at once is written to the destination port by the reader itself; a
//! delayed one goes to the single scheduler thread, which keeps a timer heap and
//! writes each packet at its departure time.
//!
//! A reader is the only one that feeds packets to its port's outgoing links; the
//! links sit behind one uncontended mutex each so that `set_link` and `stats` can
//! reach them.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ipnet::IpNet;
use memchr::memmem;
use wiremesh_wg::offload::VNET_HDR_LEN;

use crate::frame;
use crate::link::{DropReason, Impairment, Link, Verdict};
use crate::routes::{self, Routes};
use crate::WanemError;
use wiremesh_wg::tun::{Offload, Tun};

/// How often a reader with no traffic checks whether the hub is stopping.
const STOP_POLL: Duration = Duration::from_millis(50);
/// Reads a reader makes between checks whether the hub is stopping.
const READS_PER_WAKEUP: usize = 256;

/// One host's port on the hub: a TUN interface created inside `netns`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    /// The host's network namespace (a name under `/var/run/netns`).
    pub netns: String,
    /// The TUN interface's name inside it.
    pub ifname: String,
    /// Addresses given to the interface. Each is a host route to this port in the
    /// hub; each prefix becomes a route via the interface in the host (so
    /// `10.0.0.1/24` makes the other hosts' `10.0.0.x` reachable through the hub).
    pub addresses: Vec<IpNet>,
    pub mtu: u16,
}

/// Counters of one directed link.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub from: usize,
    pub to: usize,
    /// Packets and bytes that passed the link model (delivered or still in flight).
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    pub dropped_link_down: u64,
    pub dropped_random_loss: u64,
    pub dropped_burst_loss: u64,
    pub dropped_queue_overflow: u64,
    /// Reads (forwarded or not) whose bytes contain the pattern set by
    /// [`Hub::watch_for`]; a TCP super-packet counts once.
    pub pattern_packets: u64,
}

impl LinkStats {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        match reason {
            DropReason::LinkDown => self.dropped_link_down,
            DropReason::RandomLoss => self.dropped_random_loss,
            DropReason::BurstLoss => self.dropped_burst_loss,
            DropReason::QueueOverflow => self.dropped_queue_overflow,
        }
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped_link_down
            + self.dropped_random_loss
            + self.dropped_burst_loss
            + self.dropped_queue_overflow
    }

    fn count_drop(&mut self, reason: DropReason) {
        let counter = match reason {
            DropReason::LinkDown => &mut self.dropped_link_down,
            DropReason::RandomLoss => &mut self.dropped_random_loss,
            DropReason::BurstLoss => &mut self.dropped_burst_loss,
            DropReason::QueueOverflow => &mut self.dropped_queue_overflow,
        };
        *counter += 1;
    }
}

/// A running WAN emulator. Drop stops its threads and removes its TUN ports.
#[derive(Debug)]
pub struct Hub {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    specs: Mutex<Vec<PortSpec>>,
    tuns: Vec<Tun>,
    routes: RwLock<Routes>,
    /// Extra prefixes routed to each port ([`Hub::set_port_routes`]).
    prefixes: Mutex<Vec<Vec<IpNet>>>,
    /// Directed link `from → to` at `from * ports + to`.
    links: Vec<Mutex<LinkState>>,
    unroutable: Vec<AtomicU64>,
    pattern: RwLock<Option<memmem::Finder<'static>>>,
    epoch: Instant,
    stopping: AtomicBool,
}

#[derive(Debug)]
struct LinkState {
    link: Link,
    stats: LinkStats,
}

/// A packet waiting in the scheduler for its departure time.
#[derive(Debug)]
struct Scheduled {
    at: Instant,
    /// Arrival order, so packets due at the same instant keep it.
    seq: u64,
    to: usize,
    packet: BytesMut,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking reader leaves counters, not broken invariants: keep going.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Hub {
    /// Creates port `i` from `ports[i]` (TUN up, MTU and addresses set) and starts
    /// forwarding with no impairment. `seed` fixes every link's random decisions.
    pub fn start(seed: u64, ports: Vec<PortSpec>) -> Result<Hub, WanemError> {
        validate_ports(&ports)?;
        let tuns = ports
            .iter()
            .enumerate()
            .map(|(i, spec)| open_port(i, spec))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, spec) in ports.iter().enumerate() {
            set_addresses(i, spec, &[], &spec.addresses)?;
        }
        let n = ports.len();
        let links = (0..n * n)
            .map(|index| {
                let link = Link::new(Impairment::default(), seed, index as u64)?;
                let stats = LinkStats {
                    from: index / n,
                    to: index % n,
                    ..LinkStats::default()
                };
                Ok(Mutex::new(LinkState { link, stats }))
            })
            .collect::<Result<Vec<_>, WanemError>>()?;
        let addresses: Vec<_> = ports.iter().map(|p| p.addresses.clone()).collect();
        let shared = Arc::new(Shared {
            routes: RwLock::new(Routes::build(&addresses, &vec![vec![]; n])),
            prefixes: Mutex::new(vec![vec![]; n]),
            specs: Mutex::new(ports),
            tuns,
            links,
            unroutable: (0..n).map(|_| AtomicU64::new(0)).collect(),
            pattern: RwLock::new(None),
            epoch: Instant::now(),
            stopping: AtomicBool::new(false),
        });
        let (to_scheduler, scheduled) = mpsc::channel();
        let mut threads = Vec::with_capacity(n + 1);
        let scheduler_shared = Arc::clone(&shared);
        threads.push(spawn("wanem-sched", move || {
            run_scheduler(&scheduler_shared, scheduled)
        }));
        for port in 0..n {
            let shared = Arc::clone(&shared);
            let to_scheduler = to_scheduler.clone();
            threads.push(spawn(&format!("wanem-port{port}"), move || {
                run_reader(&shared, port, to_scheduler)
            }));
        }
        Ok(Hub { shared, threads })
    }

    /// The number of ports.
    pub fn ports(&self) -> usize {
        self.shared.tuns.len()
    }

    fn check_port(&self, port: usize) -> Result<(), WanemError> {
        if port < self.ports() {
            Ok(())
        } else {
            Err(WanemError::NoSuchPort {
                port,
                ports: self.ports(),
            })
        }
    }

    /// Sets the impairment of the direction `from` → `to`. Packets already in flight
    /// keep their departure times (so right after a delay is removed, new packets may
    /// overtake them, as when a real path shortens).
    pub fn set_link(
        &self,
        from: usize,
        to: usize,
        impairment: Impairment,
    ) -> Result<(), WanemError> {
        self.check_port(from)?;
        self.check_port(to)?;
        let index = from * self.ports() + to;
        lock(&self.shared.links[index])
            .link
            .set_impairment(impairment)
    }

    /// Sets the impairment of every direction.
    pub fn set_all(&self, impairment: Impairment) -> Result<(), WanemError> {
        impairment.validate()?;
        for state in &self.shared.links {
            lock(state).link.set_impairment(impairment.clone())?;
        }
        Ok(())
    }

    /// Replaces a port's addresses, on the TUN interface in its namespace too (a host
    /// whose address changes). The hub routes the new addresses from then on.
    pub fn set_port_addresses(&self, port: usize, addresses: Vec<IpNet>) -> Result<(), WanemError> {
        self.check_port(port)?;
        let mut specs = lock(&self.shared.specs);
        let mut candidate = specs.clone();
        candidate[port].addresses = addresses;
        validate_ports(&candidate)?;
        set_addresses(
            port,
            &candidate[port],
            &specs[port].addresses,
            &candidate[port].addresses,
        )?;
        *specs = candidate;
        self.rebuild_routes(&specs);
        Ok(())
    }

    /// Routes packets for `prefixes` (beyond the port's own addresses) to `port`, e.g.
    /// a host's pod CIDR when pods talk over the underlay without a VPN. Replaces the
    /// port's previous extra prefixes.
    pub fn set_port_routes(&self, port: usize, prefixes: Vec<IpNet>) -> Result<(), WanemError> {
        self.check_port(port)?;
        let specs = lock(&self.shared.specs);
        lock(&self.shared.prefixes)[port] = prefixes;
        self.rebuild_routes(&specs);
        Ok(())
    }

    fn rebuild_routes(&self, specs: &[PortSpec]) {
        let addresses: Vec<_> = specs.iter().map(|p| p.addresses.clone()).collect();
        let routes = Routes::build(&addresses, &lock(&self.shared.prefixes));
        *self
            .shared
            .routes
            .write()
            .unwrap_or_else(PoisonError::into_inner) = routes;
    }

    /// Counters per directed link, `from`-major (`from * ports + to`).
    pub fn stats(&self) -> Vec<LinkStats> {
        self.shared
            .links
            .iter()
            .map(|state| lock(state).stats.clone())
            .collect()
    }

    /// Packets from each port (index = port) that the hub could not route: no port
    /// has their destination address, or they are not IP. Multicast and broadcast
    /// packets are dropped without counting: the hosts' own link chatter.
    pub fn unroutable(&self) -> Vec<u64> {
        self.shared
            .unroutable
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Starts counting packets whose bytes contain `pattern` in
    /// [`LinkStats::pattern_packets`]: a plaintext marker (an HTTP path, a body) that
    /// must never cross the underlay when a VPN carries the traffic. An empty pattern
    /// stops counting. Only whole packets are searched, not streams.
    pub fn watch_for(&self, pattern: &[u8]) {
        let finder = (!pattern.is_empty()).then(|| memmem::Finder::new(pattern).into_owned());
        *self
            .shared
            .pattern
            .write()
            .unwrap_or_else(PoisonError::into_inner) = finder;
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        // The TUN files close with `shared`, which removes the interfaces.
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(f)
        .expect("spawning a hub thread")
}

fn field_error(field: String, reason: impl Into<String>) -> WanemError {
    WanemError::Invalid {
        field,
        reason: reason.into(),
    }
}

fn validate_ports(ports: &[PortSpec]) -> Result<(), WanemError> {
    let mut seen = std::collections::HashMap::new();
    for (i, p) in ports.iter().enumerate() {
        if p.netns.is_empty() || p.netns.contains('/') {
            return Err(field_error(
                format!("ports[{i}].netns"),
                format!("{:?} is not a namespace name", p.netns),
            ));
        }
        if p.ifname.is_empty() || p.ifname.len() > 15 || p.ifname.contains(['/', ' ', '\0']) {
            return Err(field_error(
                format!("ports[{i}].ifname"),
                format!("{:?} is not 1-15 bytes without '/', space or NUL", p.ifname),
            ));
        }
        // IPv4's minimum; the kernel refuses smaller MTUs on an interface with IPv4.
        if p.mtu < 68 {
            return Err(field_error(
                format!("ports[{i}].mtu"),
                format!("{} is below 68", p.mtu),
            ));
        }
        for a in &p.addresses {
            if let Some(other) = seen.insert(a.addr(), i) {
                return Err(field_error(
                    format!("ports[{i}].addresses"),
                    format!("{} is already port {other}'s", a.addr()),
                ));
            }
        }
    }
    Ok(())
}

fn port_error(port: usize, spec: &PortSpec, reason: impl std::fmt::Display) -> WanemError {
    WanemError::Port {
        port,
        netns: spec.netns.clone(),
        ifname: spec.ifname.clone(),
        reason: reason.to_string(),
    }
}

/// Creates the TUN inside the port's namespace, with TCP and UDP segmentation
/// offload where the kernel grants them (a VPN's GSO batch is then one read, which
/// an unimpaired link passes on whole, as a wire with GRO at the receiver would),
/// sets its MTU and brings it up.
fn open_port(port: usize, spec: &PortSpec) -> Result<Tun, WanemError> {
    let ns = Path::new("/var/run/netns").join(&spec.netns);
    Tun::create_in_netns(
        &ns.to_string_lossy(),
        &spec.ifname,
        Offload::TcpAndUdp,
        spec.mtu,
    )
    .map_err(|e| port_error(port, spec, format!("creating its TUN device: {e}")))
}

/// Runs `ip -n NETNS ARGS...` for the port.
fn ip(port: usize, spec: &PortSpec, args: &[&str]) -> Result<(), WanemError> {
    let out = Command::new("ip")
        .args(["-n", &spec.netns])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| port_error(port, spec, format!("running ip: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(port_error(
            port,
            spec,
            format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ))
    }
}

/// Moves the port's interface from addresses `old` to `new` with iproute2.
fn set_addresses(
    port: usize,
    spec: &PortSpec,
    old: &[IpNet],
    new: &[IpNet],
) -> Result<(), WanemError> {
    for net in old.iter().filter(|n| !new.contains(n)) {
        ip(
            port,
            spec,
            &["addr", "del", &net.to_string(), "dev", &spec.ifname],
        )?;
    }
    for net in new.iter().filter(|n| !old.contains(n)) {
        let net = net.to_string();
        let mut args = vec!["addr", "add", net.as_str(), "dev", spec.ifname.as_str()];
        if net.contains(':') {
            // Usable at once, without duplicate address detection.
            args.push("nodad");
        }
        ip(port, spec, &args)?;
    }
    Ok(())
}

/// One port's reading side: its buffers and where it sends delayed packets.
struct Reader<'a> {
    shared: &'a Shared,
    port: usize,
    /// `VNET_HDR_LEN` when the port's reads carry a vnet header, else 0.
    header_len: usize,
    buf: Vec<u8>,
    segments: Vec<BytesMut>,
    verdicts: Vec<Verdict>,
    seq: u64,
    to_scheduler: Sender<Scheduled>,
}

/// Reads packets from `port` until the hub stops (or the interface disappears).
fn run_reader(shared: &Shared, port: usize, to_scheduler: Sender<Scheduled>) {
    let tun = &shared.tuns[port];
    let header_len = if tun.has_vnet_hdr() { VNET_HDR_LEN } else { 0 };
    let mut reader = Reader {
        shared,
        port,
        header_len,
        buf: vec![0u8; header_len + usize::from(u16::MAX) + 1],
        segments: Vec::new(),
        verdicts: Vec::new(),
        seq: 0,
        to_scheduler,
    };
    let result = (|| -> std::io::Result<()> {
        while !shared.stopping.load(Ordering::Relaxed) {
            if !tun.wait_readable(STOP_POLL)? {
                continue;
            }
            // Drain what is queued, but look up now and then to notice a stop.
            for _ in 0..READS_PER_WAKEUP {
                let Some(n) = tun.try_recv(&mut reader.buf)? else {
                    break;
                };
                if !reader.forward(n) {
                    return Ok(());
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(port, error = %e, "wanem port stopped reading");
    }
}

impl Reader<'_> {
    /// Routes the `n`-byte read in `buf` and hands it to its link; false once the
    /// scheduler has gone (the hub is stopping).
    fn forward(&mut self, n: usize) -> bool {
        let shared = self.shared;
        let port = self.port;
        let ports = shared.tuns.len();
        let frame = &self.buf[..n];
        let destination = frame.get(self.header_len..).and_then(routes::destination);
        if destination.is_some_and(|d| d.is_multicast() || d == Ipv4Addr::BROADCAST) {
            // A host's own link chatter (IPv6 router solicitations, MLD reports):
            // no other host asked for it, and it would blur the unroutable count.
            return true;
        }
        let to = destination.and_then(|dst| {
            shared
                .routes
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .lookup(dst)
        });
        let Some(to) = to else {
            shared.unroutable[port].fetch_add(1, Ordering::Relaxed);
            return true;
        };
        let matches_pattern = shared
            .pattern
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|f| f.find(frame).is_some());
        let arrival = Instant::now();
        let mut state = lock(&shared.links[port * ports + to]);
        state.stats.pattern_packets += u64::from(matches_pattern);
        let destination_tun = &shared.tuns[to];
        if self.header_len > 0 && destination_tun.has_vnet_hdr() && state.link.is_transparent() {
            // The fast path: the frame, super-packet or not, goes on as it came.
            let size = frame::wire_size(frame);
            state.stats.forwarded_packets += size.packets;
            state.stats.forwarded_bytes += size.bytes;
            drop(state);
            if let Err(e) = destination_tun.send_frame(frame) {
                tracing::debug!(port = to, error = %e, "wanem delivery failed");
            }
            return true;
        }
        // Every wire packet meets the link on its own.
        self.segments.clear();
        if self.header_len > 0 {
            if let Err(e) = frame::split(frame, &mut self.segments) {
                tracing::debug!(port, error = %e, "wanem dropped an unreadable TUN read");
                shared.unroutable[port].fetch_add(1, Ordering::Relaxed);
                return true;
            }
        } else {
            self.segments.push(BytesMut::from(frame));
        }
        let now = arrival.duration_since(shared.epoch);
        self.verdicts.clear();
        for segment in &self.segments {
            let verdict = state.link.handle_packet(now, segment.len());
            match verdict {
                Verdict::Drop(reason) => state.stats.count_drop(reason),
                Verdict::Deliver { .. } => {
                    state.stats.forwarded_packets += 1;
                    state.stats.forwarded_bytes += segment.len() as u64;
                }
            }
            self.verdicts.push(verdict);
        }
        drop(state);
        for (segment, verdict) in self.segments.drain(..).zip(&self.verdicts) {
            let Verdict::Deliver { at } = *verdict else {
                continue;
            };
            let at = shared.epoch + at;
            if at <= arrival {
                deliver(shared, to, &segment);
                continue;
            }
            self.seq += 1;
            let scheduled = Scheduled {
                at,
                seq: self.seq * ports as u64 + port as u64,
                to,
                packet: segment,
            };
            if self.to_scheduler.send(scheduled).is_err() {
                return false;
            }
        }
        true
    }
}

fn deliver(shared: &Shared, to: usize, packet: &[u8]) {
    if let Err(e) = shared.tuns[to].send(packet) {
        // The far host's stack refused it (interface down, namespace gone): the
        // packet is lost, as on a wire.
        tracing::debug!(port = to, error = %e, "wanem delivery failed");
    }
}

/// Writes scheduled packets at their departure times until every reader has gone.
fn run_scheduler(shared: &Shared, scheduled: Receiver<Scheduled>) {
    let mut heap: BinaryHeap<Reverse<Scheduled>> = BinaryHeap::new();
    loop {
        let now = Instant::now();
        while heap.peek().is_some_and(|Reverse(next)| next.at <= now) {
            if let Some(Reverse(due)) = heap.pop() {
                deliver(shared, due.to, &due.packet);
            }
        }
        let received = match heap.peek() {
            Some(Reverse(next)) => scheduled.recv_timeout(next.at.saturating_duration_since(now)),
            None => scheduled.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match received {
            Ok(packet) => heap.push(Reverse(packet)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}
