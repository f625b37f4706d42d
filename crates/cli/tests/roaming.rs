//! A node whose underlay address changes while traffic runs (a DHCP lease to a new
//! address, a host moved to another network). WireGuard follows a peer to wherever
//! its packets come from, but the moved node may have nothing to send: its peers
//! keep sending to the old address until a handshake timer fires (15 s and more).
//! The agent notices the move and has its device send every peer a keepalive at
//! once, so traffic resumes within a few seconds; and it publishes the endpoint at
//! the new address, so a peer that loses its session still finds the node.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use support::{ip, Mesh, Pinger};
use wiremesh_testkit::{require_root, wait_until};

/// Far below the 15 s (KEEPALIVE + REKEY_TIMEOUT) after which the peer would start
/// a handshake of its own, which would still go to the old address.
const RESUMES_WITHIN: Duration = Duration::from_secs(5);

#[test]
fn traffic_follows_a_node_whose_address_changes() {
    if !require_root() {
        return;
    }
    let (mesh, n1, n2) = Mesh::pair();
    // Traffic runs: n1's pod pings n2's pod back to back.
    let pinger = Pinger::start(&mesh, n1, n2);
    assert!(
        wait_until(Duration::from_secs(10), || pinger.counts().0 >= 5),
        "the pinger did not start"
    );
    let node = &mesh.nodes[n2];
    let old = node.lan_ip;
    let new = Ipv4Addr::new(10, 99, 0, old.octets()[3] + 100);
    // The move: the old address goes, a new one on the same network comes.
    ip(&[
        "-n",
        node.ns.name(),
        "address",
        "del",
        &format!("{old}/24"),
        "dev",
        "eth0",
    ]);
    ip(&[
        "-n",
        node.ns.name(),
        "address",
        "add",
        &format!("{new}/24"),
        "dev",
        "eth0",
    ]);
    let moved = Instant::now();
    let resumed = wait_until(RESUMES_WITHIN, || mesh.ping(n1, n2));
    let took = moved.elapsed();
    let (sent, lost) = pinger.stop();
    println!(
        "traffic resumed {:.2} s after the move ({lost} of {sent} pings lost in all)",
        took.as_secs_f64()
    );
    assert!(
        resumed,
        "n1 did not reach n2 within {RESUMES_WITHIN:?} of its move:\n{}",
        mesh.log(n2)
    );
    // The registry names n2 at its new address.
    let want = SocketAddr::from((new, 51820));
    let published = wait_until(Duration::from_secs(5), || {
        let snapshot = mesh.cluster().snapshot().expect("snapshot").0;
        snapshot
            .nodes
            .iter()
            .any(|n| n.name.as_str() == "n2" && n.public_endpoint == Some(want))
    });
    assert!(published, "n2's record does not name {want}");
}
