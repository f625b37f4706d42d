//! `wiremesh-wanem`: run a WAN emulator hub between network namespaces by hand.

use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use ipnet::IpNet;
use wiremesh_wanem::{Hub, Impairment, Loss, PortSpec};

/// A userspace WAN emulator between network namespaces (this kernel has no netem).
///
/// Creates a TUN port in each host's namespace, gives it the host's addresses and
/// forwards packets between the ports by destination address, applying the same
/// impairment to every direction. Runs until SIGINT or SIGTERM, then removes the
/// ports.
///
/// Example: two hosts 20 ms apart (40 ms RTT) with 1 % loss at 50 Mbit/s:
///   wiremesh-wanem --host ns1:wan0:10.9.0.1/24 --host ns2:wan0:10.9.0.2/24 \
///     --delay 20ms --loss 1% --rate 50mbit
#[derive(Parser, Debug)]
#[command(version, about, long_about, verbatim_doc_comment)]
struct Args {
    /// A host: NETNS:IFNAME:ADDRESS[,ADDRESS...] (addresses in CIDR notation; the
    /// prefix becomes the host's route to the others). Repeat for each host.
    #[arg(long = "host", required = true, value_name = "NETNS:IFNAME:ADDRESSES", value_parser = parse_host)]
    hosts: Vec<HostArg>,
    /// MTU of every port.
    #[arg(long, default_value_t = 1500)]
    mtu: u16,
    /// Seed of the random decisions (loss, jitter): the same seed repeats a run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// One-way delay, e.g. 20ms, 1.5s, 300us.
    #[arg(long, value_parser = parse_duration, default_value = "0ms")]
    delay: Duration,
    /// Each packet's delay varies uniformly within delay ± jitter.
    #[arg(long, value_parser = parse_duration, default_value = "0ms")]
    jitter: Duration,
    /// Let jitter reorder packets (by default departures keep arrival order).
    #[arg(long)]
    reorder: bool,
    /// Random loss, e.g. 1% or 0.01.
    #[arg(long, value_parser = parse_probability, conflicts_with = "burst_loss")]
    loss: Option<f64>,
    /// Bursty loss as a Gilbert–Elliott chain: P_GOOD_TO_BAD,P_BAD_TO_GOOD,LOSS_IN_GOOD,LOSS_IN_BAD
    /// (each a probability, e.g. 1%,30%,0,50%).
    #[arg(long, value_parser = parse_gilbert_elliott)]
    burst_loss: Option<Loss>,
    /// Rate limit, e.g. 20mbit, 1gbit, 500kbit.
    #[arg(long, value_parser = parse_rate)]
    rate: Option<u64>,
    /// Rate queue length in packets (0 = 1000, netem's default).
    #[arg(long, default_value_t = 0)]
    queue: usize,
    /// Print each link's counters this often (e.g. 5s); never by default.
    #[arg(long, value_parser = parse_duration)]
    stats_every: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
struct HostArg {
    netns: String,
    ifname: String,
    addresses: Vec<IpNet>,
}

fn parse_host(s: &str) -> Result<HostArg, String> {
    let mut parts = s.splitn(3, ':');
    let (Some(netns), Some(ifname), Some(addresses)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("{s:?} is not NETNS:IFNAME:ADDRESS[,ADDRESS...]"));
    };
    let addresses = addresses
        .split(',')
        .map(|a| {
            a.parse::<IpNet>()
                .map_err(|e| format!("address {a:?}: {e} (CIDR notation, e.g. 10.9.0.1/24)"))
        })
        .collect::<Result<_, _>>()?;
    Ok(HostArg {
        netns: netns.to_owned(),
        ifname: ifname.to_owned(),
        addresses,
    })
}

fn split_number(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    s.split_at(end)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = split_number(s.trim());
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 20ms, 1.5s or 300us"))?;
    let seconds = match unit {
        "s" => value,
        "ms" => value / 1e3,
        "us" => value / 1e6,
        _ => return Err(format!("{s:?}: the unit must be s, ms or us")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{s:?}: {e}"))
}

fn parse_probability(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let value = match s.strip_suffix('%') {
        Some(percent) => percent.parse::<f64>().map(|p| p / 100.0),
        None => s.parse::<f64>(),
    }
    .map_err(|_| format!("{s:?} is not a probability like 1% or 0.01"))?;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{s:?} is not between 0 and 100%"))
    }
}

fn parse_gilbert_elliott(s: &str) -> Result<Loss, String> {
    let p: Vec<f64> = s
        .split(',')
        .map(parse_probability)
        .collect::<Result<_, _>>()?;
    let [p_good_to_bad, p_bad_to_good, loss_in_good, loss_in_bad] = p[..] else {
        return Err(format!(
            "{s:?}: give four probabilities, P_GOOD_TO_BAD,P_BAD_TO_GOOD,LOSS_IN_GOOD,LOSS_IN_BAD"
        ));
    };
    Ok(Loss::GilbertElliott {
        p_good_to_bad,
        p_bad_to_good,
        loss_in_good,
        loss_in_bad,
    })
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let (number, unit) = split_number(s.trim());
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a rate like 20mbit"))?;
    let scale = match unit.to_ascii_lowercase().as_str() {
        "bit" => 1e0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        _ => return Err(format!("{s:?}: the unit must be bit, kbit, mbit or gbit")),
    };
    let bps = (value * scale).round();
    if bps >= 1.0 && bps < u64::MAX as f64 {
        Ok(bps as u64)
    } else {
        Err(format!("{s:?} is not a positive rate"))
    }
}

impl Args {
    fn impairment(&self) -> Impairment {
        let loss = match (self.loss, &self.burst_loss) {
            (Some(probability), _) => Loss::Random { probability },
            (None, Some(burst)) => burst.clone(),
            (None, None) => Loss::None,
        };
        Impairment {
            delay: self.delay,
            jitter: self.jitter,
            reorder: self.reorder,
            loss,
            rate_bps: self.rate,
            queue_packets: self.queue,
            down: false,
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wiremesh-wanem: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let ports = args
        .hosts
        .iter()
        .map(|h| PortSpec {
            netns: h.netns.clone(),
            ifname: h.ifname.clone(),
            addresses: h.addresses.clone(),
            mtu: args.mtu,
        })
        .collect();
    let hub = Hub::start(args.seed, ports).context("starting the hub")?;
    hub.set_all(args.impairment())
        .context("setting the impairment")?;
    let (stop_tx, stop) = mpsc::channel();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("installing signal handlers")?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            let _ = stop_tx.send(());
        }
    });
    eprintln!("wiremesh-wanem: {} ports up; stop with Ctrl-C", hub.ports());
    loop {
        let stopped = match args.stats_every {
            Some(every) => stop.recv_timeout(every).is_ok(),
            None => stop.recv().is_ok(),
        };
        if stopped {
            break;
        }
        print_stats(&hub);
    }
    if args.stats_every.is_some() {
        print_stats(&hub);
    }
    drop(hub);
    Ok(())
}

fn print_stats(hub: &Hub) {
    println!("from to   packets      bytes  down  random  burst  queue  pattern");
    for l in hub.stats().iter().filter(|l| l.from != l.to) {
        println!(
            "{:>4} {:>2} {:>9} {:>10} {:>5} {:>7} {:>6} {:>6} {:>8}",
            l.from,
            l.to,
            l.forwarded_packets,
            l.forwarded_bytes,
            l.dropped_link_down,
            l.dropped_random_loss,
            l.dropped_burst_loss,
            l.dropped_queue_overflow,
            l.pattern_packets
        );
    }
    let unroutable = hub.unroutable();
    if unroutable.iter().any(|&n| n > 0) {
        println!("unroutable per port: {unroutable:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_with_their_units() {
        assert_eq!(parse_duration("20ms"), Ok(Duration::from_millis(20)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("300us"), Ok(Duration::from_micros(300)));
        assert!(parse_duration("20").unwrap_err().contains("unit"));
        assert!(parse_duration("ms").is_err());
        assert_eq!(parse_rate("20mbit"), Ok(20_000_000));
        assert_eq!(parse_rate("1.5Gbit"), Ok(1_500_000_000));
        assert!(parse_rate("0mbit").is_err());
        assert!(parse_rate("20mb").unwrap_err().contains("unit"));
        assert_eq!(parse_probability("1%"), Ok(0.01));
        assert_eq!(parse_probability("0.25"), Ok(0.25));
        assert!(parse_probability("150%").is_err());
        assert!(parse_probability("lots").is_err());
    }

    #[test]
    fn hosts_and_burst_loss_parse_or_say_what_is_wrong() {
        assert_eq!(
            parse_host("ns1:wan0:10.9.0.1/24,fd00::1/64"),
            Ok(HostArg {
                netns: "ns1".into(),
                ifname: "wan0".into(),
                addresses: vec![
                    "10.9.0.1/24".parse().unwrap(),
                    "fd00::1/64".parse().unwrap()
                ],
            })
        );
        assert!(parse_host("ns1:wan0").is_err());
        assert!(parse_host("ns1:wan0:10.9.0.1")
            .unwrap_err()
            .contains("CIDR"));
        assert_eq!(
            parse_gilbert_elliott("1%,30%,0,50%"),
            Ok(Loss::GilbertElliott {
                p_good_to_bad: 0.01,
                p_bad_to_good: 0.3,
                loss_in_good: 0.0,
                loss_in_bad: 0.5
            })
        );
        assert!(parse_gilbert_elliott("1%,30%")
            .unwrap_err()
            .contains("four"));
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
