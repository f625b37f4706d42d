//! The mesh end to end: real `wiremesh agent` processes driving real `wiremesh-wg`
//! devices, one per simulated node (a network namespace), nodes joined by a bridge
//! that stands for their network, pods as namespaces of their own.
//!
//! Each test builds its own uniquely named namespaces and cluster; the guards remove
//! them even when a test fails.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use wiremesh_host::{netns, pod, probe};
use wiremesh_testkit::{cargo_bin, random_suffix, require_root, wait_until, Netns};

const PORT: u16 = 51820;

struct TestNode {
    name: String,
    ns: Netns,
    pod: Netns,
    ifname: String,
    lan_ip: Ipv4Addr,
    public: bool,
    location: String,
    agent: Option<Child>,
    pod_ip: Option<Ipv4Addr>,
}

struct Mesh {
    dir: tempfile::TempDir,
    cluster: String,
    fabric: Netns,
    nat: Option<Netns>,
    nodes: Vec<TestNode>,
}

fn wiremesh() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wiremesh"))
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Mesh {
    /// An empty cluster with one bridge (`lan`) for public nodes and, if asked,
    /// a NAT router in front of a second bridge (`natlan`).
    fn new(granularity: &str, with_nat: bool) -> Mesh {
        let dir = tempfile::tempdir().expect("tempdir");
        let cluster = format!("t{}", random_suffix(6));
        let fabric = Netns::new("fabric").expect("netns");
        ip(&["-n", fabric.name(), "link", "add", "lan", "type", "bridge"]);
        ip(&["-n", fabric.name(), "link", "set", "lan", "up"]);
        let mut mesh = Mesh {
            dir,
            cluster,
            fabric,
            nat: None,
            nodes: Vec::new(),
        };
        if with_nat {
            ip(&[
                "-n",
                mesh.fabric.name(),
                "link",
                "add",
                "natlan",
                "type",
                "bridge",
            ]);
            ip(&["-n", mesh.fabric.name(), "link", "set", "natlan", "up"]);
            let nat = Netns::new("nat").expect("netns");
            mesh.wire(&nat, "wan0", "lan", "10.99.0.254/24");
            mesh.wire(&nat, "lan0", "natlan", "192.168.77.1/24");
            nat.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
                .expect("forwarding");
            let rules = "table ip nat {\n chain post {\n  type nat hook postrouting priority srcnat;\n  oifname \"wan0\" masquerade\n }\n}\n";
            netns::enter(nat.name(), || wiremesh_host::nft::apply(rules))
                .unwrap()
                .expect("nat rules");
            mesh.nat = Some(nat);
        }
        let out = wiremesh()
            .args([
                "init",
                "--registry",
                &mesh.registry(),
                "--cluster",
                &mesh.cluster,
                "--granularity",
                granularity,
            ])
            .output()
            .expect("wiremesh init");
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        mesh
    }

    fn registry(&self) -> String {
        format!("dir:{}", self.dir.path().join("registry").display())
    }

    fn cluster(&self) -> wiremesh_agent::Cluster {
        let store = wiremesh_agent::open_store(&self.registry()).expect("registry");
        wiremesh_agent::Cluster::new(store, &self.cluster)
    }

    fn wire(&self, ns: &Netns, ifname: &str, bridge: &str, addr: &str) {
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
        ip(&["-n", ns.name(), "address", "add", addr, "dev", ifname]);
        ip(&["-n", ns.name(), "link", "set", ifname, "up"]);
    }

    /// Add a node (not started). Public nodes sit on `lan` with a public endpoint;
    /// others sit behind the NAT router.
    fn add_node(&mut self, name: &str, location: &str, public: bool) -> usize {
        let i = self.nodes.len() as u8 + 1;
        let ns = Netns::new(name).expect("netns");
        let lan_ip = if public {
            let ip4 = Ipv4Addr::new(10, 99, 0, i);
            self.wire(&ns, "eth0", "lan", &format!("{ip4}/24"));
            ip4
        } else {
            let ip4 = Ipv4Addr::new(192, 168, 77, 10 + i);
            self.wire(&ns, "eth0", "natlan", &format!("{ip4}/24"));
            ip(&[
                "-n",
                ns.name(),
                "route",
                "add",
                "default",
                "via",
                "192.168.77.1",
            ]);
            ip4
        };
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
            pod_ip: None,
        });
        self.nodes.len() - 1
    }

    fn state_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.nodes[i].name)
    }

    fn start(&mut self, i: usize) {
        let registry = self.registry();
        let state_dir = self.state_dir(i);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", self.nodes[i].name)))
            .expect("log");
        let n = &mut self.nodes[i];
        let endpoint = SocketAddr::from((n.lan_ip, PORT)).to_string();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", n.ns.name()])
            .arg(env!("CARGO_BIN_EXE_wiremesh"))
            .args([
                "agent",
                "--registry",
                &registry,
                "--cluster",
                &self.cluster,
                "--name",
                &n.name,
            ])
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
        // The agent writes its pod CIDR claim before it touches the device.
        let claim = state_dir.join("pod-cidr");
        assert!(
            wait_until(Duration::from_secs(20), || claim.exists()),
            "{} never claimed a pod CIDR",
            n.name
        );
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
            pod::attach(&pod::PodLink {
                node_netns: Some(n.ns.name()),
                pod_netns: &netns::path_of(n.pod.name()),
                host_if: "pod0",
                pod_if: "eth0",
                pod_ip,
                mtu: 1420,
            })
            .expect("pod link");
            n.pod_ip = Some(pod_ip);
        }
    }

    /// Stop an agent with SIGTERM (the device keeps running, as in production).
    fn stop(&mut self, i: usize) {
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

    fn pod_ip(&self, i: usize) -> Ipv4Addr {
        self.nodes[i].pod_ip.expect("node started")
    }

    /// Whether node `from`'s pod reaches node `to`'s pod (ICMP, one second).
    fn ping(&self, from: usize, to: usize) -> bool {
        let dst = self.pod_ip(to);
        netns::enter(self.nodes[from].pod.name(), move || {
            probe::ping(dst, Duration::from_secs(1)).is_ok()
        })
        .unwrap_or(false)
    }

    fn eventually_pings(&self, from: usize, to: usize, within: Duration) -> bool {
        wait_until(within, || self.ping(from, to))
    }

    /// Routes wiremesh installed on node `i`.
    fn routes(&self, i: usize) -> String {
        self.nodes[i]
            .ns
            .exec_ok(&["ip", "route", "show", "proto", "52"])
            .unwrap_or_default()
    }

    fn log(&self, i: usize) -> String {
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
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.agent.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

#[test]
fn nodes_join_and_leave() {
    if !require_root() {
        return;
    }
    let mut mesh = Mesh::new("full", false);
    for name in ["n1", "n2", "n3"] {
        let i = mesh.add_node(name, "site", true);
        mesh.start(i);
    }
    for (a, b) in [(0, 1), (1, 2), (2, 0), (1, 0)] {
        assert!(
            mesh.eventually_pings(a, b, Duration::from_secs(20)),
            "n{} cannot reach n{}",
            a + 1,
            b + 1
        );
    }
    // A fourth node joins: everyone reaches it.
    let late = mesh.add_node("n4", "site", true);
    mesh.start(late);
    for a in 0..3 {
        assert!(
            mesh.eventually_pings(a, late, Duration::from_secs(20)),
            "n{} cannot reach the new node",
            a + 1
        );
    }
    // n3's agent dies without cleanup; its lease (3 s) ends and every node drops its routes.
    let gone_cidr = std::fs::read_to_string(mesh.state_dir(2).join("pod-cidr"))
        .unwrap()
        .trim()
        .to_owned();
    let mut agent = mesh.nodes[2].agent.take().unwrap();
    agent.kill().unwrap();
    agent.wait().unwrap();
    for i in [0, 1, 3] {
        assert!(
            wait_until(Duration::from_secs(15), || !mesh
                .routes(i)
                .contains(&gone_cidr)),
            "node {} still routes to the departed node's {gone_cidr}:\n{}",
            mesh.nodes[i].name,
            mesh.routes(i)
        );
    }
    assert!(mesh.ping(0, 1), "the remaining nodes still talk");
}

#[test]
fn leader_failover_restores_traffic_between_locations() {
    if !require_root() {
        return;
    }
    let mut mesh = Mesh::new("location", false);
    let a1 = mesh.add_node("a1", "site-a", true);
    let a2 = mesh.add_node("a2", "site-a", true);
    let b1 = mesh.add_node("b1", "site-b", true);
    for i in [a1, a2, b1] {
        mesh.start(i);
    }
    assert!(
        mesh.eventually_pings(a2, b1, Duration::from_secs(20)),
        "a2 -> b1 through leader a1"
    );
    // The leader of site-a dies entirely (agent and device): a2 takes over.
    let leader = mesh.nodes.remove(a1);
    drop(leader);
    let (a2, b1) = (a2 - 1, b1 - 1);
    assert!(
        mesh.eventually_pings(a2, b1, Duration::from_secs(30)),
        "traffic between sites did not resume after the leader died"
    );
    let leaders = wiremesh_topology::leaders(&mesh.cluster().snapshot().unwrap().0);
    assert_eq!(
        leaders.get(&"site-a".parse().unwrap()).map(|n| n.as_str()),
        Some("a2")
    );
}

#[test]
fn node_behind_nat_is_reached_through_its_discovered_endpoint() {
    if !require_root() {
        return;
    }
    let mut mesh = Mesh::new("full", true);
    let public = mesh.add_node("pub", "cloud", true);
    let edge = mesh.add_node("edge", "edge", false);
    mesh.start(public);
    mesh.start(edge);
    // The public node has no address for the edge node; the edge node dials out
    // with keepalive, and the public node reaches it back through the NAT mapping.
    assert!(
        mesh.eventually_pings(public, edge, Duration::from_secs(20)),
        "public -> NAT'd node"
    );
    let cluster = mesh.cluster();
    let observed = wait_until(Duration::from_secs(15), || {
        let (snapshot, _, _) = cluster.snapshot().unwrap();
        snapshot.nodes.iter().any(|n| {
            n.name.as_str() == "pub"
                && n.observed_endpoints
                    .get(&"edge".parse().unwrap())
                    .map(|e| e.ip().to_string())
                    == Some("10.99.0.254".into())
        })
    });
    assert!(
        observed,
        "the public node did not publish the edge node's NAT address"
    );
}

#[test]
fn agent_restart_loses_no_packets_on_unchanged_tunnels() {
    if !require_root() {
        return;
    }
    let mut mesh = Mesh::new("full", false);
    let n1 = mesh.add_node("n1", "site", true);
    let n2 = mesh.add_node("n2", "site", true);
    mesh.start(n1);
    mesh.start(n2);
    assert!(mesh.eventually_pings(n1, n2, Duration::from_secs(20)));
    let (sent, lost) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let done = Arc::new(AtomicBool::new(false));
    let dst = mesh.pod_ip(n2);
    let pinger = {
        let (sent, lost, done) = (sent.clone(), lost.clone(), done.clone());
        netns::spawn_in(mesh.nodes[n1].pod.name(), move || {
            while !done.load(Ordering::Relaxed) {
                sent.fetch_add(1, Ordering::Relaxed);
                if probe::ping(dst, Duration::from_millis(500)).is_err() {
                    lost.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .unwrap()
    };
    mesh.stop(n1);
    mesh.start(n1);
    // Let the restarted agent run several reconciles while pings continue.
    let cluster = mesh.cluster();
    assert!(wait_until(Duration::from_secs(15), || cluster
        .statuses()
        .unwrap()
        .iter()
        .filter(|s| s.node == "n1")
        .count()
        == 1));
    let before = sent.load(Ordering::Relaxed);
    assert!(wait_until(Duration::from_secs(10), || sent
        .load(Ordering::Relaxed)
        > before + 50));
    done.store(true, Ordering::Relaxed);
    pinger.join().unwrap();
    assert_eq!(
        lost.load(Ordering::Relaxed),
        0,
        "pings lost across the restart (of {})",
        sent.load(Ordering::Relaxed)
    );
    assert!(
        mesh.log(n1).contains("using the running WireGuard device"),
        "the restarted agent kept the device"
    );
}

#[test]
fn malformed_records_are_rejected_and_the_mesh_keeps_working() {
    if !require_root() {
        return;
    }
    let mut mesh = Mesh::new("full", false);
    let n1 = mesh.add_node("n1", "site", true);
    let n2 = mesh.add_node("n2", "site", true);
    mesh.start(n1);
    mesh.start(n2);
    assert!(mesh.eventually_pings(n1, n2, Duration::from_secs(20)));
    let cluster = mesh.cluster();
    let prefix = cluster.prefix();
    cluster
        .store
        .put(&format!("{prefix}nodes/garbage"), b"{not json", None)
        .unwrap();
    let bad_key = br#"{"name":"evil","location":"site","public_key":"AAAA","pod_cidr":"10.42.9.0/24","mesh_ip":"100.64.0.99"}"#;
    cluster
        .store
        .put(&format!("{prefix}nodes/evil"), bad_key, None)
        .unwrap();
    // The agents report the records, name the field, and keep forwarding.
    let reported = wait_until(Duration::from_secs(15), || {
        cluster.statuses().unwrap().iter().any(|s| {
            s.rejected
                .iter()
                .any(|r| r.contains("evil") && r.contains("public_key"))
        })
    });
    assert!(
        reported,
        "no agent reported the bad public_key; statuses: {:?}",
        cluster.statuses().unwrap()
    );
    assert!(
        mesh.ping(n1, n2) || mesh.eventually_pings(n1, n2, Duration::from_secs(3)),
        "the mesh stopped working"
    );
    let status = wiremesh()
        .args([
            "status",
            "--registry",
            &mesh.registry(),
            "--cluster",
            &mesh.cluster,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("REJECTED RECORDS") && text.contains("public_key"),
        "{text}"
    );
}
