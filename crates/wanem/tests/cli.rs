//! The `wiremesh-wanem` binary: hosts from flags, impairment applied, ports removed
//! on SIGTERM.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use wiremesh_testkit::{require_root, require_tool, unique_ifname, wait_until, Netns};

/// The hub process, stopped with SIGTERM on drop (also when the test panics: it runs
/// outside the test's namespaces, so their cleanup would not end it).
struct HubProcess(Child);

impl HubProcess {
    /// Sends SIGTERM and waits; whether it exited successfully.
    fn stop(&mut self) -> bool {
        // SAFETY: kill on the pid of a child we started and have not reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        self.0.wait().is_ok_and(|s| s.success())
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}

#[test]
fn the_binary_connects_hosts_with_the_flags_impairment_and_cleans_up() {
    if !require_root() || !require_tool("ping") {
        return;
    }
    let (a, b) = (Netns::new("cli0").unwrap(), Netns::new("cli1").unwrap());
    let ifname = unique_ifname("wanc");
    let mut hub = HubProcess(
        Command::new(env!("CARGO_BIN_EXE_wiremesh-wanem"))
            .args(["--host", &format!("{}:{ifname}:10.79.0.1/24", a.name())])
            .args(["--host", &format!("{}:{ifname}:10.79.0.2/24", b.name())])
            .args(["--delay", "15ms"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The last port is addressed last.
    let up = wait_until(Duration::from_secs(10), || {
        b.exec_ok(&["ip", "-o", "addr", "show", "dev", &ifname])
            .is_ok_and(|out| out.contains("10.79.0.2/24"))
    });
    assert!(up, "the ports did not come up");
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

    assert!(hub.stop(), "the hub did not exit cleanly on SIGTERM");
    assert!(
        a.exec_ok(&["ip", "link", "show", &ifname]).is_err(),
        "port left behind"
    );
}
