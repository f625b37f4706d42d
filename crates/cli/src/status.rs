//! `wiremesh status` and `wiremesh graph`: the mesh as the registry and the nodes'
//! published device reports see it.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use wiremesh_agent::{NodeStatus, Registry};
use wiremesh_model::NodeName;
use wiremesh_topology::{leaders, relay, render_dot, Snapshot};

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// "12s ago", "never".
pub fn age(unix: u64, now: u64) -> String {
    if unix == 0 {
        "never".into()
    } else {
        format!("{}s ago", now.saturating_sub(unix))
    }
}

pub fn bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}

/// The text `wiremesh status` prints.
pub fn render(
    snapshot: &Snapshot,
    statuses: &[NodeStatus],
    rejected: &[String],
    now: u64,
) -> String {
    let leaders = leaders(snapshot);
    let mut out = String::new();
    let s = &snapshot.settings;
    let _ = writeln!(
        out,
        "cluster: {} nodes, {} external peers, granularity {}, pods {}, mesh {}",
        snapshot.nodes.len(),
        snapshot.peers.len(),
        s.granularity,
        s.cluster_cidr,
        s.mesh_cidr
    );
    let mut nodes: Vec<_> = snapshot.nodes.iter().collect();
    nodes.sort_by(|a, b| (&a.location, &a.name).cmp(&(&b.location, &b.name)));
    let _ = writeln!(
        out,
        "\n{:<14} {:<12} {:<7} {:<16} {:<22} {:<22}",
        "LOCATION", "NODE", "ROLE", "POD CIDR", "PUBLIC ENDPOINT", "PRIVATE ENDPOINT"
    );
    for n in &nodes {
        let role = if leaders.get(&n.location) == Some(&n.name) {
            "leader"
        } else {
            ""
        };
        let public = n
            .public_endpoint
            .map_or("- (behind NAT)".into(), |e| e.to_string());
        let private = n.private_endpoint.map_or("-".into(), |e| e.to_string());
        let _ = writeln!(
            out,
            "{:<14} {:<12} {:<7} {:<16} {:<22} {:<22}",
            n.location,
            n.name,
            role,
            n.pod_cidr.to_string(),
            public,
            private
        );
    }
    for p in &snapshot.peers {
        let ips: Vec<String> = p.allowed_ips.iter().map(|n| n.to_string()).collect();
        let _ = writeln!(
            out,
            "{:<14} {:<12} {:<7} {}",
            "(external)",
            p.name,
            "peer",
            ips.join(",")
        );
    }
    let _ = writeln!(
        out,
        "\nTUNNELS (as each node's WireGuard device reports them)"
    );
    let _ = writeln!(
        out,
        "{:<12} {:<12} {:<22} {:<16} {:>10} {:>10}  PATH",
        "NODE", "PEER", "ENDPOINT", "HANDSHAKE", "RX", "TX"
    );
    let mut statuses: Vec<_> = statuses.iter().collect();
    statuses.sort_by(|a, b| a.node.cmp(&b.node));
    for st in statuses {
        let mut peers = st.peers.clone();
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        for p in peers {
            let endpoint = p.endpoint.map_or("-".into(), |e| e.to_string());
            let _ = writeln!(
                out,
                "{:<12} {:<12} {:<22} {:<16} {:>10} {:>10}  {}",
                st.node,
                p.name,
                endpoint,
                age(p.last_handshake, now),
                bytes(p.rx_bytes),
                bytes(p.tx_bytes),
                path(snapshot, &st.node, &p.name)
            );
        }
    }
    if !rejected.is_empty() {
        let _ = writeln!(
            out,
            "\nREJECTED RECORDS (ignored; the rest of the mesh is unaffected)"
        );
        for r in rejected {
            let _ = writeln!(out, "  {r}");
        }
    }
    out
}

/// How traffic between node `node` and its peer `peer` travels; an external peer,
/// or a name the snapshot no longer has, is reached directly.
fn path(snapshot: &Snapshot, node: &str, peer: &str) -> relay::Path {
    match (node.parse::<NodeName>(), peer.parse::<NodeName>()) {
        (Ok(node), Ok(peer)) => relay::path(snapshot, &node, &peer),
        _ => relay::Path::Direct,
    }
}

pub fn print(registry: &dyn Registry, json: bool) -> Result<()> {
    let (snapshot, bad) = registry.snapshot()?;
    let statuses = registry.statuses()?;
    if json {
        let value = serde_json::json!({
            "nodes": snapshot.nodes.iter().map(|n| serde_json::from_slice::<serde_json::Value>(&n.to_json()).unwrap_or_default()).collect::<Vec<_>>(),
            "leaders": leaders(&snapshot).iter().map(|(l, n)| (l.to_string(), n.to_string())).collect::<std::collections::BTreeMap<_, _>>(),
            "status": statuses,
            "rejected": bad.iter().map(ToString::to_string).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let rejected: Vec<String> = bad.iter().map(ToString::to_string).collect();
    print!("{}", render(&snapshot, &statuses, &rejected, unix_now()));
    Ok(())
}

pub fn graph(registry: &dyn Registry, svg: bool) -> Result<()> {
    let (snapshot, _) = registry.snapshot()?;
    let dot = render_dot(&snapshot);
    if !svg {
        print!("{dot}");
        return Ok(());
    }
    let mut child = Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .spawn()
        .context("--svg needs Graphviz's `dot` (apt-get install graphviz)")?;
    child
        .stdin
        .take()
        .context("dot's stdin")?
        .write_all(dot.as_bytes())?;
    if !child.wait()?.success() {
        bail!("dot failed to render the graph");
    }
    Ok(())
}
