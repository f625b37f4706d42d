//! The run: build the testbed once, then for each VPN (and shape) bring it up,
//! prove it carries the pods' traffic, measure every point of the plan with the
//! underlay impaired as the point asks, stop it and prove the traffic stopped; then
//! write the raw JSON, the markdown tables and the plots into the results folder.
//!
//! The honesty check: the hub counts underlay packets that hold the response
//! body's marker ([`http::MARKER`]) from bring-up to the end of the VPN's points; a
//! VPN (other than `none`) with any such packet, or one whose pods cannot be
//! reached, fails and is not measured further.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use wiremesh_wanem::Impairment;

use crate::load::{self, Load, Pace};
use crate::report::{Honesty, Record, Report, Skipped};
use crate::resources::{self, Usage};
use crate::scenario::{Config, Scenario, Shapes};
use crate::stats::{Sample, Summary};
use crate::testbed::{self, Testbed, TestbedSpec};
use crate::vpn::{Shape, Vpn, VpnError};
use crate::{http, svg, BenchError};

/// How long a VPN may take from `up` until every pod answers through it.
const FIRST_REQUEST_LIMIT: Duration = Duration::from_secs(30);
/// A guess at a VPN's bring-up and honesty check, for the time estimate.
const SETUP_ESTIMATE: Duration = Duration::from_secs(6);
/// The worker whose address changes (the first; the NAT worker is the last).
const MOVING_WORKER: usize = 1;

fn shape_name(shape: Shape) -> &'static str {
    match shape {
        Shape::HubAndSpoke => "hub-and-spoke",
        Shape::Mesh => "mesh",
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> BenchError + '_ {
    move |source| BenchError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write(path: &Path, contents: &str) -> Result<(), BenchError> {
    std::fs::write(path, contents).map_err(io_error(path))
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).expect("report types serialize")
}

/// The drivers `config.vpns` names (all when empty), in driver order; an unknown
/// name is an error listing the known ones.
pub fn select(
    config: &Config,
    drivers: Vec<Box<dyn Vpn>>,
) -> Result<Vec<Box<dyn Vpn>>, BenchError> {
    let known: Vec<&str> = drivers.iter().map(|d| d.name()).collect();
    if let Some(unknown) = config.vpns.iter().find(|v| !known.contains(&v.as_str())) {
        return Err(BenchError::Invalid {
            field: "vpn",
            reason: format!("no VPN named {unknown:?}; known: {}", known.join(", ")),
        });
    }
    Ok(drivers
        .into_iter()
        .filter(|d| config.vpns.is_empty() || config.vpns.iter().any(|v| v == d.name()))
        .collect())
}

/// Runs the whole evaluation; `stop` (set on Ctrl-C) ends it between measurements,
/// with everything torn down.
pub fn run(
    config: Config,
    drivers: Vec<Box<dyn Vpn>>,
    command: String,
    stop: &AtomicBool,
) -> Result<Report, BenchError> {
    config.validate()?;
    let raw_dir = config.out.join("raw");
    std::fs::create_dir_all(&raw_dir).map_err(io_error(&raw_dir))?;
    let mut report = Report {
        command,
        machine: machine(),
        config: config.clone(),
        skipped: Vec::new(),
        honesty: Vec::new(),
        records: Vec::new(),
        max_rates: Vec::new(),
    };
    report.skipped.push(Skipped {
        vpn: "zerotier".into(),
        reason: "no Debian package (the study measured it; this harness installs VPNs from Debian and crates.io only)".into(),
    });
    let mut runnable = Vec::new();
    for d in select(&config, drivers)? {
        match d.check_installed() {
            Ok(()) => runnable.push(d),
            Err(e) => {
                println!("skipping {}: {e}", d.name());
                report.skipped.push(Skipped {
                    vpn: d.name().into(),
                    reason: e.to_string(),
                });
            }
        }
    }
    // The baseline last: the pods keep retransmitting answers on connections its
    // load abandoned (timeouts under loss), in plaintext over the underlay, and
    // would show in the next VPN's honesty check. A VPN's own stragglers are
    // addressed to its overlay and die with its routes.
    runnable.sort_by_key(|d| is_baseline(&**d));
    let work = WorkDir::new()?;
    let bed = Testbed::build(&TestbedSpec {
        workers: config.workers,
        nat_worker: config.events,
        response_bytes: config.response_bytes,
        seed: config.seed,
        work_dir: &work.0,
    })?;
    let runs: Vec<(usize, Shape)> = runnable
        .iter()
        .enumerate()
        .flat_map(|(i, d)| {
            let shapes = match config.shapes {
                Shapes::First => &d.shapes()[..1.min(d.shapes().len())],
                Shapes::All => d.shapes(),
            };
            shapes.iter().map(move |s| (i, *s))
        })
        .collect();
    let total: Duration = runs
        .iter()
        .map(|(i, _)| SETUP_ESTIMATE + config.estimate(&config.points(is_baseline(&*runnable[*i]))))
        .sum();
    let progress = ProgressBar::new(total.as_secs().max(1));
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:40} [{bar:30}] {elapsed} elapsed, ~{eta} left",
        )
        .expect("constant template")
        .progress_chars("=> "),
    );
    for (i, shape) in runs {
        let driver = &mut runnable[i];
        let mut run = VpnRun {
            config: &config,
            bed: &bed,
            progress: &progress,
            vpn: driver.name(),
            shape: shape_name(shape),
            stop,
        };
        progress.set_message(format!("{} ({}): bringing up", run.vpn, run.shape));
        let mut bed_view = bed.bed.clone();
        bed_view.work_dir = work.0.join(format!("{}-{}", run.vpn, run.shape));
        // Where a VPN's time goes, printed with its verdict (what `--quick` spends).
        let started = Instant::now();
        let up = driver.up(&bed_view, shape);
        let up_took = started.elapsed();
        let outcome = match up {
            Ok(()) => run.measure(&**driver, &mut report),
            Err(e) => Err(e.into()),
        };
        let measured = Instant::now();
        let stopped = driver.down();
        progress.inc(SETUP_ESTIMATE.as_secs());
        match outcome {
            Ok(mut honesty) => {
                honesty.stopped_when_down = stopped.is_ok() && run.pods_unreachable()?;
                honesty.passed &= honesty.stopped_when_down;
                let timing = format!(
                    "up {:.1} s, check and points {:.1} s, down and check {:.1} s",
                    up_took.as_secs_f64(),
                    (measured - started - up_took).as_secs_f64(),
                    measured.elapsed().as_secs_f64()
                );
                let verdict = if honesty.passed {
                    "passed".to_string()
                } else {
                    format!(
                        "FAILED (pods reached: {}, plaintext packets on the underlay: {}, unreachable once stopped: {})",
                        honesty.reached_pods, honesty.plaintext_packets, honesty.stopped_when_down
                    )
                };
                progress.suspend(|| {
                    println!(
                        "{} ({}): honesty check {verdict} ({timing})",
                        run.vpn, run.shape
                    )
                });
                report.honesty.push(honesty);
            }
            Err(RunError::Bench(e)) => {
                progress.finish_and_clear();
                return Err(e);
            }
            Err(RunError::Vpn(e)) => {
                progress.suspend(|| println!("skipping {} ({}): {e}", run.vpn, run.shape));
                report.skipped.push(Skipped {
                    vpn: format!("{} ({})", run.vpn, run.shape),
                    reason: e.to_string(),
                });
            }
        }
        let raw = raw_dir.join(format!("{}-{}.json", run.vpn, run.shape));
        let mine: Vec<&Record> = report
            .records
            .iter()
            .filter(|r| r.vpn == run.vpn && r.shape == run.shape)
            .collect();
        write(&raw, &to_json(&mine))?;
        reset(&bed)?;
    }
    progress.finish_and_clear();
    drop(bed);
    write_results(&report)?;
    Ok(report)
}

/// Writes `report.json`, `results.md` and the plots into the results folder.
pub fn write_results(report: &Report) -> Result<(), BenchError> {
    let out = &report.config.out;
    write(&out.join("report.json"), &to_json(report))?;
    let mut md = format!(
        "# wiremesh bench edge\n\nCommand: `{}`\n\nMachine: {}\n\n",
        report.command, report.machine
    );
    md.push_str(&crate::report::render_markdown(report));
    let plots = svg::plots(report);
    if !plots.is_empty() {
        md.push_str("\n## Plots\n\n");
    }
    for (file, text) in &plots {
        write(&out.join(file), text)?;
        md.push_str(&format!("![{file}]({file})\n\n"));
    }
    write(&out.join("results.md"), &md)
}

fn is_baseline(vpn: &dyn Vpn) -> bool {
    vpn.name() == "none"
}

/// The kernel, CPU and core count, for the report.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {kernel}")
}

fn reset(bed: &Testbed) -> Result<(), BenchError> {
    bed.hub
        .set_all(Impairment::default())
        .map_err(|e| BenchError::Testbed {
            what: "clearing the underlay's impairment".into(),
            reason: e.to_string(),
        })
}

/// A scratch directory for the drivers' configs and keys, removed when dropped.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> Result<WorkDir, BenchError> {
        let dir = std::env::temp_dir().join(format!(
            "wiremesh-edge-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() % 1_000_000)
        ));
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_error(&dir))?;
        Ok(WorkDir(dir))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

enum RunError {
    /// The VPN could not be brought up or failed its check: skip it.
    Vpn(VpnError),
    /// The testbed broke or the run was interrupted: stop.
    Bench(BenchError),
}

impl From<VpnError> for RunError {
    fn from(e: VpnError) -> Self {
        RunError::Vpn(e)
    }
}

impl From<BenchError> for RunError {
    fn from(e: BenchError) -> Self {
        RunError::Bench(e)
    }
}

fn bench_error(what: &str) -> impl FnOnce(wiremesh_host::HostError) -> BenchError + '_ {
    move |e| BenchError::Testbed {
        what: what.into(),
        reason: e.to_string(),
    }
}

fn wanem_error(what: &str) -> impl FnOnce(wiremesh_wanem::WanemError) -> BenchError + '_ {
    move |e| BenchError::Testbed {
        what: what.into(),
        reason: e.to_string(),
    }
}

/// One VPN in one shape, being measured.
struct VpnRun<'a> {
    config: &'a Config,
    bed: &'a Testbed,
    progress: &'a ProgressBar,
    vpn: &'static str,
    shape: &'static str,
    stop: &'a AtomicBool,
}

impl VpnRun<'_> {
    fn check_stop(&self) -> Result<(), BenchError> {
        if self.stop.load(Ordering::Relaxed) {
            Err(BenchError::Interrupted)
        } else {
            Ok(())
        }
    }

    fn first_success(
        &self,
        targets: Vec<SocketAddr>,
        attempt: Duration,
        limit: Duration,
    ) -> Result<Vec<Option<Duration>>, BenchError> {
        load::first_success(self.bed.master_netns(), targets, attempt, limit)
            .map_err(bench_error("probing the pods"))
    }

    fn pods_unreachable(&self) -> Result<bool, BenchError> {
        // A VPN that still carried traffic answers within milliseconds; waiting
        // longer proves nothing more.
        let probes = self.first_success(
            self.bed.direct_pods(),
            Duration::from_millis(250),
            Duration::from_secs(1),
        )?;
        Ok(probes.iter().all(Option::is_none))
    }

    fn plaintext_packets(&self) -> u64 {
        self.bed.hub.stats().iter().map(|s| s.pattern_packets).sum()
    }

    fn wire_bytes(&self) -> u64 {
        self.bed.hub.stats().iter().map(|s| s.forwarded_bytes).sum()
    }

    /// The honesty check, then every point; the check's result (its
    /// `stopped_when_down` is filled in by the caller after `down`).
    fn measure(&mut self, vpn: &dyn Vpn, report: &mut Report) -> Result<Honesty, RunError> {
        let baseline = is_baseline(vpn);
        self.progress
            .set_message(format!("{} ({}): honesty check", self.vpn, self.shape));
        self.bed.hub.watch_for(http::MARKER);
        let plaintext_before = self.plaintext_packets();
        let first = self.first_success(
            self.bed.direct_pods(),
            Duration::from_secs(1),
            FIRST_REQUEST_LIMIT,
        )?;
        let reached_pods = first.iter().all(Option::is_some);
        // A little load so a leak has traffic to show in.
        self.sample(
            vpn,
            Scenario::Load { connections: 4 },
            Duration::from_millis(500),
        )?;
        let mut honesty = Honesty {
            vpn: self.vpn.into(),
            shape: self.shape.into(),
            reached_pods,
            plaintext_packets: self.plaintext_packets() - plaintext_before,
            stopped_when_down: false,
            passed: false,
        };
        let sound = |h: &Honesty| h.reached_pods && (baseline || h.plaintext_packets == 0);
        if !sound(&honesty) {
            return Ok(honesty);
        }
        let (events, loads): (Vec<Scenario>, Vec<Scenario>) = self
            .config
            .points(baseline)
            .into_iter()
            .partition(Scenario::is_event);
        for scenario in loads {
            let record = self.point(vpn, scenario)?;
            report.records.push(record);
        }
        if self.config.open_loop.is_some() {
            let max = self.sweep(vpn, report)?;
            report
                .max_rates
                .push((self.vpn.into(), self.shape.into(), max));
        }
        for scenario in events {
            let record = self.point(vpn, scenario)?;
            report.records.push(record);
        }
        honesty.plaintext_packets = self.plaintext_packets() - plaintext_before;
        honesty.passed = sound(&honesty);
        Ok(honesty)
    }

    /// One repetition of a load point: the load on the targets the scenario picks.
    fn sample(
        &self,
        vpn: &dyn Vpn,
        scenario: Scenario,
        duration: Duration,
    ) -> Result<(Sample, Usage, u64), BenchError> {
        let (targets, connections, pace) = match scenario {
            Scenario::Load { connections } => (self.bed.direct_pods(), connections, Pace::Closed),
            Scenario::Rate { rate } => (
                self.bed.direct_pods(),
                self.config.open_loop.map_or(1, |o| o.connections),
                Pace::Open { rate },
            ),
            Scenario::Nat => (
                self.bed.nat_pod().into_iter().collect(),
                self.config.impaired_connections,
                Pace::Closed,
            ),
            _ => (
                self.bed.direct_pods(),
                self.config.impaired_connections,
                Pace::Closed,
            ),
        };
        let pids = vpn.pids();
        let before = resources::measure(&pids);
        let bytes_before = self.wire_bytes();
        let sample = load::run(
            self.bed.master_netns(),
            Load {
                targets,
                connections,
                pace,
                keep_alive: !self.config.new_connections,
                duration,
                timeout: self.config.timeout,
            },
        )
        .map_err(bench_error("running the load"))?;
        let after = resources::measure(&pids);
        Ok((
            sample,
            after.since(&before),
            self.wire_bytes() - bytes_before,
        ))
    }

    fn point(&mut self, vpn: &dyn Vpn, scenario: Scenario) -> Result<Record, BenchError> {
        let mut record = Record {
            vpn: self.vpn.into(),
            shape: self.shape.into(),
            scenario,
            samples: Vec::new(),
            summary: None,
            recovery_seconds: Vec::new(),
            usage: Usage::default(),
            wire_bytes_per_request: None,
        };
        let mut wire = 0u64;
        for rep in 0..self.config.repetitions {
            self.check_stop()?;
            self.progress.set_message(format!(
                "{} ({}): {} #{}",
                self.vpn,
                self.shape,
                scenario.label(),
                rep + 1
            ));
            let started = Instant::now();
            match scenario {
                Scenario::AddressChange => {
                    record.recovery_seconds.extend(self.address_change()?);
                }
                Scenario::Flap { down_ms } => {
                    record
                        .recovery_seconds
                        .push(self.flap(Duration::from_millis(down_ms))?);
                }
                _ => {
                    self.bed
                        .hub
                        .set_all(scenario.impairment(self.config.jitter_fraction))
                        .map_err(wanem_error("impairing the underlay"))?;
                    let measured = self.sample(vpn, scenario, self.config.point);
                    reset(self.bed)?;
                    let (sample, usage, bytes) = measured?;
                    record.samples.push(sample);
                    record.usage.add(&usage);
                    wire += bytes;
                }
            }
            self.progress.inc(started.elapsed().as_secs().max(1));
        }
        record.summary = Summary::of(&record.samples);
        let ok: u64 = record.samples.iter().map(|s| s.ok).sum();
        if ok > 0 {
            record.wire_bytes_per_request = Some(wire as f64 / ok as f64);
        }
        if scenario.is_event() {
            // Events measure recovery, not work: only the memory figure means anything.
            record.usage = Usage {
                peak_rss_kib: resources::measure(&vpn.pids()).peak_rss_kib,
                ..Usage::default()
            };
        }
        Ok(record)
    }

    /// Moves the worker to a new address and back: seconds until its pod answers
    /// after each move. Both count: a move back that is never followed would leave
    /// the master aiming at the new address, and the next move would look instant.
    fn address_change(&self) -> Result<[Option<f64>; 2], BenchError> {
        let pod = vec![self.bed.pods[MOVING_WORKER - 1]];
        let original = self.bed.bed.hosts[MOVING_WORKER].underlay;
        let set = |addr: std::net::Ipv4Addr| {
            let net = ipnet::IpNet::V4(ipnet::Ipv4Net::new(addr, 24).expect("/24"));
            self.bed
                .hub
                .set_port_addresses(MOVING_WORKER, vec![net])
                .map_err(wanem_error("changing a worker's address"))
        };
        set(testbed::moved_address(MOVING_WORKER))?;
        let attempt = Duration::from_millis(500);
        let limit = self.config.recovery_limit;
        let recovered = self.first_success(pod.clone(), attempt, limit)?[0];
        let std::net::IpAddr::V4(original) = original else {
            unreachable!("the testbed's underlay is IPv4")
        };
        set(original)?;
        let back = self.first_success(pod, attempt, limit)?[0];
        Ok([recovered, back].map(|d| d.map(|d| d.as_secs_f64())))
    }

    /// Takes the underlay down for `down`; seconds from its return until every
    /// directly reachable pod answers again.
    fn flap(&self, down: Duration) -> Result<Option<f64>, BenchError> {
        self.bed
            .hub
            .set_all(Impairment {
                down: true,
                ..Impairment::default()
            })
            .map_err(wanem_error("taking the underlay down"))?;
        // The outage itself: a fixed length by design, not a wait for a condition.
        std::thread::sleep(down);
        reset(self.bed)?;
        let times = self.first_success(
            self.bed.direct_pods(),
            Duration::from_millis(500),
            self.config.recovery_limit,
        )?;
        Ok(times
            .into_iter()
            .try_fold(0.0f64, |m, t| t.map(|t| m.max(t.as_secs_f64()))))
    }

    /// Steps the open-loop rate up until the median repetition breaks the budget;
    /// the highest rate that kept it.
    fn sweep(&mut self, vpn: &dyn Vpn, report: &mut Report) -> Result<Option<f64>, BenchError> {
        let Some(open) = self.config.open_loop else {
            return Ok(None);
        };
        let mut best = None;
        for rate in self.config.rates() {
            let record = self.point(vpn, Scenario::Rate { rate })?;
            let holds = record
                .samples
                .iter()
                .filter(|s| open.budget.holds(s))
                .count()
                * 2
                > record.samples.len();
            report.records.push(record);
            if !holds {
                break;
            }
            best = Some(rate);
        }
        Ok(best)
    }
}
