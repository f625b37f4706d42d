//! `wiremesh demo`: a whole multi-site cluster on this one host, built from network
//! namespaces, running the real agent and data plane, and proven to work.
//!
//! Three locations (two clouds and an edge site behind NAT), two nodes each, two
//! containers per node, one `wiremesh agent` process per node on the embedded
//! registry in `location` granularity. The demo shows the mesh converging, then a
//! reachability matrix (ICMP and TCP between every pair of containers, over IPv4 and
//! IPv6: pods are dual-stack), the tunnels, and an audit of the underlay proving it
//! carried nothing but WireGuard UDP. `--underlay ipv6` gives the nodes IPv6
//! addresses only.

mod testbed;
mod vpc_act;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use wiremesh_agent::Cluster;
use wiremesh_host::{netns, probe};
use wiremesh_topology::compute;

pub use testbed::{Testbed, Underlay};

#[derive(Args)]
pub struct DemoArgs {
    #[command(subcommand)]
    command: Option<DemoCommand>,
    /// Run the checks, tear everything down, and exit non-zero if any pair of containers cannot talk.
    #[arg(long)]
    check: bool,
    /// Working directory for the demo's registry, node state and logs.
    #[arg(long, default_value = "/run/wiremesh-demo")]
    workdir: PathBuf,
    /// The address family the nodes reach each other over (the pods are dual-stack either way).
    #[arg(long, value_enum, default_value = "ipv4")]
    underlay: Underlay,
}

#[derive(Subcommand)]
enum DemoCommand {
    /// Remove what a crashed or interrupted demo left behind (namespaces, processes, files).
    Down {
        #[arg(long, default_value = "/run/wiremesh-demo")]
        workdir: PathBuf,
    },
}

const ECHO_PORT: u16 = 7;

pub fn run(args: DemoArgs) -> Result<()> {
    if let Some(DemoCommand::Down { workdir }) = args.command {
        testbed::down(&workdir);
        println!(
            "removed the demo's namespaces, processes and {}",
            workdir.display()
        );
        return Ok(());
    }
    preflight()?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let started = Instant::now();
    let family = match args.underlay {
        Underlay::Ipv4 => "IPv4",
        Underlay::Ipv6 => "IPv6",
    };
    step(1, &format!("building the testbed: 3 locations, 6 nodes, a NAT router, an {family} underlay in network namespaces"));
    let mut bed = Testbed::build(&args.workdir, args.underlay)?;
    step(
        2,
        "starting one wiremesh agent per node (embedded registry, location granularity)",
    );
    bed.start_agents()?;
    let cluster = bed.cluster()?;
    wait_for("nodes registered", Duration::from_secs(30), &stop, || {
        let (snapshot, _, _) = cluster.snapshot()?;
        Ok((snapshot.nodes.len(), testbed::NODES.len()))
    })?;
    step(
        3,
        "plugging in 12 dual-stack containers (2 per node) with addresses from each node's pod CIDRs",
    );
    bed.add_pods(&cluster)?;
    step(
        4,
        "waiting for every agent to configure its WireGuard peers",
    );
    wait_for(
        "nodes with every expected peer",
        Duration::from_secs(60),
        &stop,
        || converged(&cluster),
    )?;
    step(
        5,
        "checking every container reaches every other (ICMP echo and TCP, IPv4 and IPv6)",
    );
    let failures = reachability(&bed)?;
    let act2 = vpc_act::run(&args.workdir)?;
    println!();
    println!(
        "{}",
        crate::status::render(
            &cluster.snapshot()?.0,
            &cluster.statuses()?,
            &[],
            crate::status::unix_now()
        )
    );
    let audit = bed.audit()?;
    println!("underlay audit (packets the nodes sent on their LAN and WAN links):");
    let kinds: Vec<String> = audit
        .other_kinds
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!(
        "  WireGuard UDP: {}    anything else: {} {}",
        audit.wireguard,
        audit.other,
        if kinds.is_empty() {
            String::new()
        } else {
            format!("({})", kinds.join(", "))
        }
    );
    if audit.other == 0 && audit.wireguard > 0 {
        println!(
            "  => the underlay carried only WireGuard: no container packet crossed it in plaintext"
        );
    }
    println!(
        "\nconverged and checked in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let ok = failures == 0 && audit.other == 0 && act2.failures.is_empty();
    if args.check {
        drop(bed);
        if !ok {
            bail!("{failures} container pair checks (IPv4 or IPv6) failed, {} non-WireGuard packets on the underlay, {} VPC checks failed", audit.other, act2.failures.len());
        }
        println!("demo check passed");
        return Ok(());
    }
    print_instructions(&bed, &args.workdir);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("\nremoving the demo ...");
    drop(bed);
    println!("done");
    if ok {
        Ok(())
    } else {
        bail!("{failures} container pair checks (IPv4 or IPv6) failed")
    }
}

fn preflight() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the demo builds network namespaces: run it as root (sudo)");
    }
    for tool in ["ip", "nft", "nsenter"] {
        if which(tool).is_none() {
            bail!("`{tool}` is missing: apt-get install -y iproute2 nftables util-linux");
        }
    }
    let wg = wiremesh_agent::device::default_program();
    if !wg.exists() && which("wiremesh-wg").is_none() {
        bail!("wiremesh-wg is missing: build it with `cargo build --release` (it sits next to the wiremesh binary)");
    }
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join(tool))
        .find(|p| p.exists())
}

fn step(n: u32, what: &str) {
    println!("[{n}/5] {what}");
}

/// Poll `progress` (done, total) until done == total, showing it on one line.
fn wait_for(
    what: &str,
    timeout: Duration,
    stop: &AtomicBool,
    mut progress: impl FnMut() -> Result<(usize, usize)>,
) -> Result<()> {
    let start = Instant::now();
    loop {
        let (done, total) = progress().unwrap_or((0, 1));
        print!(
            "\r      {what}: {done}/{total}  ({:.1}s)   ",
            start.elapsed().as_secs_f64()
        );
        let _ = std::io::stdout().flush();
        if done == total {
            println!();
            return Ok(());
        }
        if stop.load(Ordering::Relaxed) {
            println!();
            bail!("interrupted");
        }
        if start.elapsed() > timeout {
            println!();
            bail!("timed out after {timeout:?} waiting for {what}; see the agents' logs");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// How many nodes' devices hold exactly the peers their topology asks for.
fn converged(cluster: &Cluster) -> Result<(usize, usize)> {
    let (snapshot, _, _) = cluster.snapshot()?;
    let statuses = cluster.statuses()?;
    let mut done = 0;
    for node in &snapshot.nodes {
        let want: BTreeSet<String> = compute(&snapshot, &node.name)?
            .peers
            .iter()
            .map(|p| p.name.clone())
            .collect();
        let have: Option<BTreeSet<String>> = statuses
            .iter()
            .find(|s| s.node == node.name.as_str())
            .map(|s| s.peers.iter().map(|p| p.name.clone()).collect());
        if have.as_ref() == Some(&want) {
            done += 1;
        }
    }
    Ok((done, testbed::NODES.len()))
}

/// Probe every ordered pair of containers; print a matrix; return the failures.
fn reachability(bed: &Testbed) -> Result<usize> {
    let pods = bed.pods();
    for pod in pods {
        let listener_ns = pod.netns.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        netns::spawn_in(&listener_ns, move || {
            // `::` takes IPv4 connections too (as IPv4-mapped addresses).
            match std::net::TcpListener::bind(("::", ECHO_PORT)) {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    probe::serve_echo(l);
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })?;
        rx.recv_timeout(Duration::from_secs(5))
            .context("echo server did not start")??;
    }
    // One thread per source container; each probes every destination, retrying while
    // the first handshakes happen.
    let handles: Vec<_> = pods
        .iter()
        .map(|src| {
            let targets: Vec<IpAddr> = pods
                .iter()
                .filter(|d| d.ip != src.ip)
                .flat_map(|d| [IpAddr::V4(d.ip), IpAddr::V6(d.ip6)])
                .collect();
            let ns = src.netns.clone();
            std::thread::spawn(move || {
                netns::enter(&ns, move || {
                    targets
                        .into_iter()
                        .map(|dst| (dst, probe_pair(dst)))
                        .collect::<Vec<_>>()
                })
            })
        })
        .collect();
    let mut results = Vec::new();
    for (src, h) in pods.iter().zip(handles) {
        let row = h
            .join()
            .map_err(|_| anyhow::anyhow!("probe thread panicked"))??;
        results.push((src, row));
    }
    let label_of = |ip: IpAddr| {
        pods.iter()
            .find(|p| IpAddr::V4(p.ip) == ip || IpAddr::V6(p.ip6) == ip)
            .map_or("?".to_string(), |p| format!("{} {ip}", p.label))
    };
    print!("\n{:>14} ", "from \\ to");
    for p in pods {
        print!("{:>7}", p.label);
    }
    println!();
    let mut failures = 0;
    for (src, row) in &results {
        print!("{:>14} ", format!("{} {}", src.label, src.ip));
        for dst in pods {
            let cell = if dst.ip == src.ip {
                "·".to_string()
            } else {
                let mut cell = String::new();
                for (family, ip) in [("4", IpAddr::V4(dst.ip)), ("6", IpAddr::V6(dst.ip6))] {
                    match row.iter().find(|(i, _)| *i == ip) {
                        Some((_, (true, true))) => {}
                        Some((_, (ping, tcp))) => {
                            failures += 1;
                            cell += &format!(
                                "{}{}",
                                if *ping { "" } else { "!i" },
                                if *tcp { "" } else { "!t" }
                            );
                            cell += family;
                        }
                        None => cell += "?",
                    }
                }
                if cell.is_empty() {
                    "ok".into()
                } else {
                    cell
                }
            };
            print!("{cell:>7}");
        }
        println!();
    }
    let pairs = 2 * pods.len() * (pods.len() - 1);
    println!(
        "{} of {pairs} (container pair, IPv4 or IPv6) checks reach each other over ICMP and TCP",
        pairs - failures
    );
    for (src, row) in &results {
        for (dst, (ping, tcp)) in row {
            if !(ping & tcp) {
                println!(
                    "  FAIL {} -> {} (icmp {}, tcp {})",
                    src.label,
                    label_of(*dst),
                    ping,
                    tcp
                );
            }
        }
    }
    Ok(failures)
}

/// (ICMP ok, TCP ok) for one destination, allowing a few seconds for first contact.
fn probe_pair(dst: IpAddr) -> (bool, bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut ping = false;
    while !ping && Instant::now() < deadline {
        ping = probe::ping(dst, Duration::from_secs(1)).is_ok();
    }
    let mut tcp = false;
    while !tcp && Instant::now() < deadline {
        tcp = probe::tcp_echo(SocketAddr::new(dst, ECHO_PORT), Duration::from_secs(2)).is_ok();
    }
    (ping, tcp)
}

fn print_instructions(bed: &Testbed, workdir: &std::path::Path) {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "wiremesh".into());
    let first = &bed.pods()[0];
    let last = &bed.pods()[bed.pods().len() - 1];
    println!(
        "\nThe demo stays up until Ctrl-C. Poke around from another terminal:\n\
         \x20 {exe} status --registry dir:{reg} --cluster demo\n\
         \x20 {exe} graph --registry dir:{reg} --cluster demo\n\
         \x20 ip netns exec wmd-a1 wg show wmd-a1            # the leader of cloud-a (needs wireguard-tools)\n\
         \x20 ip netns exec {src} nc -v {dst} {ECHO_PORT}      # {a} -> {b}, across sites and through the edge NAT\n\
         \x20 ip netns list | grep wmd-                      # every host of the demo\n\
         \x20 tail -f {logs}/a1.log                          # an agent's log\n\
         If a run is interrupted hard, `{exe} demo down` removes its leftovers.",
        reg = workdir.join("registry").display(),
        logs = workdir.join("logs").display(),
        src = first.netns,
        dst = last.ip,
        a = first.label,
        b = last.label,
    );
}
