//! `wiremesh bench vip`: what a service's virtual IP costs a client, and whether the
//! number of VPCs on a node changes it (issue 8's benchmark).
//!
//! Two nodes over `wiremesh-wg` (the [`Bed`] of `bench convergence`), VPC `v0` with a
//! client pod on n0 and a server pod on n1, plugged in as the CNI plugin does (the
//! node's agent is asked for the VPC through its state directory), and a service
//! whose one endpoint is the server. The client measures new connections per second
//! (connect, then reset, so no TIME_WAIT piles up), the connect time, and the
//! request-response time on one long-lived connection per path (64 bytes each way),
//! directly to the server's pod IP and through the VIP.
//!
//! This machine's load swings the rates twofold within seconds, so the two paths are
//! measured in pairs of short windows back to back, in an order that changes from
//! pair to pair, and compared *within* each pair: load that drifts slower than a pair
//! cancels. The report is the median of the per-pair ratios (and differences) with
//! its order-statistics confidence interval, and a target is called met or missed
//! only when the interval lies wholly on one side of it ("undecided" otherwise).
//! Each path connects from its own half of the ephemeral port range: conntrack in the
//! client's VPC namespace remembers a reset connection for 10 s, and a VIP
//! connection's reply tuple (server:port → client:port) is the same as a direct one's
//! from the same client port: shared ports make the paths collide in conntrack, and
//! the kernel then rewrites the later connection's source port (seen: a direct
//! connection from port 20000 after a VIP one from 20000 got reply port 1273), NAT
//! work on both paths that neither alone ever does.
//!
//! Then more VPCs are added, each with a client and a server pod and a service that
//! the client has reached once, so the device's VPC table and every namespace's
//! ruleset are populated, and the same is measured again.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
use nix::sys::time::TimeVal;
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
/// Issue 8's targets: the VIP keeps at least this share of the direct connections/s,
/// and adds at most this much to the median connect time.
const RATE_TARGET: f64 = 0.95;
const CONNECT_P50_TARGET_US: f64 = 10.0;
/// The confidence of the reported intervals.
const CONFIDENCE: f64 = 0.95;
/// The client's source ports: direct from the lower half of Linux's default
/// ephemeral range, the VIP from the upper (see the module comment).
const DIRECT_PORTS: (u16, u16) = (32768, 46883);
const VIP_PORTS: (u16, u16) = (46884, 60999);
/// `IP_LOCAL_PORT_RANGE` (Linux 6.3's uapi `in.h`; the libc crate lacks it).
const IP_LOCAL_PORT_RANGE: nix::libc::c_int = 51;

#[derive(clap::Args)]
pub struct Args {
    /// Numbers of VPCs on the nodes to measure with (each with pods and a service).
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    vpcs: Vec<usize>,
    /// Pairs of windows (one direct, one through the VIP) per VPC count.
    #[arg(long, default_value_t = 100)]
    pairs: usize,
    /// Milliseconds of each window (connections, then request-responses, per path).
    #[arg(long, default_value_t = 150)]
    window_ms: u64,
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

/// What one path gave in one window.
#[derive(Default)]
struct Window {
    /// Connect times, sorted.
    connects: Vec<Duration>,
    /// Seconds spent making `connects`.
    connecting: f64,
    /// Request-response times, sorted.
    round_trips: Vec<Duration>,
}

impl Window {
    fn per_second(&self) -> f64 {
        self.connects.len() as f64 / self.connecting.max(f64::MIN_POSITIVE)
    }
}

/// The two paths' windows measured back to back.
struct Pair {
    direct: Window,
    vip: Window,
}

/// A median and its confidence interval.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Estimate {
    median: f64,
    low: f64,
    high: f64,
}

impl Estimate {
    /// The median of `values` with its order-statistics interval; `None` when there
    /// are too few values for an interval at [`CONFIDENCE`].
    fn of(mut values: Vec<f64>) -> Option<Estimate> {
        values.sort_by(f64::total_cmp);
        let (low, high) = median_interval(values.len(), CONFIDENCE)?;
        Some(Estimate {
            median: median(&values),
            low: values[low],
            high: values[high],
        })
    }

    fn json(&self) -> serde_json::Value {
        json!({ "median": self.median, "low": self.low, "high": self.high })
    }
}

impl std::fmt::Display for Estimate {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let p = f.precision().unwrap_or(0);
        write!(
            f,
            "{:.p$} [{:.p$}, {:.p$}]",
            self.median, self.low, self.high
        )
    }
}

/// Whether an interval decides a target.
#[derive(Debug, PartialEq)]
enum Verdict {
    Met,
    Missed,
    Undecided,
}

impl Verdict {
    /// For a target `estimate ≥ target` (`at_least`) or `estimate ≤ target`.
    fn of(estimate: Option<Estimate>, target: f64, at_least: bool) -> Verdict {
        let Some(e) = estimate else {
            return Verdict::Undecided;
        };
        let (worst, best) = if at_least {
            (e.low, e.high)
        } else {
            (-e.high, -e.low)
        };
        let target = if at_least { target } else { -target };
        if worst >= target {
            Verdict::Met
        } else if best < target {
            Verdict::Missed
        } else {
            Verdict::Undecided
        }
    }

    fn word(&self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "missed",
            Verdict::Undecided => "undecided",
        }
    }
}

/// The median of sorted `v` (zero if empty).
fn median(v: &[f64]) -> f64 {
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The 0-based ranks `(j, n - 1 - j)` of the sorted sample of `n` that bound its
/// population's median with at least `confidence`: the largest `j` with
/// P(Binomial(n, ½) ≤ j) ≤ (1 − confidence)/2, the count of values below the median
/// being that binomial whatever the distribution. `None` when even the extremes
/// fall short (fewer than 6 values at 95 %).
fn median_interval(n: usize, confidence: f64) -> Option<(usize, usize)> {
    let tail = (1.0 - confidence) / 2.0;
    // The pmf in logs: 2^-n underflows beyond n ≈ 1070.
    let mut log_choose = 0.0_f64;
    let log_half_n = -(n as f64) * std::f64::consts::LN_2;
    let mut below = 0.0;
    let mut j = None;
    for i in 0..n / 2 {
        below += (log_choose + log_half_n).exp();
        if below > tail {
            break;
        }
        j = Some(i);
        log_choose += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
    }
    j.map(|j| (j, n - 1 - j))
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

/// Whether pair `i` measures the VIP first: a fixed pseudo-random sequence
/// (splitmix64), half each way with no period for the machine's load to fall into.
fn vip_first(i: usize) -> bool {
    let mut z = (i as u64)
        .wrapping_add(1)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) & 1 == 1
}

/// One path's figures pooled over all its windows.
struct PathSummary {
    per_second: f64,
    connect_p50: f64,
    connect_p99: f64,
    round_trip_p50: f64,
    round_trip_p99: f64,
    /// The median of the windows' request-response medians: the per-packet cost to
    /// compare between VPC counts, which are measured minutes apart.
    round_trip_window_p50: Option<Estimate>,
}

impl PathSummary {
    fn of<'a>(windows: impl Iterator<Item = &'a Window> + Clone) -> PathSummary {
        let pooled = |f: fn(&Window) -> &Vec<Duration>| {
            let mut all: Vec<Duration> = windows.clone().flat_map(|w| f(w).clone()).collect();
            all.sort_unstable();
            all
        };
        let (connects, round_trips) = (pooled(|w| &w.connects), pooled(|w| &w.round_trips));
        let connecting: f64 = windows.clone().map(|w| w.connecting).sum();
        PathSummary {
            per_second: connects.len() as f64 / connecting.max(f64::MIN_POSITIVE),
            connect_p50: micros(percentile(&connects, 0.50)),
            connect_p99: micros(percentile(&connects, 0.99)),
            round_trip_p50: micros(percentile(&round_trips, 0.50)),
            round_trip_p99: micros(percentile(&round_trips, 0.99)),
            round_trip_window_p50: Estimate::of(
                windows
                    .map(|w| micros(percentile(&w.round_trips, 0.5)))
                    .collect(),
            ),
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "connections_per_second": self.per_second,
            "connect_p50_us": self.connect_p50,
            "connect_p99_us": self.connect_p99,
            "request_response_p50_us": self.round_trip_p50,
            "request_response_p99_us": self.round_trip_p99,
            "request_response_window_p50_us": self.round_trip_window_p50.map(|e| e.json()),
        })
    }
}

/// The VIP against the direct path over the pairs of one VPC count.
struct Comparison {
    pairs: usize,
    direct: PathSummary,
    vip: PathSummary,
    /// Per pair: VIP connections/s ÷ direct.
    rate_ratio: Option<Estimate>,
    /// Per pair: VIP − direct of the window's median connect time, µs.
    connect_delta: Option<Estimate>,
    /// Per pair: VIP − direct of the window's median request-response time, µs.
    round_trip_delta: Option<Estimate>,
}

impl Comparison {
    fn of(pairs: &[Pair]) -> Comparison {
        let per_pair = |f: fn(&Window) -> f64, diff: fn(f64, f64) -> f64| {
            Estimate::of(
                pairs
                    .iter()
                    .map(|p| diff(f(&p.vip), f(&p.direct)))
                    .collect(),
            )
        };
        Comparison {
            pairs: pairs.len(),
            direct: PathSummary::of(pairs.iter().map(|p| &p.direct)),
            vip: PathSummary::of(pairs.iter().map(|p| &p.vip)),
            rate_ratio: per_pair(Window::per_second, |v, d| v / d),
            connect_delta: per_pair(|w| micros(percentile(&w.connects, 0.5)), |v, d| v - d),
            round_trip_delta: per_pair(|w| micros(percentile(&w.round_trips, 0.5)), |v, d| v - d),
        }
    }

    fn rate_verdict(&self) -> Verdict {
        Verdict::of(self.rate_ratio, RATE_TARGET, true)
    }

    fn connect_verdict(&self) -> Verdict {
        Verdict::of(self.connect_delta, CONNECT_P50_TARGET_US, false)
    }

    fn json(&self) -> serde_json::Value {
        let e = |e: Option<Estimate>| e.map(|e| e.json());
        json!({
            "pairs": self.pairs,
            "direct": self.direct.json(),
            "vip": self.vip.json(),
            "per_pair": {
                "connections_per_second_vip_over_direct": e(self.rate_ratio),
                "connect_p50_vip_minus_direct_us": e(self.connect_delta),
                "request_response_p50_vip_minus_direct_us": e(self.round_trip_delta),
            },
            "targets": {
                "connections_per_second_ratio_at_least": RATE_TARGET,
                "connections_per_second": self.rate_verdict().word(),
                "connect_p50_delta_at_most_us": CONNECT_P50_TARGET_US,
                "connect_p50": self.connect_verdict().word(),
            },
        })
    }
}

/// An estimate for a table cell ("–" without one).
fn cell(e: Option<Estimate>, precision: usize) -> String {
    e.map_or("–".into(), |e| format!("{e:.precision$}"))
}

pub fn run(args: Args) -> Result<()> {
    let mut counts = args.vpcs.clone();
    counts.sort_unstable();
    counts.dedup();
    if counts.first().is_none_or(|&n| n == 0) {
        bail!("--vpcs: give VPC counts of at least 1");
    }
    if median_interval(args.pairs, CONFIDENCE).is_none() {
        bail!("--pairs: give at least 6, the fewest with a 95 % interval");
    }
    if args.window_ms == 0 {
        bail!("--window-ms: give at least 1");
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
    let window = Duration::from_millis(args.window_ms);
    let mut tenants: Vec<Tenant> = Vec::new();
    let mut results = Vec::new();
    for &n in counts {
        let started = Instant::now();
        if let Err(e) = add_tenants(workdir, cli, tenants.len()..n, &mut tenants) {
            // What was measured stays: the tables so far, and the JSON already written.
            if !results.is_empty() {
                print_tables(&results);
            }
            return Err(e.context(format!("setting up {n} VPCs")));
        }
        eprintln!(
            "{n} VPCs on each node, each with a client, a server and a service ({:.1}s)",
            started.elapsed().as_secs_f64()
        );
        let t = &tenants[0];
        let (vip, server, pairs) = (t.vip, t.server, args.pairs);
        let measured = netns::enter(&t.client, move || measure_pairs(server, vip, pairs, window))?
            .with_context(|| format!("measuring {server} and {vip} from {}", t.client))?;
        let c = Comparison::of(&measured);
        eprintln!(
            "  {} pairs: VIP/direct connections/s {} ({}), connect p50 {} µs ({})",
            c.pairs,
            cell(c.rate_ratio, 3),
            c.rate_verdict().word(),
            cell(c.connect_delta, 1),
            c.connect_verdict().word()
        );
        results.push((n, c));
        write_report(args, &results)?;
    }
    print_tables(&results);
    println!("JSON report: {}", args.json.display());
    Ok(())
}

/// The JSON report of the counts measured so far (rewritten after each).
fn write_report(args: &Args, results: &[(usize, Comparison)]) -> Result<()> {
    let report = json!({
        "benchmark": "vip",
        "window_ms": args.window_ms,
        "pairs": args.pairs,
        "confidence": CONFIDENCE,
        "message_bytes": MESSAGE,
        "results": results.iter().map(|(n, c)| {
            let mut row = c.json();
            row["vpcs"] = json!(n);
            row
        }).collect::<Vec<_>>(),
    });
    fs::write(&args.json, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", args.json.display()))
}

fn print_tables(results: &[(usize, Comparison)]) {
    println!(
        "Per pair of windows, VIP against direct: median [{:.0} % interval]\n",
        CONFIDENCE * 100.0
    );
    println!(
        "| VPCs | pairs | connections/s VIP÷direct | ≥ {RATE_TARGET} | connect p50 VIP−direct | \
         ≤ {CONNECT_P50_TARGET_US} µs | request-response p50 VIP−direct |"
    );
    println!("|---:|---:|---:|---|---:|---|---:|");
    for (n, c) in results {
        println!(
            "| {n} | {} | ×{} | {} | {} µs | {} | {} µs |",
            c.pairs,
            cell(c.rate_ratio, 3),
            c.rate_verdict().word(),
            cell(c.connect_delta, 1),
            c.connect_verdict().word(),
            cell(c.round_trip_delta, 1),
        );
    }
    println!("\nPooled over all windows of a path:\n");
    println!(
        "| VPCs | path | connections/s | connect p50 | p99 | request-response p50 | p99 | \
         window medians |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for (n, c) in results {
        for (path, s) in [("direct", &c.direct), ("VIP", &c.vip)] {
            println!(
                "| {n} | {path} | {:.0} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {} µs |",
                s.per_second,
                s.connect_p50,
                s.connect_p99,
                s.round_trip_p50,
                s.round_trip_p99,
                cell(s.round_trip_window_p50, 1),
            );
        }
    }
}

/// Runs in the client's namespace: a warm-up pair (not kept: the first connections
/// of a path meet cold caches and conntrack), then `pairs` pairs, each path's
/// connection window back to back, then its request-response window, on one
/// long-lived connection per path.
fn measure_pairs(
    server: Ipv4Addr,
    vip: Ipv4Addr,
    pairs: usize,
    window: Duration,
) -> std::io::Result<Vec<Pair>> {
    let direct = Target::new(server, DIRECT_PORTS)?;
    let through_vip = Target::new(vip, VIP_PORTS)?;
    direct.window(window)?;
    through_vip.window(window)?;
    let mut measured = Vec::with_capacity(pairs);
    for i in 0..pairs {
        let order = if vip_first(i) {
            [&through_vip, &direct]
        } else {
            [&direct, &through_vip]
        };
        let mut windows = [Window::default(), Window::default()];
        for (w, path) in windows.iter_mut().zip(order) {
            (w.connects, w.connecting) = path.connections(window)?;
        }
        for (w, path) in windows.iter_mut().zip(order) {
            w.round_trips = path.request_responses(window)?;
        }
        let [first, second] = windows;
        measured.push(if vip_first(i) {
            Pair {
                direct: second,
                vip: first,
            }
        } else {
            Pair {
                direct: first,
                vip: second,
            }
        });
    }
    Ok(measured)
}

/// A path from the client: a destination, the source ports its connections use, and
/// its long-lived request-response connection.
struct Target {
    addr: Ipv4Addr,
    ports: (u16, u16),
    echo: TcpStream,
}

impl Target {
    fn new(addr: Ipv4Addr, ports: (u16, u16)) -> std::io::Result<Target> {
        let echo = connect(SocketAddrV4::new(addr, ECHO_PORT), ports)?;
        echo.set_nodelay(true)?;
        echo.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(Target { addr, ports, echo })
    }

    /// A window of each kind, thrown away.
    fn window(&self, window: Duration) -> std::io::Result<()> {
        self.connections(window)?;
        self.request_responses(window)?;
        Ok(())
    }

    /// New connections back to back for `window`: their connect times, sorted, and
    /// the seconds they took in all. Each is reset once made, leaving no TIME_WAIT.
    fn connections(&self, window: Duration) -> std::io::Result<(Vec<Duration>, f64)> {
        let dst = SocketAddrV4::new(self.addr, CONNECT_PORT);
        let start = Instant::now();
        let mut times = Vec::new();
        while start.elapsed() < window {
            let t = Instant::now();
            let conn = connect(dst, self.ports)?;
            times.push(t.elapsed());
            let reset = nix::libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            socket::setsockopt(&conn, sockopt::Linger, &reset)?;
        }
        let elapsed = start.elapsed().as_secs_f64();
        times.sort_unstable();
        Ok((times, elapsed))
    }

    /// Request-responses of `MESSAGE` bytes back to back for `window`, sorted.
    fn request_responses(&self, window: Duration) -> std::io::Result<Vec<Duration>> {
        let (request, mut response) = ([7u8; MESSAGE], [0u8; MESSAGE]);
        let mut conn = &self.echo;
        let start = Instant::now();
        let mut times = Vec::new();
        while start.elapsed() < window {
            let t = Instant::now();
            conn.write_all(&request)?;
            conn.read_exact(&mut response)?;
            times.push(t.elapsed());
        }
        times.sort_unstable();
        Ok(times)
    }
}

/// A TCP connection to `dst` from a port the kernel picks in `ports`, given up after
/// 2 s (a connect waits as long as a send may).
fn connect(dst: SocketAddrV4, ports: (u16, u16)) -> std::io::Result<TcpStream> {
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::setsockopt(&fd, sockopt::SendTimeout, &TimeVal::new(2, 0))?;
    let range = u32::from(ports.0) | u32::from(ports.1) << 16;
    // SAFETY: `fd` is an open socket, and the option reads a u32 that lives on.
    let set = unsafe {
        nix::libc::setsockopt(
            fd.as_raw_fd(),
            nix::libc::IPPROTO_IP,
            IP_LOCAL_PORT_RANGE,
            (&range as *const u32).cast(),
            std::mem::size_of::<u32>() as nix::libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket::connect(fd.as_raw_fd(), &SockaddrIn::from(dst))?;
    Ok(TcpStream::from(fd))
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
        let vip = t.vip;
        // Both ports: a connection the VIP refuses would end the measurement.
        let reached = wait(Duration::from_secs(60), || {
            netns::enter(&t.client, move || {
                [ECHO_PORT, CONNECT_PORT]
                    .iter()
                    .all(|&port| connect(SocketAddrV4::new(vip, port), VIP_PORTS).is_ok())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_micros(m)).collect()
    }

    fn window(connects: &[u64], seconds: f64, round_trips: &[u64]) -> Window {
        Window {
            connects: ms(connects),
            connecting: seconds,
            round_trips: ms(round_trips),
        }
    }

    #[test]
    fn median_interval_has_the_binomial_ranks() {
        // n = 10: P(B ≤ 1) = 11/1024 ≤ 2.5 % < P(B ≤ 2) = 56/1024, so the 2nd and 9th.
        assert_eq!(median_interval(10, 0.95), Some((1, 8)));
        // n = 6: P(B ≤ 0) = 1/64 ≤ 2.5 %: the extremes; n = 5 has none.
        assert_eq!(median_interval(6, 0.95), Some((0, 5)));
        assert_eq!(median_interval(5, 0.95), None);
        assert_eq!(median_interval(0, 0.95), None);
        // Large n, where 2^-n underflows: about n/2 ∓ 1.96·√n/2.
        let (low, high) = median_interval(10_000, 0.95).unwrap();
        assert!((4900..=4903).contains(&low), "{low}");
        assert_eq!(high, 9999 - low);
    }

    /// What a user relies on: the interval holds the true median at least 95 % of
    /// the time, and not much more (it is not needlessly wide).
    #[test]
    fn median_interval_covers_the_median_as_often_as_it_says() {
        let mut state = 0u64;
        let mut uniform = || {
            state += 1;
            let mut z = state.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        for n in [7, 40, 101] {
            let trials = 4000;
            let covered = (0..trials)
                .filter(|_| {
                    // Exponential with median ln 2: skewed, as latencies are.
                    let v = (0..n).map(|_| -(1.0 - uniform()).ln()).collect();
                    let e = Estimate::of(v).unwrap();
                    e.low <= std::f64::consts::LN_2 && std::f64::consts::LN_2 <= e.high
                })
                .count() as f64
                / trials as f64;
            assert!((0.94..=0.995).contains(&covered), "n = {n}: {covered}");
        }
    }

    #[test]
    fn estimate_is_the_median_within_its_interval() {
        let e = Estimate::of(vec![5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0]).unwrap();
        assert_eq!(
            e,
            Estimate {
                median: 5.5,
                low: 2.0,
                high: 9.0
            }
        );
        assert_eq!(Estimate::of(vec![1.0; 5]), None);
    }

    #[test]
    fn a_verdict_needs_the_whole_interval_on_one_side() {
        let e = |low, high| {
            Some(Estimate {
                median: (low + high) / 2.0,
                low,
                high,
            })
        };
        assert_eq!(Verdict::of(e(0.96, 1.1), 0.95, true), Verdict::Met);
        assert_eq!(Verdict::of(e(0.90, 0.94), 0.95, true), Verdict::Missed);
        assert_eq!(Verdict::of(e(0.90, 1.01), 0.95, true), Verdict::Undecided);
        assert_eq!(Verdict::of(e(-3.0, 9.0), 10.0, false), Verdict::Met);
        assert_eq!(Verdict::of(e(11.0, 20.0), 10.0, false), Verdict::Missed);
        assert_eq!(Verdict::of(e(5.0, 12.0), 10.0, false), Verdict::Undecided);
        assert_eq!(Verdict::of(None, 10.0, false), Verdict::Undecided);
    }

    #[test]
    fn pairs_are_compared_within_each_pair() {
        // The machine's load halves both paths' rates in every other pair; the VIP
        // keeps 90 % of the direct rate within each pair, and adds 5 µs to a connect.
        let pairs: Vec<Pair> = (0..20)
            .map(|i| {
                let load = if i % 2 == 0 { 1.0 } else { 2.0 };
                Pair {
                    direct: window(&[80, 80, 80, 80], 0.004 * load, &[30, 40, 50]),
                    vip: window(&[85, 85, 85], 0.003 * load / 0.9, &[31, 41, 51]),
                }
            })
            .collect();
        let c = Comparison::of(&pairs);
        let ratio = c.rate_ratio.unwrap();
        assert!((ratio.low - 0.9).abs() < 1e-9 && (ratio.high - 0.9).abs() < 1e-9);
        assert_eq!(c.rate_verdict(), Verdict::Missed);
        assert_eq!(c.connect_delta.unwrap().median, 5.0);
        assert_eq!(c.connect_verdict(), Verdict::Met);
        assert_eq!(c.round_trip_delta.unwrap().median, 1.0);
        assert_eq!(c.direct.connect_p50, 80.0);
        assert_eq!(c.vip.round_trip_p99, 51.0);
    }

    #[test]
    fn half_the_pairs_measure_the_vip_first_in_no_fixed_pattern() {
        let first: Vec<bool> = (0..1000).map(vip_first).collect();
        let vip = first.iter().filter(|&&f| f).count();
        assert!((450..=550).contains(&vip), "{vip}");
        // Not a period of two (plain alternation would be).
        let switches = first.windows(2).filter(|w| w[0] != w[1]).count();
        assert!((400..=600).contains(&switches), "{switches}");
    }
}
