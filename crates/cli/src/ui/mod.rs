//! `wiremesh ui`: a live topology page. The page is static; it polls `/api/mesh`
//! (the registry's nodes and leaders joined with each node's published device
//! report) every second and redraws, so joins, leaves and handshakes show up
//! without a reload.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use wiremesh_agent::Cluster;
use wiremesh_topology::leaders;

use crate::status::unix_now;

const PAGE: &str = include_str!("index.html");

/// A tunnel whose last handshake is older than this is shown as stale
/// (REJECT_AFTER_TIME, whitepaper §6.1: the session is dead by then).
const STALE_AFTER_SECS: u64 = 180;

/// The mesh as the page draws it.
pub fn mesh_json(cluster: &Cluster) -> Result<Value> {
    let (snapshot, bad, _) = cluster.snapshot()?;
    let statuses = cluster.statuses()?;
    let leaders = leaders(&snapshot);
    let now = unix_now();
    let mut nodes: Vec<&wiremesh_model::Node> = snapshot.nodes.iter().collect();
    nodes.sort_by(|a, b| (&a.location, &a.name).cmp(&(&b.location, &b.name)));
    let nodes: Vec<Value> = nodes
        .iter()
        .map(|n| {
            json!({
                "name": n.name.as_str(),
                "location": n.location.as_str(),
                "leader": leaders.get(&n.location) == Some(&n.name),
                "pod_cidr": n.pod_cidr.to_string(),
                "public_endpoint": n.public_endpoint.map(|e| e.to_string()),
            })
        })
        .collect();
    let mut tunnels = Vec::new();
    for st in &statuses {
        for p in &st.peers {
            let age = (p.last_handshake > 0).then(|| now.saturating_sub(p.last_handshake));
            tunnels.push(json!({
                "from": st.node,
                "to": p.name,
                "handshake_age": age,
                "healthy": age.is_some_and(|a| a < STALE_AFTER_SECS),
                "rx_bytes": p.rx_bytes,
                "tx_bytes": p.tx_bytes,
            }));
        }
    }
    Ok(json!({
        "granularity": snapshot.settings.granularity.to_string(),
        "nodes": nodes,
        "tunnels": tunnels,
        "rejected": bad.iter().map(|b| format!("{}: {}", b.key, b.error)).collect::<Vec<_>>(),
    }))
}

fn respond(mut stream: &TcpStream, status: &str, content_type: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn handle(stream: TcpStream, cluster: &Cluster) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    if BufReader::new(&stream).read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    match path {
        "/" | "/index.html" => respond(&stream, "200 OK", "text/html; charset=utf-8", PAGE),
        "/api/mesh" => match mesh_json(cluster) {
            Ok(v) => respond(&stream, "200 OK", "application/json", &v.to_string()),
            Err(e) => respond(
                &stream,
                "503 Service Unavailable",
                "text/plain",
                &format!("{e:#}\n"),
            ),
        },
        _ => respond(&stream, "404 Not Found", "text/plain", "not found\n"),
    }
}

pub fn serve(cluster: Cluster, listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    eprintln!(
        "wiremesh ui: http://{}/ (Ctrl-C to stop)",
        listener.local_addr()?
    );
    for stream in listener.incoming().flatten() {
        let cluster = cluster.clone();
        std::thread::spawn(move || handle(stream, &cluster));
    }
    Ok(())
}
