//! VPC traffic through two real `wiremesh-wg` devices: each node hosts VPCs 7 and 9
//! in their own network namespaces, both VPCs on the *same* pod addresses
//! (10.10.1.0/24 on node 1, 10.10.2.0/24 on node 2), with the devices' TUN ports
//! opened inside those namespaces (`set_vpcs=1`). Pod addresses sit on the VPC
//! namespaces' `lo`, so a socket opened there is a pod's socket.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::{can_run, Family, Impl, Node, Pair};
use socket2::{Domain, Socket, Type};
use wiremesh_testkit::{wait_until, Netns};
use wiremesh_uapi::{DeviceStats, PeerConfig, SetRequest, VpcPlane, VpcsRequest};

const MESH: &str = "fd5e:1d2c:9a00::/48";
const NODE_A: u16 = 1;
const NODE_B: u16 = 2;
const VPC_TUN: &str = "wm-vpc";

struct Bed {
    pair: Pair,
    /// (VPC id, node id) → the VPC's namespace on that node.
    vpc_ns: Vec<((u32, u16), Netns)>,
}

impl Bed {
    fn ns(&self, vpc: u32, node: u16) -> &Netns {
        &self
            .vpc_ns
            .iter()
            .find(|(k, _)| *k == (vpc, node))
            .expect("namespace")
            .1
    }

    fn node(&self, id: u16) -> &Node {
        if id == NODE_A {
            &self.pair.a
        } else {
            &self.pair.b
        }
    }

    fn counters(&self, node: u16) -> DeviceStats {
        let reply = self.node(node).uapi("get_stats=1\n\n").expect("get_stats");
        DeviceStats::parse(&reply).expect("counters reply")
    }

    /// Sends node `node` the table: it hosts `vpcs`, each with both nodes' pod CIDRs.
    fn set_vpcs(&self, node: u16, vpcs: &[u32]) {
        let req = VpcsRequest {
            mesh_prefix: MESH.parse().unwrap(),
            local_node: node,
            vpcs: vpcs
                .iter()
                .map(|&id| VpcPlane {
                    id,
                    netns: format!("/var/run/netns/{}", self.ns(id, node).name()),
                    mtu: 1380,
                    members: vec![
                        (NODE_A, "10.10.1.0/24".parse().unwrap()),
                        (NODE_B, "10.10.2.0/24".parse().unwrap()),
                    ],
                })
                .collect(),
        };
        let reply = self.node(node).uapi(&req.render()).expect("set_vpcs");
        assert_eq!(reply.trim(), "errno=0", "set_vpcs on node {node}");
        for &id in vpcs {
            let ns = self.ns(id, node);
            assert!(
                wait_until(Duration::from_secs(5), || ns
                    .exec_ok(&["ip", "link", "show", VPC_TUN])
                    .is_ok()),
                "the device opened no {VPC_TUN} in VPC {id}'s namespace on node {node}"
            );
            let pod = pod_address(node);
            ns.exec_ok(&[
                "ip",
                "route",
                "replace",
                "10.10.0.0/16",
                "dev",
                VPC_TUN,
                "src",
                &pod,
            ])
            .expect("route to the VPC");
        }
    }
}

fn pod_address(node: u16) -> String {
    format!("10.10.{node}.2")
}

fn node_net(node: u16) -> String {
    format!("fd5e:1d2c:9a00:{node:x}::/64")
}

/// Two devices peered over IPv4, each peer allowed its node's VPC `/64`, and the
/// namespaces of `vpcs` on both nodes with their pod address on `lo`.
fn bed(vpcs: &[u32]) -> io::Result<Bed> {
    let pair = Pair::new(Impl::Wiremesh, Impl::Wiremesh, Family::V4)?;
    for (node, other, other_id) in [(&pair.a, &pair.b, NODE_B), (&pair.b, &pair.a, NODE_A)] {
        let mut peer = PeerConfig::new(other.public_key());
        peer.update_only = true;
        peer.allowed_ips = vec![node_net(other_id).parse().unwrap()];
        node.set(&SetRequest {
            peers: vec![peer],
            ..Default::default()
        })
        .map_err(io::Error::other)?;
    }
    let mut vpc_ns = Vec::new();
    for &vpc in vpcs {
        for node in [NODE_A, NODE_B] {
            let ns = Netns::new(&format!("v{vpc}n{node}"))?;
            ns.exec_ok(&[
                "ip",
                "addr",
                "add",
                &format!("{}/32", pod_address(node)),
                "dev",
                "lo",
            ])?;
            vpc_ns.push(((vpc, node), ns));
        }
    }
    Ok(Bed { pair, vpc_ns })
}

/// Serves one line naming `tag` to every connection on `addr:80` inside `ns`.
fn serve_tag(ns: &Netns, addr: &str, tag: &'static str) -> io::Result<()> {
    let addr: SocketAddr = format!("{addr}:80").parse().unwrap();
    let listener = ns.run(|| TcpListener::bind(addr))??;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let _ = conn.write_all(tag.as_bytes());
        }
    });
    Ok(())
}

/// Connects from `src:src_port` in `ns` to `dst:80` and reads the tag; retries while
/// the first handshake is under way, up to `patience`.
fn fetch(
    ns: &Netns,
    src: &str,
    src_port: u16,
    dst: &str,
    patience: Duration,
) -> io::Result<String> {
    let src: SocketAddr = format!("{src}:{src_port}").parse().unwrap();
    let dst: SocketAddr = format!("{dst}:80").parse().unwrap();
    ns.run(|| {
        let deadline = std::time::Instant::now() + patience;
        loop {
            let attempt = || -> io::Result<String> {
                let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                s.set_reuse_address(true)?;
                s.bind(&src.into())?;
                s.connect_timeout(&dst.into(), Duration::from_millis(700))?;
                let mut stream: TcpStream = s.into();
                stream.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut tag = String::new();
                stream.read_to_string(&mut tag)?;
                Ok(tag)
            };
            match attempt() {
                Ok(tag) if !tag.is_empty() => return Ok(tag),
                Ok(_) if std::time::Instant::now() > deadline => {
                    return Err(io::Error::other("empty reply"))
                }
                Err(e) if std::time::Instant::now() > deadline => return Err(e),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    })?
}

#[test]
fn vpcs_with_overlapping_cidrs_each_reach_their_own_pods() -> io::Result<()> {
    if !can_run(&[Impl::Wiremesh]) {
        return Ok(());
    }
    let bed = bed(&[7, 9])?;
    for node in [NODE_A, NODE_B] {
        bed.set_vpcs(node, &[7, 9]);
    }
    serve_tag(bed.ns(7, NODE_B), "10.10.2.2", "backend of VPC 7")?;
    serve_tag(bed.ns(9, NODE_B), "10.10.2.2", "backend of VPC 9")?;
    let patience = Duration::from_secs(10);
    // The same 5-tuple in both VPCs at once: each lands on its own VPC's backend.
    let (seven, nine) = std::thread::scope(|s| {
        let seven = s.spawn(|| fetch(bed.ns(7, NODE_A), "10.10.1.2", 40000, "10.10.2.2", patience));
        let nine = s.spawn(|| fetch(bed.ns(9, NODE_A), "10.10.1.2", 40000, "10.10.2.2", patience));
        (seven.join().unwrap(), nine.join().unwrap())
    });
    assert_eq!(seven?, "backend of VPC 7");
    assert_eq!(nine?, "backend of VPC 9");
    // It crossed the tunnel, encapsulated: both devices counted it.
    let (a, b) = (bed.counters(NODE_A), bed.counters(NODE_B));
    assert!(
        a.vpc_sent > 0 && b.vpc_delivered > 0,
        "node 1: {a:?}, node 2: {b:?}"
    );
    assert_eq!(a.vpcs, vec![7, 9]);
    // `wg` still reads the device as before.
    let shown = bed
        .pair
        .a
        .wg(&["show", &bed.pair.a.ifname, "allowed-ips"])?;
    assert!(shown.contains(&node_net(NODE_B)), "{shown}");
    Ok(())
}

#[test]
fn forged_foreign_and_unhosted_vpc_packets_are_dropped_and_counted() -> io::Result<()> {
    if !can_run(&[Impl::Wiremesh]) {
        return Ok(());
    }
    let bed = bed(&[7, 11])?;
    bed.set_vpcs(NODE_A, &[7, 11]);
    // Node 2 hosts only VPC 7.
    bed.set_vpcs(NODE_B, &[7]);
    serve_tag(bed.ns(7, NODE_B), "10.10.2.2", "backend of VPC 7")?;
    // A working path first, so the session is up and later failures mean drops.
    let ok = fetch(
        bed.ns(7, NODE_A),
        "10.10.1.2",
        40001,
        "10.10.2.2",
        Duration::from_secs(10),
    )?;
    assert_eq!(ok, "backend of VPC 7");

    // A pod claiming a source outside its node's CIDR in the VPC.
    let a7 = bed.ns(7, NODE_A);
    a7.exec_ok(&["ip", "addr", "add", "10.10.9.9/32", "dev", "lo"])?;
    let forged = fetch(a7, "10.10.9.9", 40002, "10.10.2.2", Duration::from_secs(1));
    assert!(
        forged.is_err(),
        "a forged inner source got through: {forged:?}"
    );
    // A VPC the receiving node does not host.
    let unhosted = fetch(
        bed.ns(11, NODE_A),
        "10.10.1.2",
        40003,
        "10.10.2.2",
        Duration::from_secs(1),
    );
    assert!(
        unhosted.is_err(),
        "a VPC node 2 does not host got through: {unhosted:?}"
    );

    let counted = wait_until(Duration::from_secs(5), || {
        let c = bed.counters(NODE_B);
        c.dropped
            .get("inner_source_outside")
            .is_some_and(|n| *n > 0)
            && c.dropped.get("unknown_vpc").is_some_and(|n| *n > 0)
    });
    assert!(
        counted,
        "node 2's drop counters: {:?}",
        bed.counters(NODE_B)
    );
    Ok(())
}

#[test]
fn a_vpc_removed_from_the_table_loses_its_tun_device() -> io::Result<()> {
    if !can_run(&[Impl::Wiremesh]) {
        return Ok(());
    }
    let bed = bed(&[7, 9])?;
    bed.set_vpcs(NODE_A, &[7, 9]);
    bed.set_vpcs(NODE_A, &[7]);
    let gone = wait_until(Duration::from_secs(5), || {
        bed.ns(9, NODE_A)
            .exec_ok(&["ip", "link", "show", VPC_TUN])
            .is_err()
    });
    assert!(gone, "VPC 9's TUN device outlived its table entry");
    assert!(bed
        .ns(7, NODE_A)
        .exec_ok(&["ip", "link", "show", VPC_TUN])
        .is_ok());
    assert_eq!(bed.counters(NODE_A).vpcs, vec![7]);
    // A table that does not parse changes nothing and is refused with EINVAL.
    let reply = bed
        .node(NODE_A)
        .uapi("set_vpcs=1\nmesh_prefix=fd00::/64\nlocal_node=1\n\n")?;
    assert_eq!(reply.trim(), "errno=-22");
    assert_eq!(bed.counters(NODE_A).vpcs, vec![7]);
    Ok(())
}
