//! tinc 1.0 (the study's Tinc): one `tincd` per host in router mode, each host's
//! overlay address and pod CIDR announced as `Subnet`s.
//!
//! - [`Shape::HubAndSpoke`]: workers `ConnectTo` the master only and set
//!   `IndirectData`, so no other node sends them data directly: worker-to-worker
//!   packets are relayed by the master's tincd.
//! - [`Shape::Mesh`]: every host `ConnectTo`s every host that can be dialled (not
//!   behind a NAT), and data goes straight to its destination over UDP.
//!
//! Cipher: tinc 1.0 has no AEAD; packets are AES-256-CBC with an HMAC-SHA256 (the
//! defaults, Blowfish and SHA-1, are not what anyone would deploy now). RSA-2048 keys
//! from `tincd -K` authenticate the hosts.

use std::path::{Path, PathBuf};

use super::process::{self, Daemons, Deployment};
use super::{Bed, Host, Role, Shape, VpnError};

const NAME: &str = "tinc";
const PORT: u16 = 655;
const INTERFACE: &str = "wmtinc";
/// IPv4 20 + UDP 8 + sequence number 4 + CBC IV and padding 32 + HMAC-SHA256 32.
const OVERHEAD: u16 = 100;

pub struct Tinc {
    deployment: Deployment,
}

impl Tinc {
    pub fn new() -> Self {
        Self {
            deployment: Deployment::default(),
        }
    }
}

impl Default for Tinc {
    fn default() -> Self {
        Self::new()
    }
}

/// tinc node names allow only letters, digits and `_`.
fn node_name(host: &Host) -> String {
    host.name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn config_dir(bed: &Bed, host: &Host) -> PathBuf {
    bed.work_dir.join("tinc").join(&host.name)
}

/// Makes the host's RSA key pair with `tincd -K`; returns its public key (PEM).
fn generate_key(dir: &Path) -> Result<String, VpnError> {
    // Without a tinc.conf naming the host, `tincd -K` writes `rsa_key.pub` beside
    // `rsa_key.priv` (mode 0600) instead of appending to a host file.
    process::private_dir(NAME, dir)?;
    let dir_arg = dir.to_string_lossy();
    process::run(
        NAME,
        "generating a key with tincd -K",
        std::process::Command::new("tincd").args(["-c", &dir_arg, "-K", "2048"]),
    )?;
    let public = dir.join("rsa_key.pub");
    std::fs::read_to_string(&public).map_err(|e| VpnError::Setup {
        vpn: NAME,
        what: format!("reading {}", public.display()),
        reason: e.to_string(),
    })
}

/// The host file every node holds for `host`: how to reach it and what it routes.
fn host_file(host: &Host, shape: Shape, public_key: &str) -> String {
    let mut s = String::new();
    if !host.behind_nat {
        s += &format!("Address = {} {PORT}\n", host.underlay);
    }
    s += &format!("Subnet = {}/32\n", host.overlay);
    if let Some(pods) = host.pod_cidr {
        s += &format!("Subnet = {pods}\n");
    }
    if shape == Shape::HubAndSpoke && host.role == Role::Worker {
        s += "IndirectData = yes\n";
    }
    s += "Cipher = aes-256-cbc\nDigest = sha256\n";
    s += public_key;
    s
}

fn tinc_conf(bed: &Bed, host: &Host, shape: Shape) -> String {
    let mut s = format!(
        "Name = {}\nMode = router\nDeviceType = tun\nInterface = {INTERFACE}\nPort = {PORT}\n\
         AddressFamily = ipv4\nUDPRcvBuf = {buffer}\nUDPSndBuf = {buffer}\n",
        node_name(host),
        buffer = process::UDP_SOCKET_BUFFER
    );
    let peers: Vec<&Host> = match (shape, host.role) {
        (_, Role::Master) => Vec::new(),
        (Shape::HubAndSpoke, Role::Worker) => vec![bed.master()],
        (Shape::Mesh, Role::Worker) => bed
            .hosts
            .iter()
            .filter(|h| h.name != host.name && !h.behind_nat)
            .collect(),
    };
    for peer in peers {
        s += &format!("ConnectTo = {}\n", node_name(peer));
    }
    s
}

/// `tinc-up`: tincd runs it in the host's namespace once the interface exists.
fn tinc_up(bed: &Bed, host: &Host) -> String {
    let mut s = format!(
        "#!/bin/sh\nset -e\nip addr add {} dev \"$INTERFACE\"\nip link set \"$INTERFACE\" mtu {} up\n",
        process::overlay_addr(bed, host),
        process::tunnel_mtu(bed, OVERHEAD)
    );
    for pods in bed
        .hosts
        .iter()
        .filter(|h| h.name != host.name)
        .filter_map(|h| h.pod_cidr)
    {
        s += &format!("ip route add {pods} dev \"$INTERFACE\"\n");
    }
    s
}

impl Daemons for Tinc {
    const NAME: &'static str = NAME;
    const SHAPES: &'static [Shape] = &[Shape::HubAndSpoke, Shape::Mesh];
    const PROGRAMS: &'static [&'static str] = &["tincd"];
    const PACKAGES: &'static [&'static str] = &["tinc"];

    fn deployment(&self) -> &Deployment {
        &self.deployment
    }

    fn deployment_mut(&mut self) -> &mut Deployment {
        &mut self.deployment
    }

    fn start(&mut self, bed: &Bed, shape: Shape) -> Result<(), VpnError> {
        let mut public_keys = Vec::new();
        for host in &bed.hosts {
            let dir = config_dir(bed, host);
            // A previous run's keys and host files would confuse `tincd -K`.
            let _ = std::fs::remove_dir_all(&dir);
            public_keys.push(generate_key(&dir)?);
        }
        for host in &bed.hosts {
            let dir = config_dir(bed, host);
            process::write_config(NAME, &dir.join("tinc.conf"), &tinc_conf(bed, host, shape))?;
            process::write_script(NAME, &dir.join("tinc-up"), &tinc_up(bed, host))?;
            for (peer, key) in bed.hosts.iter().zip(&public_keys) {
                process::write_config(
                    NAME,
                    &dir.join("hosts").join(node_name(peer)),
                    &host_file(peer, shape, key),
                )?;
            }
        }
        for host in &bed.hosts {
            let dir = config_dir(bed, host);
            let pidfile = format!("--pidfile={}", dir.join("tinc.pid").display());
            self.deployment.spawn(
                NAME,
                &format!("tincd on {}", host.name),
                &host.netns,
                &["tincd", "-c", &dir.to_string_lossy(), "-D", "-d1", &pidfile],
                &bed.work_dir.join(format!("tinc-{}.log", host.name)),
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
    fn hub_and_spoke_workers_dial_the_master_and_take_data_through_it() {
        let bed = process::example_bed();
        let w1 = &bed.hosts[1];
        assert_eq!(
            host_file(w1, Shape::HubAndSpoke, "KEY\n"),
            "Address = 192.168.0.2 655\nSubnet = 10.99.0.2/32\nSubnet = 10.42.1.0/24\n\
             IndirectData = yes\nCipher = aes-256-cbc\nDigest = sha256\nKEY\n"
        );
        assert!(tinc_conf(&bed, w1, Shape::HubAndSpoke).ends_with("ConnectTo = master\n"));
    }

    #[test]
    fn mesh_hosts_dial_every_host_not_behind_a_nat() {
        let bed = process::example_bed();
        let w2 = &bed.hosts[2];
        assert!(tinc_conf(&bed, w2, Shape::Mesh).ends_with("ConnectTo = master\nConnectTo = w1\n"));
        // w2 is behind a NAT: nobody is told an address to dial it at.
        assert!(!host_file(w2, Shape::Mesh, "").contains("Address"));
    }
}
