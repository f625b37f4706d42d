//! How much TCP the hub carries with no impairment, next to a plain veth pair: the
//! hub must not be the bottleneck of an HTTP benchmark through a VPN (~1 Gbit/s).
//!
//! `cargo bench -p wiremesh-wanem --bench throughput` (root, iperf3 installed).

use std::process::{Command, Stdio};
use std::time::Duration;

use wiremesh_testkit::{require_root, require_tool, unique_ifname, veth_pair, wait_until, Netns};
use wiremesh_wanem::{Hub, Impairment, PortSpec};

const SECONDS: &str = "5";

/// Throughput from `client` to `server_addr` in `server` with iperf3 `flags` (TCP
/// unless `-u`), in Gbit/s as the receiver counted it.
fn iperf3_gbps(client: &Netns, server: &Netns, server_addr: &str, flags: &[&str]) -> f64 {
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
    let mut args = vec![
        "timeout",
        "30",
        "iperf3",
        "-c",
        server_addr,
        "-t",
        SECONDS,
        "-J",
    ];
    args.extend_from_slice(flags);
    let report = client.exec_ok(&args).expect("iperf3 client");
    let _ = daemon.wait();
    // TCP reports what arrived in "sum_received"; UDP in "sum" (with the server's
    // loss count applied).
    let received = report
        .rfind("\"sum_received\"")
        .or_else(|| report.rfind("\"sum\""))
        .expect("no sum in the iperf3 report");
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
    let cases: [(&str, &[&str]); 3] = [
        ("1 TCP stream", &["-P", "1"]),
        ("4 TCP streams", &["-P", "4"]),
        ("UDP 1400 B", &["-u", "-b", "0", "-l", "1400"]),
    ];
    for (name, flags) in cases {
        let veth = iperf3_gbps(&a, &b, "10.78.0.2", flags);
        println!("veth, {name}: {veth:.2} Gbit/s");
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
        for (name, flags) in cases {
            let gbps = iperf3_gbps(&a, &b, "10.77.0.2", flags);
            println!("hub, MTU {mtu}, {name}: {gbps:.2} Gbit/s");
        }
        // Any impairment sends every packet through the link model one by one, and
        // a delay through the scheduler thread.
        hub.set_all(Impairment {
            delay: Duration::from_micros(500),
            ..Impairment::default()
        })
        .unwrap();
        let gbps = iperf3_gbps(&a, &b, "10.77.0.2", &["-P", "1"]);
        println!("hub, MTU {mtu}, 0.5 ms delay each way, 1 TCP stream: {gbps:.2} Gbit/s");
    }
}
