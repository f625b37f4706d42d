//! Nebula 1.6: one `nebula` per host, the master the lighthouse (and in the
//! hub-and-spoke shape the relay).
//!
//! Each host's certificate (from `nebula-cert`, a CA made for the run) carries its
//! overlay address and, for a worker, its pod CIDR as a subnet; the other hosts route
//! that CIDR to the worker with `unsafe_routes`.
//!
//! - [`Shape::Mesh`], Nebula's own: hosts learn each other's underlay addresses from
//!   the lighthouse and tunnel directly.
//! - [`Shape::HubAndSpoke`]: workers accept no underlay address but the master's
//!   (`lighthouse.remote_allow_list`) and name the master as their relay, so
//!   worker-to-worker packets are relayed by the master's nebula.
//!
//! Cipher: AES-256-GCM (`cipher: aes`, Nebula's default; the Noise handshake uses
//! Curve25519). The UDP socket buffers are raised, as for every VPN here
//! ([`process::UDP_SOCKET_BUFFER`]; MACHINE-NOTES saw Nebula drop without).

use std::path::{Path, PathBuf};

use super::process::{self, Daemons, Deployment};
use super::{Bed, Host, Role, Shape, VpnError};

const NAME: &str = "nebula";
const PORT: u16 = 4242;
const INTERFACE: &str = "wmnebula";
/// IPv4 20 + UDP 8 + Nebula header 16 + GCM tag 16, twice over a relay.
const OVERHEAD: u16 = 120;

pub struct Nebula {
    deployment: Deployment,
}

impl Nebula {
    pub fn new() -> Self {
        Self {
            deployment: Deployment::default(),
        }
    }
}

impl Default for Nebula {
    fn default() -> Self {
        Self::new()
    }
}

fn nebula_cert(dir: &Path, what: &str, args: &[&str]) -> Result<(), VpnError> {
    let mut cmd = std::process::Command::new("nebula-cert");
    cmd.args(args).current_dir(dir);
    process::run(NAME, what, &mut cmd).map(drop)
}

/// Signs `host`'s certificate: its overlay address, and its pod CIDR as a subnet so
/// it may send and receive for its pods. `nebula-cert` writes keys 0600.
fn issue(bed: &Bed, pki: &Path, host: &Host) -> Result<(), VpnError> {
    let ip = process::overlay_addr(bed, host);
    let (crt, key) = (format!("{}.crt", host.name), format!("{}.key", host.name));
    let mut args = vec![
        "sign", "-ca-crt", "ca.crt", "-ca-key", "ca.key", "-name", &host.name, "-ip", &ip,
        "-out-crt", &crt, "-out-key", &key,
    ];
    let pods = host.pod_cidr.map(|p| p.to_string());
    if let Some(pods) = &pods {
        args.extend(["-subnets", pods]);
    }
    nebula_cert(
        pki,
        &format!("signing the certificate of {}", host.name),
        &args,
    )
}

fn config(bed: &Bed, pki: &Path, host: &Host, shape: Shape) -> String {
    let master = bed.master();
    let is_master = host.role == Role::Master;
    let path = |name: String| pki.join(name).display().to_string();
    let mut s = format!(
        "pki:\n  ca: {}\n  cert: {}\n  key: {}\n",
        path("ca.crt".into()),
        path(format!("{}.crt", host.name)),
        path(format!("{}.key", host.name))
    );
    s += &format!(
        "static_host_map:\n  \"{}\": [\"{}:{PORT}\"]\n",
        master.overlay, master.underlay
    );
    s += &format!("lighthouse:\n  am_lighthouse: {is_master}\n  interval: 10\n");
    if !is_master {
        s += &format!("  hosts: [\"{}\"]\n", master.overlay);
    }
    let hub_and_spoke = shape == Shape::HubAndSpoke;
    if hub_and_spoke && !is_master {
        s += &format!(
            "  remote_allow_list:\n    \"0.0.0.0/0\": false\n    \"{}/32\": true\n",
            master.underlay
        );
    }
    s += &format!(
        "listen:\n  host: 0.0.0.0\n  port: {PORT}\n  read_buffer: {buffer}\n  write_buffer: {buffer}\n",
        buffer = process::UDP_SOCKET_BUFFER
    );
    s += "punchy:\n  punch: true\n";
    if hub_and_spoke {
        s += &format!("relay:\n  am_relay: {is_master}\n  use_relays: true\n");
        if !is_master {
            s += &format!("  relays: [\"{}\"]\n", master.overlay);
        }
    } else {
        s += "relay:\n  am_relay: false\n  use_relays: false\n";
    }
    s += &format!(
        "tun:\n  dev: {INTERFACE}\n  mtu: {}\n  unsafe_routes:\n",
        process::tunnel_mtu(bed, OVERHEAD)
    );
    for other in bed.hosts.iter().filter(|h| h.name != host.name) {
        if let Some(pods) = other.pod_cidr {
            s += &format!("    - route: {pods}\n      via: {}\n", other.overlay);
        }
    }
    s += "cipher: aes\nlogging:\n  level: info\n";
    // The benchmark measures the tunnel, not Nebula's firewall: let all through.
    s += "firewall:\n  outbound:\n    - port: any\n      proto: any\n      host: any\n  \
          inbound:\n    - port: any\n      proto: any\n      host: any\n";
    s
}

impl Daemons for Nebula {
    const NAME: &'static str = NAME;
    const SHAPES: &'static [Shape] = &[Shape::HubAndSpoke, Shape::Mesh];
    const PROGRAMS: &'static [&'static str] = &["nebula", "nebula-cert"];
    const PACKAGES: &'static [&'static str] = &["nebula"];

    fn deployment(&self) -> &Deployment {
        &self.deployment
    }

    fn deployment_mut(&mut self) -> &mut Deployment {
        &mut self.deployment
    }

    fn start(&mut self, bed: &Bed, shape: Shape) -> Result<(), VpnError> {
        let dir = bed.work_dir.join("nebula");
        let _ = std::fs::remove_dir_all(&dir);
        let pki: PathBuf = dir.join("pki");
        process::private_dir(NAME, &pki)?;
        nebula_cert(
            &pki,
            "making the CA",
            &[
                "ca",
                "-name",
                "wiremesh-bench",
                "-duration",
                "48h",
                "-out-crt",
                "ca.crt",
                "-out-key",
                "ca.key",
            ],
        )?;
        for host in &bed.hosts {
            issue(bed, &pki, host)?;
            process::write_config(
                NAME,
                &dir.join(format!("{}.yml", host.name)),
                &config(bed, &pki, host, shape),
            )?;
        }
        for host in &bed.hosts {
            let config = dir.join(format!("{}.yml", host.name));
            self.deployment.spawn(
                NAME,
                &format!("nebula on {}", host.name),
                &host.netns,
                &["nebula", "-config", &config.to_string_lossy()],
                &bed.work_dir.join(format!("nebula-{}.log", host.name)),
            )?;
            self.deployment.track_link(&host.netns, INTERFACE);
        }
        process::wait_for_workers(NAME, bed, &mut self.deployment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_and_spoke_workers_accept_only_the_master_and_relay_through_it() {
        let bed = process::example_bed();
        let config = config(&bed, Path::new("/pki"), &bed.hosts[1], Shape::HubAndSpoke);
        for line in [
            "  am_lighthouse: false\n  interval: 10\n  hosts: [\"10.99.0.1\"]\n",
            "  remote_allow_list:\n    \"0.0.0.0/0\": false\n    \"192.168.0.1/32\": true\n",
            "relay:\n  am_relay: false\n  use_relays: true\n  relays: [\"10.99.0.1\"]\n",
            "    - route: 10.42.2.0/24\n      via: 10.99.0.3\n",
            "  read_buffer: 4194304\n",
        ] {
            assert!(config.contains(line), "{line:?} missing from\n{config}");
        }
        assert!(
            !config.contains("10.42.1.0/24"),
            "a worker does not route its own pods"
        );
    }

    #[test]
    fn in_the_mesh_the_master_is_lighthouse_only() {
        let bed = process::example_bed();
        let config = config(&bed, Path::new("/pki"), bed.master(), Shape::Mesh);
        assert!(config.contains("  am_lighthouse: true\n"));
        assert!(config.contains("relay:\n  am_relay: false\n  use_relays: false\n"));
        assert!(!config.contains("remote_allow_list"));
    }
}
