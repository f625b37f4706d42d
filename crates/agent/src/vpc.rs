//! This node's share of the VPCs: one network namespace per VPC with local pods, the
//! data plane's member table, routes and the services ruleset inside each namespace.
//!
//! Which VPCs are local is the CNI plugin's to say, through the state directory (the
//! same channel as `pod-cidr`): a directory `vpcs/<name>/` means "pods of VPC `name`
//! live here". For each such VPC the agent claims the node's member blocks in the
//! registry, makes the namespace `wm-vpc-<id>` (169.254.1.1/32 on its `lo`, the pods'
//! gateway; forwarding on), and, once the namespace routes, filters and answers DNS,
//! writes `vpcs/<name>/vpc.json` ([`LocalVpc`]) for the plugin: the namespace, the
//! node's block, the pod MTU and the DNS settings. When the plugin removes the
//! directory (its last pod left), the agent gives the blocks back and deletes the
//! namespace.
//!
//! Then, on every reconcile: the whole member table goes to the device (`set_vpcs=1`)
//! when it changed; each namespace routes its VPC's pod CIDRs to the device's `wm-vpc`
//! TUN; and the services ruleset ([`wiremesh_vpc::nft`]) is applied in one `nft -f`
//! transaction when it changed, with UDP conntrack entries of removed endpoints
//! deleted. Each namespace also runs the VPC's DNS server ([`crate::dns`]) on the
//! nameserver address, given a new [`DnsView`] on every change. Everything is
//! idempotent, so a restarted agent converges to the same state without touching
//! what is right.
//!
//! A bad VPC record is logged and left out (`VpcSnapshot::build`); the rest goes on.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::{IpNet, Ipv6Net};
use serde::{Deserialize, Serialize};
use wiremesh_host::{netns, run, uapi_client, HostError};
use wiremesh_model::{ClusterSettings, NodeName};
use wiremesh_topology::{ipam, Snapshot};
use wiremesh_uapi::{VpcPlane, VpcsRequest};
use wiremesh_vpc::dns::DnsView;
use wiremesh_vpc::nft::{self, ServicesPlan};
use wiremesh_vpc::snapshot::{Mesh, VpcState};
use wiremesh_vpc::wire::MeshPrefix;
use wiremesh_vpc::{
    dns_cluster_ip, pods, Endpoint, Label, LocalPodRecord, NodeId, Pod, PodName, VpcSnapshot,
};

use crate::dns::{self, DnsServer};
use crate::liveness::Progress;
use crate::registry::{Membership, Registry, RegistryError, ServiceId};
use crate::{AgentConfig, AgentError};

/// Under the state directory: one directory per VPC with pods on this node.
pub const VPCS_DIR: &str = "vpcs";
/// Inside a VPC's directory: what the CNI plugin needs, written by the agent.
pub const LOCAL_VPC_FILE: &str = "vpc.json";
/// Inside a VPC's directory: one `<container id>.json` per pod, written by the
/// plugin ([`LocalPodRecord`]): the pods this agent publishes, with their labels.
pub const PODS_DIR: &str = "pods";
/// The data plane's TUN device in every VPC namespace.
pub const TUN: &str = "wm-vpc";
/// The agent's default WireGuard interface: its VPC namespaces carry no suffix.
const DEFAULT_INTERFACE: &str = "wiremesh0";
/// How long the device may take to open a new VPC's TUN device.
const TUN_WAIT: Duration = Duration::from_secs(5);
/// Where the node's upstream resolvers are, for names a VPC does not answer.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// What the CNI plugin reads from `vpcs/<name>/vpc.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalVpc {
    pub id: u32,
    /// The VPC's namespace on this node (a name under `/var/run/netns`).
    pub netns: String,
    /// This node's blocks of the VPC's pod CIDRs: the plugin's address pool.
    pub pod_cidrs: Vec<IpNet>,
    pub mtu: u16,
    /// The VPC's DNS service clusterIP, and its zone (the pod's search path).
    pub nameserver: IpAddr,
    pub zone: String,
}

/// The namespace of VPC `id`: `wm-vpc-<id>` for an agent on the default interface.
/// Agents on other interfaces (several nodes simulated on one host share one
/// `/var/run/netns`) add their interface name, so their namespaces cannot clash.
pub fn netns_name(interface: &str, id: u32) -> String {
    if interface == DEFAULT_INTERFACE {
        format!("wm-vpc-{id}")
    } else {
        format!("wm-vpc-{id}-{interface}")
    }
}

/// The VPCs' state the agent keeps between reconciles: what it last applied.
pub struct VpcHost {
    me: NodeName,
    interface: String,
    state_dir: PathBuf,
    /// The device's UAPI socket.
    socket: PathBuf,
    /// The last `set_vpcs=1` request the device accepted.
    device: Option<String>,
    /// Per namespace: the services plan applied there.
    rulesets: BTreeMap<String, ServicesPlan>,
    /// Namespaces made ready (gateway, forwarding) by this agent: not checked again.
    prepared: BTreeSet<String>,
    /// Namespaces whose routes are in place.
    routed: BTreeMap<String, Vec<IpNet>>,
    /// Whether "VPCs are unavailable here" was logged.
    warned: bool,
    /// The VPCs the state directory asked for at the last reconcile.
    wanted: BTreeSet<Label>,
    /// Endpoints on this node as last published under its lease.
    adopted: BTreeMap<(ServiceId, IpAddr), Endpoint>,
    /// The node's resolvers, followed as its resolv.conf changes: VPC DNS servers
    /// forward to them.
    upstreams: dns::Upstreams,
    /// Per namespace: its DNS server.
    dns: BTreeMap<String, DnsServer>,
    /// The pod files the state directory held at the last reconcile.
    pod_files: BTreeSet<PathBuf>,
    /// Pods on this node as last published under its lease.
    published_pods: BTreeMap<PodKey, Pod>,
    /// Marked after each step for one VPC (claim, namespace, the rest): hosting
    /// hundreds at once is progress, not a wedged loop whose lease should lapse.
    progress: Progress,
}

impl VpcHost {
    pub fn new(config: &AgentConfig, socket: &Path, progress: Progress) -> VpcHost {
        let upstreams = dns::Upstreams::watch(RESOLV_CONF);
        VpcHost {
            me: config.name.clone(),
            interface: config.interface.clone(),
            state_dir: config.state_dir.clone(),
            socket: socket.to_owned(),
            device: None,
            rulesets: BTreeMap::new(),
            prepared: BTreeSet::new(),
            routed: BTreeMap::new(),
            warned: false,
            wanted: BTreeSet::new(),
            adopted: BTreeMap::new(),
            upstreams,
            dns: BTreeMap::new(),
            pod_files: BTreeSet::new(),
            published_pods: BTreeMap::new(),
            progress,
        }
    }

    /// Whether the CNI plugin asked for a VPC, gave one up, added or deleted a pod
    /// since the last reconcile: directory listings, cheap enough for every tick.
    pub fn local_pods_changed(&self) -> bool {
        wanted_vpcs(&self.state_dir) != self.wanted
            || pod_files(&self.state_dir, &self.wanted) != self.pod_files
    }

    /// Brings this node's VPCs in line with the registry and the state directory.
    /// `membership` is the node's: endpoints on this node go under its lease.
    pub fn reconcile(
        &mut self,
        registry: &dyn Registry,
        snapshot: &Snapshot,
        membership: &mut dyn Membership,
    ) -> Result<(), AgentError> {
        let me = &self.me.clone();
        let interface = &self.interface.clone();
        let state_dir = &self.state_dir.clone();
        let wanted = wanted_vpcs(state_dir);
        self.wanted = wanted.clone();
        let settings = &snapshot.settings;
        let Some(ula) = settings.mesh_ula else {
            if !wanted.is_empty() && !self.warned {
                tracing::warn!("pods ask for VPCs {wanted:?}: {}", RegistryError::NoMeshUla);
                self.warned = true;
            }
            return Ok(());
        };
        let prefix = MeshPrefix::new(ula).map_err(|e| AgentError::Record(e.within("settings")))?;
        let (mut records, bad) = match registry.vpc_records() {
            Ok(r) => r,
            // Said once: the rest of the mesh goes on without VPCs.
            Err(RegistryError::NoVpcs) => {
                if !wanted.is_empty() && !self.warned {
                    tracing::warn!("pods ask for VPCs {wanted:?}: {}", RegistryError::NoVpcs);
                    self.warned = true;
                }
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        for b in &bad {
            tracing::warn!(key = %b.key, "ignoring a VPC record: {}", b.error);
        }

        // Claim what local pods need; give back what they no longer do.
        for vpc in records.vpcs.iter().filter(|v| wanted.contains(&v.name)) {
            let held = records
                .members
                .iter()
                .any(|m| m.vpc == vpc.name && &m.node == me);
            if !held {
                let member = registry.claim_vpc_member(vpc, me)?;
                tracing::info!(vpc = %vpc.name, blocks = ?member.pod_cidrs, "joined a VPC");
                records.members.push(member);
                self.progress.mark();
            }
        }
        let stale: Vec<Label> = records
            .members
            .iter()
            .filter(|m| &m.node == me && !wanted.contains(&m.vpc))
            .map(|m| m.vpc.clone())
            .collect();
        for vpc in &stale {
            registry.leave_vpc(vpc, me)?;
            tracing::info!(%vpc, "left a VPC: its last pod is gone");
        }
        records
            .members
            .retain(|m| !(&m.node == me && stale.contains(&m.vpc)));

        let hosted: BTreeSet<Label> = records
            .members
            .iter()
            .filter(|m| &m.node == me)
            .map(|m| m.vpc.clone())
            .collect();
        self.pod_files = pod_files(state_dir, &wanted);
        let local_pods = local_pods(&self.pod_files, &hosted, me);
        self.publish_pods(local_pods, &mut records.pods, registry, membership)?;
        let endpoints = records.endpoints.clone();
        let node_ids = node_ids(settings, snapshot);
        let (vpcs, bad) = VpcSnapshot::build(
            records,
            Mesh {
                prefix,
                nodes: &node_ids,
            },
        );
        for b in &bad {
            tracing::warn!(record = %b.record, "ignoring a VPC record: {}", b.error);
        }
        self.publish_endpoints(&endpoints, &vpcs, registry, membership)?;
        let Some(&local_id) = node_ids.get(me) else {
            tracing::warn!("this node's pod CIDR gives it no node id: it hosts no VPC");
            return Ok(());
        };
        let mtu = pod_mtu(interface)?;
        let local = local_vpcs(&vpcs, me, interface, mtu);

        for (_, l) in &local {
            // Checked once: its state is this agent's to keep from then on.
            if self.prepared.contains(&l.netns) && netns::exists(&l.netns) {
                continue;
            }
            if ensure_namespace(&l.netns)? {
                // A new namespace has none of what was applied to an old one.
                self.routed.remove(&l.netns);
                self.rulesets.remove(&l.netns);
                self.dns.remove(&l.netns);
            }
            self.prepared.insert(l.netns.clone());
            self.progress.mark();
        }
        let request = device_request(&vpcs, ula, local_id, &local);
        let text = request.render();
        // A node that never hosted a VPC sends nothing: devices other than
        // wiremesh-wg (wireguard-go, boringtun) refuse `set_vpcs`.
        let untouched = self.device.is_none() && request.vpcs.is_empty();
        if !untouched && self.device.as_ref() != Some(&text) {
            tracing::info!(vpcs = request.vpcs.len(), "updating the device's VPC table");
            uapi_client::exchange(&self.socket, &text)?;
            self.device = Some(text);
        }
        for (state, l) in &local {
            self.route(&l.netns, &state.vpc.pod_cidrs)?;
            self.services(state, me, &l.netns)?;
            self.serve_dns(state, l)?;
            // Last: the plugin's answer means the VPC is ready for pods.
            write_local_vpc(state_dir, &state.vpc.name, l)?;
            self.progress.mark();
        }

        // Namespaces of VPCs that are no longer local: the device closed their TUN.
        let keep: BTreeSet<&str> = local.iter().map(|(_, l)| l.netns.as_str()).collect();
        for ns in netns::list("wm-vpc-") {
            if !keep.contains(ns.as_str()) && netns_name(interface, id_of(&ns)) == ns {
                tracing::info!(netns = %ns, "removing a VPC namespace");
                // Its sockets would keep the namespace alive.
                self.dns.remove(&ns);
                netns::delete(&ns)?;
                self.prepared.remove(&ns);
                self.rulesets.remove(&ns);
                self.routed.remove(&ns);
            }
        }
        Ok(())
    }

    /// This node's pods, from the plugin's files, published under its lease (once
    /// per change); its pods the registry still holds but the files no longer do are
    /// deleted. `pods` (the registry's) then holds the files' version of this node's.
    fn publish_pods(
        &mut self,
        local: Vec<Pod>,
        pods: &mut Vec<Pod>,
        registry: &dyn Registry,
        membership: &mut dyn Membership,
    ) -> Result<(), AgentError> {
        let listed: BTreeMap<PodKey, &Pod> = pods
            .iter()
            .filter(|p| p.node == self.me)
            .map(|p| (pod_key(p), p))
            .collect();
        self.published_pods
            .retain(|k, p| listed.get(k).is_some_and(|l| *l == p));
        let local: BTreeMap<PodKey, Pod> = local.into_iter().map(|p| (pod_key(&p), p)).collect();
        for (key, pod) in &local {
            if self.published_pods.get(key) != Some(pod) {
                membership.publish_pod(pod)?;
                self.published_pods.insert(key.clone(), pod.clone());
            }
        }
        for (vpc, namespace, name) in listed.keys().filter(|k| !local.contains_key(*k)) {
            registry.delete_pod(vpc, namespace, name)?;
            tracing::info!(%vpc, %namespace, pod = %name, "a pod left this node");
        }
        pods.retain(|p| p.node != self.me);
        pods.extend(local.into_values());
        Ok(())
    }

    /// Endpoints on this node live under its lease: when the node dies they expire,
    /// and every VIP stops choosing them. A service with a selector gets exactly its
    /// matching pods here ([`pods::selected_endpoints`]), and loses the rest; one
    /// without keeps the endpoints written by hand (whoever wrote them). Each is
    /// written once per change, so its own write does not start another reconcile loop.
    fn publish_endpoints(
        &mut self,
        endpoints: &[Endpoint],
        vpcs: &VpcSnapshot,
        registry: &dyn Registry,
        membership: &mut dyn Membership,
    ) -> Result<(), AgentError> {
        let selecting = |id: &ServiceId| {
            vpcs.vpcs.get(&id.vpc).is_some_and(|v| {
                v.services
                    .get(&(id.namespace.clone(), id.name.clone()))
                    .is_some_and(|s| !s.service.selector.0.is_empty())
            })
        };
        let listed: BTreeMap<(ServiceId, IpAddr), &Endpoint> = endpoints
            .iter()
            .filter(|e| e.node == self.me)
            .map(|e| ((ServiceId::of(e), e.address), e))
            .collect();
        let mut wanted: BTreeMap<(ServiceId, IpAddr), Endpoint> = listed
            .iter()
            .filter(|((id, _), _)| !selecting(id))
            .map(|(k, e)| (k.clone(), (*e).clone()))
            .collect();
        wanted.extend(
            vpcs.vpcs
                .values()
                .flat_map(|state| pods::selected_endpoints(state, &self.me))
                .map(|e| ((ServiceId::of(&e), e.address), e)),
        );
        self.adopted
            .retain(|k, e| listed.get(k).is_some_and(|l| *l == e));
        for (key, endpoint) in &wanted {
            if self.adopted.get(key) != Some(endpoint) {
                membership.publish_endpoint(endpoint)?;
                self.adopted.insert(key.clone(), endpoint.clone());
            }
        }
        for (id, address) in listed.keys().filter(|k| !wanted.contains_key(*k)) {
            registry.delete_endpoint(id, *address)?;
            tracing::info!(service = %id, %address, "no pod here matches the service's selector now");
        }
        Ok(())
    }

    /// The VPC's CIDRs go to the TUN (pods' /32s, more specific, stay on their veths).
    fn route(&mut self, ns: &str, cidrs: &[IpNet]) -> Result<(), HostError> {
        if self.routed.get(ns).is_some_and(|r| r == cidrs) {
            return Ok(());
        }
        // The device opens it within its `set_vpcs`; wiremesh-wg, at least.
        let tun_up = wait_for(TUN_WAIT, || {
            netns::enter(ns, || nix::net::if_::if_nametoindex(TUN).is_ok()).unwrap_or(false)
        });
        if !tun_up {
            return Err(HostError::Netns {
                name: ns.into(),
                reason: format!("the device opened no {TUN} device within {TUN_WAIT:?}"),
            });
        }
        for cidr in cidrs {
            run(&[
                "ip",
                "-n",
                ns,
                "route",
                "replace",
                &cidr.to_string(),
                "dev",
                TUN,
            ])?;
        }
        self.routed.insert(ns.into(), cidrs.to_vec());
        Ok(())
    }

    /// One `nft -f` transaction when the plan changed; UDP flows of removed
    /// endpoints flushed after it.
    fn services(&mut self, state: &VpcState, me: &NodeName, ns: &str) -> Result<(), HostError> {
        let plan = nft::plan(state, me, &|selector| {
            pods::matching_addresses(state, selector)
        });
        let previous = self.rulesets.get(ns);
        if previous == Some(&plan) {
            return Ok(());
        }
        // `nft` forked from a thread inside the namespace runs there.
        let nft_in = |ruleset: String| {
            netns::enter(ns, move || wiremesh_host::nft::apply(&ruleset)).and_then(|r| r)
        };
        if let Err(e) = nft_in(plan.render(previous)) {
            if previous.is_none() {
                return Err(e);
            }
            // The table is not what we last left (flushed by hand): replace it whole.
            nft_in(plan.render(None))?;
        }
        if let Some(old) = previous {
            for flush in nft::udp_conntrack_flushes(old, &plan) {
                let mut args = vec!["ip", "netns", "exec", ns, "conntrack"];
                let rest = flush.args();
                args.extend(rest.iter().map(String::as_str));
                // Exit 1 only says no entry matched.
                let _ = run(&args);
            }
        }
        self.rulesets.insert(ns.into(), plan);
        Ok(())
    }

    /// The VPC's DNS server on its nameserver address (on the namespace's `lo`, so
    /// the pods' queries are delivered locally; no service DNATs it): started once,
    /// then given the view of each new state.
    fn serve_dns(&mut self, state: &VpcState, local: &LocalVpc) -> Result<(), HostError> {
        let view = DnsView::new(state);
        let ip = local.nameserver;
        if let Some(server) = self.dns.get(&local.netns) {
            if server.addr.ip() == ip {
                server.set_view(view);
                return Ok(());
            }
        }
        // The old server goes first: its sockets hold the port.
        self.dns.remove(&local.netns);
        let ns = local.netns.as_str();
        let host = IpNet::from(ip).to_string();
        let mut add = vec!["ip", "-n", ns, "address", "replace", &host, "dev", "lo"];
        if ip.is_ipv6() {
            // Bound at once: no duplicate address detection to wait for.
            add.push("nodad");
        }
        run(&add)?;
        let server = DnsServer::start(ns, ip, self.upstreams.clone(), view)?;
        tracing::info!(netns = %ns, %ip, "serving the VPC's DNS");
        self.dns.insert(local.netns.clone(), server);
        Ok(())
    }
}

/// Bounded polling for the TUN device (the device opens it on its own thread).
fn wait_for(within: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        if ready() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The VPC id in a namespace name made by [`netns_name`] (0 if none).
fn id_of(ns: &str) -> u32 {
    ns.trim_start_matches("wm-vpc-")
        .split('-')
        .next()
        .and_then(|id| id.parse().ok())
        .unwrap_or(0)
}

/// The VPCs the CNI plugin has pods of on this node: `vpcs/<name>/` directories.
fn wanted_vpcs(state_dir: &Path) -> BTreeSet<Label> {
    let Ok(dir) = std::fs::read_dir(state_dir.join(VPCS_DIR)) else {
        return BTreeSet::new();
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|name| match Label::parse("vpc", &name) {
            Ok(label) => Some(label),
            Err(e) => {
                tracing::debug!("state directory: vpcs/{name} is no VPC name: {e}");
                None
            }
        })
        .collect()
}

/// A pod's place in the registry: VPC, namespace, name.
type PodKey = (Label, Label, PodName);

fn pod_key(pod: &Pod) -> PodKey {
    (pod.vpc.clone(), pod.namespace.clone(), pod.name.clone())
}

/// The plugin's pod files of the wanted VPCs: `vpcs/<vpc>/pods/*.json`.
fn pod_files(state_dir: &Path, vpcs: &BTreeSet<Label>) -> BTreeSet<PathBuf> {
    vpcs.iter()
        .map(|vpc| state_dir.join(VPCS_DIR).join(vpc.as_str()).join(PODS_DIR))
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flat_map(|dir| dir.filter_map(|e| e.ok()).map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect()
}

/// The pods of `files` in the VPCs this node hosts; a file that does not parse is
/// logged with its path and field, and left out.
fn local_pods(files: &BTreeSet<PathBuf>, hosted: &BTreeSet<Label>, me: &NodeName) -> Vec<Pod> {
    files
        .iter()
        .filter_map(|path| {
            // `<state>/vpcs/<vpc>/pods/<file>`: the VPC is two levels up.
            let vpc = path.parent()?.parent()?.file_name()?.to_str()?;
            let vpc = hosted.get(vpc)?;
            let parsed = std::fs::read(path)
                .map_err(|e| wiremesh_model::FieldError::new("file", e))
                .and_then(|bytes| {
                    serde_json::from_slice::<LocalPodRecord>(&bytes).map_err(|e| {
                        wiremesh_model::FieldError::new("pod", format!("malformed: {e}"))
                    })
                })
                .and_then(|r| r.into_pod(vpc, me));
            match parsed {
                Ok(pod) => Some(pod),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "ignoring a pod file: {e}");
                    None
                }
            }
        })
        .collect()
}

/// Every node's id: its pod-CIDR block index + 1 ([`ipam::node_id`]).
fn node_ids(settings: &ClusterSettings, snapshot: &Snapshot) -> BTreeMap<NodeName, NodeId> {
    snapshot
        .nodes
        .iter()
        .filter_map(|n| Some((n.name.clone(), ipam::node_id(settings, n.pod_cidr).ok()?)))
        .collect()
}

/// The pod MTU: the WireGuard interface's (which already leaves room for WireGuard
/// over this node's underlay) less the VPC's outer IPv6 header.
fn pod_mtu(interface: &str) -> Result<u16, HostError> {
    let path = format!("/sys/class/net/{interface}/mtu");
    let wg: u16 = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| HostError::Output {
            command: format!("read {path}"),
            reason: "no MTU".into(),
        })?;
    Ok(wg.saturating_sub(wiremesh_vpc::wire::HEADER_LEN as u16))
}

/// The VPCs this node hosts (it holds a member record), as the plugin sees them.
fn local_vpcs<'a>(
    vpcs: &'a VpcSnapshot,
    me: &NodeName,
    interface: &str,
    mtu: u16,
) -> Vec<(&'a VpcState, LocalVpc)> {
    vpcs.vpcs
        .values()
        .filter_map(|state| {
            let member = state.members.get(me)?;
            Some((
                state,
                LocalVpc {
                    id: state.vpc.id.0,
                    netns: netns_name(interface, state.vpc.id.0),
                    pod_cidrs: member.pod_cidrs.clone(),
                    mtu,
                    nameserver: dns_cluster_ip(state.vpc.service_cidr),
                    zone: state.vpc.dns_zone.to_string(),
                },
            ))
        })
        .collect()
}

/// The device's whole VPC table: every local VPC with every member's blocks.
fn device_request(
    vpcs: &VpcSnapshot,
    mesh_ula: Ipv6Net,
    local_id: NodeId,
    local: &[(&VpcState, LocalVpc)],
) -> VpcsRequest {
    VpcsRequest {
        mesh_prefix: mesh_ula,
        local_node: local_id.0,
        vpcs: local
            .iter()
            .map(|(state, l)| VpcPlane {
                id: l.id,
                netns: netns::path_of(&l.netns).display().to_string(),
                mtu: l.mtu,
                members: state
                    .members
                    .values()
                    .filter_map(|m| Some((vpcs.node_ids.get(&m.node)?.0, &m.pod_cidrs)))
                    .flat_map(|(id, cidrs)| cidrs.iter().map(move |c| (id, *c)))
                    .collect(),
            })
            .collect(),
    }
}

/// The namespace with the pods' gateway on its `lo` and forwarding on; idempotent.
/// Whether it had to be made. Few processes: this runs once per VPC, and a tenant
/// may bring dozens at once.
fn ensure_namespace(ns: &str) -> Result<bool, HostError> {
    // A name with no namespace behind it (its bind mount lived in another mount
    // namespace, now gone) is an empty file: take it away and start over.
    if netns::exists(ns) && run(&["ip", "-n", ns, "link", "show", "lo"]).is_err() {
        tracing::warn!(netns = %ns, "replacing a VPC namespace name with no namespace behind it");
        std::fs::remove_file(netns::path_of(ns)).map_err(|e| HostError::Netns {
            name: ns.into(),
            reason: e.to_string(),
        })?;
    }
    let created = !netns::exists(ns);
    if created {
        tracing::info!(netns = %ns, "creating a VPC namespace");
        netns::add(ns)?;
    }
    let gateway = format!("{}/32", wiremesh_host::pod::POD_GATEWAY);
    run(&["ip", "-n", ns, "address", "replace", &gateway, "dev", "lo"])?;
    // `/proc/sys/net` is the calling thread's namespace's: written from inside,
    // with no `ip netns exec sysctl` (two processes and a remount of /sys) per key.
    let forwarding = netns::enter(ns, || {
        ["ipv4/ip_forward", "ipv6/conf/all/forwarding"]
            .into_iter()
            .try_for_each(|key| std::fs::write(format!("/proc/sys/net/{key}"), "1"))
    })?;
    forwarding.map_err(|e| HostError::Netns {
        name: ns.into(),
        reason: format!("turning forwarding on: {e}"),
    })?;
    Ok(created)
}

fn write_local_vpc(state_dir: &Path, vpc: &Label, local: &LocalVpc) -> Result<(), AgentError> {
    let path: PathBuf = state_dir
        .join(VPCS_DIR)
        .join(vpc.as_str())
        .join(LOCAL_VPC_FILE);
    let json = serde_json::to_vec_pretty(local).expect("serializes");
    if std::fs::read(&path).is_ok_and(|old| old == json) {
        return Ok(());
    }
    // Atomically: the plugin may read it at any moment.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &json)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|source| AgentError::State {
            path: path.display().to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use wiremesh_vpc::snapshot::Records;
    use wiremesh_vpc::{VpcMember, VpcRecord};

    fn snapshot() -> VpcSnapshot {
        let vpc = |name: &str, id: u32| {
            wiremesh_vpc::Vpc::try_from(VpcRecord {
                name: name.into(),
                id,
                pod_cidrs: vec!["10.10.0.0/16".into()],
                service_cidr: "10.96.0.0/16".into(),
                dns_zone: "cluster.local".into(),
            })
            .unwrap()
        };
        let member = |vpc: &str, node: &str, cidr: &str| VpcMember {
            vpc: Label::parse("vpc", vpc).unwrap(),
            node: node.parse().unwrap(),
            pod_cidrs: vec![cidr.parse().unwrap()],
        };
        let nodes: BTreeMap<NodeName, NodeId> = [("n1", 1), ("n2", 2), ("n3", 3)]
            .into_iter()
            .map(|(n, id)| (n.parse().unwrap(), NodeId(id)))
            .collect();
        let records = Records {
            vpcs: vec![vpc("blue", 7), vpc("green", 9)],
            members: vec![
                member("blue", "n1", "10.10.0.0/24"),
                member("blue", "n2", "10.10.1.0/24"),
                member("green", "n2", "10.10.0.0/24"),
                member("green", "n3", "10.10.1.0/24"),
            ],
            ..Records::default()
        };
        let mesh = Mesh {
            prefix: "fd5e:1d2c:9a00::/48".parse().unwrap(),
            nodes: &nodes,
        };
        let (snapshot, bad) = VpcSnapshot::build(records, mesh);
        assert!(bad.is_empty(), "{bad:?}");
        snapshot
    }

    #[test]
    fn the_device_gets_every_member_of_the_local_vpcs_only() {
        let s = snapshot();
        let n1: NodeName = "n1".parse().unwrap();
        let local = local_vpcs(&s, &n1, "wiremesh0", 1380);
        assert_eq!(local.len(), 1, "n1 is in blue only");
        let l = &local[0].1;
        assert_eq!(l.netns, "wm-vpc-7");
        assert_eq!(l.nameserver.to_string(), "10.96.0.10");
        let req = device_request(
            &s,
            "fd5e:1d2c:9a00::/48".parse().unwrap(),
            NodeId(1),
            &local,
        );
        assert_eq!(
            req.render(),
            "set_vpcs=1\nmesh_prefix=fd5e:1d2c:9a00::/48\nlocal_node=1\nvpc=7\n\
             netns=/var/run/netns/wm-vpc-7\nmtu=1380\nmember=1,10.10.0.0/24\n\
             member=2,10.10.1.0/24\n\n"
        );
        let n2: NodeName = "n2".parse().unwrap();
        let both: Vec<u32> = local_vpcs(&s, &n2, "wmt0", 1380)
            .iter()
            .map(|(_, l)| l.id)
            .collect();
        assert_eq!(both, [7, 9]);
    }

    #[test]
    fn namespace_names_carry_the_interface_unless_default() {
        assert_eq!(netns_name("wiremesh0", 7), "wm-vpc-7");
        assert_eq!(netns_name("wmt0", 4_000_000_000), "wm-vpc-4000000000-wmt0");
        assert_eq!(id_of("wm-vpc-7"), 7);
        assert_eq!(id_of("wm-vpc-9-wmt0"), 9);
        assert_eq!(id_of("wm-vpc-x"), 0);
    }
}
