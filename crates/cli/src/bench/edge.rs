//! `wiremesh bench edge`: the Ghent edge-VPN study (Goethals et al., CNSM 2019) on
//! this host: a master and N workers in network namespaces joined by an emulated
//! WAN, every installed VPN side by side under load, loss, latency and edge events.
//! The flags map onto [`wiremesh_edge_bench::scenario::Config`]; the work is in the
//! `wiremesh-edge-bench` crate.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use wiremesh_edge_bench::scenario::{Config, Shapes};
use wiremesh_edge_bench::{harness, vpn};

#[derive(clap::Args)]
pub struct Args {
    /// A subset for CI, about 8 s a VPN (2 workers, one short point per axis repeated
    /// twice, a 0.5 s flap, no address change).
    #[arg(long)]
    quick: bool,
    /// Results folder: report.json, raw/ (per VPN), results.md and the SVG plots.
    #[arg(long, default_value = "edge-results")]
    out: PathBuf,
    /// VPNs to run, by name (default: all): none, wiremesh, wireguard-go, boringtun,
    /// openvpn, tinc, softether, nebula.
    #[arg(long, value_delimiter = ',')]
    vpn: Vec<String>,
    /// Install the missing VPNs first (apt-get install / cargo install), showing their output.
    #[arg(long)]
    install_peers: bool,
    /// Workers (the master is one more host).
    #[arg(long)]
    workers: Option<usize>,
    /// Measure each VPN in its first shape (the study's hub and spoke where it has
    /// one) or in all it supports.
    #[arg(long, value_enum)]
    shapes: Option<ShapesArg>,
    /// Repetitions of every point (the median and min–max are reported).
    #[arg(long)]
    repetitions: Option<usize>,
    /// Seconds one repetition of a load point lasts.
    #[arg(long)]
    point_seconds: Option<f64>,
    /// A request without a whole answer after this many milliseconds is a failure.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Closed-loop levels: concurrent connections.
    #[arg(long, value_delimiter = ',')]
    connections: Option<Vec<usize>>,
    /// Open a new connection for every request instead of keeping connections alive.
    #[arg(long)]
    new_connections: bool,
    /// Skip the open-loop rate sweep.
    #[arg(long)]
    no_open_loop: bool,
    /// First open-loop rate (requests/s); it doubles until the budget breaks.
    #[arg(long)]
    rate_start: Option<f64>,
    /// Open-loop budget: highest p99 (ms).
    #[arg(long)]
    budget_p99_ms: Option<f64>,
    /// Open-loop budget: highest failure rate (percent).
    #[arg(long)]
    budget_failures: Option<f64>,
    /// Loss levels in percent of packets, on every underlay direction.
    #[arg(long, value_delimiter = ',')]
    loss: Option<Vec<f64>>,
    /// Only random loss, no bursty (Gilbert–Elliott) loss of the same rate.
    #[arg(long)]
    no_bursty: bool,
    /// Added round-trip times in milliseconds.
    #[arg(long, value_delimiter = ',')]
    rtt: Option<Vec<u64>>,
    /// Jitter as a fraction of the one-way delay.
    #[arg(long)]
    jitter: Option<f64>,
    /// Skip the edge events (NAT worker, address change, link flap).
    #[arg(long)]
    no_events: bool,
    /// Run the address-change event (on by default, off with --quick).
    #[arg(long)]
    address_change: Option<bool>,
    /// Seconds the underlay stays down in the flap event.
    #[arg(long)]
    flap_seconds: Option<f64>,
    /// Bytes in each HTTP response body.
    #[arg(long)]
    response_bytes: Option<usize>,
    /// Seed of the WAN emulator's loss and jitter (a run repeats with the same seed).
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum ShapesArg {
    First,
    All,
}

fn config(a: &Args) -> Config {
    let mut c = if a.quick {
        Config::quick(a.out.clone())
    } else {
        Config::full(a.out.clone())
    };
    c.vpns = a.vpn.clone();
    if let Some(w) = a.workers {
        c.workers = w;
    }
    if let Some(s) = a.shapes {
        c.shapes = match s {
            ShapesArg::First => Shapes::First,
            ShapesArg::All => Shapes::All,
        };
    }
    if let Some(r) = a.repetitions {
        c.repetitions = r;
    }
    if let Some(s) = a.point_seconds {
        c.point = Duration::from_secs_f64(s.max(0.0));
    }
    if let Some(t) = a.timeout_ms {
        c.timeout = Duration::from_millis(t);
    }
    if let Some(v) = &a.connections {
        c.connections = v.clone();
    }
    c.new_connections = a.new_connections;
    if a.no_open_loop {
        c.open_loop = None;
    } else if a.rate_start.is_some() || a.budget_p99_ms.is_some() || a.budget_failures.is_some() {
        let mut o = c
            .open_loop
            .unwrap_or(Config::full(a.out.clone()).open_loop.expect("full has one"));
        if let Some(r) = a.rate_start {
            o.start_rate = r;
        }
        if let Some(p) = a.budget_p99_ms {
            o.budget.max_p99_ms = p;
        }
        if let Some(f) = a.budget_failures {
            o.budget.max_failure_rate = f / 100.0;
        }
        c.open_loop = Some(o);
    }
    if let Some(v) = &a.loss {
        c.loss_percent = v.clone();
    }
    if a.no_bursty {
        c.bursty = false;
    }
    if let Some(v) = &a.rtt {
        c.rtt_ms = v.clone();
    }
    if let Some(j) = a.jitter {
        c.jitter_fraction = j;
    }
    if a.no_events {
        c.events = false;
        c.address_change = false;
    }
    if let Some(on) = a.address_change {
        c.address_change = on;
    }
    if let Some(f) = a.flap_seconds {
        c.flap = Duration::from_secs_f64(f.max(0.0));
    }
    if let Some(b) = a.response_bytes {
        c.response_bytes = b;
    }
    if let Some(s) = a.seed {
        c.seed = s;
    }
    c
}

/// Installs what the selected, missing VPNs need, with the installers' output shown.
fn install_peers(drivers: &[Box<dyn vpn::Vpn>]) -> Result<()> {
    let missing: Vec<&str> = drivers
        .iter()
        .filter(|d| d.check_installed().is_err())
        .flat_map(|d| d.packages().iter().copied())
        .collect();
    let apt: Vec<&str> = missing
        .iter()
        .filter(|p| !p.starts_with("cargo:"))
        .copied()
        .collect();
    let cargo: Vec<&str> = missing
        .iter()
        .filter_map(|p| p.strip_prefix("cargo:"))
        .collect();
    if !apt.is_empty() {
        println!("installing with apt-get: {}", apt.join(" "));
        let ok = Command::new("apt-get")
            .args(["install", "-y"])
            .args(&apt)
            .status()
            .context("running apt-get")?
            .success();
        if !ok {
            bail!("apt-get install {} failed", apt.join(" "));
        }
    }
    for krate in cargo {
        println!("installing with cargo: {krate}");
        // `--locked`: the crate's own Cargo.lock, not whatever its dependencies
        // published since, so every install builds the same program.
        if !Command::new("cargo")
            .args(["install", "--locked", krate])
            .status()
            .context("running cargo install")?
            .success()
        {
            bail!("cargo install {krate} failed");
        }
    }
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the edge benchmark builds network namespaces: run it as root");
    }
    let config = config(&args);
    let exe = std::env::current_exe().context("locating the wiremesh binary")?;
    let drivers = harness::select(&config, vpn::drivers(exe.clone()))?;
    if args.install_peers {
        install_peers(&drivers)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let command = std::iter::once("wiremesh".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let report = harness::run(config, drivers, command, &stop)?;
    println!("{}", wiremesh_edge_bench::report::render_markdown(&report));
    println!(
        "results in {} (results.md, report.json, raw/, plots)",
        report.config.out.display()
    );
    if report.honesty.iter().any(|h| !h.passed) {
        bail!("a VPN failed the honesty check: see results.md");
    }
    Ok(())
}
