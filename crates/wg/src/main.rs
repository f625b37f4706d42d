//! `wiremesh-wg [-f] IFNAME`: run a userspace WireGuard device, like `wireguard-go`.
//!
//! Without `-f` the process detaches: it re-executes itself in the foreground in a new
//! session with stdio on /dev/null, waits until the child's UAPI socket exists, and
//! exits 0 — so `wg-quick` can configure the device as soon as this returns.

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use wiremesh_wg::{uapi_server, Config, ExitReason, RunningDevice};

/// Set in the detached child, so it knows not to detach again.
const DAEMON_ENV: &str = "WIREMESH_WG_DAEMONIZED";

/// Userspace WireGuard device, a drop-in replacement for wireguard-go.
///
/// Creates the TUN interface IFNAME and serves the WireGuard configuration protocol on
/// /var/run/wireguard/IFNAME.sock, so `wg`, `wg-quick` and `wg syncconf` work on it.
/// Set WG_QUICK_USERSPACE_IMPLEMENTATION=wiremesh-wg for wg-quick to use it.
/// The device stops on SIGTERM/SIGINT, when the interface is deleted, or when its
/// socket file is removed. In the foreground, logs go to stderr (detached, they are
/// discarded); set RUST_LOG (a tracing filter) or LOG_LEVEL (error, warn, info, debug,
/// trace, or wireguard-go's verbose / silent).
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Stay in the foreground instead of detaching.
    #[arg(short, long)]
    foreground: bool,
    /// Do not ask the TUN device for checksum and TCP segmentation offload.
    #[arg(long)]
    no_offload: bool,
    /// MTU of the interface.
    #[arg(long, default_value_t = wiremesh_wg::tun::DEFAULT_MTU)]
    mtu: u16,
    /// TUN queues, each drained by its own thread (1 = a single-queue interface).
    /// Default: the number of CPUs, at least 2 and at most 4.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=16))]
    tun_queues: Option<u8>,
    /// Interface name (at most 15 bytes).
    ifname: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging();
    let result = if args.foreground || std::env::var_os(DAEMON_ENV).is_some() {
        run(&args)
    } else {
        detach(&args)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("wiremesh-wg: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    // wireguard-go's LOG_LEVEL words, mapped onto tracing levels.
    let from_log_level = |s: String| match s.as_str() {
        "verbose" => "debug".to_string(),
        "silent" => "off".to_string(),
        _ => s,
    };
    let filter = std::env::var("RUST_LOG")
        .ok()
        .or_else(|| std::env::var("LOG_LEVEL").ok().map(from_log_level))
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn detach(args: &Args) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding own executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--foreground")
        .arg("--mtu")
        .arg(args.mtu.to_string())
        .args(args.no_offload.then_some("--no-offload"))
        .args(args.tun_queues.map(|n| format!("--tun-queues={n}")))
        .arg(&args.ifname)
        .env(DAEMON_ENV, "1")
        // Like any daemon: hold no directory busy.
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe; it detaches the child from our terminal
    // and process group so it outlives the caller.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let socket = uapi_server::socket_path(
        &PathBuf::from(uapi_server::DEFAULT_SOCKET_DIR),
        &args.ifname,
    );
    // A socket already there belongs to someone else (maybe a live device): only a
    // new one, made by our child, means it is ready.
    let old_inode = inode(&socket);
    let mut child = cmd.spawn().context("starting the device process")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("device process exited during start-up ({status}); run with -f to see why");
        }
        if inode(&socket) != old_inode && std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("device did not create {} within 30 s", socket.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn inode(path: &std::path::Path) -> Option<u64> {
    use std::os::linux::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| m.st_ino())
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, then masking in this (only) thread
    // before any other thread exists, so every thread inherits the mask and the
    // signals queue for sigtimedwait below.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: valid set and timespec; no siginfo requested.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

fn run(args: &Args) -> Result<()> {
    let signals = block_signals();
    let mut config = Config::new(&args.ifname);
    config.mtu = args.mtu;
    config.offload = !args.no_offload;
    if let Some(n) = args.tun_queues {
        config.tun_queues = usize::from(n);
    }
    let device = RunningDevice::start(&config)?;
    loop {
        if let Some(sig) = wait_signal(&signals, Duration::from_millis(200)) {
            tracing::info!(signal = sig, "shutting down");
            break;
        }
        match device.poll_exit() {
            None => {}
            Some(ExitReason::TunError(e)) => {
                device.shutdown();
                bail!("TUN device failed: {e}");
            }
            Some(reason) => {
                tracing::info!(?reason, "shutting down");
                break;
            }
        }
    }
    device.shutdown();
    Ok(())
}
