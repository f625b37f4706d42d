//! VPCs end to end: two real agents with `wiremesh-wg` devices on two nodes, two VPCs
//! made with `wiremesh vpc create` on one pod CIDR, pods plugged into the agents' VPC
//! namespaces as the CNI plugin does (`wiremesh_host::pod`), and a service made with
//! `wiremesh service create` whose VIP reaches its backend on the other node and
//! follows it when it moves (issue 8, tests 1 to 3 across nodes, 8 by CIDR); a VIP
//! balancing over backends on both nodes, with and without ClientIP affinity (test 4);
//! a one-way UDP flow leaving a removed endpoint (test 5); an agent restart that drops
//! no connection (test 7); and a pod added by the real
//! `wiremesh-cni` plugin, which asks the agent for its VPC.

mod support;
#[path = "support/vpc.rs"]
mod vpc_support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::Mesh;
use vpc_support::{
    agent_pid, attach_pod, attempt, cli, cluster_ip, cni, cni_conf, fetch, join_vpc, serve_tag,
    VpcNamespaces,
};
use wiremesh_agent::vpc::{LocalVpc, VPCS_DIR};
use wiremesh_testkit::{require_root, wait_until, Netns};

/// A pod of one VPC on one node, serving its own name on port 80.
struct Pod {
    ns: Netns,
    ip: std::net::Ipv4Addr,
}

/// A pod in the VPC namespace `node_ns`, plugged in as the CNI plugin does, at
/// host `n` of the node's block.
fn plug(local: &LocalVpc, node_ns: &str, n: usize, tag: &str) -> Pod {
    let (ns, ip) = attach_pod(local, node_ns, n);
    serve_tag(&ns, ip, tag.to_owned());
    Pod { ns, ip }
}

/// Port 80 of `ip` (as the CLI prints it), where every pod serves its tag.
fn port80(ip: impl std::fmt::Display) -> SocketAddr {
    format!("{ip}:80").parse().unwrap()
}

/// Two started nodes, VPCs blue (id 7) and green (id 9) on one pod CIDR, and a pod of
/// each VPC on each node, n1's before n2's so both VPCs give the nodes the same
/// blocks: `pods` are blue-n1, green-n1, blue-n2, green-n2, at identical addresses
/// in both VPCs.
struct Bed {
    pods: Vec<Pod>,
    /// Each pod's VPC: the agent's answer, and its namespace as this test names it.
    locals: Vec<(LocalVpc, String)>,
    /// Held for its Drop, before the mesh's (which stops the agents).
    _namespaces: VpcNamespaces,
    mesh: Mesh,
}

impl Bed {
    fn new() -> Bed {
        let (mesh, n1, n2) = Mesh::pair();
        for (name, id) in [("blue", "7"), ("green", "9")] {
            cli(
                &mesh,
                &format!("vpc create {name} --id {id} --pod-cidr 10.10.0.0/16"),
            );
        }
        let mut namespaces = VpcNamespaces::default();
        let (mut pods, mut locals) = (Vec::new(), Vec::new());
        for (i, vpc, tag) in [
            (n1, "blue", "blue-n1"),
            (n1, "green", "green-n1"),
            (n2, "blue", "blue-n2"),
            (n2, "green", "green-n2"),
        ] {
            let local = join_vpc(&mesh, i, vpc);
            assert_eq!(local.mtu, 1380, "1420 less the 40-byte outer header");
            let alias = namespaces.bind(agent_pid(&mesh, i), &local.netns);
            pods.push(plug(&local, &alias, 1, tag));
            locals.push((local, alias));
        }
        assert_eq!((pods[0].ip, pods[2].ip), (pods[1].ip, pods[3].ip));
        Bed {
            pods,
            locals,
            _namespaces: namespaces,
            mesh,
        }
    }
}

const PATIENCE: Duration = Duration::from_secs(20);

#[test]
fn overlapping_vpcs_span_nodes_and_a_service_vip_reaches_the_other_node() {
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let mut bed = Bed::new();
    let mesh = &bed.mesh;
    let dup = mesh.wiremesh(&[
        "vpc",
        "create",
        "red",
        "--id",
        "7",
        "--pod-cidr",
        "10.20.0.0/16",
    ]);
    assert!(!dup.status.success());
    let stderr = String::from_utf8_lossy(&dup.stderr);
    assert!(stderr.contains("id"), "{stderr}");
    let [blue1, green1, blue2, green2] = &bed.pods[..] else {
        unreachable!()
    };

    // Across nodes, each VPC reaches its own pod at the very same address.
    let b2 = blue2.ip.to_string();
    assert_eq!(
        fetch(&blue1.ns, port80(&b2), PATIENCE).as_deref(),
        Ok("blue-n2")
    );
    assert_eq!(
        fetch(&green1.ns, port80(&b2), PATIENCE).as_deref(),
        Ok("green-n2")
    );
    let b1 = blue1.ip.to_string();
    assert_eq!(
        fetch(&green2.ns, port80(&b1), PATIENCE).as_deref(),
        Ok("green-n1")
    );

    // An address only blue has: blue reaches it, green (the same CIDR) does not.
    let (blue_n2, ns) = &bed.locals[2];
    let only_blue = plug(blue_n2, ns, 3, "blue-only").ip.to_string();
    assert_eq!(
        fetch(&blue1.ns, port80(&only_blue), PATIENCE).as_deref(),
        Ok("blue-only")
    );
    assert!(fetch(&green1.ns, port80(&only_blue), Duration::from_secs(2)).is_err());

    // A service in blue, its one endpoint on n2: the VIP from n1 lands there.
    let vip = cluster_ip(&cli(mesh, "service create blue/web/db --port http:80/tcp"));
    cli(mesh, &format!("endpoints blue/web/db --add {b2} --node n2"));
    assert_eq!(
        fetch(&blue1.ns, port80(&vip), PATIENCE).as_deref(),
        Ok("blue-n2")
    );
    // green has no such service: its pods cannot reach blue's VIP.
    assert!(fetch(&green1.ns, port80(&vip), Duration::from_secs(2)).is_err());
    // Access policy: only blue1's address may call db2; another pod of blue is refused.
    let line = format!("service create blue/web/db2 --port http:80/tcp --allow {b1}/32");
    let vip2 = cluster_ip(&cli(mesh, &line));
    cli(
        mesh,
        &format!("endpoints blue/web/db2 --add {b2} --node n2"),
    );
    assert_eq!(
        fetch(&blue1.ns, port80(&vip2), PATIENCE).as_deref(),
        Ok("blue-n2")
    );
    let (blue_n1, ns) = &bed.locals[0];
    let other = plug(blue_n1, ns, 2, "blue-other");
    assert_eq!(
        fetch(&other.ns, port80(&vip), PATIENCE).as_deref(),
        Ok("blue-n2")
    );
    let refused = fetch(&other.ns, port80(&vip2), Duration::from_secs(2)).unwrap_err();
    assert!(refused.contains("ConnectionRefused"), "{refused}");

    let listed = cli(mesh, "endpoints blue/web/db");
    assert!(listed.contains(&format!("{b2}\tn2")), "{listed}");

    // n2's agent stops: the endpoints on n2 expire with its lease (3 s here), and
    // the VIP refuses at once instead of sending clients to a node nobody runs.
    bed.mesh.stop(1);
    let stopped = Instant::now();
    let vip = port80(&vip);
    let refused = || attempt(&blue1.ns, vip) == Err(std::io::ErrorKind::ConnectionRefused);
    assert!(
        wait_until(PATIENCE, refused),
        "n2's endpoint outlived its lease"
    );
    eprintln!(
        "a dead node's endpoint left the VIP after {:?}",
        stopped.elapsed()
    );
    eprintln!("VPC test took {:?}", started.elapsed());
}

#[test]
fn a_vip_follows_its_backend_to_another_node_and_a_vpc_leaves_with_its_last_pod() {
    if !require_root() {
        return;
    }
    let bed = Bed::new();
    let mesh = &bed.mesh;
    let [blue1, _, blue2, _] = &bed.pods[..] else {
        unreachable!()
    };
    let out = cli(mesh, "service create blue/web/db --port http:80/tcp");
    let vip = port80(cluster_ip(&out));
    let b2 = blue2.ip.to_string();
    cli(mesh, &format!("endpoints blue/web/db --add {b2} --node n2"));
    assert_eq!(fetch(&blue1.ns, vip, PATIENCE).as_deref(), Ok("blue-n2"));

    // The backend moves from n2 to a new pod on n1 (a new address) while the client,
    // which never resolves anything again, calls the VIP every 50 ms.
    let (blue_n1, ns) = &bed.locals[0];
    let moved_pod = plug(blue_n1, ns, 2, "blue-n1");
    let b1 = moved_pod.ip.to_string();
    cli(mesh, &format!("endpoints blue/web/db --remove {b2}"));
    let mut log: Vec<(Duration, Result<String, std::io::ErrorKind>)> = Vec::new();
    let start = Instant::now();
    let mut moved = false;
    while start.elapsed() < PATIENCE {
        let outcome = attempt(&blue1.ns, vip);
        let refused = outcome == Err(std::io::ErrorKind::ConnectionRefused);
        log.push((start.elapsed(), outcome));
        if refused && !moved {
            cli(mesh, &format!("endpoints blue/web/db --add {b1} --node n1"));
            moved = true;
        }
        if log.last().unwrap().1.as_deref() == Ok("blue-n1") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let summary: Vec<String> = log.iter().map(|(t, o)| format!("{t:.2?} {o:?}")).collect();
    let first_refusal = log.iter().find(|(_, o)| o.is_err()).map(|(t, _)| *t);
    let back = log.last().filter(|(_, o)| o.as_deref() == Ok("blue-n1"));
    assert!(
        back.is_some(),
        "the VIP never reached the moved backend:\n{summary:#?}"
    );
    // While it had no endpoint the VIP refused at once: never a hang.
    assert!(
        log.iter()
            .all(|(_, o)| matches!(o, Ok(_) | Err(std::io::ErrorKind::ConnectionRefused))),
        "{summary:#?}"
    );
    eprintln!(
        "moving backend: first refusal at {first_refusal:?}, back at {:?} on n1 ({} calls)",
        back.unwrap().0,
        log.len()
    );

    // green's last pod on n2 leaves (the plugin's last DEL removes its directory):
    // the agent gives n2's block back and removes the namespace.
    let dir = mesh.state_dir(1).join(VPCS_DIR).join("green");
    std::fs::remove_dir_all(&dir).unwrap();
    let agent_ns = format!(
        "/proc/{}/root/run/netns/{}",
        agent_pid(mesh, 1),
        bed.locals[3].0.netns
    );
    assert!(
        wait_until(PATIENCE, || !std::path::Path::new(&agent_ns).exists()),
        "n2 kept green's namespace:\n{}",
        mesh.log(1)
    );
    let shown = cli(mesh, "vpc show green");
    assert!(
        shown.contains("member n1") && !shown.contains("member n2"),
        "{shown}"
    );
    // blue on n2 is untouched.
    assert_eq!(
        fetch(&blue1.ns, port80(&b2), PATIENCE).as_deref(),
        Ok("blue-n2")
    );
}

#[test]
fn a_pod_added_by_the_cni_plugin_joins_its_vpc_across_nodes() {
    if !require_root() || !wiremesh_testkit::require_tool("nsenter") {
        return;
    }
    if !wiremesh_testkit::cargo_bin("wiremesh-cni").exists() {
        wiremesh_testkit::skip("build wiremesh-cni first (cargo build -p wiremesh-cni)");
        return;
    }
    let bed = Bed::new();
    let [_, _, blue2, _] = &bed.pods[..] else {
        unreachable!()
    };
    let conf = cni_conf(&bed.mesh, 0, "blue");
    let ctr = Netns::new("cpod").unwrap();
    let args = "K8S_POD_NAMESPACE=web";
    let result = cni(&bed.mesh, 0, "ADD", "c1", &ctr, args, &conf);
    let ip = result["ips"][0]["address"].as_str().unwrap().to_owned();
    assert!(ip.starts_with("10.10.0."), "n1's block of blue: {result}");
    assert_eq!(result["interfaces"][1]["mtu"], 1380, "{result}");
    assert_eq!(result["dns"]["nameservers"][0], "10.96.0.10", "{result}");
    assert_eq!(
        result["dns"]["search"][0], "web.svc.cluster.local",
        "{result}"
    );
    let pod = Pod {
        ns: ctr,
        ip: ip.trim_end_matches("/32").parse().unwrap(),
    };
    assert_eq!(
        fetch(&pod.ns, port80(blue2.ip), PATIENCE).as_deref(),
        Ok("blue-n2")
    );
    cni(&bed.mesh, 0, "DEL", "c1", &pod.ns, args, &conf);
}

/// The tag `vip:80` answers from `client`, for each of `n` new connections.
fn tags(client: &Pod, vip: SocketAddr, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| attempt(&client.ns, vip).unwrap_or_else(|e| panic!("connection {i}: {e:?}")))
        .collect()
}

/// Creates service `name` in blue with `endpoints` (address, node) and `extra`
/// flags; its VIP's port 80.
fn service_on(bed: &Bed, name: &str, extra: &str, endpoints: &[(&Pod, &str)]) -> SocketAddr {
    let mesh = &bed.mesh;
    let out = cli(
        mesh,
        &format!("service create {name} --port http:80/tcp {extra}"),
    );
    let vip = port80(cluster_ip(&out));
    for (pod, node) in endpoints {
        let ip = pod.ip;
        cli(mesh, &format!("endpoints {name} --add {ip} --node {node}"));
    }
    vip
}

#[test]
fn a_vip_balances_over_backends_on_both_nodes_and_affinity_pins_a_client_until_its_timeout() {
    if !require_root() {
        return;
    }
    let bed = Bed::new();
    let [client, _, blue2, _] = &bed.pods[..] else {
        unreachable!()
    };
    // Three backends: one beside the client on n1, two on n2.
    let (blue_n1, ns1) = &bed.locals[0];
    let (blue_n2, ns2) = &bed.locals[2];
    let local = plug(blue_n1, ns1, 2, "n1-a");
    let remote = plug(blue_n2, ns2, 2, "n2-b");
    let backends = [(&local, "n1"), (blue2, "n2"), (&remote, "n2")];
    let all: BTreeSet<&str> = ["n1-a", "blue-n2", "n2-b"].into();

    let vip = service_on(&bed, "blue/web/lb", "", &backends);
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let every_backend_seen = wait_until(PATIENCE, || {
        // Until the ruleset and routes are in place, calls fail: keep trying.
        seen.extend(attempt(&client.ns, vip));
        seen.iter().map(String::as_str).collect::<BTreeSet<_>>() == all
    });
    assert!(every_backend_seen, "the VIP chose only {seen:?}");
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for tag in tags(client, vip, 300) {
        *counts.entry(tag).or_default() += 1;
    }
    eprintln!("300 connections through the VIP: {counts:?}");
    for tag in &all {
        let share = counts.get(*tag).copied().unwrap_or(0) * 100 / 300;
        assert!((20..=47).contains(&share), "{tag}: {share} % of {counts:?}");
    }

    // ClientIP affinity, 2 s: back-to-back connections stay on one backend; after
    // 2 s of silence the pin is gone and the choice is random again (1/3 of the
    // time the same backend: up to 10 rounds before calling it stuck).
    let timeout = Duration::from_secs(2);
    let sticky = service_on(
        &bed,
        "blue/web/sticky",
        "--affinity client-ip --affinity-timeout 2",
        &backends,
    );
    assert!(
        wait_until(PATIENCE, || attempt(&client.ns, sticky).is_ok()),
        "the sticky VIP never answered"
    );
    std::thread::sleep(timeout + Duration::from_millis(500));
    let mut pins = Vec::new();
    for _ in 0..10 {
        let round = tags(client, sticky, 20);
        assert!(
            round.iter().all(|t| t == &round[0]),
            "affinity did not pin the client: {round:?}"
        );
        pins.push(round[0].clone());
        if pins.iter().any(|p| p != &pins[0]) {
            break;
        }
        // Silence longer than the timeout: the client's entry expires.
        std::thread::sleep(timeout + Duration::from_millis(500));
    }
    eprintln!("pinned backend, one 20-connection round each: {pins:?}");
    assert!(
        pins.iter().any(|p| p != &pins[0]),
        "the pin outlived its timeout for {} rounds: {pins:?}",
        pins.len()
    );
}

/// Datagrams a UDP sink in `pod` received on `port`, by the sender's source port.
type Received = Arc<Mutex<BTreeMap<u16, u64>>>;

fn udp_sink(pod: &Pod, port: u16) -> Received {
    let received: Received = Arc::default();
    let socket = pod
        .ns
        .run(|| UdpSocket::bind((pod.ip, port)))
        .unwrap()
        .unwrap();
    let counts = received.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = socket.recv_from(&mut buf) {
            *counts.lock().unwrap().entry(from.port()).or_default() += 1;
        }
    });
    received
}

fn count(received: &Received, port: u16) -> u64 {
    received.lock().unwrap().get(&port).copied().unwrap_or(0)
}

#[test]
fn a_one_way_udp_flow_leaves_a_removed_endpoint_on_another_node() {
    if !require_root() {
        return;
    }
    let bed = Bed::new();
    let mesh = &bed.mesh;
    let [client, _, blue2, _] = &bed.pods[..] else {
        unreachable!()
    };
    let (blue_n1, ns1) = &bed.locals[0];
    let local = plug(blue_n1, ns1, 2, "n1-a");
    const PORT: u16 = 5353;
    let (remote_rx, local_rx) = (udp_sink(blue2, PORT), udp_sink(&local, PORT));
    let out = cli(mesh, "service create blue/web/feed --port feed:5353/udp");
    let vip: SocketAddr = format!("{}:{PORT}", cluster_ip(&out)).parse().unwrap();
    let b2 = blue2.ip.to_string();
    cli(
        mesh,
        &format!("endpoints blue/web/feed --add {b2} --node n2"),
    );

    // The flow: one socket, a datagram every 20 ms, never reading a reply. Errors
    // a send reports (ICMP unreachable on an earlier datagram) are counted.
    let socket = client
        .ns
        .run(|| UdpSocket::bind("0.0.0.0:0"))
        .unwrap()
        .unwrap();
    socket.connect(vip).unwrap();
    let flow = socket.local_addr().unwrap().port();
    let refused = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sender = {
        let (refused, done) = (refused.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Err(e) = socket.send(b"tick") {
                    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let on_remote = wait_until(PATIENCE, || count(&remote_rx, flow) > 5);
    assert!(on_remote, "the flow never reached the backend on n2");

    // A second endpoint, beside the client: new flows may land there, this one
    // stays (its conntrack entry says where it goes).
    let a = local.ip.to_string();
    cli(
        mesh,
        &format!("endpoints blue/web/feed --add {a} --node n1"),
    );
    let mut probes = Vec::new();
    let in_ruleset = wait_until(PATIENCE, || {
        // A new source port each time, until one has landed on the new endpoint.
        let probe = client
            .ns
            .run(|| UdpSocket::bind("0.0.0.0:0"))
            .unwrap()
            .unwrap();
        let _ = probe.send_to(b"probe", vip);
        probes.push(probe.local_addr().unwrap().port());
        probes.iter().any(|p| count(&local_rx, *p) > 0)
    });
    assert!(in_ruleset, "the second endpoint never took a new flow");
    let before = count(&local_rx, flow);
    assert_eq!(before, 0, "the flow moved without cause");

    // The flow's endpoint is removed: its conntrack entry goes with it, and the flow
    // (which never receives anything) moves to the remaining endpoint.
    cli(mesh, &format!("endpoints blue/web/feed --remove {b2}"));
    let removed = Instant::now();
    assert!(
        wait_until(PATIENCE, || count(&local_rx, flow) > 0),
        "the flow stayed on the removed endpoint:\n{}",
        mesh.log(0)
    );
    let moved = removed.elapsed();
    let stale = count(&remote_rx, flow);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(count(&remote_rx, flow), stale, "datagrams still go to n2");

    // No endpoint left: the flow is refused (ICMP port unreachable), never black-holed.
    cli(mesh, &format!("endpoints blue/web/feed --remove {a}"));
    let emptied = Instant::now();
    assert!(
        wait_until(PATIENCE, || refused.load(Ordering::Relaxed) > 0),
        "the flow was not refused with no endpoint"
    );
    let rejected = emptied.elapsed();
    done.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    eprintln!("one-way UDP flow: moved {moved:?} after its endpoint was removed, refused {rejected:?} after the last one was");
    assert!(moved < Duration::from_secs(5), "moved only after {moved:?}");
}

/// An echo server on `pod`'s port 7.
fn echo_server(pod: &Pod) {
    let addr = SocketAddr::from((pod.ip, 7));
    let listener = pod.ns.run(|| TcpListener::bind(addr)).unwrap().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut back = conn.try_clone().unwrap();
                let _ = std::io::copy(&mut &conn, &mut back);
            });
        }
    });
}

/// One long-lived TCP connection from a pod, exchanging a message with an echo
/// server every 20 ms: the longest wait for an answer and the first failure.
struct Conversation {
    done: Arc<AtomicBool>,
    exchanges: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<(Duration, Option<String>)>,
}

impl Conversation {
    fn start(from: &Pod, to: SocketAddr) -> Conversation {
        let mut conn = from
            .ns
            .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)))
            .unwrap()
            .unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (done, exchanges) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let thread = {
            let (done, exchanges) = (done.clone(), exchanges.clone());
            std::thread::spawn(move || {
                let mut longest = Duration::ZERO;
                while !done.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let n = exchanges.load(Ordering::Relaxed).to_be_bytes();
                    let mut answer = [0u8; 8];
                    let exchanged = conn
                        .write_all(&n)
                        .and_then(|()| conn.read_exact(&mut answer));
                    match exchanged {
                        Ok(()) if answer == n => {}
                        Ok(()) => return (longest, Some(format!("{answer:?} for {n:?}"))),
                        Err(e) => return (longest, Some(e.to_string())),
                    }
                    longest = longest.max(sent.elapsed());
                    exchanges.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
                (longest, None)
            })
        };
        Conversation {
            done,
            exchanges,
            thread,
        }
    }

    fn exchanges(&self) -> u64 {
        self.exchanges.load(Ordering::Relaxed)
    }

    /// The longest round trip, and the first failure.
    fn stop(self) -> (Duration, Option<String>) {
        self.done.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

#[test]
fn an_agent_restart_drops_no_connection_through_a_vip_or_between_pods() {
    if !require_root() {
        return;
    }
    let mut bed = Bed::new();
    let [client, _, blue2, _] = &bed.pods[..] else {
        unreachable!()
    };
    echo_server(blue2);
    let out = cli(&bed.mesh, "service create blue/web/echo --port echo:7/tcp");
    let vip: SocketAddr = format!("{}:7", cluster_ip(&out)).parse().unwrap();
    let b2 = blue2.ip.to_string();
    cli(
        &bed.mesh,
        &format!("endpoints blue/web/echo --add {b2} --node n2"),
    );
    let vip_up = wait_until(PATIENCE, || {
        client
            .ns
            .run(|| TcpStream::connect_timeout(&vip, Duration::from_millis(500)).is_ok())
            .unwrap()
    });
    assert!(vip_up, "the VIP never answered");
    let through_vip = Conversation::start(client, vip);
    let direct = Conversation::start(client, SocketAddr::from((blue2.ip, 7)));
    let talking = || through_vip.exchanges() > 10 && direct.exchanges() > 10;
    assert!(
        wait_until(PATIENCE, talking),
        "the conversations never began"
    );

    // n1's agent (the client's node) stops and starts again; the device and the
    // namespaces stay, and the new agent must take them over as they are.
    let before = (through_vip.exchanges(), direct.exchanges());
    bed.mesh.stop(0);
    bed.mesh.start(0);
    // Its node record outlived it (under the lease), so `start` returns at once.
    let took_over = || {
        bed.mesh
            .log(0)
            .contains("using the running WireGuard device")
    };
    assert!(wait_until(PATIENCE, took_over), "{}", bed.mesh.log(0));
    // The restarted agent applies a change (its first ruleset replaces the table it
    // did not know; this one updates it): the new VIP answers.
    let out = cli(
        &bed.mesh,
        "service create blue/web/echo2 --port http:80/tcp",
    );
    cli(
        &bed.mesh,
        &format!("endpoints blue/web/echo2 --add {b2} --node n2"),
    );
    let vip2 = cluster_ip(&out);
    assert_eq!(
        fetch(&client.ns, port80(&vip2), PATIENCE).as_deref(),
        Ok("blue-n2")
    );
    let more = || through_vip.exchanges() > before.0 + 50 && direct.exchanges() > before.1 + 50;
    assert!(wait_until(PATIENCE, more), "the conversations stalled");

    let (vip_longest, vip_failure) = through_vip.stop();
    let (direct_longest, direct_failure) = direct.stop();
    eprintln!(
        "across the agent's restart: longest round trip {vip_longest:?} through the VIP, {direct_longest:?} pod to pod"
    );
    assert_eq!(vip_failure, None, "the connection through the VIP broke");
    assert_eq!(direct_failure, None, "the pod-to-pod connection broke");
    let log = bed.mesh.log(0);
    assert!(!log.contains("replacing a VPC namespace"), "{log}");
    for longest in [vip_longest, direct_longest] {
        assert!(
            longest < Duration::from_secs(1),
            "a round trip took {longest:?}"
        );
    }
}
