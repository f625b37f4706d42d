//! The whole cluster as a Graphviz graph, for `wiremesh graph`.
//!
//! The edges are drawn from the very [`Topology`](crate::Topology) values the
//! agents apply (as `kgctl graph` does for Kilo), so the picture cannot disagree
//! with the mesh: a solid edge is a WireGuard peering, a dashed one a route over a
//! trusted location network.

use std::collections::BTreeSet;
use std::fmt::Write;

use wiremesh_model::{ExternalPeer, Node};

use crate::{compute, leaders, PeerKind, Route, Snapshot};

/// Render `snapshot` as DOT: one cluster subgraph per location, leaders drawn bold
/// and double-bordered, every node labelled with its pod CIDR, mesh IP and
/// endpoints. Deterministic: the same snapshot in any order renders byte-for-byte
/// the same text, so it can be compared in tests and diffs.
pub fn render_dot(snapshot: &Snapshot) -> String {
    let leaders = leaders(snapshot);
    let mut nodes: Vec<&Node> = snapshot.nodes.iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let mut externals: Vec<&ExternalPeer> = snapshot.peers.iter().collect();
    externals.sort_by(|a, b| a.name.cmp(&b.name));

    let mut out = String::new();
    let s = &snapshot.settings;
    out.push_str("graph wiremesh {\n");
    let _ = writeln!(
        out,
        "  label=\"wiremesh: granularity {}, cluster {}, mesh {}{}\";",
        s.granularity,
        s.cluster_cidr,
        s.mesh_cidr,
        if s.trust_location_network {
            ", trusted location networks"
        } else {
            ""
        }
    );
    out.push_str("  node [shape=box, style=rounded];\n");

    for (location, leader) in &leaders {
        let _ = writeln!(
            out,
            "  subgraph {} {{",
            quote(&format!("cluster_{location}"))
        );
        let _ = writeln!(out, "    label={};", quote(location.as_str()));
        for n in nodes.iter().filter(|n| &n.location == location) {
            let mut label = n.name.to_string();
            if &n.name == leader {
                label.push_str(" (leader)");
            }
            let _ = write!(label, "\n{}\n{}", n.pod_cidr, n.mesh_ip);
            match n.public_endpoint {
                Some(e) => {
                    let _ = write!(label, "\npublic {e}");
                }
                None => label.push_str("\nbehind NAT"),
            }
            if let Some(e) = n.private_endpoint {
                let _ = write!(label, "\nprivate {e}");
            }
            let style = if &n.name == leader {
                ", style=\"rounded,bold\", peripheries=2"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "    {} [label={}{}];",
                node_id(n),
                quote(&label),
                style
            );
        }
        out.push_str("  }\n");
    }
    for e in &externals {
        let mut label = format!("{} (external)", e.name);
        for ip in &e.allowed_ips {
            let _ = write!(label, "\n{ip}");
        }
        if let Some(ep) = e.endpoint {
            let _ = write!(label, "\nendpoint {ep}");
        }
        let _ = writeln!(
            out,
            "  {} [label={}, shape=ellipse];",
            quote(&format!("peer/{}", e.name)),
            quote(&label)
        );
    }

    // Undirected edges, each pair once: both ends of a peering list each other.
    let mut tunnels: BTreeSet<(String, String)> = BTreeSet::new();
    let mut trusted: BTreeSet<(String, String)> = BTreeSet::new();
    for n in &nodes {
        let topology = match compute(snapshot, &n.name) {
            Ok(t) => t,
            Err(e) => {
                // Every node fails alike on an inconsistent snapshot; say why once.
                let _ = writeln!(out, "  // no edges: {}", e.to_string().replace('\n', " "));
                break;
            }
        };
        let me = node_id(n);
        for p in &topology.peers {
            let other = match p.kind {
                PeerKind::Node => quote(&format!("node/{}", p.name)),
                PeerKind::External => quote(&format!("peer/{}", p.name)),
            };
            tunnels.insert(ordered(me.clone(), other));
        }
        for r in &topology.routes {
            if let Route::Gateway { via, .. } = r {
                let gateway = nodes.iter().find(|g| {
                    g.location == n.location && g.private_endpoint.map(|e| e.ip()) == Some(*via)
                });
                if let Some(g) = gateway {
                    trusted.insert(ordered(me.clone(), node_id(g)));
                }
            }
        }
    }
    for (a, b) in &tunnels {
        let _ = writeln!(out, "  {a} -- {b};");
    }
    for (a, b) in &trusted {
        let _ = writeln!(out, "  {a} -- {b} [style=dashed];");
    }
    out.push_str("}\n");
    out
}

fn node_id(n: &Node) -> String {
    quote(&format!("node/{}", n.name))
}

fn ordered(a: String, b: String) -> (String, String) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

/// A DOT string literal. Names are DNS labels and the rest are addresses, so this
/// escapes only what could still break the syntax.
fn quote(s: &str) -> String {
    let escaped = s
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("\"{escaped}\"")
}
