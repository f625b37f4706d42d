//! Userspace WireGuard as a user would run it by hand: `wireguard-go` or
//! `boringtun-cli` per host, configured with `wg` and `ip`, in either shape.
//!
//! Hub and spoke: the master peers with every worker (its allowed IPs: the worker's
//! overlay address and pod CIDR); a worker peers only with the master, which
//! carries the whole overlay and every other pod CIDR. Mesh: every host peers with
//! every other. A peer behind NAT has no endpoint: it dials out, and every worker
//! keeps its tunnels alive every [`KEEPALIVE_SECS`] so NAT mappings and roaming
//! (an address change) are picked up as fast as with the other VPNs.

use std::path::Path;
use std::time::Duration;

use wiremesh_model::PrivateKey;

use super::process::{self, Deployment};
use super::{Bed, Host, Role, Shape, Vpn, VpnError};

pub const PORT: u16 = 51820;
pub const KEEPALIVE_SECS: u16 = 5;
/// 1500 less WireGuard over IPv4's 60 bytes (IP 20, UDP 8, WireGuard 32).
const OVERHEAD: u16 = 60;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    WireguardGo,
    Boringtun,
}

pub struct UserspaceWg {
    program: Program,
    deployment: Deployment,
}

impl UserspaceWg {
    pub fn new(program: Program) -> UserspaceWg {
        UserspaceWg {
            program,
            deployment: Deployment::default(),
        }
    }

    fn name_of(program: Program) -> &'static str {
        match program {
            Program::WireguardGo => "wireguard-go",
            Program::Boringtun => "boringtun",
        }
    }

    fn error(&self, what: impl Into<String>, reason: impl ToString) -> VpnError {
        VpnError::Setup {
            vpn: self.name(),
            what: what.into(),
            reason: reason.to_string(),
        }
    }

    fn bring_up(&mut self, bed: &Bed, shape: Shape) -> Result<(), VpnError> {
        let vpn = self.name();
        let keys: Vec<PrivateKey> = bed.hosts.iter().map(|_| PrivateKey::generate()).collect();
        let dir = bed.work_dir.join(vpn);
        process::private_dir(vpn, &dir)?;
        let mtu = process::tunnel_mtu(bed, OVERHEAD).to_string();
        for (i, host) in bed.hosts.iter().enumerate() {
            let ifname = interface_name(host);
            let log = dir.join(format!("{}.log", host.name));
            let command: Vec<&str> = match self.program {
                Program::WireguardGo => vec!["wireguard-go", "-f", &ifname],
                Program::Boringtun => {
                    vec!["boringtun-cli", "-f", "--disable-drop-privileges", &ifname]
                }
            };
            self.deployment.spawn(
                vpn,
                &format!("{vpn} on {}", host.name),
                &host.netns,
                &command,
                &log,
            )?;
            self.deployment.track_link(&host.netns, &ifname);
            let socket = Path::new("/var/run/wireguard").join(format!("{ifname}.sock"));
            if !process::poll(Duration::from_secs(10), || socket.exists()) {
                self.deployment.check_alive(vpn, &dir)?;
                return Err(self.error(
                    format!("starting {vpn} on {}", host.name),
                    format!("no UAPI socket {} after 10 s", socket.display()),
                ));
            }
            let key_file = dir.join(format!("{}.key", host.name));
            process::write_secret(vpn, &key_file, keys[i].to_base64().as_bytes())?;
            let mut wg: Vec<String> = vec![
                "wg".into(),
                "set".into(),
                ifname.clone(),
                "listen-port".into(),
                PORT.to_string(),
                "private-key".into(),
                key_file.display().to_string(),
            ];
            for (j, peer) in bed.hosts.iter().enumerate() {
                if let Some(allowed) = allowed_ips(bed, shape, host, peer) {
                    wg.extend(["peer".into(), keys[j].public_key().to_base64()]);
                    wg.extend(["allowed-ips".into(), allowed.join(",")]);
                    if !peer.behind_nat {
                        wg.extend(["endpoint".into(), format!("{}:{PORT}", peer.underlay)]);
                    }
                    if host.role == Role::Worker {
                        wg.extend(["persistent-keepalive".into(), KEEPALIVE_SECS.to_string()]);
                    }
                }
            }
            let wg: Vec<&str> = wg.iter().map(String::as_str).collect();
            process::run(
                vpn,
                &format!("configuring {ifname} on {}", host.name),
                &mut process::in_netns(&host.netns, &wg),
            )?;
            let addr = process::overlay_addr(bed, host);
            process::ip(vpn, &host.netns, &["address", "add", &addr, "dev", &ifname])?;
            process::ip(
                vpn,
                &host.netns,
                &["link", "set", &ifname, "mtu", &mtu, "up"],
            )?;
            for other in bed.hosts.iter().filter(|o| o.name != host.name) {
                if let Some(cidr) = other.pod_cidr {
                    let cidr = cidr.to_string();
                    process::ip(
                        vpn,
                        &host.netns,
                        &["route", "replace", &cidr, "dev", &ifname],
                    )?;
                }
            }
        }
        process::wait_for_workers(vpn, bed, &mut self.deployment)
    }
}

/// Unique on the machine, as every namespace shares `/var/run/wireguard`: a hash of
/// the host's namespace name (itself unique per run), the same on every call.
pub(crate) fn interface_name(host: &Host) -> String {
    // FNV-1a, 32 bits.
    let tag = host.netns.bytes().fold(0x811c_9dc5u32, |a, b| {
        (a ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("wm{tag:08x}")
}

/// What `host` routes to `peer` through its tunnel, or `None` if they do not peer.
fn allowed_ips(bed: &Bed, shape: Shape, host: &Host, peer: &Host) -> Option<Vec<String>> {
    if host.name == peer.name {
        return None;
    }
    let own = |h: &Host| {
        let mut v = vec![format!("{}/32", h.overlay)];
        v.extend(h.pod_cidr.map(|c| c.to_string()));
        v
    };
    match (shape, host.role, peer.role) {
        (Shape::Mesh, _, _) | (Shape::HubAndSpoke, Role::Master, _) => Some(own(peer)),
        // A spoke sends everything in the overlay through the hub.
        (Shape::HubAndSpoke, Role::Worker, Role::Master) => {
            let mut v = vec![bed.overlay_cidr.to_string()];
            v.extend(
                bed.workers()
                    .filter(|w| w.name != host.name)
                    .filter_map(|w| w.pod_cidr.map(|c| c.to_string())),
            );
            Some(v)
        }
        (Shape::HubAndSpoke, Role::Worker, Role::Worker) => None,
    }
}

impl Vpn for UserspaceWg {
    fn name(&self) -> &'static str {
        Self::name_of(self.program)
    }

    fn shapes(&self) -> &'static [Shape] {
        &[Shape::HubAndSpoke, Shape::Mesh]
    }

    fn check_installed(&self) -> Result<(), VpnError> {
        let (program, packages): (&str, &[&str]) = match self.program {
            Program::WireguardGo => ("wireguard-go", &["wireguard-go", "wireguard-tools"]),
            Program::Boringtun => ("boringtun-cli", &["cargo:boringtun-cli", "wireguard-tools"]),
        };
        process::require_programs(self.name(), &[program, "wg"], packages).map_err(|e| match e {
            VpnError::NotInstalled { vpn, .. } if self.program == Program::Boringtun => {
                VpnError::NotInstalled {
                    vpn,
                    hint: "boringtun-cli or wg not found; cargo install --locked boringtun-cli; apt-get install -y wireguard-tools".into(),
                }
            }
            e => e,
        })
    }

    fn packages(&self) -> &'static [&'static str] {
        match self.program {
            Program::WireguardGo => &["wireguard-go", "wireguard-tools"],
            Program::Boringtun => &["cargo:boringtun-cli", "wireguard-tools"],
        }
    }

    fn up(&mut self, bed: &Bed, shape: Shape) -> Result<(), VpnError> {
        let result = self.bring_up(bed, shape);
        process::undo_on_error(self.name(), &mut self.deployment, result)
    }

    fn pids(&self) -> Vec<u32> {
        self.deployment.pids()
    }

    fn down(&mut self) -> Result<(), VpnError> {
        self.deployment.down(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn bed() -> Bed {
        let host = |i: u8, role| Host {
            name: if i == 0 {
                "master".into()
            } else {
                format!("w{i}")
            },
            role,
            netns: format!("ns-{i}"),
            underlay: IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1 + i)),
            underlay_if: "wan0".into(),
            pod_cidr: (i > 0).then(|| format!("10.42.{i}.0/24").parse().unwrap()),
            overlay: IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1 + i)),
            behind_nat: false,
        };
        Bed {
            hosts: vec![
                host(0, Role::Master),
                host(1, Role::Worker),
                host(2, Role::Worker),
            ],
            overlay_cidr: "10.99.0.0/24".parse().unwrap(),
            work_dir: "/nonexistent".into(),
            underlay_mtu: 1500,
        }
    }

    #[test]
    fn hub_and_spoke_routes_everything_through_the_master() {
        let b = bed();
        let [m, w1, w2] = [&b.hosts[0], &b.hosts[1], &b.hosts[2]];
        let hs = Shape::HubAndSpoke;
        assert_eq!(
            allowed_ips(&b, hs, m, w1).unwrap(),
            ["10.99.0.2/32", "10.42.1.0/24"]
        );
        assert_eq!(
            allowed_ips(&b, hs, w1, m).unwrap(),
            ["10.99.0.0/24", "10.42.2.0/24"]
        );
        assert_eq!(allowed_ips(&b, hs, w1, w2), None);
        assert_eq!(allowed_ips(&b, hs, m, m), None);
    }

    #[test]
    fn mesh_peers_directly() {
        let b = bed();
        let (w1, w2) = (&b.hosts[1], &b.hosts[2]);
        assert_eq!(
            allowed_ips(&b, Shape::Mesh, w1, w2).unwrap(),
            ["10.99.0.3/32", "10.42.2.0/24"]
        );
        assert_eq!(
            allowed_ips(&b, Shape::Mesh, w2, &b.hosts[0]).unwrap(),
            ["10.99.0.1/32"]
        );
    }

    #[test]
    fn interface_names_fit_and_differ() {
        let b = bed();
        let names: Vec<String> = b.hosts.iter().map(interface_name).collect();
        assert!(names.iter().all(|n| n.len() <= 15));
        assert_ne!(names[0], names[1]);
        assert_eq!(names[0], interface_name(&b.hosts[0]));
    }
}
