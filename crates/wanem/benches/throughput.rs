//! How much TCP the hub carries with no impairment, next to a plain veth pair: the
//! hub must not be the bottleneck of an HTTP benchmark through a VPN (~1 Gbit/s).
//!
//! `cargo bench -p wiremesh-wanem --bench throughput` (root, iperf3 installed).

use std::process::{Command, Stdio};
use std::time::Duration;

use wiremesh_testkit::{require_root, require_tool, unique_ifname, veth_pair, wait_until, Netns};
use wiremesh_wanem::{Hub, Impairment, PortSpec};

const SECONDS: &str = "5";

/// TCP throughput from `client` to `server_addr` in `server` with `streams` streams,
/// in Gbit/s as the receiver counted it.
fn iperf3_gbps(client: &Netns, server: &Netns, server_addr: &str, streams: u32) -> f64 {
    let mut daemon = Command::new("ip")
        .args(["netns", "exec", server.name()])
        .args(["timeout", "30", "iperf3", "-s", "-1", "-B", server_addr])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("starting iperf3 -s");
    assert!(wait_until(Duration::from_secs(5), || {
        server
            .exec_ok(&["ss", "-Hltn", "sport = :5201"])
            .is_ok_and(|o| !o.trim().is_empty())
    }));
    let streams = streams.to_string();
    let report = client
        .exec_ok(&[
            "timeout", "30", "iperf3", "-c", server_addr, "-t", SECONDS, "-P", &streams, "-J",
        ])
        .expect("iperf3 client");
    let _ = daemon.wait();
    let received = report
        .rfind("\"sum_received\"")
        .expect("no sum_received in the iperf3 report");
    report[received..]
        .split("\"bits_per_second\":")
        .nth(1)
        .and_then(|rest| rest.split([',', '}']).next())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("no rate in the iperf3 report")
        / 1e9
}

fn main() {
    if !require_root() || !require_tool("iperf3") {
        return;
    }
    let (a, b) = (Netns::new("bench0").unwrap(), Netns::new("bench1").unwrap());
    veth_pair(&a, &b, "10.78.0.1/24", "10.78.0.2/24").unwrap();
    for streams in [1, 4] {
        let veth = iperf3_gbps(&a, &b, "10.78.0.2", streams);
        println!("veth,  {streams} TCP stream(s): {veth:.2} Gbit/s");
    }
    for mtu in [1500, 9000] {
        let ports = [(&a, "10.77.0.1/24"), (&b, "10.77.0.2/24")]
            .into_iter()
            .map(|(ns, addr)| PortSpec {
                netns: ns.name().to_owned(),
                ifname: unique_ifname("wanb"),
                addresses: vec![addr.parse().unwrap()],
                mtu,
            })
            .collect();
        let hub = Hub::start(1, ports).unwrap();
        hub.set_all(Impairment::default()).unwrap();
        for streams in [1, 4] {
            let gbps = iperf3_gbps(&a, &b, "10.77.0.2", streams);
            println!("hub, MTU {mtu}, {streams} TCP stream(s): {gbps:.2} Gbit/s");
        }
    }
}
