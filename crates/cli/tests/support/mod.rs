//! The test bed of the end-to-end tests: real `wiremesh agent` processes driving real
//! `wiremesh-wg` devices, one per simulated node (a network namespace), nodes joined
//! by a bridge (in the `fabric` namespace) that stands for their network, pods as
//! namespaces of their own. The registry is a directory, a real etcd cluster whose
//! members run in the fabric namespace on addresses of the bridge, so agents reach
//! it over their node's link, or Kubernetes: the agent crate's FAKE API server,
//! served over HTTP on the bridge from this process, found through a kubeconfig.
//!
//! Each test builds its own uniquely named namespaces and cluster; the guards remove
//! them even when a test fails.

#![allow(dead_code)] // each test binary uses a different part

#[path = "../../src/bench/etcd.rs"]
mod etcd;
#[path = "../../../agent/tests/conformance/fake_kube.rs"]
mod fake_kube;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use wiremesh_host::{netns, pod, probe};
use wiremesh_testkit::{cargo_bin, random_suffix, wait_until, Netns};

pub use etcd::LocalEtcd;

const PORT: u16 = 51820;

pub struct TestNode {
    pub name: String,
    pub ns: Netns,
    pub pod: Netns,
    pub ifname: String,
    pub lan_ip: Ipv4Addr,
    pub public: bool,
    pub location: String,
    pub agent: Option<Child>,
    /// Holds the node's mount namespace (see [`Mesh::spawn_agent`]), from its first
    /// agent on.
    pub mounts: Option<Child>,
    pub pod_ip: Option<Ipv4Addr>,
    /// The pod's IPv6 address, when the cluster has dual-stack pods.
    pub pod_ip6: Option<Ipv6Addr>,
}

pub struct Mesh {
    /// The etcd members, if the registry is etcd (dropped, so killed, before `dir` goes).
    pub etcd: Option<LocalEtcd>,
    /// The fake API server, if the registry is Kubernetes.
    pub kube: Option<KubeFake>,
    pub dir: tempfile::TempDir,
    pub cluster: String,
    pub fabric: Netns,
    /// NAT routers, each in front of a bridge of its own (`natlan`, `natlan1`, ...).
    pub nats: Vec<Netns>,
    pub nodes: Vec<TestNode>,
    /// The last byte of the first node's `lan` address (10.99.0.x); a mesh beside
    /// another ([`Mesh::beside`]) starts higher, as they share one segment.
    pub first_host: u8,
    /// Nodes on `lan` get IPv6 addresses only (`fd99::x`) and IPv6 endpoints.
    pub ipv6_underlay: bool,
}

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How a test NAT router maps a node's flows to its own ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// The flow's source port is kept where it can be, so one mapping serves every
    /// destination (as most home routers do): two such NATs let a simultaneous
    /// open through.
    Cone,
    /// Every flow gets a random port, so the mapping a public node observed is of
    /// no use to another peer (as carrier-grade and many corporate NATs do).
    Symmetric,
}

/// The fake Kubernetes API server of a mesh, and how agents find it.
pub struct KubeFake {
    pub server: fake_kube::FakeApiServer,
    /// Serves the HTTP connections; dropped, it stops.
    _runtime: tokio::runtime::Runtime,
    pub kubeconfig: PathBuf,
}

/// Where wiremesh keeps its Leases and settings on the fake.
pub const KUBE_NAMESPACE: &str = "wiremesh";
/// The fake's address on the `lan` bridge.
const KUBE_API: &str = "10.99.0.200";

/// Which registry a mesh runs on.
enum RegistryKind {
    Dir,
    Etcd { members: usize },
    Kubernetes,
}

impl Mesh {
    /// Two started nodes of one site (full granularity) whose pods already reach each other.
    pub fn pair() -> (Mesh, usize, usize) {
        let (mut mesh, n1, n2) = Mesh::two_nodes();
        mesh.start_pair(n1, n2);
        (mesh, n1, n2)
    }

    /// Two nodes of one site (full granularity), n1 and n2, not started yet.
    pub fn two_nodes() -> (Mesh, usize, usize) {
        let mut mesh = Mesh::new("full", false);
        let n1 = mesh.add_node("n1", "site", true);
        let n2 = mesh.add_node("n2", "site", true);
        (mesh, n1, n2)
    }

    /// Starts nodes `a` and `b`; `a`'s pod must come to reach `b`'s within 20 s.
    pub fn start_pair(&mut self, a: usize, b: usize) {
        self.start(a);
        self.start(b);
        assert!(
            self.eventually_pings(a, b, Duration::from_secs(20)),
            "{} cannot reach {}",
            self.nodes[a].name,
            self.nodes[b].name
        );
    }

    /// Two sites, location granularity: `site-a` with a1 (its leader, by name) and a2,
    /// `site-b` with b1; all started, a2's pod already reaching b1's through a1.
    pub fn two_sites() -> (Mesh, usize, usize, usize) {
        let (mesh, a1, a2, b1) = Mesh::two_sites_started();
        assert!(
            mesh.eventually_pings(a2, b1, Duration::from_secs(20)),
            "a2 -> b1 through leader a1"
        );
        (mesh, a1, a2, b1)
    }

    /// The nodes of [`Mesh::two_sites`], started, with nothing waited for yet.
    pub fn two_sites_started() -> (Mesh, usize, usize, usize) {
        let mut mesh = Mesh::new("location", false);
        let a1 = mesh.add_node("a1", "site-a", true);
        let a2 = mesh.add_node("a2", "site-a", true);
        let b1 = mesh.add_node("b1", "site-b", true);
        for i in [a1, a2, b1] {
            mesh.start(i);
        }
        (mesh, a1, a2, b1)
    }

    /// The leader the registry's nodes elect for `location` now.
    pub fn leader_of(&self, location: &str) -> Option<String> {
        let snapshot = self.cluster().snapshot().expect("snapshot").0;
        wiremesh_topology::leaders(&snapshot)
            .get(&location.parse().expect("location"))
            .map(|n| n.to_string())
    }

    /// An empty cluster with a directory registry and one bridge (`lan`) for public
    /// nodes and, if asked, a NAT router in front of a second bridge (`natlan`).
    pub fn new(granularity: &str, with_nat: bool) -> Mesh {
        Self::build(granularity, with_nat, RegistryKind::Dir, &[])
    }

    /// A second cluster, with its own directory registry initialised with
    /// `init_args` (give it CIDRs apart from `other`'s), whose `lan` bridge is joined
    /// to `other`'s: one underlay, so the two clusters' nodes reach each other as
    /// the sites of two clusters would over the internet.
    pub fn beside(other: &Mesh, granularity: &str, init_args: &[&str]) -> Mesh {
        let mut mesh = Self::build(granularity, false, RegistryKind::Dir, init_args);
        mesh.first_host = other.first_host + 100;
        // Both bridges were given one fixed MAC; one segment needs two.
        ip(&[
            "-n",
            mesh.fabric.name(),
            "link",
            "set",
            "lan",
            "address",
            "02:77:6d:00:00:02",
        ]);
        let (here, there) = (
            format!("f{}", random_suffix(8)),
            format!("f{}", random_suffix(8)),
        );
        ip(&[
            "link",
            "add",
            &here,
            "netns",
            mesh.fabric.name(),
            "type",
            "veth",
            "peer",
            "name",
            &there,
            "netns",
            other.fabric.name(),
        ]);
        for (ns, end) in [(&mesh.fabric, &here), (&other.fabric, &there)] {
            ip(&["-n", ns.name(), "link", "set", end, "master", "lan", "up"]);
        }
        mesh
    }

    /// An empty cluster with dual-stack pods (`fd42::/48`) whose nodes reach each other
    /// over IPv6 only: the `lan` bridge carries IPv6 addresses, and every endpoint is one.
    pub fn dual_stack_over_ipv6(granularity: &str) -> Mesh {
        let mut mesh = Self::build(
            granularity,
            false,
            RegistryKind::Dir,
            &["--cluster-cidr-v6", "fd42::/48"],
        );
        mesh.ipv6_underlay = true;
        mesh
    }

    /// An empty cluster whose registry is a fake Kubernetes API server on the `lan`
    /// bridge; each node added gets a Node object with its pod CIDR, as the kubelet
    /// and controller manager would make it.
    pub fn with_kubernetes(granularity: &str) -> Mesh {
        Self::build(granularity, false, RegistryKind::Kubernetes, &[])
    }

    /// An empty cluster whose registry is an etcd cluster of `members` on the `lan`
    /// bridge (10.99.0.201 and up); `None`, having said `skipped: ...`, without etcd.
    pub fn with_etcd(granularity: &str, members: usize) -> Option<Mesh> {
        if !etcd::installed() {
            wiremesh_testkit::skip("etcd not installed (apt-get install etcd-server)");
            return None;
        }
        Some(Self::build(
            granularity,
            false,
            RegistryKind::Etcd { members },
            &[],
        ))
    }

    fn build(
        granularity: &str,
        with_nat: bool,
        registry: RegistryKind,
        init_args: &[&str],
    ) -> Mesh {
        let dir = tempfile::tempdir().expect("tempdir");
        let cluster = format!("t{}", random_suffix(6));
        let fabric = Netns::new("fabric").expect("netns");
        // A fixed MAC: a bridge without one takes the lowest of its ports', which
        // changes as nodes join, and etcd listens on the bridge itself; agents would
        // send to the old MAC until their ARP entry aged out.
        ip(&[
            "-n",
            fabric.name(),
            "link",
            "add",
            "lan",
            "address",
            "02:77:6d:00:00:01",
            "type",
            "bridge",
        ]);
        ip(&["-n", fabric.name(), "link", "set", "lan", "up"]);
        let mut mesh = Mesh {
            etcd: None,
            kube: None,
            dir,
            cluster,
            fabric,
            nats: Vec::new(),
            nodes: Vec::new(),
            first_host: 1,
            ipv6_underlay: false,
        };
        if with_nat {
            mesh.add_nat();
        }
        if let RegistryKind::Kubernetes = registry {
            mesh.start_kube(granularity);
            return mesh;
        }
        if let RegistryKind::Etcd {
            members: etcd_members,
        } = registry
        {
            let ips: Vec<Ipv4Addr> = (0..etcd_members)
                .map(|i| Ipv4Addr::new(10, 99, 0, 201 + i as u8))
                .collect();
            for member in &ips {
                ip(&[
                    "-n",
                    mesh.fabric.name(),
                    "address",
                    "add",
                    &format!("{member}/24"),
                    "dev",
                    "lan",
                ]);
            }
            let etcd = LocalEtcd::start(mesh.fabric.name(), &ips, &mesh.dir.path().join("etcd"))
                .expect("etcd cluster");
            mesh.etcd = Some(etcd);
        }
        let mut init = vec!["init", "--granularity", granularity];
        init.extend_from_slice(init_args);
        mesh.wiremesh_ok(&init);
        mesh
    }

    /// Serves the fake API server on the bridge, with the settings ConfigMap.
    fn start_kube(&mut self, granularity: &str) {
        let fabric = self.fabric.name();
        ip(&[
            "-n",
            fabric,
            "address",
            "add",
            &format!("{KUBE_API}/24"),
            "dev",
            "lan",
        ]);
        // A socket stays in the namespace it was made in, whichever thread serves it.
        let listener = netns::enter(fabric, || std::net::TcpListener::bind((KUBE_API, 6443)))
            .expect("fabric namespace")
            .expect("bind the fake API server");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let server = fake_kube::FakeApiServer::new();
        let kubeconfig = self.dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            server.serve_http(&runtime, listener, KUBE_NAMESPACE),
        )
        .expect("write the kubeconfig");
        // What deploy/30-settings.yaml ships.
        let settings = wiremesh_model::ClusterSettings {
            granularity: granularity.parse().expect("a granularity"),
            mesh_ula: Some(wiremesh_kube::manifests::MESH_ULA.parse().expect("a /48")),
            ..wiremesh_model::ClusterSettings::default()
        };
        server.put(
            &format!("/api/v1/namespaces/{KUBE_NAMESPACE}/configmaps"),
            serde_json::json!({"metadata": {"name": "wiremesh-settings"},
                "data": {"settings.json": String::from_utf8(settings.to_json()).unwrap()}}),
        );
        self.kube = Some(KubeFake {
            server,
            _runtime: runtime,
            kubeconfig,
        });
    }

    /// The registry address the agents are given.
    pub fn registry(&self) -> String {
        match (&self.etcd, &self.kube) {
            (Some(etcd), _) => etcd.address(),
            (None, Some(_)) => "kubernetes".into(),
            (None, None) => format!("dir:{}", self.dir.path().join("registry").display()),
        }
    }

    /// Flags and environment that take a `wiremesh` command to the registry.
    fn registry_flags(&self) -> (Vec<String>, Vec<(String, String)>) {
        let mut flags = vec![
            "--registry".into(),
            self.registry(),
            "--cluster".into(),
            self.cluster.clone(),
        ];
        let mut env = Vec::new();
        if let Some(kube) = &self.kube {
            flags.extend(["--kube-namespace".into(), KUBE_NAMESPACE.into()]);
            env.push(("KUBECONFIG".into(), kube.kubeconfig.display().to_string()));
        }
        (flags, env)
    }

    /// The cluster's records, read from the fabric namespace (where etcd listens).
    /// The etcd client's threads start there, so its connections stay there.
    pub fn cluster(&self) -> wiremesh_agent::Cluster {
        let (registry, name) = (self.registry(), self.cluster.clone());
        netns::enter(self.fabric.name(), move || {
            let store = wiremesh_agent::open_store(&registry).expect("registry");
            wiremesh_agent::Cluster::new(store, &name)
        })
        .expect("fabric namespace")
    }

    /// Runs `wiremesh ARGS --registry R --cluster C` in the fabric namespace.
    pub fn wiremesh(&self, args: &[&str]) -> Output {
        let (flags, env) = self.registry_flags();
        let mut all = vec![env!("CARGO_BIN_EXE_wiremesh")];
        all.extend_from_slice(args);
        all.extend(flags.iter().map(String::as_str));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.fabric.exec_env(&env, &all).expect("wiremesh runs")
    }

    /// `wiremesh <args>`, which must succeed: its stdout.
    pub fn wiremesh_ok(&self, args: &[&str]) -> String {
        let out = self.wiremesh(args);
        assert!(
            out.status.success(),
            "wiremesh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `wg show <device> endpoints` on node `i`: a line a peer, its key and its
    /// endpoint apart by a tab.
    pub fn wg_endpoints(&self, i: usize) -> String {
        let node = &self.nodes[i];
        node.ns
            .exec_ok(&["wg", "show", &node.ifname, "endpoints"])
            .expect("wg show")
    }

    pub fn wire(&self, ns: &Netns, ifname: &str, bridge: &str, addr: &str) {
        let peer = format!("f{}", random_suffix(8));
        ip(&[
            "link",
            "add",
            ifname,
            "netns",
            ns.name(),
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            self.fabric.name(),
        ]);
        ip(&[
            "-n",
            self.fabric.name(),
            "link",
            "set",
            &peer,
            "master",
            bridge,
            "up",
        ]);
        if addr.contains(':') {
            // The bed's IPv6 addresses are unique: skip DAD, so they work at once.
            ip(&[
                "-n",
                ns.name(),
                "address",
                "add",
                addr,
                "dev",
                ifname,
                "nodad",
            ]);
        } else {
            ip(&["-n", ns.name(), "address", "add", addr, "dev", ifname]);
        }
        ip(&["-n", ns.name(), "link", "set", ifname, "up"]);
    }

    /// Adds a cone NAT router (see [`Mesh::add_nat_of`]). Returns its number.
    pub fn add_nat(&mut self) -> usize {
        self.add_nat_of(Nat::Cone)
    }

    /// Adds a NAT router (number `n`, from 0): `lan` address 10.99.0.(254 - n), and a
    /// bridge of its own with 192.168.(77 + n).0/24 behind it. Like home routers it
    /// drops unsolicited packets to itself: dropped before conntrack confirms them,
    /// they leave no entry that would later push an outgoing flow onto another port.
    /// How it maps ports is `kind`'s. Returns `n`.
    pub fn add_nat_of(&mut self, kind: Nat) -> usize {
        let n = self.nats.len();
        let bridge = Self::nat_bridge(n);
        ip(&[
            "-n",
            self.fabric.name(),
            "link",
            "add",
            &bridge,
            "type",
            "bridge",
        ]);
        ip(&["-n", self.fabric.name(), "link", "set", &bridge, "up"]);
        let nat = Netns::new(&format!("nat{n}")).expect("netns");
        self.wire(&nat, "wan0", "lan", &format!("10.99.0.{}/24", 254 - n));
        self.wire(&nat, "lan0", &bridge, &format!("192.168.{}.1/24", 77 + n));
        nat.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            .expect("forwarding");
        let masquerade = match kind {
            Nat::Cone => "masquerade",
            Nat::Symmetric => "masquerade fully-random",
        };
        let rules = format!("table ip nat {{\n chain post {{\n  type nat hook postrouting priority srcnat;\n  oifname \"wan0\" {masquerade}\n }}\n chain in {{\n  type filter hook input priority filter;\n  iifname \"wan0\" ct state new drop\n }}\n}}\n");
        netns::enter(nat.name(), move || wiremesh_host::nft::apply(&rules))
            .unwrap()
            .expect("nat rules");
        self.nats.push(nat);
        n
    }

    fn nat_bridge(n: usize) -> String {
        if n == 0 {
            "natlan".into()
        } else {
            format!("natlan{n}")
        }
    }

    /// Add a node (not started). Public nodes sit on `lan` with a public endpoint;
    /// others sit behind the first NAT router.
    pub fn add_node(&mut self, name: &str, location: &str, public: bool) -> usize {
        self.add_node_at(name, location, (!public).then_some(0))
    }

    /// Add a node (not started) on `lan` with a public endpoint, or behind NAT router
    /// `nat` (see [`Mesh::add_nat`]).
    pub fn add_node_at(&mut self, name: &str, location: &str, nat: Option<usize>) -> usize {
        let public = nat.is_none();
        let i = self.nodes.len() as u8 + self.first_host;
        let ns = Netns::new(name).expect("netns");
        let lan_ip = match nat {
            None if self.ipv6_underlay => {
                // No IPv4 on the underlay at all. `lan_ip` still names the host.
                self.wire(&ns, "eth0", "lan", &format!("{}/64", Self::lan_ip6(i)));
                Ipv4Addr::new(10, 99, 0, i)
            }
            None => {
                let ip4 = Ipv4Addr::new(10, 99, 0, i);
                self.wire(&ns, "eth0", "lan", &format!("{ip4}/24"));
                ip4
            }
            Some(n) => {
                let subnet = 77 + n as u8;
                let ip4 = Ipv4Addr::new(192, 168, subnet, 10 + i);
                self.wire(&ns, "eth0", &Self::nat_bridge(n), &format!("{ip4}/24"));
                ip(&[
                    "-n",
                    ns.name(),
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("192.168.{subnet}.1"),
                ]);
                ip4
            }
        };
        if let Some(kube) = &self.kube {
            kube.server.put(
                "/api/v1/nodes",
                serde_json::json!({"metadata": {"name": name},
                    "spec": {"podCIDR": format!("10.42.{i}.0/24")}}),
            );
        }
        let pod = Netns::new(&format!("{name}p")).expect("netns");
        let ifname = format!("wmt{}", random_suffix(8));
        self.nodes.push(TestNode {
            name: name.into(),
            ns,
            pod,
            ifname,
            lan_ip,
            public,
            location: location.into(),
            agent: None,
            mounts: None,
            pod_ip: None,
            pod_ip6: None,
        });
        self.nodes.len() - 1
    }

    pub fn state_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.nodes[i].name)
    }

    /// Starts node `i`'s agent and waits until it has joined (see [`Mesh::await_join`]).
    pub fn start(&mut self, i: usize) {
        self.spawn_agent(i);
        self.await_join(i);
    }

    /// Starts node `i`'s agent without waiting for it.
    ///
    /// Agents run in their node's network namespace *and* a mount namespace of the
    /// node's own, as on a host of its own: an agent's VPC namespaces are bind mounts
    /// under `/run/netns`, which two nodes on this one host would otherwise share (and
    /// its `/sys` shows the node's interfaces). A `sleep` started by `ip netns exec`
    /// holds that mount namespace for the node's lifetime, so an agent started again
    /// finds what the one before it made, as after a restart on a real host.
    pub fn spawn_agent(&mut self, i: usize) {
        let (flags, env) = self.registry_flags();
        let state_dir = self.state_dir(i);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", self.nodes[i].name)))
            .expect("log");
        let ipv6_underlay = self.ipv6_underlay;
        let n = &mut self.nodes[i];
        let holder = n
            .mounts
            .get_or_insert_with(|| mount_holder(n.ns.name()))
            .id();
        let endpoint = if ipv6_underlay {
            SocketAddr::from((Self::lan_ip6(n.lan_ip.octets()[3]), PORT)).to_string()
        } else {
            SocketAddr::from((n.lan_ip, PORT)).to_string()
        };
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--mount=/proc/{holder}/ns/mnt"))
            .arg(format!("--net=/proc/{holder}/ns/net"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_wiremesh"))
            .arg("agent")
            .args(&flags)
            .envs(env)
            .args(["--name", &n.name])
            .args([
                "--location",
                &n.location,
                "--interface",
                &n.ifname,
                "--lease-ttl",
                "3",
            ])
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--device")
            .arg(cargo_bin("wiremesh-wg"))
            .args(["--private-endpoint", &endpoint]);
        if n.public {
            cmd.args(["--public-endpoint", &endpoint]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("agent");
        n.agent = Some(child);
    }

    /// Waits until node `i`'s agent has joined: claimed its pod CIDR and published
    /// its record. Then wires its pod to the node.
    pub fn await_join(&mut self, i: usize) {
        if let Err(status) = self.try_join(i) {
            panic!(
                "{}'s agent exited ({status}) before joining:\n{}",
                self.nodes[i].name,
                self.log(i)
            );
        }
    }

    /// [`Mesh::await_join`], or the agent's exit status if it exited first.
    fn try_join(&mut self, i: usize) -> Result<(), std::process::ExitStatus> {
        let claim = self.state_dir(i).join("pod-cidr");
        let published = self.published(i);
        let mut exited = None;
        let agent = &mut self.nodes[i].agent;
        let joined = wait_until(Duration::from_secs(20), || {
            exited = agent.as_mut().and_then(|c| c.try_wait().ok().flatten());
            exited.is_some() || (claim.exists() && published())
        });
        if let Some(status) = exited {
            return Err(status);
        }
        assert!(joined, "{} did not join within 20 s", self.nodes[i].name);
        let n = &mut self.nodes[i];
        if n.pod_ip.is_none() {
            let cidr: IpNet = std::fs::read_to_string(&claim)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            let IpNet::V4(cidr) = cidr else {
                panic!("IPv4 expected")
            };
            let pod_ip = cidr.hosts().nth(1).unwrap();
            // A dual-stack pod's IPv6 address has the same host part.
            let pod_ip6 = std::fs::read_to_string(claim.with_file_name("pod-cidr-v6"))
                .ok()
                .map(|c| c.trim().parse::<ipnet::Ipv6Net>().expect("an IPv6 CIDR"))
                .map(|c| Ipv6Addr::from(u128::from(c.network()) + 2));
            pod::attach(&pod::PodLink {
                node_netns: Some(n.ns.name()),
                pod_netns: &netns::path_of(n.pod.name()),
                host_if: "pod0",
                pod_if: "eth0",
                pod_ip: Some(pod_ip),
                pod_ip_v6: pod_ip6,
                mtu: 1420,
            })
            .expect("pod link");
            n.pod_ip = Some(pod_ip);
            n.pod_ip6 = pod_ip6;
        }
        Ok(())
    }

    /// Whether node `i`'s record is in the registry: its key in a store, its public
    /// key annotation on Kubernetes.
    fn published(&self, i: usize) -> Box<dyn Fn() -> bool> {
        let name = self.nodes[i].name.clone();
        if let Some(kube) = &self.kube {
            let server = kube.server.clone();
            return Box::new(move || {
                server.get("/api/v1/nodes", &name).is_some_and(|node| {
                    !node["metadata"]["annotations"]["wiremesh.io/public-key"].is_null()
                })
            });
        }
        let cluster = self.cluster();
        let record = format!("{}nodes/{name}", cluster.prefix());
        Box::new(move || cluster.store.get(&record).is_ok_and(|r| r.is_some()))
    }

    /// Stop an agent with SIGTERM (the device keeps running, as in production).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].agent.take() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            assert!(
                wait_until(Duration::from_secs(10), || matches!(
                    child.try_wait(),
                    Ok(Some(_))
                )),
                "agent did not stop"
            );
        }
    }

    pub fn pod_ip(&self, i: usize) -> Ipv4Addr {
        self.nodes[i].pod_ip.expect("node started")
    }

    /// The IPv6 underlay address of the node whose IPv4 one would end in `host`.
    fn lan_ip6(host: u8) -> Ipv6Addr {
        Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, u16::from(host))
    }

    pub fn pod_ip6(&self, i: usize) -> Ipv6Addr {
        self.nodes[i]
            .pod_ip6
            .expect("node started, with dual-stack pods")
    }

    /// Whether node `from`'s pod reaches node `to`'s pod (ICMP, one second).
    pub fn ping(&self, from: usize, to: usize) -> bool {
        self.ping_address(from, IpAddr::V4(self.pod_ip(to)))
    }

    /// Whether node `from`'s pod reaches `dst` (ICMP or ICMPv6, one second).
    pub fn ping_address(&self, from: usize, dst: IpAddr) -> bool {
        netns::enter(self.nodes[from].pod.name(), move || {
            probe::ping(dst, Duration::from_secs(1)).is_ok()
        })
        .unwrap_or(false)
    }

    pub fn eventually_pings(&self, from: usize, to: usize, within: Duration) -> bool {
        wait_until(within, || self.ping(from, to))
    }

    /// Routes wiremesh installed on node `i`.
    pub fn routes(&self, i: usize) -> String {
        self.nodes[i]
            .ns
            .exec_ok(&["ip", "route", "show", "proto", "52"])
            .unwrap_or_default()
    }

    /// The PATH `wiremesh status` shows for node `i`'s tunnel to node `peer`
    /// (`direct`, `relayed via <node>`), once node `i` has reported that tunnel.
    pub fn path_in_status(&self, i: usize, peer: usize) -> Option<String> {
        let out = self.wiremesh(&["status"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let (node, peer) = (&self.nodes[i].name, &self.nodes[peer].name);
        text.lines().find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some(node) && words.next() == Some(peer)).then(|| {
                line.rsplit("  ")
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            })
        })
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{}.log", self.nodes[i].name)))
            .unwrap_or_default()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 0..self.nodes.len() {
                eprintln!("--- log of {} ---\n{}", self.nodes[i].name, self.log(i));
            }
            if let Some(etcd) = &self.etcd {
                for m in 1..=etcd.len() {
                    let log = std::fs::read_to_string(etcd.dir().join(format!("m{m}.log")))
                        .unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(20).collect();
                    eprintln!("--- etcd member m{m}, last lines ---");
                    for line in tail.iter().rev() {
                        eprintln!("{line}");
                    }
                }
            }
        }
        for n in &mut self.nodes {
            for mut c in [n.agent.take(), n.mounts.take()].into_iter().flatten() {
                let _ = c.kill();
                let _ = c.wait();
            }
            // The agents' VPC namespaces (`wm-vpc-<id>-<interface>`): their names can
            // reach the host's /run/netns, a shared mount, from the node's own.
            let suffix = format!("-{}", n.ifname);
            for entry in std::fs::read_dir("/run/netns")
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("wm-vpc-") && name.ends_with(&suffix) {
                    let _ = Command::new("ip").args(["netns", "del", &name]).status();
                }
            }
        }
    }
}

/// A process holding a mount namespace of its own, made by `ip netns exec` for
/// network namespace `ns` (its `/sys` shows that namespace's interfaces); returned
/// once `ip` has handed over to it.
fn mount_holder(ns: &str) -> Child {
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "sleep", "infinity"])
        .stdin(Stdio::null())
        .spawn()
        .expect("ip netns exec sleep");
    let comm = format!("/proc/{}/comm", child.id());
    let ready = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&comm).is_ok_and(|c| c.trim() == "sleep")
    });
    assert!(ready, "ip netns exec {ns} sleep did not start");
    child
}

/// Pings from one node's pod to another's, back to back (20 ms apart, 500 ms
/// timeout each), on a thread in the source pod's namespace, counting losses.
pub struct Pinger {
    sent: Arc<AtomicU64>,
    lost: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pinger {
    pub fn start(mesh: &Mesh, from: usize, to: usize) -> Pinger {
        let (sent, lost) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let done = Arc::new(AtomicBool::new(false));
        let dst = mesh.pod_ip(to);
        let thread = {
            let (sent, lost, done) = (sent.clone(), lost.clone(), done.clone());
            netns::spawn_in(mesh.nodes[from].pod.name(), move || {
                while !done.load(Ordering::Relaxed) {
                    sent.fetch_add(1, Ordering::Relaxed);
                    if probe::ping(dst, Duration::from_millis(500)).is_err() {
                        lost.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
            .expect("pinger thread")
        };
        Pinger {
            sent,
            lost,
            done,
            thread: Some(thread),
        }
    }

    /// Pings sent and lost so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.lost.load(Ordering::Relaxed),
        )
    }

    /// Stops the pings; the final counts.
    pub fn stop(mut self) -> (u64, u64) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.counts()
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}
