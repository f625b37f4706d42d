//! Prometheus metrics of the agent: reconcile counts and timing, per-peer
//! traffic and handshake age as the device reports them, the path to each peer
//! (direct or through a relay), and what this node relays. The loop writes a
//! [`Metrics`] value; a small HTTP thread serves its text rendering on `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use wiremesh_model::NodePair;
use wiremesh_topology::relay::Path;

use crate::registry::PeerStatus;

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub node: String,
    pub reconciles: u64,
    pub reconcile_errors: u64,
    pub last_reconcile: Duration,
    pub rejected_records: usize,
    pub peers: Vec<PeerStatus>,
    /// Unix seconds, for handshake ages.
    pub now: u64,
    /// Packets the device dropped, by reason (empty for devices that do not say).
    pub drops: BTreeMap<String, u64>,
    /// The path to each node, by name; a peer not listed (an external one) is direct.
    pub paths: BTreeMap<String, Path>,
    /// Datagrams forwarded and dropped per pair this node relays.
    pub relayed: BTreeMap<NodePair, (u64, u64)>,
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition of `m`.
pub fn render(m: &Metrics) -> String {
    let mut out = String::new();
    let node = escape(&m.node);
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{{node=\"{node}\"{labels}}} {value}");
        }
    };
    family(
        "wiremesh_reconciles_total",
        "counter",
        "Reconcile passes that succeeded.",
        &[(String::new(), m.reconciles.to_string())],
    );
    family(
        "wiremesh_reconcile_errors_total",
        "counter",
        "Reconcile passes that failed (retried).",
        &[(String::new(), m.reconcile_errors.to_string())],
    );
    family(
        "wiremesh_reconcile_duration_seconds",
        "gauge",
        "Duration of the last reconcile pass.",
        &[(
            String::new(),
            format!("{:.6}", m.last_reconcile.as_secs_f64()),
        )],
    );
    family(
        "wiremesh_rejected_records",
        "gauge",
        "Registry records ignored as invalid.",
        &[(String::new(), m.rejected_records.to_string())],
    );
    let per_peer = |value: &dyn Fn(&PeerStatus) -> String| -> Vec<(String, String)> {
        m.peers
            .iter()
            .map(|p| (format!(",peer=\"{}\"", escape(&p.name)), value(p)))
            .collect()
    };
    family(
        "wiremesh_peer_receive_bytes_total",
        "counter",
        "Bytes received from the peer.",
        &per_peer(&|p| p.rx_bytes.to_string()),
    );
    family(
        "wiremesh_peer_transmit_bytes_total",
        "counter",
        "Bytes sent to the peer.",
        &per_peer(&|p| p.tx_bytes.to_string()),
    );
    family(
        "wiremesh_peer_last_handshake_age_seconds",
        "gauge",
        "Seconds since the last handshake with the peer (absent: never).",
        &m.peers
            .iter()
            .filter(|p| p.last_handshake > 0)
            .map(|p| {
                (
                    format!(",peer=\"{}\"", escape(&p.name)),
                    m.now.saturating_sub(p.last_handshake).to_string(),
                )
            })
            .collect::<Vec<_>>(),
    );
    family(
        "wiremesh_peer_path",
        "gauge",
        "1 for the path traffic to the peer takes: direct, or relayed via a node.",
        &m.peers
            .iter()
            .map(|p| {
                let labels = match m.paths.get(&p.name) {
                    Some(Path::Relayed { via }) => {
                        format!("path=\"relayed\",via=\"{}\"", escape(via.as_str()))
                    }
                    _ => "path=\"direct\",via=\"\"".to_owned(),
                };
                (
                    format!(",peer=\"{}\",{labels}", escape(&p.name)),
                    "1".into(),
                )
            })
            .collect::<Vec<_>>(),
    );
    let per_pair = |count: fn(&(u64, u64)) -> u64| -> Vec<(String, String)> {
        m.relayed
            .iter()
            .map(|(pair, c)| (format!(",pair=\"{pair}\""), count(c).to_string()))
            .collect()
    };
    family(
        "wiremesh_relay_forwarded_packets_total",
        "counter",
        "Datagrams this node relayed between a pair of NATed nodes.",
        &per_pair(|c| c.0),
    );
    family(
        "wiremesh_relay_dropped_packets_total",
        "counter",
        "Datagrams this node's relay dropped (not WireGuard, or the far end unknown yet).",
        &per_pair(|c| c.1),
    );
    family(
        "wiremesh_dropped_packets_total",
        "counter",
        "Packets the WireGuard device dropped, by reason (wiremesh-wg only).",
        &m.drops
            .iter()
            .map(|(reason, n)| (format!(",reason=\"{}\"", escape(reason)), n.to_string()))
            .collect::<Vec<_>>(),
    );
    out
}

/// Serve `GET /metrics` on `addr` from a background thread.
pub fn serve(addr: SocketAddr, metrics: Arc<Mutex<Metrics>>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut request_line = String::new();
            let mut reader = BufReader::new(&stream);
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let (status, body) = if request_line.starts_with("GET /metrics") {
                (
                    "200 OK",
                    render(&metrics.lock().unwrap_or_else(PoisonError::into_inner)),
                )
            } else {
                ("404 Not Found", "see /metrics\n".to_owned())
            };
            let mut stream = &stream;
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics {
            node: "a1".into(),
            reconciles: 3,
            peers: vec![PeerStatus {
                name: "b\"1".into(),
                rx_bytes: 10,
                tx_bytes: 20,
                last_handshake: 95,
                ..Default::default()
            }],
            now: 100,
            drops: BTreeMap::from([("disallowed_source".to_owned(), 7)]),
            paths: BTreeMap::from([(
                "b\"1".to_owned(),
                Path::Relayed {
                    via: "p1".parse().unwrap(),
                },
            )]),
            relayed: BTreeMap::from([(
                NodePair::new("x".parse().unwrap(), "y".parse().unwrap()).unwrap(),
                (12, 1),
            )]),
            ..Default::default()
        };
        let text = render(&m);
        assert!(
            text.contains(
                "wiremesh_dropped_packets_total{node=\"a1\",reason=\"disallowed_source\"} 7\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("wiremesh_reconciles_total{node=\"a1\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("wiremesh_peer_receive_bytes_total{node=\"a1\",peer=\"b\\\"1\"} 10\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "wiremesh_peer_last_handshake_age_seconds{node=\"a1\",peer=\"b\\\"1\"} 5\n"
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE wiremesh_peer_transmit_bytes_total counter"));
        assert!(
            text.contains(
                "wiremesh_peer_path{node=\"a1\",peer=\"b\\\"1\",path=\"relayed\",via=\"p1\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("wiremesh_relay_forwarded_packets_total{node=\"a1\",pair=\"x/y\"} 12\n"),
            "{text}"
        );
    }
}

#[cfg(test)]
mod dashboard {
    use super::*;

    /// The Grafana dashboard in deploy/grafana only queries metrics the agent serves.
    #[test]
    fn dashboard_queries_only_served_metrics() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/grafana/wiremesh.json"
        );
        let dashboard = std::fs::read_to_string(path).expect("the dashboard");
        let served = render(&Metrics::default());
        let mut queried = 0;
        for word in dashboard.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("wiremesh_") {
                queried += 1;
                assert!(
                    served.contains(&format!("# TYPE {word} ")),
                    "the dashboard queries {word}, which the agent does not serve"
                );
            }
        }
        assert!(queried >= 7, "the dashboard queries the agent's metrics");
    }
}
