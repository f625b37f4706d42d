//! The threaded shell around [`Device`]: one thread per UDP socket, a timer thread
//! and the UAPI server, all with blocking I/O, as wireguard-go does. The IPv4
//! socket's thread (the IPv6 one's, on a host without IPv4) also reads the TUN
//! device: writing a decrypted request to the TUN device runs the kernel's stack in
//! that thread, so the reply is queued before the write returns, and the same
//! thread picks it up on its next `poll` without waking another. A thread of its
//! own for the TUN device cost a wake-up per round trip: ~40 µs of ping RTT on an
//! idle machine, more than boringtun's.
//!
//! Every loop wakes at least every 200 ms to check the shared stop flag, so
//! [`RunningDevice::shutdown`] returns promptly. The device stops by itself when the
//! interface is deleted or its UAPI socket file is removed or replaced; the owner
//! learns why from [`RunningDevice::poll_exit`].
//!
//! Batching: TUN reads are TCP super-packets (TSO, [`crate::offload`]), and whatever
//! is queued after one wake-up goes out with UDP GSO; UDP reads are GRO-coalesced
//! datagrams whose decrypted TCP segments are merged back into super-packets for the
//! TUN.
//!
//! The TUN device has several queues (`IFF_MULTI_QUEUE`, [`Config::tun_queues`]).
//! The kernel puts a flow on the queue its last incoming packet was written to, so
//! replies to decrypted packets stay on the first queue and its UDP thread; what
//! starts here (a burst of new connections' SYNs) spreads by hash over all queues,
//! each drained by its own thread. With one queue, a burst of 1000 new connections
//! could overflow the 500-packet ring while the one thread was decrypting, and a
//! dropped SYN costs its connection a second.
//! Not yet: parallel crypto for one peer's traffic.

use std::io;
use std::os::linux::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use std::net::SocketAddr;

use bytes::BytesMut;
use gotatun::packet::Packet;
use wiremesh_uapi::{DeviceSnapshot, Errno, Request, SetRequest, VpcsRequest};
use wiremesh_vpc::VpcId;

use crate::device::{Device, Output};
use crate::tun::{Offload, Tun};
use crate::uapi_server::{self, Handler};
use crate::udp::{self, UdpSockets};
use crate::vpc::{Received, Vpcs};

/// How often timers run.
const TICK: Duration = Duration::from_millis(100);
/// How long blocking waits last before re-checking the stop flag.
const POLL: Duration = Duration::from_millis(200);
/// Concurrent UAPI connections served; more are refused.
const MAX_UAPI_CLIENTS: usize = 32;
/// Largest datagram or packet read.
const BUF_LEN: usize = 65536;
/// Reads from the TUN device per wake-up, at most...
const TUN_READS: usize = 64;
/// ...and datagrams gathered before they are sent (a TSO super-packet alone gives ~45).
const MAX_SENDS: usize = 128;

/// How to start a device.
#[derive(Debug, Clone)]
pub struct Config {
    /// The interface name (at most 15 bytes).
    pub ifname: String,
    /// The TUN MTU.
    pub mtu: u16,
    /// Where the UAPI socket goes (`/var/run/wireguard`).
    pub socket_dir: PathBuf,
    /// Ask the TUN device for checksum and TCP segmentation offload.
    pub offload: bool,
    /// TUN queues; each beyond the first gets a thread of its own.
    pub tun_queues: usize,
}

impl Config {
    /// Defaults for `ifname`: MTU 1420, socket in `/var/run/wireguard`.
    pub fn new(ifname: impl Into<String>) -> Self {
        Self {
            ifname: ifname.into(),
            mtu: crate::tun::DEFAULT_MTU,
            socket_dir: PathBuf::from(uapi_server::DEFAULT_SOCKET_DIR),
            offload: true,
            tun_queues: default_tun_queues(),
        }
    }
}

/// One queue a CPU, at least 2 (a second ring and reader absorb bursts even on one
/// core) and at most 4 (beyond that the queues only cost memory here).
fn default_tun_queues() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4))
}

/// Errors starting a device.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The TUN interface could not be created or configured.
    #[error("creating TUN interface {ifname}")]
    Tun {
        /// The interface name.
        ifname: String,
        /// The cause.
        source: io::Error,
    },
    /// The UAPI socket could not be created.
    #[error("creating UAPI socket {}", path.display())]
    Uapi {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The UDP sockets could not be bound.
    #[error("binding UDP sockets")]
    Udp(#[source] io::Error),
    /// A thread could not be spawned.
    #[error("spawning thread")]
    Thread(#[source] io::Error),
}

/// Why a device stopped on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The interface was deleted.
    InterfaceDeleted,
    /// The UAPI socket file was removed or replaced.
    SocketRemoved,
    /// Reading the TUN device failed.
    TunError(String),
}

struct Shared {
    device: Device,
    /// The TUN device's first queue: decrypted packets are written here, and the
    /// IPv4 UDP thread reads it.
    tun: Tun,
    /// The other queues, each read by a thread of its own.
    more_tun_queues: Vec<Tun>,
    vpcs: Vpcs,
    sockets: RwLock<Option<Arc<UdpSockets>>>,
    /// Bumped on every rebind; UDP readers of an older generation exit.
    generation: AtomicU64,
    readers: Mutex<Vec<JoinHandle<()>>>,
    /// Serialises `set` requests, so rebinds never interleave.
    config: Mutex<()>,
    stop: AtomicBool,
    exit: Mutex<Option<ExitReason>>,
    uapi_clients: AtomicUsize,
}

/// Scratch space for reading the TUN device, reused for every packet.
struct TunSide {
    buf: Vec<u8>,
    packets: Vec<BytesMut>,
    sends: Vec<(SocketAddr, Packet)>,
}

impl TunSide {
    fn new() -> Self {
        Self {
            // Room for a vnet header plus the largest (64 KiB) super-packet.
            buf: vec![0u8; BUF_LEN + crate::offload::VNET_HDR_LEN],
            packets: Vec::new(),
            sends: Vec::new(),
        }
    }
}

/// A running device. Dropping it shuts it down.
pub struct RunningDevice {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    socket_path: PathBuf,
    socket_ino: u64,
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, StartError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(StartError::Thread)
}

impl Shared {
    fn current_sockets(&self) -> Option<Arc<UdpSockets>> {
        self.sockets
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_exit(&self, reason: ExitReason) {
        let mut e = self.exit.lock().unwrap_or_else(PoisonError::into_inner);
        e.get_or_insert(reason);
        self.stop.store(true, Ordering::SeqCst);
    }

    fn send_outputs(&self, sockets: Option<&UdpSockets>, out: &mut Vec<Output>) {
        for o in out.drain(..) {
            match o {
                Output::Network { dst, payload } => {
                    if let Some(s) = sockets {
                        if let Err(e) = s.send_to(&payload, dst) {
                            tracing::trace!(error = %e, %dst, "udp send failed");
                        }
                    }
                }
                Output::Tunnel(p) => {
                    if let Err(e) = self.tun.send(&p) {
                        tracing::trace!(error = %e, "tun write failed");
                    }
                }
            }
        }
    }

    /// Replaces the UDP sockets with ones bound to the configured port and mark.
    fn rebind(self: &Arc<Self>) -> io::Result<()> {
        self.generation.fetch_add(1, Ordering::SeqCst);
        let old_readers: Vec<_> =
            std::mem::take(&mut *self.readers.lock().unwrap_or_else(PoisonError::into_inner));
        for r in old_readers {
            let _ = r.join();
        }
        let old = self
            .sockets
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let old_port = old.as_ref().map_or(0, |s| s.port);
        drop(old);
        let port = self.device.listen_port();
        let fwmark = self.device.fwmark();
        // Another thread may hold a clone of the old sockets for one send; a few
        // short retries ride that out.
        let mut result = UdpSockets::bind(port, fwmark);
        for _ in 0..20 {
            match &result {
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && port == old_port => {
                    std::thread::sleep(Duration::from_millis(10));
                    result = UdpSockets::bind(port, fwmark);
                }
                _ => break,
            }
        }
        let (sockets, res) = match result {
            Ok(s) => (s, Ok(())),
            // Keep the device reachable on its old port and report the failure.
            Err(e) => (UdpSockets::bind(old_port, fwmark)?, Err(e)),
        };
        self.install(Arc::new(sockets)).map_err(io::Error::other)?;
        res
    }

    fn install(self: &Arc<Self>, sockets: Arc<UdpSockets>) -> Result<(), StartError> {
        self.device.set_bound_port(sockets.port);
        let generation = self.generation.load(Ordering::SeqCst);
        let mut readers = self.readers.lock().unwrap_or_else(PoisonError::into_inner);
        for v6 in [false, true] {
            let has = if v6 {
                sockets.v6.is_some()
            } else {
                sockets.v4.is_some()
            };
            if has {
                let me = Arc::clone(self);
                let s = Arc::clone(&sockets);
                let name = if v6 { "wg-udp6" } else { "wg-udp4" };
                let serves_tun = !v6 || sockets.v4.is_none();
                readers.push(spawn(name, move || {
                    me.udp_reader(&s, v6, serves_tun, generation)
                })?);
            }
        }
        *self.sockets.write().unwrap_or_else(PoisonError::into_inner) = Some(sockets);
        tracing::info!(port = self.device_port(), "listening");
        Ok(())
    }

    fn device_port(&self) -> u16 {
        self.current_sockets().map_or(0, |s| s.port)
    }

    /// Reads one UDP socket (and, if `serves_tun`, the TUN device) until shutdown or
    /// a rebind of a newer generation.
    fn udp_reader(&self, sockets: &UdpSockets, v6: bool, serves_tun: bool, generation: u64) {
        let sock = if v6 { &sockets.v6 } else { &sockets.v4 };
        let Some(sock) = sock else {
            return;
        };
        let mut buf = vec![0u8; BUF_LEN];
        let mut out = Vec::new();
        let mut to_tun = Vec::new();
        let mut frames = Vec::new();
        let mut side = TunSide::new();
        while !self.stop.load(Ordering::Relaxed)
            && self.generation.load(Ordering::Relaxed) == generation
        {
            if serves_tun {
                use std::os::fd::AsRawFd;
                let fds = [sock.as_raw_fd(), self.tun.as_raw_fd()];
                let [udp_ready, tun_ready] = match crate::tun::wait_readable(fds, POLL) {
                    Ok(ready) => ready,
                    Err(e) => {
                        self.set_exit(ExitReason::TunError(e.to_string()));
                        return;
                    }
                };
                if tun_ready {
                    self.tun_batch(&self.tun, &mut side);
                }
                if !udp_ready {
                    continue;
                }
            }
            match udp::recv(sock, &mut buf) {
                Ok(None) => {}
                Ok(Some(r)) => {
                    let Some(data) = buf.get(..r.len) else {
                        continue;
                    };
                    // One datagram, or several the kernel coalesced (UDP GRO).
                    for d in data.chunks(r.segment) {
                        self.device
                            .handle_datagram(BytesMut::from(d), r.src, &mut out);
                    }
                    for o in out.drain(..) {
                        match o {
                            Output::Network { dst, payload } => {
                                if let Err(e) = sockets.send_to(&payload, dst) {
                                    tracing::trace!(error = %e, %dst, "udp send failed");
                                }
                            }
                            Output::Tunnel(p) => {
                                if let Received::NotVpc = self.vpcs.receive(&p) {
                                    to_tun.push(p);
                                }
                            }
                        }
                    }
                    self.write_tunnel(&mut to_tun, &mut frames);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "udp receive failed");
                    // Errors here are per-datagram (e.g. ICMP feedback); never spin.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// Writes decrypted packets to the TUN device, merging TCP segments into
    /// super-packets when it takes vnet headers (one write instead of dozens).
    fn write_tunnel(&self, packets: &mut Vec<Packet>, frames: &mut Vec<BytesMut>) {
        if self.tun.has_vnet_hdr() {
            crate::offload::coalesce(packets, frames);
            for f in frames.drain(..) {
                if let Err(e) = self.tun.send_frame(&f) {
                    tracing::trace!(error = %e, "tun write failed");
                }
            }
        } else {
            for p in packets.iter() {
                if let Err(e) = self.tun.send(p) {
                    tracing::trace!(error = %e, "tun write failed");
                }
            }
        }
        packets.clear();
    }

    /// Reads TUN queue `queue` until shutdown.
    fn tun_reader(&self, queue: &Tun) {
        let mut side = TunSide::new();
        while !self.stop.load(Ordering::Relaxed) {
            match queue.wait_readable(POLL) {
                Ok(true) => self.tun_batch(queue, &mut side),
                Ok(false) => {}
                Err(e) => {
                    self.set_exit(ExitReason::TunError(e.to_string()));
                    return;
                }
            }
        }
    }

    /// Handles what is queued on TUN queue `queue`, after a wake-up.
    fn tun_batch(&self, queue: &Tun, side: &mut TunSide) {
        let TunSide {
            buf,
            packets,
            sends,
        } = side;
        let mut next = queue.try_recv(buf);
        // After one wake-up, take everything already queued (up to a bound), so
        // small packets to one peer leave as one GSO batch instead of one
        // `sendmsg` each. Nothing waits for more to arrive.
        let mut reads = 0;
        while let Ok(Some(n)) = next {
            if let Some(data) = buf.get(..n) {
                if self.tun.has_vnet_hdr() {
                    if let Err(e) = crate::offload::split(data, packets) {
                        tracing::debug!(error = %e, "dropped TUN read");
                    }
                } else {
                    packets.push(BytesMut::from(data));
                }
                for p in packets.drain(..) {
                    if let Some(t) = self.device.handle_tun_packet(p) {
                        sends.push(t);
                    }
                }
            }
            reads += 1;
            next = if reads < TUN_READS && sends.len() < MAX_SENDS {
                queue.try_recv(buf)
            } else {
                Ok(None)
            };
        }
        // Datagrams for one endpoint go out as one GSO batch. Many connections to
        // several peers interleave on the TUN device, so group by endpoint first; the
        // sort is stable, so each peer's datagrams keep their order (and counters).
        sends.sort_by_key(|(dst, _)| *dst);
        if let Some(s) = self.current_sockets() {
            for run in sends.chunk_by(|a, b| a.0 == b.0) {
                let dst = run[0].0;
                let batch: Vec<&Packet> = run.iter().map(|(_, p)| p).collect();
                if let Err(e) = s.send_batch(&batch, dst) {
                    tracing::trace!(error = %e, %dst, "udp send failed");
                }
            }
        }
        sends.clear();
        match next {
            Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
                self.set_exit(ExitReason::InterfaceDeleted);
            }
            Err(e) => {
                self.set_exit(ExitReason::TunError(e.to_string()));
            }
            Ok(_) => {}
        }
    }

    /// Reads VPC `vpc`'s TUN device, wraps each packet for the node hosting its
    /// destination and sends it, until `stop` (the VPC went away) or shutdown.
    fn vpc_reader(&self, vpc: VpcId, tun: &Tun, stop: &AtomicBool) {
        let header = wiremesh_vpc::wire::HEADER_LEN;
        let mut buf = vec![0u8; BUF_LEN];
        while !self.stop.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
            let n = match tun.recv(&mut buf[header..], POLL) {
                Ok(Some(n)) => n,
                Ok(None) => continue,
                Err(e) => {
                    // EBADFD: the VPC's namespace, and so its interface, is gone.
                    tracing::info!(vpc = vpc.0, error = %e, "VPC TUN device closed");
                    return;
                }
            };
            let frame = &mut buf[..header + n];
            if !self.vpcs.encapsulate(vpc, frame) {
                continue;
            }
            if let Some((dst, datagram)) = self.device.handle_tun_packet(BytesMut::from(&*frame)) {
                if let Some(s) = self.current_sockets() {
                    if let Err(e) = s.send_to(&datagram, dst) {
                        tracing::trace!(error = %e, %dst, "udp send failed");
                    }
                }
            }
        }
    }

    fn timers(&self) {
        let mut out = Vec::new();
        let mut ticks = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            // Follow `ip link set mtu` about once a second. This thread was started in
            // the device's namespace, so the by-name ioctl finds the interface.
            if ticks.is_multiple_of(10) {
                if let Ok(mtu) = self.tun.mtu() {
                    self.device.set_mtu(mtu);
                }
            }
            ticks += 1;
            self.device.tick(SystemTime::now(), &mut out);
            // Not held across the sleep: a rebind must be able to close old sockets.
            self.send_outputs(self.current_sockets().as_deref(), &mut out);
            std::thread::sleep(TICK);
        }
    }

    fn uapi_acceptor(self: &Arc<Self>, listener: UnixListener) {
        use std::os::fd::AsRawFd;
        if listener.set_nonblocking(true).is_err() {
            return;
        }
        while !self.stop.load(Ordering::Relaxed) {
            let mut pfd = libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, POLL.as_millis() as libc::c_int) };
            if rc <= 0 {
                continue;
            }
            let Ok((stream, _)) = listener.accept() else {
                continue;
            };
            if stream.set_nonblocking(false).is_err() {
                continue;
            }
            if self.uapi_clients.fetch_add(1, Ordering::SeqCst) >= MAX_UAPI_CLIENTS {
                self.uapi_clients.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            let me = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name("wg-uapi-conn".into())
                .spawn(move || {
                    uapi_server::serve_connection(stream, &me);
                    me.uapi_clients.fetch_sub(1, Ordering::SeqCst);
                });
            if spawned.is_err() {
                self.uapi_clients.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

impl Shared {
    /// Applies a `set` request, then rebinds or re-marks the sockets if it asks for it.
    fn configure(self: &Arc<Self>, req: &SetRequest) -> Errno {
        let _guard = self.config.lock().unwrap_or_else(PoisonError::into_inner);
        let outcome = self.device.apply(req);
        if outcome.rebind {
            if let Err(e) = self.rebind() {
                tracing::warn!(error = %e, "rebinding UDP sockets failed");
                return if e.kind() == io::ErrorKind::AddrInUse {
                    Errno::EADDRINUSE
                } else {
                    Errno::EIO
                };
            }
        } else if outcome.fwmark_changed {
            if let Some(s) = self.current_sockets() {
                if let Err(e) = s.set_fwmark(self.device.fwmark()) {
                    tracing::warn!(error = %e, "setting fwmark failed");
                    return Errno::EIO;
                }
            }
        }
        Errno::OK
    }
}

impl Shared {
    /// Replaces the VPC table (`set_vpcs=1`).
    fn configure_vpcs(self: &Arc<Self>, req: &VpcsRequest) -> Errno {
        let _guard = self.config.lock().unwrap_or_else(PoisonError::into_inner);
        let spawn_reader = |vpc: VpcId, tun: Arc<Tun>, stop: Arc<AtomicBool>| {
            let me = Arc::clone(self);
            std::thread::Builder::new()
                .name(format!("wg-vpc-{vpc}"))
                .spawn(move || me.vpc_reader(vpc, &tun, &stop))
        };
        self.vpcs.apply(req, &spawn_reader)
    }
}

impl Handler for Arc<Shared> {
    fn handle(&self, request: Request) -> String {
        match request {
            Request::Get => self.device.snapshot(SystemTime::now()).render(),
            Request::Set(req) => wiremesh_uapi::render_errno(self.configure(&req)),
            Request::SetVpcs(req) => wiremesh_uapi::render_errno(self.configure_vpcs(&req)),
            Request::GetStats => {
                let mut stats = self.vpcs.stats();
                stats.dropped.extend(
                    self.device
                        .drops()
                        .map(|(why, n)| (why.as_str().to_owned(), n)),
                );
                stats.render() + &wiremesh_uapi::render_errno(Errno::OK)
            }
        }
    }
}

fn inode(path: &Path) -> Option<u64> {
    std::fs::symlink_metadata(path).ok().map(|m| m.st_ino())
}

impl RunningDevice {
    /// Creates the interface, binds a random UDP port, opens the UAPI socket and
    /// starts serving.
    pub fn start(config: &Config) -> Result<Self, StartError> {
        let tun_err = |source| StartError::Tun {
            ifname: config.ifname.clone(),
            source,
        };
        let offload = if config.offload {
            Offload::Tcp
        } else {
            Offload::None
        };
        let mut queues =
            Tun::create_queues(&config.ifname, offload, config.tun_queues).map_err(tun_err)?;
        let tun = queues.remove(0);
        tun.set_mtu(config.mtu).map_err(tun_err)?;
        tun.set_up().map_err(tun_err)?;
        let socket_path = uapi_server::socket_path(&config.socket_dir, tun.name());
        let listener = uapi_server::listen(&socket_path).map_err(|source| StartError::Uapi {
            path: socket_path.clone(),
            source,
        })?;
        let socket_ino = inode(&socket_path).unwrap_or(0);
        let sockets = UdpSockets::bind(0, 0).map_err(StartError::Udp)?;
        let shared = Arc::new(Shared {
            device: Device::new(config.mtu),
            tun,
            more_tun_queues: queues,
            vpcs: Vpcs::default(),
            sockets: RwLock::new(None),
            generation: AtomicU64::new(0),
            readers: Mutex::new(Vec::new()),
            config: Mutex::new(()),
            stop: AtomicBool::new(false),
            exit: Mutex::new(None),
            uapi_clients: AtomicUsize::new(0),
        });
        let mut dev = RunningDevice {
            shared: Arc::clone(&shared),
            threads: Vec::new(),
            socket_path,
            socket_ino,
        };
        shared.install(Arc::new(sockets))?;
        for i in 0..shared.more_tun_queues.len() {
            let s = Arc::clone(&shared);
            let name = format!("wg-tun{}", i + 1);
            dev.threads
                .push(spawn(&name, move || s.tun_reader(&s.more_tun_queues[i]))?);
        }
        let s = Arc::clone(&shared);
        dev.threads.push(spawn("wg-timers", move || s.timers())?);
        let s = Arc::clone(&shared);
        dev.threads
            .push(spawn("wg-uapi", move || s.uapi_acceptor(listener))?);
        tracing::info!(ifname = dev.shared.tun.name(), "device started");
        Ok(dev)
    }

    /// The interface name.
    pub fn ifname(&self) -> &str {
        self.shared.tun.name()
    }

    /// The UAPI socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Applies a configuration change exactly as a UAPI `set` would (including
    /// rebinding the sockets for a new listen port); `Errno::OK` on success.
    pub fn configure(&self, req: &SetRequest) -> Errno {
        self.shared.configure(req)
    }

    /// The device's state, as a UAPI `get` would return it.
    pub fn snapshot(&self) -> DeviceSnapshot {
        self.shared.device.snapshot(SystemTime::now())
    }

    /// The protocol core (routing queries; configure through [`Self::configure`]).
    pub fn device(&self) -> &Device {
        &self.shared.device
    }

    /// Checks, without blocking, whether the device must stop: the interface is gone,
    /// the socket file was removed or replaced, or the TUN device failed.
    pub fn poll_exit(&self) -> Option<ExitReason> {
        if let Some(r) = self
            .shared
            .exit
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Some(r);
        }
        if !self.shared.tun.is_attached() {
            return Some(ExitReason::InterfaceDeleted);
        }
        if inode(&self.socket_path) != Some(self.socket_ino) {
            return Some(ExitReason::SocketRemoved);
        }
        None
    }

    /// Stops every thread, closes the interface and removes the socket (if it is
    /// still ours).
    pub fn shutdown(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.shared.vpcs.close_all();
        let readers: Vec<_> = std::mem::take(
            &mut *self
                .shared
                .readers
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for r in readers {
            let _ = r.join();
        }
        if self.socket_ino != 0 && inode(&self.socket_path) == Some(self.socket_ino) {
            let _ = std::fs::remove_file(&self.socket_path);
        }
        self.socket_ino = 0;
    }
}

impl Drop for RunningDevice {
    fn drop(&mut self) {
        self.stop_inner();
    }
}
