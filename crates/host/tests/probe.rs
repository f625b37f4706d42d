//! `probe::ping` in a real network namespace.

use std::time::Duration;

use wiremesh_host::probe;
use wiremesh_testkit::{require_root, require_tool, Netns};

/// A lost echo request (here: nftables drops sequence number 0, as a not-yet-usable
/// address or neighbour would) is followed by another, so the probe still answers
/// "reachable" within its timeout; and an address that never answers times out.
#[test]
fn ping_survives_a_lost_first_request() {
    if !require_root() || !require_tool("nft") {
        return;
    }
    let ns = Netns::new("probe").expect("namespace");
    ns.exec_ok(&[
        "nft",
        "add table inet t; \
         add chain inet t in { type filter hook input priority 0; }; \
         add rule inet t in icmp type echo-request icmp sequence 0 counter drop; \
         add rule inet t in icmpv6 type echo-request icmpv6 sequence 0 counter drop",
    ])
    .unwrap();
    for dst in ["127.0.0.1", "::1"] {
        let dst: std::net::IpAddr = dst.parse().unwrap();
        let rtt = ns
            .run(move || probe::ping(dst, Duration::from_secs(2)))
            .unwrap();
        // The round trip is the answered (second) request's, not time since the first.
        assert!(
            rtt.as_ref().is_ok_and(|t| *t < Duration::from_millis(150)),
            "{dst}: {rtt:?}"
        );
    }
    let rules = ns.exec_ok(&["nft", "list", "table", "inet", "t"]).unwrap();
    assert_eq!(
        rules.matches("packets 1 ").count(),
        2,
        "one request of each family was dropped: {rules}"
    );
    ns.exec_ok(&["nft", "add rule inet t in ip daddr 127.0.0.2 drop"])
        .unwrap();
    let lost = ns
        .run(|| probe::ping([127, 0, 0, 2], Duration::from_millis(500)))
        .unwrap();
    assert!(
        lost.as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::TimedOut),
        "{lost:?}"
    );
}
