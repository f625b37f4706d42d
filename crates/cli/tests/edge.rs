//! `wiremesh bench edge --quick`, end to end, as CI runs it: the real binary builds
//! the testbed, brings every installed VPN up in turn and measures it. The test
//! checks what a reader of the report relies on: every VPN that is not reported as
//! skipped passed the honesty check (pods reached through it, no plaintext on the
//! underlay, unreachable once stopped) and served requests at every load point;
//! wiremesh itself and the baseline are among them; the tables and plots are
//! written; and no namespace of the run is left behind.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use wiremesh_testkit::{cargo_bin, require_root, require_tool, wait_until};

/// The edge testbed's namespaces on this machine (`wme-<run>-<host>`), of any run.
fn edge_namespaces() -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("wme-"))
                .collect()
        })
        .unwrap_or_default()
}

/// The `wme-<run>-` prefix of the run in process `pid`, once one of its threads (a
/// pod's server) is in one of its namespaces: other runs may overlap this one, so
/// only the names of this run's own testbed count.
fn run_prefix(pid: u32) -> Option<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let in_use: HashSet<String> = tasks
        .flatten()
        .filter_map(|t| std::fs::read_link(t.path().join("ns/net")).ok())
        .map(|link| link.to_string_lossy().into_owned())
        .collect();
    edge_namespaces().into_iter().find_map(|name| {
        let inode = std::fs::metadata(format!("/var/run/netns/{name}"))
            .ok()?
            .ino();
        let run = name.split('-').nth(1)?;
        in_use
            .contains(&format!("net:[{inode}]"))
            .then(|| format!("wme-{run}-"))
    })
}

#[test]
fn quick_run_measures_every_installed_vpn_honestly() {
    if !require_root() || !require_tool("nft") {
        return;
    }
    let wiremesh = Path::new(env!("CARGO_BIN_EXE_wiremesh"));
    assert!(
        cargo_bin("wiremesh-wg").exists(),
        "wiremesh-wg is not built: cargo build --workspace --bins"
    );
    let out = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut child = Command::new(wiremesh)
        .args(["bench", "edge", "--quick", "--out"])
        .arg(out.path())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // A quick run takes about a minute; a hung one must not hang CI.
    let mut prefix = None;
    let finished = wait_until(Duration::from_secs(600), || {
        if prefix.is_none() {
            prefix = run_prefix(child.id());
        }
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !finished {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    println!("quick run took {:.0} s", started.elapsed().as_secs_f64());
    assert!(finished, "the quick run did not finish within 600 s");
    assert!(
        status.success(),
        "wiremesh bench edge --quick failed: {status}"
    );

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap())
            .unwrap();
    let skipped: Vec<&str> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["vpn"].as_str().unwrap())
        .collect();
    assert!(
        skipped.contains(&"zerotier"),
        "the report says why ZeroTier is absent"
    );
    let honesty = report["honesty"].as_array().unwrap();
    let measured: Vec<&str> = honesty.iter().map(|h| h["vpn"].as_str().unwrap()).collect();
    for vpn in ["none", "wiremesh"] {
        assert!(measured.contains(&vpn), "{vpn} not measured: {measured:?}");
    }
    for h in honesty {
        assert_eq!(h["passed"], Value::Bool(true), "honesty check failed: {h}");
    }
    // Every VPN the harness knows is either measured or skipped with a reason.
    for vpn in [
        "none",
        "wiremesh",
        "wireguard-go",
        "boringtun",
        "openvpn",
        "tinc",
        "softether",
        "nebula",
    ] {
        assert!(
            measured.contains(&vpn) || skipped.iter().any(|s| s.starts_with(vpn)),
            "{vpn} neither measured nor skipped"
        );
    }
    let records = report["records"].as_array().unwrap();
    for vpn in &measured {
        let load: Vec<&Value> = records
            .iter()
            .filter(|r| r["vpn"] == *vpn && r["scenario"]["kind"] == "load")
            .collect();
        assert!(!load.is_empty(), "{vpn} has no load point");
        for r in load {
            for s in r["samples"].as_array().unwrap() {
                assert!(
                    s["ok"].as_u64().unwrap() > 0,
                    "{vpn}: no request succeeded: {s}"
                );
            }
        }
    }
    for file in [
        "results.md",
        "response-time-vs-load.svg",
        "failure-rate-vs-loss.svg",
    ] {
        assert!(out.path().join(file).exists(), "{file} missing");
    }
    assert!(out.path().join("raw").join("wiremesh-mesh.json").exists());
    let prefix = prefix.expect("no namespace of the run was seen with its pods' servers in it");
    let left: Vec<String> = edge_namespaces()
        .into_iter()
        .filter(|name| name.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}
