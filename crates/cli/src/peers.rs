//! External peers (laptops, VMs, phones) and `showconf`: register a device outside
//! the cluster and print the `wg-quick` configuration that joins it to the mesh.
//!
//! The peer's key pair is made here, on the machine that runs the command; the
//! private key is printed once, inside the configuration, and stored nowhere.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ipnet::IpNet;
use wiremesh_model::{ExternalPeer, NodeName, PeerName, PrivateKey};
use wiremesh_topology::{compute, external_view, leaders, Peer, Snapshot};

use crate::RegistryArgs;

#[derive(Subcommand)]
pub enum PeerCommand {
    /// Register a device outside the cluster and print its wg-quick config (with its private key, once).
    Add(AddArgs),
    /// Remove an external peer: every node drops it on its next reconcile.
    Remove {
        #[command(flatten)]
        registry: RegistryArgs,
        name: String,
    },
    /// List the external peers.
    List {
        #[command(flatten)]
        registry: RegistryArgs,
    },
}

#[derive(Args)]
pub struct AddArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    /// The peer's name (a DNS label).
    name: String,
    /// Addresses the peer uses inside the mesh (default: a free /32 at the top of the mesh CIDR).
    #[arg(long, value_delimiter = ',')]
    allowed_ips: Vec<String>,
    /// Persistent keepalive in seconds (set it for a device behind NAT).
    #[arg(long)]
    keepalive: Option<u16>,
    /// Where the nodes can reach the peer, if it has a fixed address (IP:port).
    #[arg(long)]
    endpoint: Option<String>,
    #[command(flatten)]
    qr: QrArgs,
}

#[derive(Args)]
pub struct QrArgs {
    /// Also print the config as a QR code in the terminal (for the WireGuard mobile apps).
    #[arg(long)]
    qr: bool,
    /// Also write the config as a QR code PNG image.
    #[arg(long, value_name = "FILE")]
    qr_png: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum ShowconfCommand {
    /// An external peer's wg-quick config (its private key is not known to the cluster: fill it in).
    Peer {
        #[command(flatten)]
        registry: RegistryArgs,
        name: String,
        #[command(flatten)]
        qr: QrArgs,
    },
    /// A node's WireGuard config as its agent applies it (as `wg showconf` would print it, without the private key).
    Node {
        #[command(flatten)]
        registry: RegistryArgs,
        name: String,
    },
}

pub fn run_peer(command: PeerCommand) -> Result<()> {
    match command {
        PeerCommand::Add(a) => add(a),
        PeerCommand::Remove { registry, name } => {
            let name: PeerName = name.parse()?;
            if !registry.open()?.delete_peer(&name)? {
                bail!("there is no external peer named {name:?}");
            }
            eprintln!("removed {name}; nodes drop it on their next reconcile");
            Ok(())
        }
        PeerCommand::List { registry } => {
            let (snapshot, _) = registry.open()?.snapshot()?;
            for p in &snapshot.peers {
                let ips: Vec<String> = p.allowed_ips.iter().map(|n| n.to_string()).collect();
                println!("{:<16} {:<46} {}", p.name, p.public_key, ips.join(","));
            }
            Ok(())
        }
    }
}

pub fn run_showconf(command: ShowconfCommand) -> Result<()> {
    match command {
        ShowconfCommand::Peer { registry, name, qr } => {
            let (snapshot, _) = registry.open()?.snapshot()?;
            let name: PeerName = name.parse()?;
            let config = peer_config(&snapshot, &name, None)?;
            print!("{config}");
            qr.emit(&config)
        }
        ShowconfCommand::Node { registry, name } => {
            let (snapshot, _) = registry.open()?.snapshot()?;
            let name: NodeName = name.parse()?;
            print!("{}", node_config(&snapshot, &name)?);
            Ok(())
        }
    }
}

fn add(a: AddArgs) -> Result<()> {
    let registry = a.registry.open()?;
    let (snapshot, _) = registry.snapshot()?;
    let name: PeerName = a.name.parse().context("peer name")?;
    if snapshot.peers.iter().any(|p| p.name == name) {
        bail!("an external peer named {name} exists already (`wiremesh peer remove {name}` first)");
    }
    let allowed_ips: Vec<IpNet> = if a.allowed_ips.is_empty() {
        vec![IpNet::from(free_mesh_address(&snapshot)?)]
    } else {
        a.allowed_ips
            .iter()
            .map(|s| {
                s.parse()
                    .with_context(|| format!("--allowed-ips: {s:?} is not a CIDR"))
            })
            .collect::<Result<_>>()?
    };
    let private_key = PrivateKey::generate();
    let peer = ExternalPeer {
        name: name.clone(),
        public_key: private_key.public_key(),
        allowed_ips,
        endpoint: a
            .endpoint
            .as_deref()
            .map(str::parse)
            .transpose()
            .context("--endpoint: expected IP:port")?,
        persistent_keepalive: a.keepalive,
    };
    // Validate as the agents will, so a bad peer is refused here rather than ignored there.
    let record = wiremesh_model::ExternalPeerRecord::from(&peer);
    ExternalPeer::try_from(record)?;
    let mut with_peer = snapshot.clone();
    with_peer.peers.push(peer.clone());
    let config = peer_config(&with_peer, &name, Some(&private_key))?;
    registry.put_peer(&peer)?;
    if snapshot.nodes.is_empty() {
        eprintln!("warning: the cluster has no live nodes yet, so the config has no [Peer] sections; add them later from `wiremesh showconf peer {name}`");
    }
    eprintln!("registered {name}; this is the only time its private key is shown:\n");
    print!("{config}");
    a.qr.emit(&config)
}

/// The highest address of the mesh CIDR that no node or peer uses.
fn free_mesh_address(snapshot: &Snapshot) -> Result<IpAddr> {
    let used: Vec<IpAddr> = snapshot
        .nodes
        .iter()
        .map(|n| n.mesh_ip)
        .chain(
            snapshot
                .peers
                .iter()
                .flat_map(|p| p.allowed_ips.iter().map(|n| n.addr())),
        )
        .collect();
    let free = match snapshot.settings.mesh_cidr {
        IpNet::V4(net) => net
            .hosts()
            .rev()
            .map(IpAddr::V4)
            .find(|a| !used.contains(a)),
        IpNet::V6(net) => net
            .hosts()
            .rev()
            .take(65536)
            .map(IpAddr::V6)
            .find(|a| !used.contains(a)),
    };
    free.context("the mesh CIDR is full: pass --allowed-ips")
}

fn peer_section(out: &mut String, p: &Peer, note: &str) {
    let ips: Vec<String> = p.allowed_ips.iter().map(|n| n.to_string()).collect();
    let _ = writeln!(
        out,
        "\n[Peer]\n# {}{note}\nPublicKey = {}\nAllowedIPs = {}",
        p.name,
        p.public_key,
        ips.join(", ")
    );
    match p.endpoint {
        Some(e) => {
            let _ = writeln!(out, "Endpoint = {e}");
        }
        None => out.push_str("# no endpoint: behind NAT, it dials in\n"),
    }
    if let Some(k) = p.persistent_keepalive {
        let _ = writeln!(out, "PersistentKeepalive = {k}");
    }
}

/// The wg-quick configuration of an external peer.
pub fn peer_config(
    snapshot: &Snapshot,
    name: &PeerName,
    key: Option<&PrivateKey>,
) -> Result<String> {
    let me = snapshot
        .peers
        .iter()
        .find(|p| &p.name == name)
        .with_context(|| format!("no external peer named {name}"))?;
    let view = external_view(snapshot, name)?;
    let leaders = leaders(snapshot);
    let mut out = String::new();
    let addresses: Vec<String> = me.allowed_ips.iter().map(|n| n.to_string()).collect();
    let _ = writeln!(out, "# wiremesh external peer {name}");
    out.push_str("[Interface]\n");
    match key {
        Some(k) => {
            let _ = writeln!(out, "PrivateKey = {}", k.to_base64());
        }
        None => out.push_str("PrivateKey = <the private key printed by `wiremesh peer add`>\n"),
    }
    let _ = writeln!(
        out,
        "Address = {}\nMTU = {}",
        addresses.join(", "),
        snapshot.settings.mtu
    );
    for p in &view {
        let leader_of = leaders
            .iter()
            .find(|(_, n)| n.as_str() == p.name)
            .map(|(l, _)| format!(", leader of {l}"));
        peer_section(&mut out, p, &leader_of.unwrap_or_default());
    }
    Ok(out)
}

/// A node's WireGuard configuration, in `wg setconf` form without the private key.
pub fn node_config(snapshot: &Snapshot, name: &NodeName) -> Result<String> {
    let topology = compute(snapshot, name)?;
    let mut out = format!(
        "# wiremesh node {name}\n[Interface]\nListenPort = {}\n",
        topology.interface.listen_port
    );
    for p in &topology.peers {
        peer_section(&mut out, p, "");
    }
    Ok(out)
}

impl QrArgs {
    fn emit(&self, config: &str) -> Result<()> {
        if !self.qr && self.qr_png.is_none() {
            return Ok(());
        }
        let code = qrcode::QrCode::new(config.as_bytes())
            .context("the config is too long for a QR code")?;
        if self.qr {
            let image = code
                .render::<qrcode::render::unicode::Dense1x2>()
                .quiet_zone(true)
                .build();
            println!("\n{image}");
        }
        if let Some(path) = &self.qr_png {
            write_png(&code, path)?;
            eprintln!("wrote {}", path.display());
        }
        Ok(())
    }
}

/// The QR code as a black-on-white PNG, 8 pixels a module, with a 4-module quiet zone.
fn write_png(code: &qrcode::QrCode, path: &PathBuf) -> Result<()> {
    const SCALE: usize = 8;
    const QUIET: usize = 4;
    let modules = code.width();
    let side = (modules + 2 * QUIET) * SCALE;
    let colors = code.to_colors();
    let mut pixels = vec![255u8; side * side];
    for (i, color) in colors.iter().enumerate() {
        if *color == qrcode::Color::Dark {
            let (mx, my) = (i % modules + QUIET, i / modules + QUIET);
            for y in my * SCALE..(my + 1) * SCALE {
                pixels[y * side + mx * SCALE..y * side + (mx + 1) * SCALE].fill(0);
            }
        }
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), side as u32, side as u32);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header()?.write_image_data(&pixels)?;
    Ok(())
}
