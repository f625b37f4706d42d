//! The hub between real network namespaces, measured with real ping and iperf3:
//! each test checks a figure the emulator promises.

use std::process::{Command, Stdio};
use std::time::Duration;

use wiremesh_testkit::{require_root, require_tool, unique_ifname, wait_until, Netns};
use wiremesh_wanem::{Hub, Impairment, Loss, PortSpec};

/// Hosts `10.77.0.1`, `10.77.0.2`, ... (a /24 each) and `fd77::1`, `fd77::2`, ... (a
/// /64 each), one per namespace, on one hub.
/// Field order matters: the hub drops (removing its ports) before the namespaces.
struct Bed {
    hub: Hub,
    hosts: Vec<Netns>,
}

/// Held by the tests that time or load the hub (RTT, rate, iperf3), so they never
/// run at once: one test's iperf3 must not show up as another's delay.
fn measuring() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn address(host: usize) -> String {
    format!("10.77.0.{}", host + 1)
}

impl Bed {
    /// `None` (after printing `skipped: why`) when this machine cannot run it.
    fn new(hosts: usize, seed: u64) -> Option<Self> {
        if !require_root() || !require_tool("ping") {
            return None;
        }
        let hosts: Vec<Netns> = (0..hosts)
            .map(|i| Netns::new(&format!("wan{i}")).unwrap())
            .collect();
        let ports = hosts
            .iter()
            .enumerate()
            .map(|(i, ns)| PortSpec {
                netns: ns.name().to_owned(),
                ifname: unique_ifname("wan"),
                addresses: vec![
                    format!("{}/24", address(i)).parse().unwrap(),
                    format!("fd77::{}/64", i + 1).parse().unwrap(),
                ],
                mtu: 1500,
            })
            .collect();
        let hub = Hub::start(seed, ports).unwrap();
        Some(Self { hub, hosts })
    }

    /// Pings `to` from host `from`; returns (sent, received, average RTT in ms).
    fn ping(&self, from: usize, to: &str, count: u32, interval: &str) -> (u32, u32, Option<f64>) {
        let count = count.to_string();
        let out = self.hosts[from]
            .exec(&[
                "ping", "-n", "-q", "-c", &count, "-i", interval, "-W", "1", to,
            ])
            .unwrap();
        parse_ping(&String::from_utf8_lossy(&out.stdout))
    }
}

/// From ping's summary: "N packets transmitted, M received" and "rtt min/avg/max/mdev
/// = a/b/c/d ms".
fn parse_ping(out: &str) -> (u32, u32, Option<f64>) {
    let number_before = |word: &str| -> u32 {
        let words: Vec<&str> = out
            .split([' ', ',', '\n'])
            .filter(|w| !w.is_empty())
            .collect();
        words
            .windows(2)
            .find(|w| w[1] == word)
            .and_then(|w| w[0].parse().ok())
            .unwrap_or(0)
    };
    let avg = out
        .lines()
        .find(|l| l.starts_with("rtt"))
        .and_then(|l| l.split(" = ").nth(1))
        .and_then(|v| v.split('/').nth(1))
        .and_then(|v| v.parse().ok());
    (number_before("packets"), number_before("received"), avg)
}

#[test]
fn rtt_is_twice_the_delay_plus_the_unimpaired_base() {
    let _quiet = measuring();
    let Some(bed) = Bed::new(2, 1) else { return };
    let (_, received, base) = bed.ping(0, &address(1), 20, "0.01");
    assert_eq!(received, 20, "unimpaired ping lost packets");
    let base = base.unwrap();
    bed.hub
        .set_all(Impairment {
            delay: Duration::from_millis(25),
            ..Impairment::default()
        })
        .unwrap();
    let (_, received, rtt) = bed.ping(0, &address(1), 20, "0.01");
    assert_eq!(received, 20);
    let expected = 50.0 + base;
    let rtt = rtt.unwrap();
    println!("rtt {rtt:.3} ms, expected {expected:.3} ms (base {base:.3} ms)");
    assert!(
        (rtt - expected).abs() <= 0.1 * expected,
        "rtt {rtt:.2} ms, expected {expected:.2} ms (base {base:.3} ms)"
    );
}

/// Pings 2000 times over a link `0 → 1` losing with `loss`, and checks the replies
/// missing are within 99.9 % bounds (z = 3.29) of the expected count.
fn check_loss(loss: Loss) {
    let Some(bed) = Bed::new(2, 2) else { return };
    bed.hub
        .set_link(
            0,
            1,
            Impairment {
                loss: loss.clone(),
                ..Impairment::default()
            },
        )
        .unwrap();
    let sent = 2000;
    let (transmitted, received, _) = bed.ping(0, &address(1), sent, "0.001");
    assert_eq!(transmitted, sent);
    let lost = f64::from(sent - received);
    let expected = loss.stationary_loss() * f64::from(sent);
    let bound = 3.29 * loss.count_variance(u64::from(sent)).sqrt();
    println!("lost {lost} of {sent}, expected {expected:.0} ± {bound:.0} ({loss:?})");
    assert!(
        (lost - expected).abs() <= bound,
        "lost {lost} of {sent}, expected {expected:.0} ± {bound:.0}"
    );
    // The hub counted the same drops, and only in the impaired direction.
    let stats = bed.hub.stats();
    let (forward, back) = (&stats[1], &stats[2]);
    assert_eq!((forward.from, forward.to, back.from, back.to), (0, 1, 1, 0));
    assert_eq!(forward.dropped_total() as f64, lost);
    assert_eq!(back.dropped_total(), 0);
}

#[test]
fn random_loss_is_within_binomial_bounds() {
    check_loss(Loss::Random { probability: 0.1 });
}

#[test]
fn bursty_loss_is_within_its_bounds() {
    check_loss(Loss::GilbertElliott {
        p_good_to_bad: 0.05,
        p_bad_to_good: 0.3,
        loss_in_good: 0.0,
        loss_in_bad: 0.6,
    });
}

#[test]
fn rate_limit_holds_within_five_percent() {
    let _quiet = measuring();
    let Some(bed) = Bed::new(2, 3) else { return };
    if !require_tool("iperf3") {
        return;
    }
    let rate_bps = 20_000_000;
    bed.hub
        .set_link(
            0,
            1,
            Impairment {
                rate_bps: Some(rate_bps),
                ..Impairment::default()
            },
        )
        .unwrap();
    // UDP at twice the rate keeps the queue full; the server reports what arrived.
    let report = iperf3(&bed, &["-u", "-b", "40M", "-l", "1400", "-t", "3"]);
    let received_bps = receiver_bits_per_second(&report);
    // iperf3 counts UDP payload; the link counts IP bytes (+ 28 of headers).
    let expected = rate_bps as f64 * 1400.0 / 1428.0;
    println!(
        "received {:.2} Mbit/s of UDP payload, expected {:.2}",
        received_bps / 1e6,
        expected / 1e6
    );
    assert!(
        (received_bps - expected).abs() <= 0.05 * expected,
        "received {:.2} Mbit/s, expected {:.2}",
        received_bps / 1e6,
        expected / 1e6
    );
    assert!(
        bed.hub.stats()[1].dropped_queue_overflow > 0,
        "the queue never filled"
    );
}

#[test]
fn tcp_over_a_delayed_rate_limited_link_gets_the_rate() {
    let _quiet = measuring();
    let Some(bed) = Bed::new(2, 7) else { return };
    if !require_tool("iperf3") {
        return;
    }
    bed.hub
        .set_all(Impairment {
            delay: Duration::from_millis(2),
            ..Impairment::default()
        })
        .unwrap();
    let rate_bps = 30_000_000;
    bed.hub
        .set_link(
            0,
            1,
            Impairment {
                delay: Duration::from_millis(2),
                rate_bps: Some(rate_bps),
                ..Impairment::default()
            },
        )
        .unwrap();
    // The ports hand the hub TCP super-packets; an impaired link must still limit
    // the wire packets they stand for. One second of slow start left out.
    let report = iperf3(&bed, &["-t", "4", "-O", "1"]);
    let received_bps = receiver_bits_per_second(&report);
    // 1448 bytes of payload per 1500-byte packet (IP + TCP with timestamps).
    let expected = rate_bps as f64 * 1448.0 / 1500.0;
    println!(
        "received {:.2} Mbit/s of TCP payload, expected {:.2}",
        received_bps / 1e6,
        expected / 1e6
    );
    assert!(
        (received_bps - expected).abs() <= 0.05 * expected,
        "received {:.2} Mbit/s, expected {:.2}",
        received_bps / 1e6,
        expected / 1e6
    );
}

#[test]
fn ipv6_is_routed_and_delayed_like_ipv4() {
    let _quiet = measuring();
    let Some(bed) = Bed::new(2, 8) else { return };
    bed.hub
        .set_link(
            0,
            1,
            Impairment {
                delay: Duration::from_millis(10),
                ..Impairment::default()
            },
        )
        .unwrap();
    let (_, received, rtt) = bed.ping(0, "fd77::2", 3, "0.01");
    assert_eq!(received, 3);
    let rtt = rtt.unwrap();
    // The delay, once (the RTT test checks the precise figure against a base).
    assert!((10.0..20.0).contains(&rtt), "rtt {rtt} ms");
    assert_eq!(bed.hub.stats()[1].forwarded_packets, 3);
}

/// Sends one UDP GSO batch (10 datagrams of 1400 bytes, `UDP_SEGMENT`) from host 0
/// to host 1 and returns what the receiver said: how many datagrams arrived and
/// whether their bytes, in order, are the batch's.
fn send_gso_batch(bed: &Bed) -> String {
    const RECEIVER: &str = "
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('10.77.0.2', 9000))
s.settimeout(5)
got = b''
n = 0
try:
    while n < 10:
        got += s.recv(65535)
        n += 1
except socket.timeout:
    pass
print(n, got == bytes(i % 251 for i in range(14000)))
";
    const SENDER: &str = "
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_UDP, 103, 1400)  # UDP_SEGMENT
s.sendto(bytes(i % 251 for i in range(14000)), ('10.77.0.2', 9000))
";
    let receiver = Command::new("ip")
        .args([
            "netns",
            "exec",
            bed.hosts[1].name(),
            "python3",
            "-c",
            RECEIVER,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let bound = wait_until(Duration::from_secs(5), || {
        bed.hosts[1]
            .exec_ok(&["ss", "-Hlun", "sport = :9000"])
            .is_ok_and(|o| !o.trim().is_empty())
    });
    assert!(bound, "the receiver did not start");
    bed.hosts[0].exec_ok(&["python3", "-c", SENDER]).unwrap();
    let out = receiver.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn udp_gso_batches_arrive_as_datagrams_on_plain_and_impaired_links() {
    let Some(bed) = Bed::new(2, 9) else { return };
    if !require_tool("python3") {
        return;
    }
    // Unimpaired: the batch crosses whole; the receiver's stack cuts it up.
    assert_eq!(send_gso_batch(&bed), "10 True");
    // Impaired: the hub cuts it into datagrams with fresh checksums (a bad one would
    // be dropped by the receiver's stack), each delayed on its own.
    bed.hub
        .set_link(
            0,
            1,
            Impairment {
                delay: Duration::from_millis(1),
                ..Impairment::default()
            },
        )
        .unwrap();
    assert_eq!(send_gso_batch(&bed), "10 True");
    let stats = &bed.hub.stats()[1];
    assert_eq!(stats.forwarded_packets, 20);
    assert_eq!(stats.forwarded_bytes, 20 * (1400 + 28));
}

#[test]
fn a_link_set_down_drops_everything_until_it_comes_back_up() {
    let Some(bed) = Bed::new(2, 4) else { return };
    assert_eq!(bed.ping(0, &address(1), 3, "0.01").1, 3);
    let down = Impairment {
        down: true,
        ..Impairment::default()
    };
    bed.hub.set_link(1, 0, down).unwrap();
    let (sent, received, _) = bed.ping(0, &address(1), 10, "0.01");
    assert_eq!((sent, received), (10, 0));
    let stats = bed.hub.stats();
    // The requests got through; every reply died on the down link.
    assert_eq!(stats[1].forwarded_packets, 13);
    assert_eq!(stats[2].dropped_link_down, 10);
    bed.hub.set_link(1, 0, Impairment::default()).unwrap();
    assert_eq!(bed.ping(0, &address(1), 3, "0.01").1, 3);
}

#[test]
fn a_readdressed_port_is_reached_at_its_new_address_only() {
    let Some(bed) = Bed::new(2, 5) else { return };
    let new = "10.77.0.102";
    bed.hub
        .set_port_addresses(1, vec![format!("{new}/24").parse().unwrap()])
        .unwrap();
    let shown = bed.hosts[1].exec_ok(&["ip", "-o", "addr", "show"]).unwrap();
    assert!(shown.contains(&format!("{new}/24")), "{shown}");
    assert!(!shown.contains(&format!("{}/24", address(1))), "{shown}");
    assert_eq!(bed.ping(0, new, 3, "0.01").1, 3);
    assert_eq!(bed.ping(0, &address(1), 2, "0.01").1, 0);
    assert_eq!(bed.hub.unroutable()[0], 2);
    // An address another port holds is refused, naming the field.
    let err = bed
        .hub
        .set_port_addresses(1, vec![format!("{}/24", address(0)).parse().unwrap()])
        .unwrap_err();
    assert!(err.to_string().contains("ports[1].addresses"), "{err}");
}

#[test]
fn unknown_destinations_are_dropped_and_counted_and_patterns_are_seen() {
    let Some(bed) = Bed::new(3, 6) else { return };
    assert_eq!(bed.ping(0, "10.77.0.99", 4, "0.01").1, 0);
    assert_eq!(bed.hub.unroutable(), [4, 0, 0]);
    assert!(bed.hub.stats().iter().all(|l| l.forwarded_packets == 0));

    // "wanem!" in hex, as ping fills its payload with the pattern.
    bed.hub.watch_for(b"wanem!");
    let out = bed.hosts[0]
        .exec_ok(&[
            "ping",
            "-c",
            "2",
            "-i",
            "0.01",
            "-p",
            "77616e656d21",
            &address(2),
        ])
        .unwrap();
    assert!(out.contains("2 received"), "{out}");
    let stats = bed.hub.stats();
    let seen: Vec<_> = stats
        .iter()
        .filter(|l| l.pattern_packets > 0)
        .map(|l| (l.from, l.to, l.pattern_packets))
        .collect();
    assert_eq!(seen, [(0, 2, 2), (2, 0, 2)]);
}

/// Runs an iperf3 server on host 1 and `client_args` from host 0 to it; returns the
/// server's JSON report.
fn iperf3(bed: &Bed, client_args: &[&str]) -> String {
    let server = Command::new("ip")
        .args(["netns", "exec", bed.hosts[1].name()])
        .args([
            "timeout",
            "30",
            "iperf3",
            "-s",
            "-1",
            "-J",
            "-B",
            &address(1),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let listening = wait_until(Duration::from_secs(5), || {
        bed.hosts[1]
            .exec_ok(&["ss", "-Hltn", "sport = :5201"])
            .is_ok_and(|o| !o.trim().is_empty())
    });
    assert!(listening, "iperf3 server did not start");
    let mut args = vec!["timeout", "30", "iperf3", "-c", "10.77.0.2"];
    args.extend_from_slice(client_args);
    bed.hosts[0].exec_ok(&args).unwrap();
    let out = server.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The receiver's rate from an iperf3 server's JSON report: the last
/// `"bits_per_second"` of its `"end"` section.
fn receiver_bits_per_second(report: &str) -> f64 {
    let end = report
        .rfind("\"end\"")
        .expect("no end section in the iperf3 report");
    report[end..]
        .rsplit("\"bits_per_second\":")
        .next()
        .and_then(|rest| rest.split([',', '}', '\n']).next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rate in the iperf3 report:\n{report}"))
}
