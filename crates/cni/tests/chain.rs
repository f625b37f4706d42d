//! `wiremesh-cni` first in a conflist, the reference `portmap` plugin (Debian's
//! containernetworking-plugins) after it, as libcni runs them: each plugin gets the
//! previous one's result as `prevResult`, DEL runs in reverse order. Then a client
//! outside the node reaches the container through the mapped host port.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use common::{address_of, invoke, netns_path, Call, PLUGIN};
use serde_json::json;
use wiremesh_host::probe;
use wiremesh_testkit::{require_root, require_tool, veth_pair, wait_until, Netns};

const PORTMAP: &str = "/usr/lib/cni/portmap";

#[test]
fn portmap_chained_after_wiremesh_cni() {
    if !require_root()
        || !require_tool("nsenter")
        || !require_tool(PORTMAP)
        || !require_tool("iptables")
    {
        return;
    }
    let node = Netns::new("cnode").expect("node namespace");
    let client = Netns::new("client").expect("client namespace");
    let ctr = Netns::new("cctr").expect("container namespace");
    veth_pair(&node, &client, "192.168.77.1/24", "192.168.77.2/24").expect("underlay");
    // The agent turns forwarding on for a real node; there is no agent here.
    node.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        .expect("enabling forwarding");
    let dir = tempfile::tempdir().expect("temp dir");
    let id = format!("chain-{}", wiremesh_testkit::random_suffix(6));
    let path = netns_path(&ctr);
    let call = |command| Call {
        command,
        container_id: &id,
        ifname: "eth0",
        netns: Some(&path),
    };

    // Debian's plugins (1.1.1) speak CNI up to 1.0.0: the conflist says 1.0.0.
    let ours = json!({
        "cniVersion": "1.0.0",
        "name": "wmchain",
        "type": "wiremesh-cni",
        "podCidr": "10.77.9.0/24",
        "dataDir": dir.path(),
    });
    let result = invoke(PLUGIN, &node, &call("ADD"), &ours).expect_ok("wiremesh-cni ADD");
    let ip = address_of(&result);
    let mut portmap = json!({
        "cniVersion": "1.0.0",
        "name": "wmchain",
        "type": "portmap",
        "capabilities": {"portMappings": true},
        "runtimeConfig": {"portMappings": [
            {"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}
        ]},
    });
    portmap["prevResult"] = result.clone();
    let chained = invoke(PORTMAP, &node, &call("ADD"), &portmap).expect_ok("portmap ADD");
    assert_eq!(
        address_of(&chained),
        ip,
        "portmap changed the result: {chained}"
    );
    assert_eq!(chained["interfaces"], result["interfaces"]);

    // CHECK walks the chain the same way, with the final result as prevResult.
    let mut ours_check = ours.clone();
    ours_check["prevResult"] = chained.clone();
    invoke(PLUGIN, &node, &call("CHECK"), &ours_check).expect_ok("wiremesh-cni CHECK");

    // A TCP echo server in the container, reached from the client via the node's port.
    let listener = ctr
        .run(|| TcpListener::bind("0.0.0.0:8080"))
        .expect("entering the container")
        .expect("binding in the container");
    std::thread::spawn(move || probe::serve_echo(listener));
    let mapped: SocketAddr = "192.168.77.1:18080".parse().unwrap();
    let reached = wait_until(Duration::from_secs(10), || {
        client
            .run(|| probe::tcp_echo(mapped, Duration::from_secs(1)).is_ok())
            .unwrap_or(false)
    });
    assert!(reached, "client could not reach {ip}:8080 through {mapped}");

    invoke(PORTMAP, &node, &call("DEL"), &portmap).expect_ok("portmap DEL");
    invoke(PLUGIN, &node, &call("DEL"), &ours).expect_ok("wiremesh-cni DEL");
    assert!(
        std::fs::read_dir(dir.path().join("wmchain"))
            .map(|d| d.flatten().all(|e| e
                .file_name()
                .to_str()
                .is_some_and(|n| n.parse::<std::net::Ipv4Addr>().is_err())))
            .unwrap_or(true),
        "address not freed"
    );
}
