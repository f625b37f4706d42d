//! The agent's loop. It owns every piece of the node's state; registry watch
//! batches and a one-second tick are its only inputs.
//!
//! Start-up: key pair (made once, 0600) → settings → pod CIDR (claimed by
//! compare-and-swap in a store, remembered in the state dir; the Node's on
//! Kubernetes) → device → join (liveness + node record). Then, whenever a
//! record that matters changes (and every `resync` anyway): snapshot → topology →
//! plan against the device and routes → apply the difference. Failures are logged
//! once here and retried on the next pass; the last applied state stays in place.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use wiremesh_host::{nft, route, uapi_client, HostError};
use wiremesh_model::{FieldError, Location, Node, NodeName, PrivateKey};
use wiremesh_topology::relay::{self, DirectAttempt, DirectWatch};
use wiremesh_topology::{compute, forwarding_probe, Snapshot, Topology};
use wiremesh_uapi::SetRequest;

use crate::device::DeviceBackend;
use crate::liveness::{self, Liveness};
use crate::metrics::Metrics;
use crate::plan::{greet_new_peers, plan_device, plan_routes};
use crate::registry::{Membership, NodeStatus, PeerStatus, Registry, RegistryError};
use crate::{firewall, keys};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub name: NodeName,
    pub location: Location,
    pub state_dir: PathBuf,
    /// WireGuard interface name (unique per host: UAPI sockets share one directory).
    pub interface: String,
    pub public_endpoint: Option<SocketAddr>,
    pub private_endpoint: Option<SocketAddr>,
    pub leader_preference: i32,
    pub persistent_keepalive: Option<u16>,
    pub device: DeviceBackend,
    /// How long the node's records outlive its last heartbeat.
    pub lease_ttl: Duration,
    /// Full reconcile at least this often, even without registry events.
    pub resync: Duration,
    /// Remove the node's record, routes and rules on shutdown (the device stays unless asked).
    pub leave_on_exit: bool,
    /// Serve Prometheus metrics on this address.
    pub metrics: Option<SocketAddr>,
    /// The WireGuard interface MTU; `None`: the cluster's, lowered to fit the underlay.
    pub mtu: Option<u16>,
    /// Replace the node's key pair this often (`None`: only on `wiremesh rotate-key`).
    pub rotate_key_every: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("state directory {path}: {source}")]
    State {
        path: String,
        source: std::io::Error,
    },
    #[error("WireGuard device: {0}")]
    Device(std::io::Error),
    #[error("starting the heartbeat thread: {0}")]
    Heartbeat(std::io::Error),
    #[error("serving metrics on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("this node's record: {0}")]
    Record(FieldError),
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

const BLOCK_FILE: &str = "pod-cidr";
/// The node's IPv6 pod CIDR, for the CNI plugin; absent with IPv4-only pods.
const BLOCK_FILE_V6: &str = "pod-cidr-v6";
const TICK: Duration = Duration::from_millis(500);
/// Device reports are published after every change and at least this often.
const STATUS_EVERY: Duration = Duration::from_secs(10);
/// An unchanged device report is published again this often, at the least.
const STATUS_REFRESH: Duration = Duration::from_secs(60);

/// Run the agent until `stop` is set.
pub fn run(
    registry: &dyn Registry,
    config: AgentConfig,
    stop: Arc<AtomicBool>,
) -> Result<(), AgentError> {
    let state_err = |source| AgentError::State {
        path: config.state_dir.display().to_string(),
        source,
    };
    let mut private_key = keys::load_or_create(&config.state_dir).map_err(state_err)?;
    let settings = until_available(&stop, "reading the cluster settings", || {
        registry.settings()
    })?;
    let block_file = config.state_dir.join(BLOCK_FILE);
    let previous: Option<IpNet> = std::fs::read_to_string(&block_file)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let block = until_available(&stop, "claiming a pod CIDR", || {
        registry.claim_block(&config.name, &settings, previous)
    })?;
    std::fs::write(&block_file, format!("{}\n", block.pod_cidr)).map_err(state_err)?;
    let pod_cidr_v6 = wiremesh_topology::ipam::pod_cidr_v6(&settings, block.pod_cidr)
        .map_err(|e| AgentError::Record(FieldError::new("pod_cidr_v6", e)))?;
    // The CNI plugin gives pods IPv6 addresses only while this file exists.
    let block_file_v6 = config.state_dir.join(BLOCK_FILE_V6);
    match pod_cidr_v6 {
        Some(cidr) => std::fs::write(&block_file_v6, format!("{cidr}\n")),
        None => std::fs::remove_file(&block_file_v6).or_else(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Ok(()),
            _ => Err(e),
        }),
    }
    .map_err(state_err)?;
    tracing::info!(node = %config.name, pod_cidr = %block.pod_cidr, pod_cidr_v6 = ?pod_cidr_v6, mesh_ip = %block.mesh_ip, public_key = %private_key.public_key(), "joining the mesh");

    let socket =
        crate::device::ensure(&config.interface, &config.device).map_err(AgentError::Device)?;
    // Key and port first, alone: a device must not send a peer's first handshake
    // from the random port it started on (a NAT would map that port instead).
    let identity = SetRequest {
        private_key: Some(private_key.clone()),
        listen_port: Some(settings.port),
        ..SetRequest::default()
    };
    uapi_client::set(&socket, &identity)?;
    let mesh_prefix = settings.mesh_cidr.prefix_len();
    let address = IpNet::new(block.mesh_ip, mesh_prefix)
        .map_err(|e| AgentError::Record(FieldError::new("mesh_ip", e)))?;
    // The underlay is whatever carries this node's own endpoints.
    let underlay = [config.public_endpoint, config.private_endpoint]
        .into_iter()
        .flatten()
        .filter_map(|e| route::mtu_of_local_address(e.ip()))
        .min();
    let ipv6_underlay = !matches!(
        config.public_endpoint.or(config.private_endpoint),
        Some(SocketAddr::V4(_))
    );
    let mtu = crate::mtu::choose(config.mtu, settings.mtu, underlay, ipv6_underlay);
    tracing::info!(mtu, underlay_mtu = ?underlay, "WireGuard interface MTU");
    route::configure_link(&config.interface, address, mtu)?;
    route::enable_forwarding()?;

    let mut me = Node {
        name: config.name.clone(),
        location: config.location.clone(),
        public_key: private_key.public_key(),
        public_endpoint: config.public_endpoint,
        private_endpoint: config.private_endpoint,
        pod_cidr: block.pod_cidr,
        pod_cidr_v6,
        mesh_ip: block.mesh_ip,
        persistent_keepalive: config.persistent_keepalive,
        leader_preference: config.leader_preference,
        observed_endpoints: Default::default(),
        suspected_leaders: Default::default(),
        unreachable_direct: Default::default(),
        relay_ports: Default::default(),
        last_seen: unix_now(),
    };
    let membership = until_available(&stop, "joining the registry", || {
        registry.join(&me, config.lease_ttl)
    })?;
    let membership = Liveness::start(membership, &me, config.lease_ttl, liveness::STALL)
        .map_err(AgentError::Heartbeat)?;
    let progress = membership.progress();
    let mut state = LoopState {
        firewall: None,
        vpcs: crate::vpc::VpcHost::new(&config, &socket, progress.clone()),
        membership: Box::new(membership),
        snapshot: None,
        direct: DirectWatch::default(),
        relays: crate::relay::Relays::new(config.public_endpoint.map(|e| e.ip())),
        said_no_ipv6: false,
    };
    let mut changes = until_available(&stop, "watching the registry", || registry.changes())?;
    let prober = crate::prober::Prober::start().map_err(AgentError::Device)?;
    let mut underlay = crate::underlay::UnderlayWatch::new(&config.interface);
    let mut dirty = true;
    let mut last_full = Instant::now();
    let mut last_status = Instant::now() - STATUS_EVERY;
    let mut published: Option<NodeStatus> = None;
    let metrics = Arc::new(Mutex::new(Metrics {
        node: config.name.to_string(),
        ..Metrics::default()
    }));
    if let Some(addr) = config.metrics {
        crate::metrics::serve(addr, metrics.clone())
            .map_err(|source| AgentError::Metrics { addr, source })?;
        tracing::info!(%addr, "serving Prometheus metrics on /metrics");
    }
    while !stop.load(Ordering::Relaxed) {
        progress.mark();
        match changes.recv_timeout(TICK) {
            Ok(Some(mut change)) => loop {
                dirty |= change.affects_topology();
                // Coalesce a burst (many nodes joining) into one reconcile.
                match changes.try_recv() {
                    Ok(Some(next)) => change = next,
                    _ => break,
                }
            },
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("registry watch ended ({e}); re-reading the registry");
                dirty = true;
                match registry.changes() {
                    Ok(c) => changes = c,
                    Err(e) => {
                        tracing::warn!("registry unavailable: {e}; the data plane keeps its last configuration");
                        std::thread::sleep(TICK);
                    }
                }
            }
        }
        // This host's address moved: every peer hears from it at once (`underlay`).
        if underlay.follow(&socket, &mut me) {
            match state.membership.publish(&me) {
                Ok(()) => dirty = true,
                Err(e) => tracing::warn!("publishing the moved endpoint failed: {e}"),
            }
        }
        let suspected = prober.suspected();
        if suspected != me.suspected_leaders {
            me.suspected_leaders = suspected;
            match state.membership.publish(&me) {
                Ok(()) => dirty = true,
                Err(e) => tracing::warn!("publishing suspected leaders failed: {e}"),
            }
        }
        match watch_direct_paths(&socket, &mut me, &mut state) {
            Ok(true) => dirty = true,
            Ok(false) => {}
            Err(e) => tracing::warn!("publishing unreachable peers failed: {e}"),
        }
        match rotate_key(&config, &socket, &mut me, &mut state) {
            Ok(Some(key)) => {
                private_key = key;
                dirty = true;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("key rotation failed, will retry: {e}"),
        }
        // Pods of a VPC arriving on, or all leaving, this node (the CNI plugin's word).
        dirty |= state.vpcs.local_pods_changed();
        let mut device_changed = false;
        if dirty || last_full.elapsed() >= config.resync {
            if !dirty {
                // A periodic resync re-applies the firewall too, in case someone flushed it.
                state.firewall = None;
            }
            let started = Instant::now();
            let result = reconcile(
                registry,
                &config,
                &private_key,
                &socket,
                &mut me,
                &mut state,
                &prober,
            );
            let mut m = metrics.lock().unwrap_or_else(PoisonError::into_inner);
            m.last_reconcile = started.elapsed();
            match result {
                Ok(changed) => {
                    dirty = false;
                    device_changed = changed;
                    m.reconciles += 1;
                    if let Some(snapshot) = &state.snapshot {
                        m.paths = peer_paths(snapshot, &me.name);
                    }
                }
                Err(e) => {
                    m.reconcile_errors += 1;
                    tracing::warn!("reconcile failed, will retry: {e}");
                }
            }
            drop(m);
            last_full = Instant::now();
        }
        if device_changed || last_status.elapsed() >= STATUS_EVERY {
            last_status = Instant::now();
            match publish_status(registry, &config, &socket, &mut state, &mut published) {
                Ok(status) => {
                    let mut m = metrics.lock().unwrap_or_else(PoisonError::into_inner);
                    m.rejected_records = status.rejected.len();
                    m.now = status.updated;
                    m.peers = status.peers;
                }
                Err(e) => tracing::debug!("status not published: {e}"),
            }
            // Only wiremesh-wg answers; other devices leave the drop counters out.
            let mut m = metrics.lock().unwrap_or_else(PoisonError::into_inner);
            if let Ok(stats) = uapi_client::stats(&socket) {
                m.drops = stats.dropped;
            }
            m.relayed = state.relays.counts();
        }
    }
    if config.leave_on_exit {
        tracing::info!(node = %config.name, "leaving the mesh");
        state.membership.leave()?;
        for r in route::list_own()? {
            let _ = route::delete(&r);
        }
        nft::delete_table("inet", firewall::TABLE)?;
    }
    Ok(())
}

/// Take a waiting key: the device uses it at once (its sessions restart with it),
/// then the new public key is published so every peer swaps it in. Established
/// connections ride over the gap (one handshake) on their retransmissions.
fn rotate_key(
    config: &AgentConfig,
    socket: &std::path::Path,
    me: &mut Node,
    state: &mut LoopState,
) -> Result<Option<PrivateKey>, AgentError> {
    let state_err = |source| AgentError::State {
        path: config.state_dir.display().to_string(),
        source,
    };
    let Some(key) =
        keys::pending_rotation(&config.state_dir, config.rotate_key_every).map_err(state_err)?
    else {
        return Ok(None);
    };
    uapi_client::set(
        socket,
        &SetRequest {
            private_key: Some(key.clone()),
            ..SetRequest::default()
        },
    )?;
    keys::commit_rotation(&config.state_dir).map_err(state_err)?;
    me.public_key = key.public_key();
    state.membership.publish(me)?;
    tracing::info!(public_key = %me.public_key, "rotated the node's key pair");
    Ok(Some(key))
}

/// Retry `f` while the registry is unreachable (a member restarting, a network
/// blip) or not ready for this node (no pod CIDR yet), so an agent started during an
/// outage joins when it ends; other errors, and a stop request, end the wait.
pub fn until_available<T>(
    stop: &AtomicBool,
    what: &str,
    mut f: impl FnMut() -> Result<T, RegistryError>,
) -> Result<T, AgentError> {
    let mut delay = Duration::from_millis(200);
    loop {
        match f() {
            Err(e) if e.is_transient() && !stop.load(Ordering::Relaxed) => {
                tracing::warn!("{what}: {e}; retrying in {delay:?}");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            other => return other.map_err(AgentError::from),
        }
    }
}

struct LoopState {
    /// Heartbeaten by a thread of its own while this loop makes progress.
    membership: Box<Liveness>,
    /// The ruleset last applied, so an unchanged one is not reloaded on every pass.
    firewall: Option<String>,
    vpcs: crate::vpc::VpcHost,
    /// The snapshot of the last reconcile, for the checks between reconciles.
    snapshot: Option<Snapshot>,
    /// The direct paths to NATed peers being tried (see `wiremesh_topology::relay`).
    direct: DirectWatch,
    /// The pairs of NATed nodes this node relays.
    relays: crate::relay::Relays,
    /// Whether the interface's lack of IPv6 was logged.
    said_no_ipv6: bool,
}

fn reconcile(
    registry: &dyn Registry,
    config: &AgentConfig,
    private_key: &PrivateKey,
    socket: &std::path::Path,
    me: &mut Node,
    state: &mut LoopState,
    prober: &crate::prober::Prober,
) -> Result<bool, AgentError> {
    let (snapshot, bad) = registry.snapshot()?;
    for b in &bad {
        tracing::warn!(key = %b.key, "ignoring a registry record: {}", b.error);
    }
    let topology: Topology = match compute(&snapshot, &config.name) {
        Ok(t) => t,
        // Our own record is not in the snapshot yet (just expired, or being rewritten).
        Err(e) => {
            tracing::info!("no topology yet: {e}");
            state.membership.publish(me)?;
            return Ok(false);
        }
    };
    prober.set_plan(forwarding_probe(&snapshot, &config.name));
    let device = uapi_client::get(socket)?;
    let request = plan_device(&topology, private_key, &device, unix_now());
    if let Some(request) = &request {
        tracing::info!(peers = request.peers.len(), "updating WireGuard peers");
        uapi_client::set(socket, request)?;
        if let Some(greet) = greet_new_peers(request) {
            // Only a head start on the handshake: the first packet would start it too.
            if let Err(e) = uapi_client::set(socket, &greet) {
                tracing::warn!("sending keepalives to new peers: {e}");
            }
        }
    }
    // Where IPv6 is off, its routes (VPC traffic, IPv6 pods) cannot exist: leave
    // them out, said once, rather than fail every reconcile.
    let ipv6 = route::ipv6_enabled(&config.interface);
    if !ipv6 && !state.said_no_ipv6 {
        tracing::warn!(
            interface = %config.interface,
            "IPv6 is off on the WireGuard interface: IPv6 routes (VPCs, IPv6 pods) left out"
        );
        state.said_no_ipv6 = true;
    }
    let routes: Vec<_> = topology
        .routes
        .iter()
        .filter(|r| ipv6 || !r.dst().addr().is_ipv6())
        .cloned()
        .collect();
    let plan = plan_routes(
        &routes,
        &config.interface,
        route::dev_towards,
        &route::list_own()?,
    );
    // One route the host refuses (an IPv6 route where IPv6 is off, say) must not
    // keep the firewall, the other routes and the records from being applied: each
    // is tried, and the first failure is this reconcile's error, after the rest.
    let mut route_failure = None;
    for r in &plan.remove {
        tracing::info!(dst = %r.dst, "removing route");
        if let Err(e) = route::delete(r) {
            tracing::warn!(dst = %r.dst, error = %e, "cannot remove route");
            route_failure.get_or_insert(e);
        }
    }
    for r in &plan.replace {
        tracing::info!(dst = %r.dst, dev = %r.dev, "installing route");
        if let Err(e) = route::replace(r) {
            tracing::warn!(dst = %r.dst, error = %e, "cannot install route");
            route_failure.get_or_insert(e);
        }
    }
    let ruleset = firewall::ruleset(&config.interface, &snapshot.settings, me);
    if state.firewall.as_ref() != Some(&ruleset) {
        nft::apply(&ruleset)?;
        state.firewall = Some(ruleset);
    }

    // NAT discovery: publish where we see peers that have no public endpoint.
    let observed = snapshot
        .nodes
        .iter()
        .filter(|n| n.behind_nat() && n.name != me.name)
        .filter_map(|n| {
            let peer = device.peers.iter().find(|p| p.public_key == n.public_key)?;
            Some((n.name.clone(), peer.endpoint?))
        })
        .collect();
    if observed != me.observed_endpoints {
        me.observed_endpoints = observed;
        state.membership.publish(me)?;
    }
    let relay_ports = state.relays.serve(&relay::served_by(&snapshot, &me.name));
    if relay_ports != me.relay_ports {
        me.relay_ports = relay_ports;
        state.membership.publish(me)?;
    }
    state
        .vpcs
        .reconcile(registry, &snapshot, &mut *state.membership)?;
    state.snapshot = Some(snapshot);
    if let Some(e) = route_failure {
        return Err(e.into());
    }
    Ok(request.is_some() || !plan.is_empty())
}

/// Check the direct paths to NATed peers against the device's handshakes, and
/// publish the peers found unreachable (their pairs then go through a relay).
/// Whether the record changed.
fn watch_direct_paths(
    socket: &std::path::Path,
    me: &mut Node,
    state: &mut LoopState,
) -> Result<bool, AgentError> {
    let Some(snapshot) = &state.snapshot else {
        return Ok(false);
    };
    if !me.behind_nat() {
        return Ok(false);
    }
    let device = uapi_client::get(socket)?;
    let attempts = snapshot
        .nodes
        .iter()
        .filter_map(|n| {
            let peer = device.peers.iter().find(|p| p.public_key == n.public_key)?;
            let attempt = DirectAttempt {
                endpoint: peer.endpoint,
                last_handshake: peer.last_handshake_time_sec,
            };
            Some((n.name.clone(), attempt))
        })
        .collect();
    let unreachable = state.direct.update(snapshot, me, &attempts, unix_now());
    if unreachable == me.unreachable_direct {
        return Ok(false);
    }
    tracing::info!(?unreachable, "NATed peers unreachable directly; relaying");
    me.unreachable_direct = unreachable;
    state.membership.publish(me)?;
    Ok(true)
}

/// The path to each node this node peers with, by peer name.
fn peer_paths(
    snapshot: &Snapshot,
    me: &NodeName,
) -> std::collections::BTreeMap<String, relay::Path> {
    snapshot
        .nodes
        .iter()
        .filter(|n| &n.name != me)
        .map(|n| (n.name.to_string(), relay::path(snapshot, me, &n.name)))
        .collect()
}

fn publish_status(
    registry: &dyn Registry,
    config: &AgentConfig,
    socket: &std::path::Path,
    state: &mut LoopState,
    published: &mut Option<NodeStatus>,
) -> Result<NodeStatus, AgentError> {
    let device = uapi_client::get(socket)?;
    let (snapshot, bad) = registry.snapshot()?;
    let name_of = |key| {
        snapshot
            .nodes
            .iter()
            .find(|n| n.public_key == key)
            .map(|n| n.name.to_string())
            .or_else(|| {
                snapshot
                    .peers
                    .iter()
                    .find(|p| p.public_key == key)
                    .map(|p| p.name.to_string())
            })
            .unwrap_or_else(|| key.to_string())
    };
    let status = NodeStatus {
        node: config.name.to_string(),
        interface: config.interface.clone(),
        peers: device
            .peers
            .iter()
            .map(|p| PeerStatus {
                name: name_of(p.public_key),
                endpoint: p.endpoint,
                allowed_ips: p.allowed_ips.clone(),
                last_handshake: p.last_handshake_time_sec,
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
            })
            .collect(),
        rejected: bad.iter().map(ToString::to_string).collect(),
        updated: unix_now(),
    };
    // Every write reaches every watcher (and rewrites the embedded store's file):
    // an unchanged report is repeated only once a minute.
    let unchanged = published.as_ref().is_some_and(|p| {
        p.peers == status.peers
            && p.rejected == status.rejected
            && status.updated.saturating_sub(p.updated) < STATUS_REFRESH.as_secs()
    });
    if !unchanged {
        state.membership.report(&status)?;
        *published = Some(status.clone());
    }
    Ok(status)
}
