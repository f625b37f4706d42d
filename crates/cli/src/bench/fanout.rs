//! Fan-out of one registry change: a cluster of `--agents` settled nodes, all
//! watching the registry (by default an etcd cluster the benchmark starts). Then the
//! benchmark writes the record of a new node itself (a node with no agent of its
//! own: a fresh key, the next free pod CIDR), and times, from just before the
//! write, how long until each agent has applied it, i.e. its device lists the new
//! peer. It reports the spread across agents: median, 90th percentile, slowest.
//! Several changes are timed one after another on the same cluster.
//!
//! The bed is `convergence`'s ([`super::convergence::Bed`]); where `convergence`
//! times a real node's join from when its record shows up, this writes the record,
//! so the clock starts at the change itself.

use std::time::Duration;

use anyhow::{bail, Result};

use super::convergence::{settled_bed, BedArgs, Registry};

#[derive(clap::Args)]
pub struct Args {
    /// Agents watching the registry.
    #[arg(long, default_value_t = 50)]
    agents: usize,
    /// Changes (new node records) to time, one after another.
    #[arg(long, default_value_t = 5)]
    changes: usize,
    /// The registry the agents watch.
    #[arg(long, value_enum, default_value_t = Registry::Etcd)]
    registry: Registry,
    #[command(flatten)]
    bed: BedArgs,
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

/// The `p`-th percentile (nearest rank) of sorted, non-empty `values`.
fn percentile(values: &[Duration], p: usize) -> Duration {
    let rank = (values.len() * p).div_ceil(100).max(1);
    values[rank - 1]
}

pub fn run(args: Args) -> Result<()> {
    if args.changes == 0 {
        bail!("--changes must be at least 1");
    }
    let bed = settled_bed(args.registry, &args.bed, args.agents)?;
    println!(
        "registry: {:?}{}; {} agents",
        args.registry,
        match args.registry {
            Registry::Etcd => format!(" ({} members)", args.bed.etcd_members),
            Registry::Dir => String::new(),
        },
        bed.len()
    );
    println!("| change | p50 applied | p90 applied | last applied |");
    println!("|---:|---:|---:|---:|");
    let mut all = Vec::new();
    for c in 1..=args.changes {
        let mut times = bed.announce(&format!("x{c}"))?;
        times.sort();
        println!(
            "| {c} | {} | {} | {} |",
            ms(percentile(&times, 50)),
            ms(percentile(&times, 90)),
            ms(*times.last().expect("agents"))
        );
        all.extend(times);
    }
    all.sort();
    println!(
        "| all | {} | {} | {} |",
        ms(percentile(&all, 50)),
        ms(percentile(&all, 90)),
        ms(*all.last().expect("agents"))
    );
    let weight: Vec<String> = bed
        .registry_weight()?
        .iter()
        .map(|(kind, keys, bytes)| {
            format!("{kind}: {keys} keys, {:.1} KiB", *bytes as f64 / 1024.0)
        })
        .collect();
    println!("the cluster in the registry: {}", weight.join("; "));
    if bed.restarts > 0 {
        println!(
            "({} agents exited at start-up and were started again)",
            bed.restarts
        );
    }
    Ok(())
}
