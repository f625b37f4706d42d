//! IPv6 pods in VPCs (issue 8), end to end: two real agents with `wiremesh-wg`
//! devices, two dual-stack VPCs on the very same pod CIDRs (blue and green), pods
//! added by the real `wiremesh-cni` plugin. Each pod gets an IPv6 address at its
//! IPv4 address's offset in its node's IPv6 block; a pod reaches its VPC's pod on
//! the other node over IPv6 (ping and TCP); the other VPC, on either node, never
//! reaches it; and a packet whose inner IPv6 source is not its node's is dropped
//! by the receiving node, counted by reason.

mod support;
#[path = "support/vpc.rs"]
mod vpc_support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use support::Mesh;
use vpc_support::{agent_pid, cli, cluster_ip, cni, cni_conf_labelled, fetch, join_vpc, serve_tag};
use wiremesh_host::uapi_client;
use wiremesh_testkit::{require_root, require_tool, wait_until, Netns};

const PATIENCE: Duration = Duration::from_secs(20);

/// A container the plugin added, serving its tag on port 80 of both its addresses.
struct Pod {
    ns: Netns,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
}

/// Adds a pod with `labels` to `vpc` on node `i` through the plugin, serving `tag` on
/// port 80 of every address; its namespace and the addresses the plugin gave it.
fn add(
    mesh: &Mesh,
    i: usize,
    vpc: &str,
    tag: &str,
    labels: &[(&str, &str)],
) -> (Netns, Vec<IpAddr>) {
    let ns = Netns::new("v6pod").unwrap();
    let conf = cni_conf_labelled(mesh, i, vpc, labels);
    let result = cni(mesh, i, "ADD", tag, &ns, "K8S_POD_NAMESPACE=web", &conf);
    let ips = result["ips"]
        .as_array()
        .unwrap_or_else(|| panic!("no ips: {result}"))
        .iter()
        .map(|ip| {
            ip["address"]
                .as_str()
                .and_then(|a| a.parse::<IpNet>().ok())
                .unwrap_or_else(|| panic!("not an address: {ip}"))
                .addr()
        })
        .collect();
    serve_tag(&ns, Ipv6Addr::UNSPECIFIED, tag.to_owned());
    (ns, ips)
}

/// A dual-stack pod (see [`add`]).
fn add_pod(mesh: &Mesh, i: usize, vpc: &str, tag: &str, labels: &[(&str, &str)]) -> Pod {
    let (ns, ips) = add(mesh, i, vpc, tag, labels);
    let [IpAddr::V4(v4), IpAddr::V6(v6)] = ips[..] else {
        panic!("not an IPv4 and an IPv6 address: {ips:?}");
    };
    Pod { ns, v4, v6 }
}

fn pings(pod: &Pod, dst: Ipv6Addr) -> bool {
    let dst = dst.to_string();
    pod.ns
        .exec_ok(&["ping", "-6", "-c", "1", "-W", "1", &dst])
        .is_ok()
}

/// The node's IPv4 and IPv6 blocks of a VPC, from its agent's answer.
fn blocks(cidrs: &[IpNet]) -> (Ipv4Net, Ipv6Net) {
    let v4 = cidrs.iter().find_map(|c| match c {
        IpNet::V4(b) => Some(*b),
        IpNet::V6(_) => None,
    });
    let v6 = cidrs.iter().find_map(|c| match c {
        IpNet::V6(b) => Some(*b),
        IpNet::V4(_) => None,
    });
    (v4.expect("an IPv4 block"), v6.expect("an IPv6 block"))
}

/// Node `i`'s device's drops whose inner source was outside the sender's block.
fn inner_source_drops(mesh: &Mesh, i: usize) -> u64 {
    let socket = format!(
        "/proc/{}/root/run/wireguard/{}.sock",
        agent_pid(mesh, i),
        mesh.nodes[i].ifname
    );
    let stats = uapi_client::stats(socket.as_ref()).expect("device stats");
    stats
        .dropped
        .get("inner_source_outside")
        .copied()
        .unwrap_or(0)
}

#[test]
fn dual_stack_vpc_pods_reach_their_vpc_over_ipv6_and_nothing_else() {
    if !(require_root() && require_tool("nsenter") && require_tool("ping")) {
        return;
    }
    if !wiremesh_testkit::cargo_bin("wiremesh-cni").exists() {
        wiremesh_testkit::skip("build wiremesh-cni first (cargo build -p wiremesh-cni)");
        return;
    }
    let started = Instant::now();
    let (mesh, n1, n2) = Mesh::pair();
    for (name, id) in [("blue", 7), ("green", 9)] {
        let line =
            format!("vpc create {name} --id {id} --pod-cidr 10.10.0.0/16 --pod-cidr fd10::/56");
        cli(&mesh, &line);
    }
    // n1 joins both first, so both VPCs give each node the same blocks; each agent
    // hosts them before the plugin's first ADD, which waits only 10 s.
    let mut locals = Vec::new();
    for (i, vpc) in [(n1, "blue"), (n1, "green"), (n2, "blue"), (n2, "green")] {
        locals.push(blocks(&join_vpc(&mesh, i, vpc).pod_cidrs));
    }
    assert_eq!((locals[0], locals[2]), (locals[1], locals[3]));
    let blue1 = add_pod(&mesh, n1, "blue", "blue-n1", &[]);
    let green1 = add_pod(&mesh, n1, "green", "green-n1", &[]);
    let blue2 = add_pod(&mesh, n2, "blue", "blue-n2", &[("app", "web")]);
    let green2 = add_pod(&mesh, n2, "green", "green-n2", &[]);

    // Each pod's IPv6 address: its IPv4 address's offset in its node's IPv6 block.
    for (pod, (v4, v6)) in [(&blue1, locals[0]), (&blue2, locals[2])] {
        let offset = u32::from(pod.v4) - u32::from(v4.network());
        assert!(v4.contains(&pod.v4), "{} outside {v4}", pod.v4);
        assert_eq!(
            pod.v6,
            Ipv6Addr::from(u128::from(v6.network()) + u128::from(offset))
        );
    }
    assert_eq!((blue1.v6, blue2.v6), (green1.v6, green2.v6));

    // Across nodes over IPv6: ping, and TCP to the VPC's own pod at that address.
    assert!(
        wait_until(PATIENCE, || pings(&blue1, blue2.v6)),
        "blue-n1 never pinged {} over IPv6:\n{}",
        blue2.v6,
        mesh.log(n2)
    );
    assert_eq!(
        fetch(&blue1.ns, (blue2.v6, 80).into(), PATIENCE).as_deref(),
        Ok("blue-n2")
    );
    assert_eq!(
        fetch(&green1.ns, (blue2.v6, 80).into(), PATIENCE).as_deref(),
        Ok("green-n2")
    );
    assert_eq!(
        fetch(&blue2.ns, (blue1.v6, 80).into(), PATIENCE).as_deref(),
        Ok("blue-n1")
    );

    // One try, no retries: what `dst:80` answers `pod` now.
    let once = |pod: &Pod, dst: IpAddr| fetch(&pod.ns, (dst, 80).into(), Duration::ZERO);

    // An address only blue has, on n2: blue on n1 reaches it; green never does,
    // from the other node or from the same one.
    let only = add_pod(&mesh, n2, "blue", "blue-only", &[]);
    assert_eq!(
        fetch(&blue1.ns, (only.v6, 80).into(), PATIENCE).as_deref(),
        Ok("blue-only")
    );
    for green in [&green1, &green2] {
        assert!(once(green, only.v6.into()).is_err());
        assert!(!pings(green, only.v6));
    }

    // Access by label holds over IPv6 too: `guarded` (an IPv4 service) admits pods
    // labelled role=api only, so a pod dialling its backend's IPv6 address directly
    // meets the check its IPv4 address has; an admitted pod passes in both families.
    let api1 = add_pod(&mesh, n1, "blue", "api-n1", &[("role", "api")]);
    cli(
        &mesh,
        "service create blue/web/guarded --port http:80/tcp --selector app=web --allow role=api",
    );
    assert!(
        wait_until(PATIENCE, || once(&blue1, blue2.v6.into())
            .is_err_and(|e| e.contains("ConnectionRefused"))),
        "blue-n1 (no role=api) still reaches the backend's IPv6 address:\n{}",
        mesh.log(n2)
    );
    let refused = once(&blue1, blue2.v4.into());
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("ConnectionRefused")),
        "{refused:?}"
    );
    for dst in [IpAddr::V6(blue2.v6), IpAddr::V4(blue2.v4)] {
        assert_eq!(once(&api1, dst).as_deref(), Ok("blue-n2"), "{dst}");
    }

    // The source check: blue-n1 sends from an address of n2's block (as if it were
    // a pod there), then from its own. n2 delivers the second only, and counts the
    // first as dropped for its inner source.
    let spoofed = Ipv6Addr::from(u128::from(locals[2].1.network()) + 0x99);
    blue1
        .ns
        .exec_ok(&[
            "ip",
            "-6",
            "address",
            "add",
            &format!("{spoofed}/128"),
            "dev",
            "eth0",
            "nodad",
        ])
        .unwrap();
    let sink = blue2
        .ns
        .run(|| UdpSocket::bind("[::]:9999"))
        .unwrap()
        .unwrap();
    sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let drops_before = inner_source_drops(&mesh, n2);
    let to = SocketAddr::from((blue2.v6, 9999));
    blue1
        .ns
        .run(|| -> std::io::Result<()> {
            UdpSocket::bind(SocketAddr::from((spoofed, 0)))?.send_to(b"spoofed", to)?;
            UdpSocket::bind(SocketAddr::from((blue1.v6, 0)))?.send_to(b"own", to)?;
            Ok(())
        })
        .unwrap()
        .unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = sink.recv_from(&mut buf).expect("blue-n1's own datagram");
    assert_eq!(
        (&buf[..n], from.ip()),
        (&b"own"[..], IpAddr::V6(blue1.v6)),
        "the spoofed datagram was delivered (it went first)"
    );
    assert!(
        wait_until(Duration::from_secs(5), || inner_source_drops(&mesh, n2)
            > drops_before),
        "n2 counted no drop for the spoofed inner source"
    );

    eprintln!("IPv6 VPC test took {:?}", started.elapsed());
}

#[test]
fn an_ipv6_only_vpc_spans_nodes_and_its_ipv6_service_vip_reaches_the_other_node() {
    if !(require_root() && require_tool("nsenter")) {
        return;
    }
    if !wiremesh_testkit::cargo_bin("wiremesh-cni").exists() {
        wiremesh_testkit::skip("build wiremesh-cni first (cargo build -p wiremesh-cni)");
        return;
    }
    let (mesh, n1, n2) = Mesh::pair();
    cli(
        &mesh,
        "vpc create red --id 11 --pod-cidr fd30::/56 --service-cidr fd96::/112",
    );
    let block = |i: usize| match join_vpc(&mesh, i, "red").pod_cidrs[..] {
        [IpNet::V6(b)] => b,
        ref other => panic!("node {i}: not one IPv6 block: {other:?}"),
    };
    let (block1, block2) = (block(n1), block(n2));
    let only_v6 = |(ns, ips): (Netns, Vec<IpAddr>), block: Ipv6Net| match ips[..] {
        [IpAddr::V6(a)] if block.contains(&a) => (ns, a),
        _ => panic!("not one IPv6 address in {block}: {ips:?}"),
    };
    let (client, _) = only_v6(add(&mesh, n1, "red", "red-n1", &[]), block1);
    let (_server, server) = only_v6(add(&mesh, n2, "red", "red-n2", &[("app", "api")]), block2);

    // Pod to pod across nodes, then through the service's IPv6 VIP, whose endpoint
    // is the backend's selected IPv6 address.
    assert_eq!(
        fetch(&client, (server, 80).into(), PATIENCE).as_deref(),
        Ok("red-n2"),
        "{}",
        mesh.log(n2)
    );
    let created = cli(
        &mesh,
        "service create red/web/api --port http:80/tcp --selector app=api",
    );
    let vip: Ipv6Addr = cluster_ip(&created).parse().expect("an IPv6 clusterIP");
    assert!(
        "fd96::/112".parse::<Ipv6Net>().unwrap().contains(&vip),
        "{vip}"
    );
    assert_eq!(
        fetch(&client, (vip, 80).into(), PATIENCE).as_deref(),
        Ok("red-n2"),
        "{}",
        mesh.log(n1)
    );
}
