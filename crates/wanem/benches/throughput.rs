//! How much TCP the hub carries with no impairment, next to a plain veth pair: the
//! hub must not be the bottleneck of an HTTP benchmark through a VPN (~1 Gbit/s).
//!
//! `cargo bench -p wiremesh-wanem --bench throughput` (root, iperf3 installed).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use wiremesh_testkit::{
    cargo_bin, require_root, require_tool, unique_ifname, veth_pair, wait_until, Netns,
};
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

/// Two wiremesh-wg devices, stopped on drop.
struct Tunnel {
    names: [String; 2],
    devices: Vec<Child>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        for device in &mut self.devices {
            // SAFETY: kill on the pid of a child we started and have not reaped.
            unsafe { libc::kill(device.id() as i32, libc::SIGTERM) };
            let _ = device.wait();
        }
    }
}

/// A wiremesh-wg tunnel between `a` (10.80.0.1) and `b` (10.80.0.2); `None` when
/// the binary is not built.
fn wg_tunnel(a: &Netns, b: &Netns, endpoints: [&str; 2]) -> Option<Tunnel> {
    let binary = cargo_bin("wiremesh-wg");
    if !binary.exists() || !require_tool("wg") {
        println!("skipped: the tunnel rows need wiremesh-wg built (cargo build --release -p wiremesh-wg) and wg");
        return None;
    }
    let keys: Vec<(String, String)> = (0..2)
        .map(|_| {
            let private = Command::new("wg").arg("genkey").output().unwrap().stdout;
            let mut pubkey = Command::new("wg")
                .arg("pubkey")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            pubkey.stdin.take().unwrap().write_all(&private).unwrap();
            let public = pubkey.wait_with_output().unwrap().stdout;
            let text = |b: Vec<u8>| String::from_utf8(b).unwrap().trim().to_owned();
            (text(private), text(public))
        })
        .collect();
    let mut tunnel = Tunnel {
        names: [unique_ifname("wmb"), unique_ifname("wmb")],
        devices: Vec::new(),
    };
    for (i, ns) in [a, b].into_iter().enumerate() {
        let name = &tunnel.names[i];
        tunnel.devices.push(
            ns.spawn(&["env", "RUST_LOG=warn", binary.to_str().unwrap(), "-f", name])
                .unwrap(),
        );
        let socket = format!("/var/run/wireguard/{name}.sock");
        assert!(wait_until(Duration::from_secs(5), || std::path::Path::new(
            &socket
        )
        .exists()));
        let key_file = std::env::temp_dir().join(format!("{name}.key"));
        std::fs::write(&key_file, &keys[i].0).unwrap();
        let peer = 1 - i;
        ns.exec_ok(&[
            "wg",
            "set",
            name,
            "private-key",
            key_file.to_str().unwrap(),
            "listen-port",
            "51820",
            "peer",
            &keys[peer].1,
            "allowed-ips",
            &format!("10.80.0.{}/32", peer + 1),
            "endpoint",
            &format!("{}:51820", endpoints[peer]),
        ])
        .unwrap();
        let _ = std::fs::remove_file(key_file);
        ns.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("10.80.0.{}/24", i + 1),
            "dev",
            name,
        ])
        .unwrap();
        ns.exec_ok(&["ip", "link", "set", name, "up"]).unwrap();
    }
    Some(tunnel)
}

fn main() {
    if !require_root() || !require_tool("iperf3") {
        return;
    }
    let (a, b) = (Netns::new("bench0").unwrap(), Netns::new("bench1").unwrap());
    veth_pair(&a, &b, "10.78.0.1/24", "10.78.0.2/24").unwrap();
    let ports = [(&a, "10.77.0.1/24"), (&b, "10.77.0.2/24")]
        .into_iter()
        .map(|(ns, addr)| PortSpec {
            netns: ns.name().to_owned(),
            ifname: unique_ifname("wanb"),
            addresses: vec![addr.parse().unwrap()],
            mtu: 1500,
        })
        .collect();
    let hub = Hub::start(1, ports).unwrap();
    for (name, flags) in [
        ("1 TCP stream", &["-P", "1"]),
        ("4 TCP streams", &["-P", "4"]),
    ] {
        let veth = iperf3_gbps(&a, &b, "10.78.0.2", flags);
        let through_hub = iperf3_gbps(&a, &b, "10.77.0.2", flags);
        println!("{name}: veth {veth:.2} Gbit/s, hub {through_hub:.2} Gbit/s");
    }
    // What the hub carries in the edge benchmark: a VPN's UDP datagrams, one wire
    // packet per read. The same tunnel, its underlay switched from veth to the hub.
    if let Some(tunnel) = wg_tunnel(&a, &b, ["10.78.0.1", "10.78.0.2"]) {
        let names = &tunnel.names;
        let veth = iperf3_gbps(&a, &b, "10.80.0.2", &["-P", "1"]);
        for (i, ns) in [&a, &b].into_iter().enumerate() {
            let peer_key = ns.exec_ok(&["wg", "show", &names[i], "peers"]).unwrap();
            ns.exec_ok(&[
                "wg",
                "set",
                &names[i],
                "peer",
                peer_key.trim(),
                "endpoint",
                &format!("10.77.0.{}:51820", 2 - i),
            ])
            .unwrap();
        }
        let through_hub = iperf3_gbps(&a, &b, "10.80.0.2", &["-P", "1"]);
        println!("wiremesh-wg tunnel, 1 TCP stream: over veth {veth:.2} Gbit/s, over the hub {through_hub:.2} Gbit/s");
    }
    // Any impairment sends every packet through the link model one by one, and a
    // delay through the scheduler thread.
    hub.set_all(Impairment {
        delay: Duration::from_micros(500),
        ..Impairment::default()
    })
    .unwrap();
    let gbps = iperf3_gbps(&a, &b, "10.77.0.2", &["-P", "1"]);
    println!("0.5 ms delay each way, 1 TCP stream: hub {gbps:.2} Gbit/s");
}
