//! The `wiremesh-wanem` binary: hosts from flags, impairment applied, ports removed
//! on SIGTERM.

use std::process::{Command, Stdio};
use std::time::Duration;

use wiremesh_testkit::{require_root, require_tool, unique_ifname, wait_until, Netns};

#[test]
fn the_binary_connects_hosts_with_the_flags_impairment_and_cleans_up() {
    if !require_root() || !require_tool("ping") {
        return;
    }
    let (a, b) = (Netns::new("cli0").unwrap(), Netns::new("cli1").unwrap());
    let ifname = unique_ifname("wanc");
    let mut hub = Command::new(env!("CARGO_BIN_EXE_wiremesh-wanem"))
        .args(["--host", &format!("{}:{ifname}:10.79.0.1/24", a.name())])
        .args(["--host", &format!("{}:{ifname}:10.79.0.2/24", b.name())])
        .args(["--delay", "15ms"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let up = wait_until(Duration::from_secs(5), || {
        b.exec_ok(&["ip", "link", "show", &ifname]).is_ok()
    });
    assert!(up, "the port did not appear");
    let out = a
        .exec_ok(&[
            "ping",
            "-n",
            "-c",
            "3",
            "-i",
            "0.01",
            "-W",
            "2",
            "10.79.0.2",
        ])
        .unwrap();
    // 15 ms each way: every reply takes at least 30 ms.
    let min_rtt: f64 = out
        .lines()
        .find(|l| l.starts_with("rtt"))
        .and_then(|l| l.split(" = ").nth(1))
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no rtt in ping output:\n{out}"));
    assert!(min_rtt >= 30.0, "min rtt {min_rtt} ms");

    // SAFETY: kill on the pid of a child we started and have not reaped.
    unsafe { libc::kill(hub.id() as i32, libc::SIGTERM) };
    let status = hub.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(
        a.exec_ok(&["ip", "link", "show", &ifname]).is_err(),
        "port left behind"
    );
}
