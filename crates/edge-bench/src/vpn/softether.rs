//! SoftEther VPN 5.01 in the study's shape: `vpnserver` on the master, `vpnclient`
//! on every worker, all in one layer-2 virtual hub.
//!
//! The master's hub is bridged to a TAP device (`tap_se`, a SoftEther local bridge)
//! that carries the master's overlay address; each worker's virtual NIC (`vpn_se`)
//! carries its own. Being layer 2, the hub knows nothing of pods: every host routes
//! a worker's pod CIDR via that worker's overlay address. Worker-to-worker frames are
//! switched by the hub in the master's server process. SoftEther has no mesh mode:
//! [`Shape::HubAndSpoke`] only.
//!
//! Cipher: the session runs over TLS 1.3 on TCP port 5555 (TLS_AES_256_GCM_SHA384
//! is what `AccountStatusGet` reports here); each client pins the server's own
//! certificate (`AccountServerCertSet` + `AccountServerCertEnable`) and logs in with
//! a random per-run password. Data rides the TLS session, or UDP acceleration where
//! SoftEther sets it up (not for a worker behind a NAT: see `AccountDetailSet`).
//!
//! The Debian build keeps its state in fixed directories (`/var/lib/softether`,
//! `/run/softether`, `/var/log/softether`), so each daemon (and each `vpncmd`
//! talking to it) runs with per-host directories bind-mounted over them, inside the
//! private mount namespace `ip netns exec` gives every command.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::process::{self, Daemons, Deployment};
use super::{Bed, Host, Shape, Vpn, VpnError};

const NAME: &str = "softether";
const PORT: u16 = 5555;
/// The hub the server creates on first start.
const HUB: &str = "DEFAULT";
/// A SoftEther NIC or bridge name; Linux sees `tap_se` (server) and `vpn_se` (client).
const NIC: &str = "se";
const SERVER_TAP: &str = "tap_se";
const CLIENT_NIC: &str = "vpn_se";
/// Layer-2 frames over TLS over TCP: Ethernet 14 + SoftEther framing, with margin.
const OVERHEAD: u16 = 100;
/// The directories the Debian build hard-codes, each shadowed per host.
const STATE_DIRS: [&str; 3] = ["/var/lib/softether", "/run/softether", "/var/log/softether"];

pub struct SoftEther {
    deployment: Deployment,
}

impl SoftEther {
    pub fn new() -> Self {
        Self {
            deployment: Deployment::default(),
        }
    }
}

impl Default for SoftEther {
    fn default() -> Self {
        Self::new()
    }
}

fn setup_error(what: impl Into<String>, reason: impl Into<String>) -> VpnError {
    VpnError::Setup {
        vpn: NAME,
        what: what.into(),
        reason: reason.into(),
    }
}

/// `'text'` for `sh -c`.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// One host's SoftEther instance: its own state directories and working directory.
struct Instance<'a> {
    host: &'a Host,
    dir: PathBuf,
}

impl<'a> Instance<'a> {
    fn new(bed: &Bed, host: &'a Host) -> Result<Self, VpnError> {
        let dir = bed.work_dir.join("softether").join(&host.name);
        let _ = std::fs::remove_dir_all(&dir);
        for target in STATE_DIRS {
            process::private_dir(NAME, &dir.join(state_dir_name(target)))?;
            // The mount points themselves; the package leaves them to systemd.
            process::private_dir(NAME, Path::new(target))?;
        }
        Ok(Self { host, dir })
    }

    /// `program args...` in the host's namespace, with its state directories mounted
    /// and the working directory `dir` (vpncmd reads a leading `/` as an option, so
    /// file arguments are given relative to it).
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut script = String::new();
        for target in STATE_DIRS {
            let source = self.dir.join(state_dir_name(target));
            let _ = write!(
                script,
                "mount --bind {} {target} && ",
                shell_quote(&source.to_string_lossy())
            );
        }
        let _ = write!(
            script,
            "cd {} && exec {program}",
            shell_quote(&self.dir.to_string_lossy())
        );
        for arg in args {
            script += " ";
            script += &shell_quote(arg);
        }
        process::in_netns(&self.host.netns, &["sh", "-c", &script])
    }

    /// Runs `commands` through `vpncmd` against this host's server or client (`mode`
    /// is `/SERVER` or `/CLIENT`). The batch file may hold passwords: it is 0600, and
    /// errors quote SoftEther's messages, never the echoed commands.
    fn vpncmd(&self, mode: &str, batch: &str, commands: &[String]) -> Result<(), VpnError> {
        let file = format!("{batch}.vpncmd");
        process::write_secret(NAME, &self.dir.join(&file), commands.join("\n").as_bytes())?;
        let target = match mode {
            "/SERVER" => format!("localhost:{PORT}"),
            _ => "localhost".to_string(),
        };
        let what = format!("vpncmd {batch} on {}", self.host.name);
        let out = self
            .command("vpncmd", &[&target, mode, &format!("/IN:{file}")])
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| setup_error(&what, e.to_string()))?;
        // vpncmd reports on stdout, and mostly exits 0 whatever happens: every
        // command that worked says so.
        let stdout = String::from_utf8_lossy(&out.stdout);
        let succeeded = stdout
            .matches("The command completed successfully.")
            .count();
        if out.status.success() && succeeded == commands.len() {
            return Ok(());
        }
        Err(setup_error(
            what,
            format!(
                "{}, {succeeded} of {} commands succeeded: {}",
                out.status,
                commands.len(),
                vpncmd_errors(&stdout)
            ),
        ))
    }

    /// Waits until the daemon answers `vpncmd`.
    fn wait_for_daemon(&self, mode: &str, probe: &str) -> Result<(), VpnError> {
        let answered = process::poll(process::BRING_UP_TIMEOUT, || {
            self.vpncmd(mode, "probe", &[probe.to_string()]).is_ok()
        });
        if answered {
            Ok(())
        } else {
            Err(setup_error(
                format!("starting SoftEther on {}", self.host.name),
                format!(
                    "vpncmd got no answer within {}s",
                    process::BRING_UP_TIMEOUT.as_secs()
                ),
            ))
        }
    }
}

/// SoftEther's error messages from vpncmd's output, without the lines that echo a
/// command (and with it a password).
fn vpncmd_errors(stdout: &str) -> String {
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|l| !l.starts_with("VPN ") && !l.contains("/PASSWORD"))
        .collect();
    let mut errors: Vec<&str> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.contains("Error occurred") {
            // The line after it says what the error code means.
            errors.extend(lines.get(i..=i + 1).unwrap_or(&lines[i..]).iter().copied());
        } else if ["Cannot", "not found", "not possible"]
            .iter()
            .any(|m| line.contains(m))
        {
            errors.push(line);
        }
    }
    errors.join(" ")
}

/// `/var/lib/softether` → `var-lib`.
fn state_dir_name(target: &str) -> String {
    target
        .trim_start_matches('/')
        .trim_end_matches("/softether")
        .replace('/', "-")
}

/// A random password for a worker's login (hex of 16 bytes from the kernel).
fn random_password() -> Result<String, VpnError> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| setup_error("making a password", e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Gives `interface` (in `host`'s namespace) its overlay address and MTU and routes
/// the other hosts' pod CIDRs via their overlay addresses.
fn configure_interface(bed: &Bed, host: &Host, interface: &str) -> Result<(), VpnError> {
    let netns = &host.netns;
    let mtu = process::tunnel_mtu(bed, OVERHEAD).to_string();
    process::ip(
        NAME,
        netns,
        &[
            "addr",
            "add",
            &process::overlay_addr(bed, host),
            "dev",
            interface,
        ],
    )?;
    process::ip(NAME, netns, &["link", "set", interface, "mtu", &mtu, "up"])?;
    for other in bed.hosts.iter().filter(|h| h.name != host.name) {
        if let Some(pods) = other.pod_cidr {
            let (pods, via) = (pods.to_string(), other.overlay.to_string());
            process::ip(
                NAME,
                netns,
                &["route", "add", &pods, "via", &via, "dev", interface],
            )?;
        }
    }
    Ok(())
}

fn link_exists(netns: &str, interface: &str) -> bool {
    process::ip(NAME, netns, &["link", "show", interface]).is_ok()
}

impl SoftEther {
    fn spawn(&mut self, bed: &Bed, instance: &Instance, program: &str) -> Result<(), VpnError> {
        let host = instance.host;
        let log = bed.work_dir.join(format!("softether-{}.log", host.name));
        self.deployment.spawn_command(
            NAME,
            &format!("{program} on {}", host.name),
            instance.command(program, &["execsvc"]),
            &log,
        )
    }
}

impl Daemons for SoftEther {
    const NAME: &'static str = NAME;
    const SHAPES: &'static [Shape] = &[Shape::HubAndSpoke];
    const PROGRAMS: &'static [&'static str] = &["vpnserver", "vpnclient", "vpncmd"];
    const PACKAGES: &'static [&'static str] = &[
        "softether-vpnserver",
        "softether-vpnclient",
        "softether-vpncmd",
    ];

    fn deployment(&self) -> &Deployment {
        &self.deployment
    }

    fn deployment_mut(&mut self) -> &mut Deployment {
        &mut self.deployment
    }

    fn start(&mut self, bed: &Bed, shape: Shape) -> Result<(), VpnError> {
        process::require_shape(NAME, self.shapes(), shape)?;
        let master = bed.master();
        let server = Instance::new(bed, master)?;
        self.spawn(bed, &server, "vpnserver")?;
        self.deployment.track_link(&master.netns, SERVER_TAP);
        server.wait_for_daemon("/SERVER", "ListenerList")?;

        let workers: Vec<&Host> = bed.workers().collect();
        let mut commands: Vec<String> = ["443", "992", "1194"]
            .iter()
            .map(|port| format!("ListenerDelete {port}"))
            .collect();
        commands.push(format!("BridgeCreate {HUB} /DEVICE:{NIC} /TAP:yes"));
        commands.push("ServerCertGet server.crt".to_string());
        commands.push(format!("Hub {HUB}"));
        let mut passwords = Vec::new();
        for worker in &workers {
            let password = random_password()?;
            commands.push(format!(
                "UserCreate {} /GROUP:none /REALNAME:none /NOTE:none",
                worker.name
            ));
            commands.push(format!(
                "UserPasswordSet {} /PASSWORD:{password}",
                worker.name
            ));
            passwords.push(password);
        }
        server.vpncmd("/SERVER", "setup", &commands)?;
        if !process::poll(process::BRING_UP_TIMEOUT, || {
            link_exists(&master.netns, SERVER_TAP)
        }) {
            return Err(setup_error(
                "bridging the hub",
                format!("{SERVER_TAP} did not appear"),
            ));
        }
        configure_interface(bed, master, SERVER_TAP)?;

        let server_cert = server.dir.join("server.crt");
        for (worker, password) in workers.iter().zip(&passwords) {
            let client = Instance::new(bed, worker)?;
            std::fs::copy(&server_cert, client.dir.join("server.crt"))
                .map_err(|e| setup_error("copying the server's certificate", e.to_string()))?;
            self.spawn(bed, &client, "vpnclient")?;
            self.deployment.track_link(&worker.netns, CLIENT_NIC);
            client.wait_for_daemon("/CLIENT", "AccountList")?;
            let account = "bench";
            let mut commands = vec![
                format!("NicCreate {NIC}"),
                format!(
                    "AccountCreate {account} /SERVER:{}:{PORT} /HUB:{HUB} /USERNAME:{} /NICNAME:{NIC}",
                    master.underlay, worker.name
                ),
                format!("AccountPasswordSet {account} /PASSWORD:{password} /TYPE:standard"),
                format!("AccountServerCertSet {account} /LOADCERT:server.crt"),
                format!("AccountServerCertEnable {account}"),
            ];
            if worker.behind_nat {
                // Behind the harness's NAT the server deleted the session within a
                // second of every login while UDP acceleration was on (and not with
                // it off): such a worker keeps to TCP. The other values are the
                // defaults; vpncmd would prompt for any left out.
                commands.push(format!(
                    "AccountDetailSet {account} /MAXTCP:2 /INTERVAL:1 /TTL:0 /HALF:no \
                     /BRIDGE:no /MONITOR:no /NOTRACK:no /NOQOS:no /DISABLEUDP:yes"
                ));
            }
            client.vpncmd("/CLIENT", "setup", &commands)?;
            configure_interface(bed, worker, CLIENT_NIC)?;
            client.vpncmd("/CLIENT", "connect", &[format!("AccountConnect {account}")])?;
        }
        process::wait_for_workers(NAME, bed, &mut self.deployment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_dirs_get_distinct_names() {
        let names: Vec<String> = STATE_DIRS.iter().map(|d| state_dir_name(d)).collect();
        assert_eq!(names, ["var-lib", "run", "var-log"]);
    }

    #[test]
    fn vpncmd_errors_never_quote_a_password() {
        let out = "VPN Server/DEFAULT>UserPasswordSet w1 /PASSWORD:s3cret\n\
                   UserPasswordSet command - Set Password\n\
                   The parameter \"/PASSWORD:s3cret\" has been specified. It is not possible\n\
                   Error occurred. (Error code: 52)\n\
                   Not enough privileges.\n";
        let errors = vpncmd_errors(out);
        assert_eq!(
            errors,
            "Error occurred. (Error code: 52) Not enough privileges."
        );
    }

    #[test]
    fn shell_quote_survives_quotes() {
        assert_eq!(shell_quote("a b'c"), r"'a b'\''c'");
    }
}
