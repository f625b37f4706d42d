//! What the OpenVPN, tinc, SoftEther and Nebula drivers share: running programs in a
//! host's network namespace, keeping daemons as children so their PIDs can be
//! measured and stopped, writing config and key files, and waiting until the tunnel
//! carries traffic.
//!
//! Everything here runs `ip netns exec NETNS ...`, which `exec`s the program after
//! joining the namespace: the child's PID is the daemon's.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Bed, Host, Shape, Vpn, VpnError};

/// How long a driver waits for every worker to answer through a fresh tunnel.
pub(crate) const BRING_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// The UDP socket buffers each VPN asks for. With the kernel's default (208 KiB)
/// every UDP VPN here drops packets at the receiving socket under one TCP stream
/// (`UdpRcvbufErrors`), which the benchmark would count against the VPN rather than
/// its configuration. 4 MiB is `net.core.rmem_max` on these hosts: OpenVPN and tinc
/// ask without `SO_RCVBUFFORCE`, so the kernel caps them there.
pub(crate) const UDP_SOCKET_BUFFER: u32 = 4 << 20;

/// How long a stopped daemon gets to exit on SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

fn setup_error(vpn: &'static str, what: impl Into<String>, reason: impl ToString) -> VpnError {
    VpnError::Setup {
        vpn,
        what: what.into(),
        reason: reason.to_string(),
    }
}

/// `Err(NotInstalled)` naming the first of `programs` that is missing, with the
/// `apt-get install` line for `packages`.
pub(crate) fn require_programs(
    vpn: &'static str,
    programs: &[&str],
    packages: &[&str],
) -> Result<(), VpnError> {
    // root's PATH has the sbin directories, a test runner's may not.
    let dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .collect();
    match programs
        .iter()
        .find(|p| !dirs.iter().any(|d| d.join(p).is_file()))
    {
        None => Ok(()),
        Some(missing) => Err(VpnError::NotInstalled {
            vpn,
            hint: format!(
                "{missing} not found; apt-get install -y {}",
                packages.join(" ")
            ),
        }),
    }
}

/// `Err(Unsupported)` unless `shape` is one of the VPN's `shapes`.
pub(crate) fn require_shape(
    vpn: &'static str,
    shapes: &[Shape],
    shape: Shape,
) -> Result<(), VpnError> {
    if shapes.contains(&shape) {
        Ok(())
    } else {
        Err(VpnError::Unsupported { vpn, shape })
    }
}

/// A command that runs `args` inside network namespace `netns`.
pub(crate) fn in_netns(netns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns]).args(args);
    c
}

/// Runs `cmd` to completion; its stdout, or an error naming `what` with its stderr.
pub(crate) fn run(vpn: &'static str, what: &str, cmd: &mut Command) -> Result<String, VpnError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| setup_error(vpn, what, e))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let mut reason = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if reason.is_empty() {
            // Some tools (nebula-cert) report errors on stdout.
            reason = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        Err(setup_error(vpn, what, format!("{}: {reason}", out.status)))
    }
}

/// Runs `ip ARGS` inside `netns`.
pub(crate) fn ip(vpn: &'static str, netns: &str, args: &[&str]) -> Result<String, VpnError> {
    let mut c = Command::new("ip");
    c.args(["-n", netns]).args(args);
    run(vpn, &format!("ip {} in {netns}", args.join(" ")), &mut c)
}

/// Writes a config file (readable by all: it holds no secret).
pub(crate) fn write_config(vpn: &'static str, path: &Path, contents: &str) -> Result<(), VpnError> {
    write_with_mode(vpn, path, contents.as_bytes(), 0o644)
}

/// Writes a script a daemon runs (`tinc-up`): mode 0755.
pub(crate) fn write_script(vpn: &'static str, path: &Path, contents: &str) -> Result<(), VpnError> {
    write_with_mode(vpn, path, contents.as_bytes(), 0o755)
}

/// Writes a private key or anything holding one: mode 0600 from the first byte.
pub(crate) fn write_secret(
    vpn: &'static str,
    path: &Path,
    contents: &[u8],
) -> Result<(), VpnError> {
    write_with_mode(vpn, path, contents, 0o600)
}

fn write_with_mode(
    vpn: &'static str,
    path: &Path,
    contents: &[u8],
    mode: u32,
) -> Result<(), VpnError> {
    let what = || format!("writing {}", path.display());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| setup_error(vpn, what(), e))?;
    }
    // Remove first: `mode` applies only to a file that is created.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(setup_error(vpn, what(), e))
        }
        _ => {}
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(contents))
        .map_err(|e| setup_error(vpn, what(), e))
}

/// Creates `dir` (and parents) with mode 0700: it will hold private keys.
pub(crate) fn private_dir(vpn: &'static str, dir: &Path) -> Result<(), VpnError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| setup_error(vpn, format!("creating {}", dir.display()), e))
}

/// The tunnel MTU: the underlay's less the VPN's per-packet overhead.
pub(crate) fn tunnel_mtu(bed: &Bed, overhead: u16) -> u16 {
    bed.underlay_mtu.saturating_sub(overhead).max(576)
}

/// `host`'s overlay address with the overlay's prefix length (`10.99.0.2/24`).
pub(crate) fn overlay_addr(bed: &Bed, host: &Host) -> String {
    format!("{}/{}", host.overlay, bed.overlay_cidr.prefix_len())
}

/// One daemon the driver started; `what` names it in errors (`tincd on w1`).
struct Daemon {
    what: String,
    child: Child,
}

/// The daemons a driver started and the links it created, so `down` can undo them.
#[derive(Default)]
pub(crate) struct Deployment {
    daemons: Vec<Daemon>,
    /// `(netns, interface)` pairs to delete on `down` (links a dead daemon leaves).
    links: Vec<(String, String)>,
}

impl Deployment {
    /// Starts `args` in `netns` in the foreground, stdout and stderr appended to `log`.
    /// `what` names it in errors (`tincd on w1`).
    pub(crate) fn spawn(
        &mut self,
        vpn: &'static str,
        what: &str,
        netns: &str,
        args: &[&str],
        log: &Path,
    ) -> Result<(), VpnError> {
        self.spawn_command(vpn, what, in_netns(netns, args), log)
    }

    /// Like [`Deployment::spawn`], for a command built by the driver (it must `exec`
    /// the daemon, so that the child is the daemon).
    pub(crate) fn spawn_command(
        &mut self,
        vpn: &'static str,
        what: &str,
        mut command: Command,
        log: &Path,
    ) -> Result<(), VpnError> {
        let open_log = || {
            OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o644)
                .open(log)
        };
        let (out, err) = open_log()
            .and_then(|f: File| Ok((f.try_clone()?, f)))
            .map_err(|e| setup_error(vpn, format!("opening log {}", log.display()), e))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| setup_error(vpn, format!("starting {what}"), e))?;
        self.daemons.push(Daemon {
            what: what.to_string(),
            child,
        });
        Ok(())
    }

    /// Remembers a link in `netns` for `down` to delete if it outlives its daemon.
    pub(crate) fn track_link(&mut self, netns: &str, interface: &str) {
        self.links.push((netns.to_string(), interface.to_string()));
    }

    /// Every daemon and the processes it forked (SoftEther's watchdog forks its worker).
    pub(crate) fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.daemons.iter().map(|d| d.child.id()).collect();
        let mut i = 0;
        while i < pids.len() {
            pids.extend(children(pids[i]));
            i += 1;
        }
        pids
    }

    /// Fails naming the first daemon that has exited, pointing at `logs`.
    pub(crate) fn check_alive(&mut self, vpn: &'static str, logs: &Path) -> Result<(), VpnError> {
        for d in &mut self.daemons {
            if let Ok(Some(status)) = d.child.try_wait() {
                return Err(setup_error(
                    vpn,
                    d.what.clone(),
                    format!(
                        "exited early ({status}); see the logs in {}",
                        logs.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Stops every daemon (SIGTERM, then SIGKILL after a grace period), reaps it and
    /// deletes the tracked links. Idempotent: a second call finds nothing to do.
    pub(crate) fn down(&mut self, vpn: &'static str) -> Result<(), VpnError> {
        let pids = self.pids();
        for pid in &pids {
            signal(*pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        let mut failures = Vec::new();
        for mut d in std::mem::take(&mut self.daemons) {
            let exited = poll(deadline.saturating_duration_since(Instant::now()), || {
                matches!(d.child.try_wait(), Ok(Some(_)))
            });
            if !exited {
                let _ = d.child.kill();
            }
            if let Err(e) = d.child.wait() {
                failures.push(format!("{}: {e}", d.what));
            }
        }
        // Forked children are not ours to reap: wait until they are gone too.
        let alive = |pid: &u32| Path::new(&format!("/proc/{pid}")).exists();
        if !poll(deadline.saturating_duration_since(Instant::now()), || {
            !pids.iter().any(alive)
        }) {
            for pid in pids.iter().filter(|p| alive(p)) {
                signal(*pid, libc::SIGKILL);
            }
            if !poll(STOP_GRACE, || !pids.iter().any(alive)) {
                failures.push("processes survived SIGKILL".to_string());
            }
        }
        for (netns, link) in std::mem::take(&mut self.links) {
            let out = Command::new("ip")
                .args(["-n", &netns, "link", "del", &link])
                .stdin(Stdio::null())
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                // Gone with its daemon, or its namespace already removed: nothing to undo.
                Ok(o) if is_absent(&String::from_utf8_lossy(&o.stderr)) => {}
                Ok(o) => failures.push(format!(
                    "deleting {link} in {netns}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => failures.push(format!("deleting {link} in {netns}: {e}")),
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(setup_error(vpn, "stopping", failures.join("; ")))
        }
    }
}

/// The direct children of every thread of `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

fn signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions. The PIDs are our children
        // (not yet reaped, so not reused) or were their children a moment ago.
        unsafe { libc::kill(pid, signal) };
    }
}

fn is_absent(stderr: &str) -> bool {
    stderr.contains("Cannot find device")
        || stderr.contains("does not exist")
        || stderr.contains("No such file")
}

/// Passes `result` through; on an error first undoes what a partial bring-up left,
/// so a failed `up` leaves no daemon or link behind.
pub(crate) fn undo_on_error(
    vpn: &'static str,
    deployment: &mut Deployment,
    result: Result<(), VpnError>,
) -> Result<(), VpnError> {
    if result.is_err() {
        // The error worth reporting is the bring-up's, not a cleanup hiccup.
        let _ = deployment.down(vpn);
    }
    result
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes; whether it held.
pub(crate) fn poll(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether one ping from `from`'s namespace to `to` is answered within a second.
fn pings(from: &Host, to: &Host) -> bool {
    in_netns(
        &from.netns,
        &[
            "ping",
            "-n",
            "-q",
            "-c",
            "1",
            "-W",
            "1",
            &to.overlay.to_string(),
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .status()
    .is_ok_and(|s| s.success())
}

/// Waits until the master reaches every worker's overlay address through the tunnel,
/// failing early if a daemon dies; the error names the first worker that did not
/// answer within [`BRING_UP_TIMEOUT`].
pub(crate) fn wait_for_workers(
    vpn: &'static str,
    bed: &Bed,
    deployment: &mut Deployment,
) -> Result<(), VpnError> {
    let deadline = Instant::now() + BRING_UP_TIMEOUT;
    let master = bed.master();
    for worker in bed.workers() {
        let mut died = None;
        let answered = poll(deadline.saturating_duration_since(Instant::now()), || {
            if let Err(e) = deployment.check_alive(vpn, &bed.work_dir) {
                died = Some(e);
                return true;
            }
            pings(master, worker)
        });
        if let Some(e) = died {
            return Err(e);
        }
        if !answered {
            return Err(setup_error(
                vpn,
                format!("bringing up {}", worker.name),
                format!(
                    "the master got no answer from {} ({}) through the tunnel within {}s; see the logs in {}",
                    worker.name,
                    worker.overlay,
                    BRING_UP_TIMEOUT.as_secs(),
                    bed.work_dir.display()
                ),
            ));
        }
    }
    Ok(())
}

/// A master and two workers, for the drivers' config rendering tests.
#[cfg(test)]
pub(crate) fn example_bed() -> Bed {
    use super::Role;
    let host = |i: u8| Host {
        name: if i == 0 {
            "master".into()
        } else {
            format!("w{i}")
        },
        role: if i == 0 { Role::Master } else { Role::Worker },
        netns: format!("ns{i}"),
        underlay: [192, 168, 0, 1 + i].into(),
        underlay_if: "ul0".into(),
        pod_cidr: (i > 0).then(|| format!("10.42.{i}.0/24").parse().unwrap()),
        overlay: [10, 99, 0, 1 + i].into(),
        behind_nat: i == 2,
    };
    Bed {
        hosts: (0..3).map(host).collect(),
        overlay_cidr: "10.99.0.0/24".parse().unwrap(),
        work_dir: "/work".into(),
        underlay_mtu: 1500,
    }
}

/// A VPN run as daemons kept in a [`Deployment`]: a driver says what differs (its
/// programs, shapes, packages and how to start it), and gets the rest of [`Vpn`]:
/// a failed bring-up undone, the daemons' PIDs, and `down`.
pub(crate) trait Daemons: Send {
    const NAME: &'static str;
    const SHAPES: &'static [Shape];
    /// Binaries that must be on `PATH`.
    const PROGRAMS: &'static [&'static str];
    /// Debian packages that provide them.
    const PACKAGES: &'static [&'static str];

    fn deployment(&self) -> &Deployment;
    fn deployment_mut(&mut self) -> &mut Deployment;

    /// Write the configuration and start every daemon (tracked in the deployment),
    /// until the tunnel carries traffic.
    fn start(&mut self, bed: &Bed, shape: Shape) -> Result<(), VpnError>;
}

impl<D: Daemons> Vpn for D {
    fn name(&self) -> &'static str {
        D::NAME
    }

    fn shapes(&self) -> &'static [Shape] {
        D::SHAPES
    }

    fn check_installed(&self) -> Result<(), VpnError> {
        require_programs(D::NAME, D::PROGRAMS, D::PACKAGES)
    }

    fn packages(&self) -> &'static [&'static str] {
        D::PACKAGES
    }

    fn up(&mut self, bed: &Bed, shape: Shape) -> Result<(), VpnError> {
        let result = self.start(bed, shape);
        undo_on_error(D::NAME, self.deployment_mut(), result)
    }

    fn pids(&self) -> Vec<u32> {
        self.deployment().pids()
    }

    fn down(&mut self) -> Result<(), VpnError> {
        self.deployment_mut().down(D::NAME)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_program_names_itself_and_the_packages() {
        let err =
            require_programs("tinc", &["sh", "wiremesh-no-such-program"], &["tinc"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tinc is not installed: wiremesh-no-such-program not found; apt-get install -y tinc"
        );
        assert!(require_programs("sh", &["sh"], &[]).is_ok());
    }

    #[test]
    fn an_unsupported_shape_is_refused() {
        let err = require_shape("openvpn", &[Shape::HubAndSpoke], Shape::Mesh).unwrap_err();
        assert!(matches!(
            err,
            VpnError::Unsupported {
                shape: Shape::Mesh,
                ..
            }
        ));
        assert!(require_shape("openvpn", &[Shape::HubAndSpoke], Shape::HubAndSpoke).is_ok());
    }

    #[test]
    fn secrets_are_written_0600_even_over_a_readable_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.key");
        write_config("x", &path, "public").unwrap();
        write_secret("x", &path, b"secret").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
    }
}
