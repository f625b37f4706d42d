//! `wiremesh bench vip`: what a service's virtual IP costs a client, and whether the
//! number of VPCs on a node changes it (issue 8's benchmark).
//!
//! Two nodes over `wiremesh-wg` (the [`Bed`] of `bench convergence`), VPC `v0` with a
//! client pod on n0 and a server pod on n1, plugged in as the CNI plugin does (the
//! node's agent is asked for the VPC through its state directory), and a service
//! whose one endpoint is the server. The client measures, directly to the server's
//! pod IP and through the VIP, alternating the two so the machine's noise falls on
//! both: new connections per second (connect, then reset, so no TIME_WAIT piles up),
//! the connect time, and the request-response time on one long-lived connection (64
//! bytes each way). Then more VPCs are added, each with a client and a server pod and
//! a service that the client has reached once, so the device's VPC table and every
//! namespace's ruleset are populated, and the same is measured again.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use wiremesh_agent::Cluster;
use wiremesh_host::netns;

use super::convergence::{Bed, BedArgs, Registry};
use crate::vpc_pod;

/// The shared bed's namespace prefix: its teardown removes our pods and names too.
const PREFIX: &str = "wmb-";
const CLUSTER: &str = "bench";
/// The server pod's ports: one echoes (request-response), one accepts and hangs up.
const ECHO_PORT: u16 = 7;
const CONNECT_PORT: u16 = 80;
const MESSAGE: usize = 64;
/// The node of the clients, and the node of the servers.
const CLIENT_NODE: usize = 0;
const SERVER_NODE: usize = 1;

#[derive(clap::Args)]
pub struct Args {
    /// Numbers of VPCs on the nodes to measure with (each with pods and a service).
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    vpcs: Vec<usize>,
    /// Seconds of each measurement.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Measurements of each path (direct, VIP) per VPC count, alternating.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Where the JSON report goes.
    #[arg(long, default_value = "vip-bench.json")]
    json: PathBuf,
    #[command(flatten)]
    bed: BedArgs,
}

/// One VPC's pods and service.
struct Tenant {
    /// The client pod's namespace (on n0).
    client: String,
    server: Ipv4Addr,
    vip: Ipv4Addr,
}

/// What one path (direct or VIP) gave over all its rounds.
#[derive(Default)]
struct Sample {
    connects: Vec<Duration>,
    /// Seconds spent making `connects`.
    connecting: f64,
    round_trips: Vec<Duration>,
}

impl Sample {
    fn per_second(&self) -> f64 {
        self.connects.len() as f64 / self.connecting.max(f64::MIN_POSITIVE)
    }

    fn summary(&mut self) -> serde_json::Value {
        self.connects.sort();
        self.round_trips.sort();
        json!({
            "connections_per_second": self.per_second(),
            "connections": self.connects.len(),
            "connect_p50_us": micros(percentile(&self.connects, 0.50)),
            "connect_p99_us": micros(percentile(&self.connects, 0.99)),
            "request_response_p50_us": micros(percentile(&self.round_trips, 0.50)),
            "request_response_p99_us": micros(percentile(&self.round_trips, 0.99)),
            "request_responses": self.round_trips.len(),
        })
    }
}

/// The `p` quantile of sorted `v` (zero if empty).
fn percentile(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

pub fn run(args: Args) -> Result<()> {
    let mut counts = args.vpcs.clone();
    counts.sort_unstable();
    counts.dedup();
    if counts.first().is_none_or(|&n| n == 0) {
        bail!("--vpcs: give VPC counts of at least 1");
    }
    let registry = format!("dir:{}", args.bed.workdir.join("registry").display());
    let mut bed = Bed::new(Registry::Dir, &args.bed)?;
    enable_vpcs(&registry)?;
    bed.add()?;
    bed.add()?;
    eprint!("two nodes: settling ... ");
    let settle = bed.settle(Duration::from_secs(60))?;
    eprintln!("{:.1}s", settle.as_secs_f64());
    let cli = vpc_pod::Cli {
        registry,
        cluster: CLUSTER.into(),
    };
    let result = measure_all(&args, &counts, &cli);
    drop(bed);
    vpc_pod::forget_vpc_names(PREFIX);
    result
}

fn measure_all(args: &Args, counts: &[usize], cli: &vpc_pod::Cli) -> Result<()> {
    let workdir = &args.bed.workdir;
    let per = Duration::from_secs_f64(args.seconds);
    let mut tenants: Vec<Tenant> = Vec::new();
    let mut rows = Vec::new();
    println!(
        "| VPCs | path | connections/s | connect p50 | connect p99 | request-response p50 | p99 |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for &n in counts {
        let started = Instant::now();
        // Ten at a time: an agent asked for many new VPCs at once spends one long
        // reconcile on them.
        while tenants.len() < n {
            let batch = tenants.len()..n.min(tenants.len() + 10);
            add_tenants(workdir, cli, batch, &mut tenants)?;
        }
        eprintln!(
            "{n} VPCs on each node, each with a client, a server and a service ({:.1}s)",
            started.elapsed().as_secs_f64()
        );
        let t = &tenants[0];
        let mut direct = Sample::default();
        let mut vip = Sample::default();
        for round in 0..args.rounds {
            // Alternate which goes first, so neither always meets a warmer machine.
            let order = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for through_vip in order {
                let (sample, dst) = if through_vip {
                    (&mut vip, t.vip)
                } else {
                    (&mut direct, t.server)
                };
                measure(&t.client, dst, per, sample)?;
            }
            eprintln!(
                "  round {}/{}: direct {:.0}/s, VIP {:.0}/s",
                round + 1,
                args.rounds,
                direct.per_second(),
                vip.per_second()
            );
        }
        let (d, v) = (direct.summary(), vip.summary());
        for (path, s) in [("direct", &d), ("VIP", &v)] {
            println!(
                "| {n} | {path} | {:.0} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs |",
                s["connections_per_second"].as_f64().unwrap_or_default(),
                s["connect_p50_us"].as_f64().unwrap_or_default(),
                s["connect_p99_us"].as_f64().unwrap_or_default(),
                s["request_response_p50_us"].as_f64().unwrap_or_default(),
                s["request_response_p99_us"].as_f64().unwrap_or_default(),
            );
        }
        let f = |s: &serde_json::Value, k: &str| s[k].as_f64().unwrap_or_default();
        let ratio = f(&v, "connections_per_second") / f(&d, "connections_per_second");
        let connect_delta = f(&v, "connect_p50_us") - f(&d, "connect_p50_us");
        let rr_delta = f(&v, "request_response_p50_us") - f(&d, "request_response_p50_us");
        println!(
            "| {n} | VIP/direct | ×{ratio:.3} | {connect_delta:+.0} µs | | {rr_delta:+.0} µs | |"
        );
        rows.push(json!({
            "vpcs": n,
            "direct": d,
            "vip": v,
            "vip_over_direct": {
                "connections_per_second": ratio,
                "connect_p50_delta_us": connect_delta,
                "request_response_p50_delta_us": rr_delta,
            },
        }));
    }
    let report = json!({
        "benchmark": "vip",
        "seconds_per_measurement": args.seconds,
        "rounds": args.rounds,
        "message_bytes": MESSAGE,
        "results": rows,
    });
    fs::write(&args.json, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    println!("JSON report: {}", args.json.display());
    Ok(())
}

/// One round of a path: connections, then request-responses, `per` each.
fn measure(client: &str, dst: Ipv4Addr, per: Duration, sample: &mut Sample) -> Result<()> {
    let (connects, connecting, round_trips) = netns::enter(client, move || {
        let (connects, connecting) = connections(SocketAddr::from((dst, CONNECT_PORT)), per)?;
        let round_trips = request_responses(SocketAddr::from((dst, ECHO_PORT)), per)?;
        std::io::Result::Ok((connects, connecting, round_trips))
    })?
    .with_context(|| format!("measuring {dst}"))?;
    sample.connects.extend(connects);
    sample.connecting += connecting;
    sample.round_trips.extend(round_trips);
    Ok(())
}

/// New connections back to back for `per`: each one's connect time, and the seconds
/// they took in all. Each is reset once made, leaving no TIME_WAIT behind.
fn connections(dst: SocketAddr, per: Duration) -> std::io::Result<(Vec<Duration>, f64)> {
    let start = Instant::now();
    let mut times = Vec::new();
    while start.elapsed() < per {
        let t = Instant::now();
        let conn = TcpStream::connect_timeout(&dst, Duration::from_secs(2))?;
        times.push(t.elapsed());
        let reset = nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        nix::sys::socket::setsockopt(&conn, nix::sys::socket::sockopt::Linger, &reset)?;
    }
    Ok((times, start.elapsed().as_secs_f64()))
}

/// Request-responses of `MESSAGE` bytes on one connection, back to back, for `per`.
fn request_responses(dst: SocketAddr, per: Duration) -> std::io::Result<Vec<Duration>> {
    let mut conn = TcpStream::connect_timeout(&dst, Duration::from_secs(2))?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let (request, mut response) = ([7u8; MESSAGE], [0u8; MESSAGE]);
    let start = Instant::now();
    let mut times = Vec::new();
    while start.elapsed() < per {
        let t = Instant::now();
        conn.write_all(&request)?;
        conn.read_exact(&mut response)?;
        times.push(t.elapsed());
    }
    Ok(times)
}

/// VPCs need the mesh ULA that `wiremesh init` picks; the shared bed initialises its
/// cluster with default settings, so they gain one before any agent starts.
fn enable_vpcs(registry: &str) -> Result<()> {
    let cluster = Cluster::new(wiremesh_agent::open_store(registry)?, CLUSTER);
    let mut settings = cluster.settings()?;
    settings.mesh_ula = Some(crate::vpc_cmd::random_mesh_ula()?);
    let key = format!("{}settings", cluster.prefix());
    cluster.store.put(&key, &settings.to_json(), None)?;
    Ok(())
}

/// VPCs `v<k>` for k in `range` (ids k + 1, all on 10.10.0.0/16), in one batch: the
/// records, both nodes asked to host them, the pods, the services, and a connection
/// from each client through its VIP.
fn add_tenants(
    workdir: &Path,
    cli: &vpc_pod::Cli,
    range: std::ops::Range<usize>,
    tenants: &mut Vec<Tenant>,
) -> Result<()> {
    for k in range.clone() {
        let (name, id) = (format!("v{k}"), (k + 1).to_string());
        cli.run(&[
            "vpc",
            "create",
            &name,
            "--id",
            &id,
            "--pod-cidr",
            "10.10.0.0/16",
        ])?;
        for node in [CLIENT_NODE, SERVER_NODE] {
            vpc_pod::request(&workdir.join(format!("n{node}")), &name)?;
        }
    }
    for k in range {
        let name = format!("v{k}");
        let server = pod(workdir, SERVER_NODE, &name)?;
        serve(&server)?;
        let client = pod(workdir, CLIENT_NODE, &name)?;
        let vip = cli.service(
            &format!("{name}/bench/echo"),
            &[
                &format!("echo:{ECHO_PORT}/tcp"),
                &format!("connect:{CONNECT_PORT}/tcp"),
            ],
            (server.1, &format!("n{SERVER_NODE}")),
        )?;
        tenants.push(Tenant {
            client: client.0,
            server: server.1,
            vip,
        });
    }
    for t in tenants.iter() {
        let dst = SocketAddr::from((t.vip, ECHO_PORT));
        let reached = wait(Duration::from_secs(60), || {
            netns::enter(&t.client, move || {
                request_responses(dst, Duration::ZERO).is_ok()
            })
            .unwrap_or(false)
        });
        if !reached {
            bail!("{}'s client never reached its VIP {}", t.client, t.vip);
        }
    }
    Ok(())
}

/// A pod of `vpc` on node `node` (host 1 of its block): its namespace and address.
fn pod(workdir: &Path, node: usize, vpc: &str) -> Result<(String, Ipv4Addr)> {
    let pod_ns = format!("{PREFIX}{vpc}-n{node}");
    let state_dir = workdir.join(format!("n{node}"));
    let ip = vpc_pod::plug(&state_dir, &node_ns(node), vpc, 1, &pod_ns, PREFIX)?;
    Ok((pod_ns, ip))
}

/// Node `node`'s namespace in the shared bed, also its WireGuard interface's name.
fn node_ns(node: usize) -> String {
    format!("{PREFIX}n{node}")
}

/// The server pod's listeners: an echo on `ECHO_PORT`, and on `CONNECT_PORT` one
/// that accepts and hangs up (the connect benchmark's clients reset at once).
fn serve((ns, ip): &(String, Ipv4Addr)) -> Result<()> {
    let ip = *ip;
    let (echo, connect) = netns::enter(ns, move || {
        std::io::Result::Ok((
            TcpListener::bind((ip, ECHO_PORT))?,
            TcpListener::bind((ip, CONNECT_PORT))?,
        ))
    })??;
    std::thread::spawn(move || {
        for conn in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = conn.set_nodelay(true);
                if let Ok(mut back) = conn.try_clone() {
                    let _ = std::io::copy(&mut &conn, &mut back);
                }
            });
        }
    });
    std::thread::spawn(move || for _conn in connect.incoming() {});
    Ok(())
}

/// Polls `ready` every 20 ms, for at most `within`.
fn wait(within: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if ready() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
