//! OpenVPN 2.6 in the study's shape: one server on the master, every worker a client.
//!
//! Layer 3 (`dev-type tun`, `topology subnet`) over UDP. Each worker's
//! `client-config-dir` file pins its overlay address (`ifconfig-push`), tells the
//! server which pod CIDR lives behind it (`iroute`) and pushes routes to the other
//! workers' pods; the server's `route`s send pod traffic into its tun device, and
//! `client-to-client` relays worker-to-worker packets inside the server process.
//! OpenVPN has no mesh mode: [`Shape::HubAndSpoke`] only.
//!
//! Cipher: the data channel negotiates AES-256-GCM (CHACHA20-POLY1305 offered as
//! well); the control channel is TLS with P-256 ECDSA certificates from a CA made
//! with `openssl` for the run, `dh none` (ECDHE). Kernel data-channel offload is
//! disabled: the module is not on these hosts, and a userspace run is what is
//! compared.

use std::path::{Path, PathBuf};

use ipnet::IpNet;

use super::process::{self, Daemons, Deployment};
use super::{Bed, Host, Role, Shape, Vpn, VpnError};

const NAME: &str = "openvpn";
const PORT: u16 = 1194;
const INTERFACE: &str = "wmovpn";
/// IPv4 20 + UDP 8 + opcode and peer id 4 + packet id 4 + GCM tag 16, with margin.
const OVERHEAD: u16 = 80;
const DATA_CIPHERS: &str = "AES-256-GCM:CHACHA20-POLY1305";

/// `openssl req` extension sections for the run's CA and its leaf certificates.
const OPENSSL_CNF: &str = "[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
";

pub struct OpenVpn {
    deployment: Deployment,
}

impl OpenVpn {
    pub fn new() -> Self {
        Self {
            deployment: Deployment::default(),
        }
    }
}

impl Default for OpenVpn {
    fn default() -> Self {
        Self::new()
    }
}

/// The run's PKI: a CA and one certificate per host, its CN the host's name.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn create(dir: PathBuf) -> Result<Self, VpnError> {
        process::private_dir(NAME, &dir)?;
        process::write_config(NAME, &dir.join("openssl.cnf"), OPENSSL_CNF)?;
        let pki = Self { dir };
        pki.generate_key("ca")?;
        pki.openssl(
            "making the CA certificate",
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "ca.key",
                "-subj",
                "/CN=wiremesh-bench-ca",
                "-days",
                "2",
                "-config",
                "openssl.cnf",
                "-extensions",
                "ca",
                "-out",
                "ca.crt",
            ],
        )?;
        Ok(pki)
    }

    /// A P-256 key, written 0600 from the first byte (openssl prints it to stdout).
    fn generate_key(&self, name: &str) -> Result<(), VpnError> {
        let pem = self.openssl(
            &format!("making the key of {name}"),
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ],
        )?;
        process::write_secret(NAME, &self.key(name), pem.as_bytes())
    }

    /// A key and a certificate for `host`; `extensions` is `server` or `client`.
    fn issue(&self, host: &Host, extensions: &str) -> Result<(), VpnError> {
        self.generate_key(&host.name)?;
        let (key, crt) = (format!("{}.key", host.name), format!("{}.crt", host.name));
        self.openssl(
            &format!("making the certificate of {}", host.name),
            &[
                "req",
                "-new",
                "-key",
                &key,
                "-subj",
                &format!("/CN={}", host.name),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-days",
                "2",
                "-config",
                "openssl.cnf",
                "-extensions",
                extensions,
                "-out",
                &crt,
            ],
        )?;
        Ok(())
    }

    fn openssl(&self, what: &str, args: &[&str]) -> Result<String, VpnError> {
        let mut cmd = std::process::Command::new("openssl");
        cmd.args(args).current_dir(&self.dir);
        process::run(NAME, what, &mut cmd)
    }

    fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }

    /// The `ca`, `cert` and `key` lines of `host`'s config.
    fn config_lines(&self, host: &Host) -> String {
        format!(
            "ca {}\ncert {}\nkey {}\n",
            self.dir.join("ca.crt").display(),
            self.dir.join(format!("{}.crt", host.name)).display(),
            self.key(&host.name).display()
        )
    }
}

/// `10.78.1.0/24` as OpenVPN writes it: `10.78.1.0 255.255.255.0`.
fn net_and_mask(net: &IpNet) -> String {
    format!("{} {}", net.network(), net.netmask())
}

/// What every config shares: the device, the cipher, the MTU, the log level.
fn common_lines(bed: &Bed) -> String {
    format!(
        "dev {INTERFACE}\ndev-type tun\nproto udp4\ntun-mtu {}\ndata-ciphers {DATA_CIPHERS}\n\
         disable-dco\nkeepalive 2 10\nverb 3\nsndbuf {buffer}\nrcvbuf {buffer}\n",
        process::tunnel_mtu(bed, OVERHEAD),
        buffer = process::UDP_SOCKET_BUFFER
    )
}

fn server_config(bed: &Bed, pki: &Pki, ccd: &Path) -> String {
    let master = bed.master();
    let mut s = format!(
        "mode server\ntls-server\nport {PORT}\ntopology subnet\nifconfig {} {}\n\
         push \"topology subnet\"\npush \"route-gateway {}\"\n\
         client-config-dir {}\nccd-exclusive\nclient-to-client\ndh none\n",
        master.overlay,
        bed.overlay_cidr.netmask(),
        master.overlay,
        ccd.display()
    );
    for worker in bed.workers() {
        if let Some(pods) = worker.pod_cidr {
            s += &format!("route {} {}\n", net_and_mask(&pods), worker.overlay);
        }
    }
    s + &common_lines(bed) + &pki.config_lines(master)
}

/// The server's `client-config-dir` file for `worker`.
fn client_config_dir_file(bed: &Bed, worker: &Host) -> String {
    let mut s = format!(
        "ifconfig-push {} {}\n",
        worker.overlay,
        bed.overlay_cidr.netmask()
    );
    if let Some(pods) = worker.pod_cidr {
        s += &format!("iroute {}\n", net_and_mask(&pods));
    }
    for other in bed.workers().filter(|w| w.name != worker.name) {
        if let Some(pods) = other.pod_cidr {
            s += &format!("push \"route {}\"\n", net_and_mask(&pods));
        }
    }
    s
}

fn client_config(bed: &Bed, pki: &Pki, worker: &Host) -> String {
    format!(
        "client\nremote {} {PORT}\nnobind\nremote-cert-tls server\nverify-x509-name {} name\n",
        bed.master().underlay,
        bed.master().name
    ) + &common_lines(bed)
        + &pki.config_lines(worker)
}

impl Daemons for OpenVpn {
    const NAME: &'static str = NAME;
    const SHAPES: &'static [Shape] = &[Shape::HubAndSpoke];
    const PROGRAMS: &'static [&'static str] = &["openvpn", "openssl"];
    const PACKAGES: &'static [&'static str] = &["openvpn", "openssl"];

    fn deployment(&self) -> &Deployment {
        &self.deployment
    }

    fn deployment_mut(&mut self) -> &mut Deployment {
        &mut self.deployment
    }

    fn start(&mut self, bed: &Bed, shape: Shape) -> Result<(), VpnError> {
        process::require_shape(NAME, self.shapes(), shape)?;
        let dir = bed.work_dir.join("openvpn");
        let _ = std::fs::remove_dir_all(&dir);
        let pki = Pki::create(dir.join("pki"))?;
        let ccd = dir.join("ccd");
        for host in &bed.hosts {
            let (config, extensions) = match host.role {
                Role::Master => (server_config(bed, &pki, &ccd), "server"),
                Role::Worker => {
                    process::write_config(
                        NAME,
                        &ccd.join(&host.name),
                        &client_config_dir_file(bed, host),
                    )?;
                    (client_config(bed, &pki, host), "client")
                }
            };
            pki.issue(host, extensions)?;
            process::write_config(NAME, &dir.join(format!("{}.conf", host.name)), &config)?;
        }
        for host in &bed.hosts {
            let config = dir.join(format!("{}.conf", host.name));
            self.deployment.spawn(
                NAME,
                &format!("openvpn on {}", host.name),
                &host.netns,
                &["openvpn", "--config", &config.to_string_lossy()],
                &bed.work_dir.join(format!("openvpn-{}.log", host.name)),
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
    fn a_workers_client_config_dir_file_pins_its_address_and_routes() {
        let bed = process::example_bed();
        let w1 = &bed.hosts[1];
        assert_eq!(
            client_config_dir_file(&bed, w1),
            "ifconfig-push 10.99.0.2 255.255.255.0\n\
             iroute 10.42.1.0 255.255.255.0\n\
             push \"route 10.42.2.0 255.255.255.0\"\n"
        );
    }

    #[test]
    fn the_server_routes_each_pod_cidr_to_its_worker() {
        let bed = process::example_bed();
        let pki = Pki { dir: "/pki".into() };
        let config = server_config(&bed, &pki, Path::new("/ccd"));
        assert!(
            config.contains("route 10.42.1.0 255.255.255.0 10.99.0.2\n"),
            "{config}"
        );
        assert!(
            config.contains("route 10.42.2.0 255.255.255.0 10.99.0.3\n"),
            "{config}"
        );
        assert!(config.contains("data-ciphers AES-256-GCM:CHACHA20-POLY1305\n"));
        assert!(config.contains("tun-mtu 1420\n"));
    }
}
