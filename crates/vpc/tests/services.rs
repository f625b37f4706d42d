//! The rendered services ruleset, loaded with `nft -f` into a real VPC namespace and
//! exercised by real connections.
//!
//! The bed is the node layout of the design (Calico's pattern): a "VPC router"
//! namespace holds the ruleset and routes a /32 to each pod over a veth; every pod
//! namespace has its address as a /32 and a default route via 169.254.1.1, which the
//! router holds on each of its veths. One client pod, three backend pods.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use wiremesh_model::NodeName;
use wiremesh_testkit::{require_root, require_tool, veth_pair, wait_until, Netns};
use wiremesh_vpc::nft::{plan, udp_conntrack_flushes, ServicesPlan};
use wiremesh_vpc::snapshot::{Mesh, Records};
use wiremesh_vpc::{
    Endpoint, EndpointRecord, LabelSelector, NodeId, Service, ServiceRecord, VpcMemberRecord,
    VpcRecord, VpcSnapshot,
};

const VIP: &str = "10.96.0.11";
const BACKENDS: [&str; 3] = ["10.10.1.11", "10.10.1.12", "10.10.1.13"];
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

fn can_run() -> bool {
    require_root() && require_tool("nft")
}

/// A pod namespace at `addr`, routed through `router`.
fn pod(router: &Netns, name: &str, addr: &str) -> Netns {
    let ns = Netns::new(name).unwrap();
    let (pod_if, router_if) =
        veth_pair(&ns, router, &format!("{addr}/32"), "169.254.1.1/32").unwrap();
    ns.exec_ok(&["ip", "route", "add", "169.254.1.1", "dev", &pod_if])
        .unwrap();
    ns.exec_ok(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        &pod_if,
    ])
    .unwrap();
    router
        .exec_ok(&[
            "ip",
            "route",
            "add",
            &format!("{addr}/32"),
            "dev",
            &router_if,
        ])
        .unwrap();
    ns
}

struct Bed {
    router: Netns,
    clients: Vec<Netns>,
    /// Kept for their lifetime: the namespaces go when the bed drops.
    _backends: Vec<Netns>,
    /// The plan applied last, as the agent keeps it.
    applied: RefCell<Option<ServicesPlan>>,
}

impl Bed {
    /// Clients at 10.10.1.2, .3, ...; backends at [`BACKENDS`], each serving TCP 8080
    /// (says its address, then echoes lines) and UDP 5353 (answers with its address).
    fn new(clients: usize) -> Bed {
        let router = Netns::new("vpcr").unwrap();
        router
            .exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            .unwrap();
        let clients = (0..clients)
            .map(|i| pod(&router, &format!("cl{i}"), &format!("10.10.1.{}", i + 2)))
            .collect();
        let _backends = BACKENDS
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let ns = pod(&router, &format!("be{i}"), addr);
                serve(&ns, addr);
                ns
            })
            .collect();
        Bed {
            router,
            clients,
            _backends,
            applied: RefCell::new(None),
        }
    }

    /// Loads `plan` in one `nft -f` transaction, from the plan applied before.
    fn apply(&self, plan: &ServicesPlan) {
        let text = plan.render(self.applied.borrow().as_ref());
        if let Err(e) = load(&self.router, &text) {
            panic!("{e}\n{text}");
        }
        self.applied.replace(Some(plan.clone()));
    }
}

/// `nft -f -` in `ns`; its stderr on failure.
fn load(ns: &Netns, text: &str) -> Result<(), String> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name(), "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft -f failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn serve(ns: &Netns, addr: &str) {
    let name = addr.to_owned();
    let tcp = ns
        .run(|| TcpListener::bind("0.0.0.0:8080"))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for stream in tcp.incoming().flatten() {
            let name = name.clone();
            std::thread::spawn(move || {
                let mut w = stream.try_clone().unwrap();
                if writeln!(w, "{name}").is_err() {
                    return;
                }
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if writeln!(w, "{line}").is_err() {
                        return;
                    }
                }
            });
        }
    });
    let udp = ns.run(|| UdpSocket::bind("0.0.0.0:5353")).unwrap().unwrap();
    let name = addr.to_owned();
    std::thread::spawn(move || {
        let mut buf = [0; 64];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(name.as_bytes(), from);
        }
    });
}

fn vip(port: u16) -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), port)
}

/// Connects from `ns` to `addr`; the backend's first line is its name.
fn connect(ns: &Netns, addr: SocketAddr) -> std::io::Result<(String, TcpStream)> {
    ns.run(|| {
        let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
        stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
        let mut name = String::new();
        BufReader::new(stream.try_clone()?).read_line(&mut name)?;
        Ok((name.trim().to_owned(), stream))
    })
    .unwrap()
}

fn who(ns: &Netns) -> String {
    connect(ns, vip(80)).expect("connect through the VIP").0
}

fn node() -> NodeName {
    "n1".parse().unwrap()
}

/// The `blue` VPC's services plan on node n1, from registry-shaped JSON.
fn plan_for(service: serde_json::Value, endpoints: &[&str]) -> ServicesPlan {
    plan_with("10.96.0.0/24", service, endpoints)
}

/// The same in a dual-stack VPC whose services come from `service_cidr`.
fn plan_with(service_cidr: &str, service: serde_json::Value, endpoints: &[&str]) -> ServicesPlan {
    let mut svc = serde_json::json!({
        "vpc": "blue", "namespace": "web", "name": "db", "cluster_ip": VIP,
        "ports": [{"name": "http", "protocol": "TCP", "port": 80, "target_port": 8080},
                  {"name": "dns", "protocol": "UDP", "port": 53, "target_port": 5353}]
    });
    svc.as_object_mut()
        .unwrap()
        .extend(service.as_object().unwrap().clone());
    let endpoints: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|a| {
            serde_json::json!({
                "vpc": "blue", "namespace": "web", "service": "db", "address": a, "node": "n1"
            })
        })
        .collect();
    plan_of(service_cidr, &[svc], &endpoints)
}

/// Node n1's plan for the `blue` VPC (n1: 10.10.1.0/24 and fd10::/64; n2: 10.10.2.0/24
/// and fd10:0:0:2::/64) with these service and endpoint records.
fn plan_of(
    service_cidr: &str,
    services: &[serde_json::Value],
    endpoints: &[serde_json::Value],
) -> ServicesPlan {
    let vpc = serde_json::from_value::<VpcRecord>(serde_json::json!({
        "name": "blue", "id": 7, "pod_cidrs": ["10.10.0.0/16", "fd10::/56"],
        "service_cidr": service_cidr, "dns_zone": "cluster.local"
    }))
    .unwrap()
    .try_into()
    .unwrap();
    let member = |node: &str, cidrs: [&str; 2]| {
        VpcMemberRecord {
            vpc: "blue".into(),
            node: node.into(),
            pod_cidrs: cidrs.map(str::to_owned).to_vec(),
        }
        .try_into()
        .unwrap()
    };
    let records = Records {
        vpcs: vec![vpc],
        members: vec![
            member("n1", ["10.10.1.0/24", "fd10::/64"]),
            member("n2", ["10.10.2.0/24", "fd10:0:0:2::/64"]),
        ],
        services: services
            .iter()
            .map(|s| {
                let s: Service = serde_json::from_value::<ServiceRecord>(s.clone())
                    .unwrap()
                    .try_into()
                    .unwrap();
                s
            })
            .collect(),
        endpoints: endpoints
            .iter()
            .map(|e| {
                let e: Endpoint = serde_json::from_value::<EndpointRecord>(e.clone())
                    .unwrap()
                    .try_into()
                    .unwrap();
                e
            })
            .collect(),
        pods: Vec::new(),
    };
    let nodes = BTreeMap::from([(node(), NodeId(1)), ("n2".parse().unwrap(), NodeId(2))]);
    let mesh = Mesh {
        prefix: "fd77:aa:bbcc::/48".parse().unwrap(),
        nodes: &nodes,
    };
    let (snapshot, bad) = VpcSnapshot::build(records, mesh);
    assert!(bad.is_empty(), "{bad:?}");
    // Pods labelled `app: api` sit at 10.10.1.2 and fd10::2.
    let api_pods = |_: &LabelSelector| {
        vec![
            "10.10.1.2".parse::<IpAddr>().unwrap(),
            "fd10::2".parse().unwrap(),
        ]
    };
    plan(&snapshot.vpcs["blue"], &node(), &api_pods)
}

#[test]
fn connections_spread_over_the_backends() {
    if !can_run() {
        return;
    }
    let bed = Bed::new(1);
    bed.apply(&plan_for(serde_json::json!({}), &BACKENDS));
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..300 {
        *counts.entry(who(&bed.clients[0])).or_default() += 1;
    }
    println!("300 connections through the VIP: {counts:?}");
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (backend, n) in &counts {
        // 20–47 %: far outside what a fair 1/3 choice gives in 300 tries (p < 1e-6).
        assert!(
            (60..=141).contains(n),
            "{backend} got {n} of 300: {counts:?}"
        );
    }
}

#[test]
fn client_ip_affinity_pins_a_client_until_its_timeout() {
    if !can_run() {
        return;
    }
    let bed = Bed::new(1);
    let affine = serde_json::json!({"session_affinity": "ClientIP", "affinity_timeout_seconds": 1});
    bed.apply(&plan_for(affine.clone(), &BACKENDS));
    let first = who(&bed.clients[0]);
    for _ in 0..20 {
        assert_eq!(who(&bed.clients[0]), first);
    }
    // Changes to the service keep the pin while its endpoint stays (if they reset the
    // sets, six fresh picks would all land on `first` with p < 0.01).
    let other = BACKENDS.iter().copied().find(|b| *b != first).unwrap();
    for round in 0..6 {
        let endpoints = if round % 2 == 0 {
            vec![first.as_str(), other]
        } else {
            BACKENDS.to_vec()
        };
        bed.apply(&plan_for(affine.clone(), &endpoints));
        assert_eq!(who(&bed.clients[0]), first, "round {round}");
    }
    // Once idle past the timeout the client is free again: some later connection
    // lands elsewhere (each new pick stays on `first` with p = 1/3).
    assert!(wait_until(Duration::from_secs(15), || {
        std::thread::sleep(Duration::from_millis(1100)); // idle: the point of the test
        who(&bed.clients[0]) != first
    }));
}

#[test]
fn a_service_without_endpoints_refuses_at_once() {
    if !can_run() {
        return;
    }
    let bed = Bed::new(1);
    bed.apply(&plan_for(serde_json::json!({}), &[]));
    let err = connect(&bed.clients[0], vip(80)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    // UDP: ICMP port unreachable, seen by a connected socket.
    let err = bed.clients[0]
        .run(|| {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(vip(53))?;
            s.set_read_timeout(Some(CONNECT_TIMEOUT))?;
            s.send(b"q")?;
            s.recv(&mut [0; 64])
        })
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn replacing_the_ruleset_keeps_established_connections() {
    if !can_run() {
        return;
    }
    let bed = Bed::new(1);
    bed.apply(&plan_for(serde_json::json!({}), &BACKENDS));
    let (kept, stream) = connect(&bed.clients[0], vip(80)).unwrap();
    let remaining: Vec<&str> = BACKENDS.iter().copied().filter(|b| *b != kept).collect();
    let removed = remaining[0];
    let after: Vec<&str> = BACKENDS.iter().copied().filter(|b| *b != removed).collect();
    bed.apply(&plan_for(serde_json::json!({}), &after));

    let mut w = stream.try_clone().unwrap();
    let mut lines = BufReader::new(stream).lines();
    for i in 0..5 {
        writeln!(w, "ping {i}").unwrap();
        assert_eq!(lines.next().unwrap().unwrap(), format!("ping {i}"));
    }
    for _ in 0..30 {
        assert_ne!(
            who(&bed.clients[0]),
            removed,
            "a new connection reached the removed backend"
        );
    }
    // An agent restart knows no previous plan and replaces the table whole: the
    // connection lives on in conntrack all the same.
    bed.applied.replace(None);
    bed.apply(&plan_for(serde_json::json!({}), &after));
    writeln!(w, "after restart").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "after restart");
}

#[test]
fn draining_the_last_endpoint_keeps_its_connections_and_refuses_new_ones() {
    if !can_run() {
        return;
    }
    let bed = Bed::new(1);
    bed.apply(&plan_for(serde_json::json!({}), &BACKENDS[..1]));
    let (_, stream) = connect(&bed.clients[0], vip(80)).unwrap();
    // The endpoint turns unready (it is still alive): no endpoint is left.
    bed.apply(&plan_for(serde_json::json!({}), &[]));
    let err = connect(&bed.clients[0], vip(80)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    let mut w = stream.try_clone().unwrap();
    let mut lines = BufReader::new(stream).lines();
    writeln!(w, "still there").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "still there");
}

#[test]
fn a_one_way_udp_flow_leaves_a_removed_endpoint() {
    if !(can_run() && require_tool("conntrack")) {
        return;
    }
    let bed = Bed::new(1);
    let old = plan_for(serde_json::json!({}), &BACKENDS);
    bed.apply(&old);
    // One socket, one source port: every datagram is the same conntrack flow.
    let socket = bed.clients[0]
        .run(|| {
            let s = UdpSocket::bind("0.0.0.0:40000")?;
            s.connect(vip(53))?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            std::io::Result::Ok(s)
        })
        .unwrap()
        .unwrap();
    let ask = || {
        let mut buf = [0; 64];
        socket.send(b"q").ok()?;
        let n = socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    let pinned = ask().expect("an answer through the VIP");
    let rest: Vec<&str> = BACKENDS.iter().copied().filter(|b| *b != pinned).collect();
    let new = plan_for(serde_json::json!({}), &rest);
    bed.apply(&new);
    let flushes = udp_conntrack_flushes(&old, &new);
    assert_eq!(flushes.len(), 1, "{flushes:?}");
    // Without the flush the flow's entry keeps the old DNAT: the removed pod answers.
    assert_eq!(ask().as_deref(), Some(pinned.as_str()));
    for flush in &flushes {
        let args = flush.args();
        let mut cmd = vec!["conntrack"];
        cmd.extend(args.iter().map(String::as_str));
        bed.router.exec_ok(&cmd).unwrap();
    }
    let answer = ask().expect("an answer after the flush");
    assert!(rest.contains(&answer.as_str()), "{answer} answered");
}

#[test]
fn access_policy_admits_the_allowed_client_only() {
    if !can_run() {
        return;
    }
    let bed = Bed::new(2);
    // Client 0 is 10.10.1.2: allowed; client 1 (10.10.1.3) is not.
    let policy = serde_json::json!({"access": {"allowed_cidrs": ["10.10.1.2/32"]}});
    bed.apply(&plan_for(policy, &BACKENDS));
    assert!(BACKENDS.contains(&who(&bed.clients[0]).as_str()));
    let err = connect(&bed.clients[1], vip(80)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    // The backend side checks too: dialling a backend pod directly is refused.
    let direct = SocketAddr::new(BACKENDS[0].parse().unwrap(), 8080);
    let err = connect(&bed.clients[1], direct).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    assert_eq!(connect(&bed.clients[0], direct).unwrap().0, BACKENDS[0]);
}

/// The IPv6 ruleset loads, and a second transaction from it too (syntax checked by
/// the kernel's nftables, not by us).
#[test]
fn an_ipv6_ruleset_loads() {
    if !can_run() {
        return;
    }
    let bed = Bed::new(0);
    let service = serde_json::json!({
        "cluster_ip": "fd96::11", "session_affinity": "ClientIP",
        "access": {"allowed_cidrs": ["fd10::/64", "10.10.0.0/16"]}
    });
    let endpoints = ["fd10::5", "fd10::6", "10.10.1.7"];
    let first = plan_with("fd96::/112", service.clone(), &endpoints);
    bed.apply(&first);
    bed.apply(&plan_with("fd96::/112", service, &endpoints[..1]));
    let listed = bed
        .router
        .exec_ok(&["nft", "list", "table", "ip6", "wmvpc"])
        .unwrap();
    assert!(listed.contains("dnat to [fd10::5]:8080"), "{listed}");
    assert!(!listed.contains("fd10::6"), "{listed}");
    // Back to IPv4 services: the IPv6 table goes.
    bed.apply(&plan_for(serde_json::json!({}), &BACKENDS));
    assert!(
        bed.router
            .exec(&["nft", "list", "table", "ip6", "wmvpc"])
            .unwrap()
            .status
            .code()
            != Some(0)
    );
}

/// Random services and endpoints of either family, every option: services, endpoint
/// records.
fn arb_records(
    v6: bool,
) -> impl Strategy<Value = (Vec<serde_json::Value>, Vec<serde_json::Value>)> {
    let long = "n".repeat(63);
    let service = (
        0usize..3,
        any::<bool>(),
        1u16..=65535,
        1u16..=65535,
        prop::option::of(1u32..=86400),
        any::<bool>(),
        prop::option::of(prop::collection::vec(0usize..4, 0..3)),
        prop::collection::vec((0u8..6, any::<bool>(), 0usize..3), 0..5),
    );
    prop::collection::vec(service, 0..6).prop_map(move |services| {
        let cidrs = ["10.10.0.0/16", "fd10::/60", "10.10.1.2/32", "fd10::2/128"];
        let mut svcs = Vec::new();
        let mut eps = Vec::new();
        for (i, (ns, udp, port, target, affinity, local, access, endpoints)) in
            services.into_iter().enumerate()
        {
            let namespace = ["web", "db", long.as_str()][ns];
            let name = format!("s{i}");
            let cluster_ip = if v6 { format!("fd96::{:x}", 0x20 + i) } else { format!("10.96.0.{}", 20 + i) };
            let mut svc = serde_json::json!({
                "vpc": "blue", "namespace": namespace, "name": name, "cluster_ip": cluster_ip,
                "ports": [{"protocol": if udp { "UDP" } else { "TCP" }, "port": port, "target_port": target}],
                "internal_traffic_policy": if local { "Local" } else { "Cluster" },
            });
            if let Some(t) = affinity {
                svc["session_affinity"] = "ClientIP".into();
                svc["affinity_timeout_seconds"] = t.into();
            }
            if let Some(allowed) = access {
                svc["access"] = serde_json::json!({
                    "allowed_cidrs": allowed.iter().map(|c| cidrs[*c]).collect::<Vec<_>>(),
                    "allowed_pods": [{"app": "api"}],
                });
            }
            svcs.push(svc);
            for (host, on_n2, state) in endpoints {
                let n = if on_n2 { 2 } else { 1 };
                let address = if v6 { format!("fd10:0:0:{}::{:x}", if on_n2 { 2 } else { 0 }, 0x10 + host) } else { format!("10.10.{n}.{}", 10 + host) };
                let (ready, terminating) = [(true, false), (false, true), (false, false)][state];
                let ep = serde_json::json!({
                    "vpc": "blue", "namespace": namespace, "service": name, "address": address,
                    "node": format!("n{n}"), "ready": ready, "serving": ready || terminating,
                    "terminating": terminating
                });
                if !eps.contains(&ep) && !eps.iter().any(|e: &serde_json::Value| e["service"] == ep["service"] && e["namespace"] == ep["namespace"] && e["address"] == ep["address"]) {
                    eps.push(ep);
                }
            }
        }
        (svcs, eps)
    })
}

/// Any plan loads, and so does the transaction from any plan to any other (the
/// incremental path deletes exactly what the kernel has).
#[test]
fn any_change_between_random_plans_loads() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("nftfz").unwrap();
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 24,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let plans = (
        any::<bool>(),
        arb_records(false),
        arb_records(false),
        arb_records(true),
    )
        .prop_map(|(to_v6, (s1, e1), (s2, e2), (s3, e3))| {
            let first = plan_of("10.96.0.0/24", &s1, &e1);
            let second = if to_v6 {
                plan_of("fd96::/112", &s3, &e3)
            } else {
                plan_of("10.96.0.0/24", &s2, &e2)
            };
            (first, second)
        });
    runner
        .run(&plans, |(first, second)| {
            for (text, what) in [
                (first.render(None), "first from scratch"),
                (second.render(Some(&first)), "second from first"),
                (first.render(Some(&second)), "back to first"),
                (first.render(Some(&first)), "first again"),
            ] {
                if let Err(e) = load(&ns, &text) {
                    return Err(TestCaseError::fail(format!("{what}: {e}\n{text}")));
                }
            }
            Ok(())
        })
        .unwrap();
}
