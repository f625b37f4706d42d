//! The OpenVPN, tinc, SoftEther and Nebula drivers against the real programs.
//!
//! Each test builds a small bed: a master and two workers as network namespaces on a
//! bridge (the underlay), the second worker behind a NAT router, each worker with a
//! pod namespace answering TCP on its pod address. It brings the VPN up in one shape and proves what the benchmark relies on:
//! the master (and a worker) reach every pod through the tunnel while nftables
//! counters on every underlay interface see none of that TCP in the clear; in the
//! hub-and-spoke shape no worker sends anything to another worker's underlay address;
//! after `down()` the pods are unreachable, every process is gone and no link is left.
//! A VPN that is not installed is skipped with a printed reason.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use wiremesh_edge_bench::vpn::nebula::Nebula;
use wiremesh_edge_bench::vpn::openvpn::OpenVpn;
use wiremesh_edge_bench::vpn::softether::SoftEther;
use wiremesh_edge_bench::vpn::tinc::Tinc;
use wiremesh_edge_bench::vpn::{Bed, Host, Role, Shape, Vpn, VpnError};
use wiremesh_testkit::{require_root, require_tool, unique_ifname, veth_pair, wait_until, Netns};

const POD_PORT: u16 = 8080;
const WORKERS: u8 = 2;

/// One host of the bed: its namespace and underlay link (and a worker's pod).
struct Node {
    ns: Netns,
    underlay_if: String,
    /// Where the others reach it on the WAN (a NAT router's address for w2).
    public: Ipv4Addr,
    /// A worker's pod namespace, kept for the bed's lifetime.
    _pod: Option<Netns>,
}

struct TestBed {
    bed: Bed,
    nodes: Vec<Node>,
    _routers: Vec<Netns>,
    // Dropped last: the bridge outlives the hosts' links into it.
    _wan: Netns,
    _work: tempfile::TempDir,
}

fn sh(ns: &Netns, args: &[&str]) {
    ns.exec_ok(args).unwrap();
}

/// Counts the pod port's TCP leaving `underlay_if` in the clear (either direction,
/// sent or forwarded), and everything sent to each other host's underlay address.
fn install_counters(node: &Node, others: &[Ipv4Addr]) {
    let mut rules = format!(
        "table inet wmtest {{\n counter plain {{}}\n counter pod_port {{}}\n{}\n",
        others
            .iter()
            .map(|a| format!(" counter to_{} {{}}\n", a.octets()[3]))
            .collect::<String>()
    );
    for hook in ["output", "forward"] {
        rules += &format!(
            " chain {hook} {{ type filter hook {hook} priority 0; policy accept;\n  \
             oifname \"{ul}\" tcp dport {POD_PORT} counter name plain\n  \
             oifname \"{ul}\" tcp sport {POD_PORT} counter name plain\n  \
             tcp dport {POD_PORT} counter name pod_port\n",
            ul = node.underlay_if
        );
        for a in others {
            rules += &format!("  ip daddr {a} counter name to_{}\n", a.octets()[3]);
        }
        rules += " }\n";
    }
    rules += "}\n";
    apply_nft(&node.ns, &rules);
}

fn apply_nft(ns: &Netns, rules: &str) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), rules).unwrap();
    sh(ns, &["nft", "-f", &file.path().to_string_lossy()]);
}

fn counter(ns: &Netns, name: &str) -> u64 {
    let out = ns
        .exec_ok(&["nft", "list", "counter", "inet", "wmtest", name])
        .unwrap();
    let words: Vec<&str> = out.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == "packets")
        .expect("nft prints packets");
    words[at + 1].parse().unwrap()
}

/// What worker `i`'s pod answers: its name, padded so that full-size segments
/// have to cross the tunnel (a wrong tunnel MTU shows here).
fn pod_reply(worker: u8) -> String {
    format!("w{worker}") + &".".repeat(256 * 1024)
}

/// A pod that answers every connection with `reply`.
fn serve_pod(pod: &Netns, addr: SocketAddr, reply: String) {
    let listener = pod.run(move || TcpListener::bind(addr)).unwrap().unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(reply.as_bytes());
        }
    });
}

/// Whether `from` gets worker `i`'s whole reply from its pod.
fn reaches_pod(from: &Netns, worker: u8) -> bool {
    fetch(from, pod_addr(worker)).is_some_and(|r| r == pod_reply(worker))
}

/// What `from` reads from the pod at `to`, if it connects within a second.
fn fetch(from: &Netns, to: SocketAddr) -> Option<String> {
    from.run(move || {
        let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(1)).ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut reply = String::new();
        conn.read_to_string(&mut reply).ok()?;
        Some(reply)
    })
    .unwrap()
}

fn pod_addr(worker: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 78, worker, 2)), POD_PORT)
}

/// Plugs `ns` into the bridge in `wan` with `addr` (a /24); its interface name.
fn attach_to_wan(wan: &Netns, ns: &Netns, addr: Ipv4Addr) -> String {
    let inside = unique_ifname("ul");
    let port = unique_ifname("br");
    // Created straight in the namespaces: nothing touches the host's.
    #[rustfmt::skip]
    sh(wan, &["ip", "link", "add", &port, "type", "veth", "peer", "name", &inside, "netns", ns.name()]);
    sh(wan, &["ip", "link", "set", &port, "master", "br0", "up"]);
    sh(
        ns,
        &["ip", "addr", "add", &format!("{addr}/24"), "dev", &inside],
    );
    sh(ns, &["ip", "link", "set", &inside, "up"]);
    inside
}

/// Puts `worker` behind a NAT router on the WAN at `public`; the router namespace
/// and the worker's interface towards it.
fn behind_nat(wan: &Netns, worker: &Netns, public: Ipv4Addr) -> (Netns, String) {
    let router = Netns::new("nat").unwrap();
    let outside = attach_to_wan(wan, &router, public);
    let (_, inside) = veth_pair(&router, worker, "192.168.78.1/24", "192.168.78.2/24").unwrap();
    sh(
        worker,
        &["ip", "route", "add", "default", "via", "192.168.78.1"],
    );
    sh(&router, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    apply_nft(
        &router,
        &format!(
            "table ip nat {{\n chain post {{\n  type nat hook postrouting priority srcnat;\n  \
             oifname \"{outside}\" masquerade\n }}\n}}\n"
        ),
    );
    (router, inside)
}

/// A master and two workers; w2 sits behind a NAT, as an edge node often does.
fn build_bed() -> TestBed {
    let wan = Netns::new("wan").unwrap();
    sh(&wan, &["ip", "link", "add", "br0", "type", "bridge"]);
    sh(&wan, &["ip", "link", "set", "br0", "up"]);
    let work = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    let mut hosts = Vec::new();
    let mut routers = Vec::new();
    for i in 0..=WORKERS {
        let name = if i == 0 {
            "master".to_string()
        } else {
            format!("w{i}")
        };
        let ns = Netns::new(&name).unwrap();
        let public = Ipv4Addr::new(192, 168, 77, 1 + i);
        let nat = i == WORKERS;
        let (underlay, underlay_if) = if nat {
            let (router, inside) = behind_nat(&wan, &ns, public);
            routers.push(router);
            (Ipv4Addr::new(192, 168, 78, 2), inside)
        } else {
            (public, attach_to_wan(&wan, &ns, public))
        };
        sh(&ns, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
        let pod = (i > 0).then(|| {
            let pod = Netns::new(&format!("pod{i}")).unwrap();
            let (gateway, addr) = (format!("10.78.{i}.1"), format!("10.78.{i}.2/24"));
            veth_pair(&ns, &pod, &format!("{gateway}/24"), &addr).unwrap();
            sh(&pod, &["ip", "route", "add", "default", "via", &gateway]);
            serve_pod(&pod, pod_addr(i), pod_reply(i));
            pod
        });
        hosts.push(Host {
            name: name.clone(),
            role: if i == 0 { Role::Master } else { Role::Worker },
            netns: ns.name().to_string(),
            underlay: IpAddr::V4(underlay),
            underlay_if: underlay_if.clone(),
            pod_cidr: (i > 0).then(|| format!("10.78.{i}.0/24").parse().unwrap()),
            overlay: IpAddr::V4(Ipv4Addr::new(10, 77, 0, 1 + i)),
            behind_nat: nat,
        });
        nodes.push(Node {
            ns,
            underlay_if,
            public,
            _pod: pod,
        });
    }
    for node in &nodes {
        let others: Vec<Ipv4Addr> = nodes
            .iter()
            .map(|n| n.public)
            .filter(|a| *a != node.public)
            .collect();
        install_counters(node, &others);
    }
    TestBed {
        bed: Bed {
            hosts,
            overlay_cidr: "10.77.0.0/24".parse().unwrap(),
            work_dir: work.path().to_path_buf(),
            underlay_mtu: 1500,
        },
        nodes,
        _routers: routers,
        _wan: wan,
        _work: work,
    }
}

fn links(ns: &Netns) -> BTreeSet<String> {
    ns.exec_ok(&["ip", "-o", "link", "show"])
        .unwrap()
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .collect()
}

fn installed(vpn: &dyn Vpn) -> bool {
    if !require_root() || !require_tool("nft") {
        return false;
    }
    match vpn.check_installed() {
        Ok(()) => true,
        Err(e @ VpnError::NotInstalled { .. }) => {
            println!("skipped: {e}");
            false
        }
        Err(e) => panic!("check_installed: {e}"),
    }
}

/// Key files, and the vpncmd batches holding passwords, are readable by root only.
fn assert_private_files_are_private(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            assert_private_files_are_private(&path);
        } else if path
            .extension()
            .is_some_and(|e| e == "key" || e == "priv" || e == "vpncmd")
        {
            let mode = meta.permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} has mode {mode:o}", path.display());
        }
    }
}

/// The tail of every daemon's log, to see why a bring-up failed.
fn print_logs(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            println!("--- {}", path.display());
            for line in &lines[lines.len().saturating_sub(40)..] {
                println!("{line}");
            }
        }
    }
}

/// The control for the "no plaintext" check: routed over the bare underlay, pod
/// traffic does show in the counters. They are zeroed again afterwards.
fn check_counters_see_plaintext(t: &TestBed) {
    let (master, w1) = (&t.nodes[0], &t.nodes[1]);
    let route = [
        "ip",
        "route",
        "add",
        "10.78.1.0/24",
        "via",
        &w1.public.to_string(),
    ];
    sh(&master.ns, &route);
    assert!(
        reaches_pod(&master.ns, 1),
        "the bare underlay reaches w1's pod"
    );
    assert!(
        counter(&master.ns, "plain") > 0,
        "plaintext on the underlay is counted"
    );
    sh(&master.ns, &["ip", "route", "del", "10.78.1.0/24"]);
    for node in &t.nodes {
        sh(
            &node.ns,
            &["nft", "reset", "counters", "table", "inet", "wmtest"],
        );
    }
}

/// Up, prove the pods are reached only through the tunnel, down, prove nothing is left.
fn check_vpn(mut vpn: impl Vpn, shape: Shape) {
    if !installed(&vpn) {
        return;
    }
    assert!(vpn.shapes().contains(&shape));
    let t = build_bed();
    let links_before: Vec<_> = t.nodes.iter().map(|n| links(&n.ns)).collect();
    let (master, w1) = (&t.nodes[0], &t.nodes[1]);

    // Without the VPN there is no route to a pod: the check below can fail.
    assert_eq!(fetch(&master.ns, pod_addr(1)), None);
    check_counters_see_plaintext(&t);

    let started = Instant::now();
    if let Err(e) = vpn.up(&t.bed, shape) {
        print_logs(&t.bed.work_dir);
        panic!("{} up: {e}", vpn.name());
    }
    println!("{} {shape:?}: up in {:?}", vpn.name(), started.elapsed());
    let pids = vpn.pids();
    assert!(!pids.is_empty(), "a daemon runs on every host");

    for i in 1..=WORKERS {
        // The first packets may race the last routes of a fresh tunnel.
        assert!(
            wait_until(Duration::from_secs(10), || reaches_pod(&master.ns, i)),
            "the master reaches w{i}'s pod"
        );
    }
    assert!(
        wait_until(Duration::from_secs(10), || reaches_pod(&w1.ns, 2)),
        "w1 reaches w2's pod"
    );
    assert_private_files_are_private(&t.bed.work_dir);
    assert!(
        counter(&master.ns, "pod_port") > 0,
        "the master's pod traffic was counted"
    );
    for node in &t.nodes {
        assert_eq!(
            counter(&node.ns, "plain"),
            0,
            "pod TCP left {} in the clear",
            node.ns.name()
        );
    }
    let w2_public = t.nodes[2].public;
    let w1_to_w2 = counter(&w1.ns, &format!("to_{}", w2_public.octets()[3]));
    match shape {
        Shape::HubAndSpoke => assert_eq!(
            w1_to_w2, 0,
            "w1 sent to w2 directly in the hub-and-spoke shape"
        ),
        Shape::Mesh => assert!(w1_to_w2 > 0, "w1 tunnels to w2 directly in the mesh shape"),
    }

    vpn.down().unwrap();
    vpn.down().expect("down is idempotent");
    assert_eq!(
        fetch(&master.ns, pod_addr(1)),
        None,
        "traffic stops with the VPN"
    );
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} still runs"
        );
    }
    assert!(vpn.pids().is_empty());
    for (node, before) in t.nodes.iter().zip(links_before) {
        assert_eq!(links(&node.ns), before, "links left in {}", node.ns.name());
    }
}

#[test]
fn tinc_hub_and_spoke() {
    check_vpn(Tinc::new(), Shape::HubAndSpoke);
}

#[test]
fn tinc_mesh() {
    check_vpn(Tinc::new(), Shape::Mesh);
}

#[test]
fn openvpn_hub_and_spoke() {
    check_vpn(OpenVpn::new(), Shape::HubAndSpoke);
}

#[test]
fn openvpn_refuses_the_mesh_shape() {
    let bed = Bed {
        hosts: Vec::new(),
        overlay_cidr: "10.77.0.0/24".parse().unwrap(),
        work_dir: std::env::temp_dir(),
        underlay_mtu: 1500,
    };
    let err = OpenVpn::new().up(&bed, Shape::Mesh).unwrap_err();
    assert!(
        matches!(
            err,
            VpnError::Unsupported {
                shape: Shape::Mesh,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn nebula_hub_and_spoke() {
    check_vpn(Nebula::new(), Shape::HubAndSpoke);
}

#[test]
fn nebula_mesh() {
    check_vpn(Nebula::new(), Shape::Mesh);
}

#[test]
fn softether_hub_and_spoke() {
    check_vpn(SoftEther::new(), Shape::HubAndSpoke);
}
