//! `wiremesh`: the command users run. Each subcommand is a thin shell over the
//! library crates: `agent` runs a node, `demo` builds a whole simulated cluster on
//! this host, `status` and `graph` show the mesh from the registry.

mod agent_cmd;
mod bench;
mod cluster_link;
mod demo;
mod peers;
mod status;
mod ui;
mod vpc_cmd;
mod vpc_pod;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use wiremesh_agent::{KubeCluster, Registry};
use wiremesh_registry::{EtcdOptions, EtcdTls};

/// An encrypted WireGuard overlay for containers across nodes, clouds and edge sites.
#[derive(Parser)]
#[command(name = "wiremesh", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the cluster's records live.
#[derive(Args, Clone)]
pub struct RegistryArgs {
    /// Registry address: `dir:/path` for the embedded one-host registry,
    /// `etcd://host:port,host:port` (`etcd+https://` for TLS) for etcd, or
    /// `kubernetes` for the Kubernetes API (in a pod its service account, else
    /// KUBECONFIG or ~/.kube/config).
    #[arg(
        long,
        env = "WIREMESH_REGISTRY",
        default_value = "dir:/var/lib/wiremesh/registry"
    )]
    registry: String,
    /// Cluster name: one registry can hold several clusters (not with `kubernetes`:
    /// one Kubernetes cluster is one mesh).
    #[arg(long, env = "WIREMESH_CLUSTER", default_value = "default")]
    cluster: String,
    /// With `--registry kubernetes`: the namespace of wiremesh's Leases and settings
    /// ConfigMap (default: the pod's own, or the kubeconfig context's).
    #[arg(long, env = "WIREMESH_NAMESPACE")]
    kube_namespace: Option<String>,
    /// etcd user name; the password comes from WIREMESH_ETCD_PASSWORD (never a flag: flags show in `ps`).
    #[arg(long, env = "WIREMESH_ETCD_USER")]
    etcd_user: Option<String>,
    /// CA certificate (PEM) that signed the etcd members' certificates.
    #[arg(long, env = "WIREMESH_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-cert-auth; needs --etcd-key.
    #[arg(long, env = "WIREMESH_ETCD_CERT", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// Client private key (PEM) for --etcd-cert.
    #[arg(long, env = "WIREMESH_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
}

/// `--registry kubernetes`.
const KUBERNETES: &str = "kubernetes";

impl RegistryArgs {
    fn is_kubernetes(&self) -> bool {
        self.registry == KUBERNETES
    }

    /// The registry, whichever kind `--registry` names.
    fn open(&self) -> Result<Box<dyn Registry>> {
        if self.is_kubernetes() {
            return Ok(Box::new(self.open_kubernetes()?));
        }
        Ok(Box::new(self.connect_store()?))
    }

    fn open_kubernetes(&self) -> Result<KubeCluster> {
        KubeCluster::connect(self.kube_namespace.as_deref())
            .context("connecting to the Kubernetes API")
    }

    /// A key-value store registry (`dir:`, `etcd://`), for what only it can do;
    /// `kubernetes` is an error naming `command`.
    fn open_store(&self, command: &str) -> Result<wiremesh_agent::Cluster> {
        if self.is_kubernetes() {
            bail!(
                "`wiremesh {command}` works with a dir: or etcd:// registry, not yet on Kubernetes"
            );
        }
        self.connect_store()
    }

    fn connect_store(&self) -> Result<wiremesh_agent::Cluster> {
        let read = |path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))
        };
        let mut etcd = EtcdOptions::default();
        if let Some(user) = &self.etcd_user {
            let password = std::env::var("WIREMESH_ETCD_PASSWORD")
                .context("--etcd-user needs the password in WIREMESH_ETCD_PASSWORD")?;
            etcd.user = Some((user.clone(), password));
        }
        if let Some(ca) = &self.etcd_ca {
            let identity = match (&self.etcd_cert, &self.etcd_key) {
                (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
                _ => None,
            };
            etcd.tls = Some(EtcdTls {
                ca_pem: read(ca)?,
                identity,
                domain: None,
            });
        }
        let store = wiremesh_agent::open_store_with(&self.registry, etcd)
            .with_context(|| format!("opening the registry {}", self.registry))?;
        Ok(wiremesh_agent::Cluster::new(store, &self.cluster))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Write the cluster's settings (address plan, port, MTU, granularity) once.
    Init(InitArgs),
    /// Run this node's agent: join the mesh and keep its WireGuard peers, routes and rules up to date.
    Agent(agent_cmd::AgentArgs),
    /// Show nodes, locations, leaders, and each node's tunnels with their last handshake and bytes.
    Status {
        #[command(flatten)]
        registry: RegistryArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the mesh's topology as Graphviz DOT (or SVG with --svg, which needs `dot`).
    Graph {
        #[command(flatten)]
        registry: RegistryArgs,
        /// Render SVG with Graphviz's `dot`.
        #[arg(long)]
        svg: bool,
    },
    /// External peers: devices outside the cluster (laptops, VMs, phones).
    #[command(subcommand)]
    Peer(peers::PeerCommand),
    /// Link this cluster with another that has its own registry (import its gateway nodes as peers).
    #[command(subcommand)]
    Cluster(cluster_link::ClusterCommand),
    /// Print the WireGuard config of an external peer (wg-quick) or of a node.
    #[command(subcommand)]
    Showconf(peers::ShowconfCommand),
    /// Serve a live topology page: locations, leaders, nodes and tunnels, updating as the mesh changes.
    Ui {
        #[command(flatten)]
        registry: RegistryArgs,
        /// Address to serve the page on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },
    /// Replace this node's key pair; the running agent applies it within a second and every peer follows.
    RotateKey {
        /// The agent's state directory.
        #[arg(long, default_value_os_t = default_state_dir())]
        state_dir: PathBuf,
    },
    /// Build a demo cluster on this host (3 locations, 6 nodes, 12 containers) and show it working.
    Demo(demo::DemoArgs),
    /// Benchmarks that build their own clusters on this host (as root).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// VPCs: isolated layer-3 networks of pods, spanning nodes and sites.
    #[command(subcommand)]
    Vpc(vpc_cmd::VpcCommand),
    /// Services of a VPC: a clusterIP that follows its backends wherever they run.
    #[command(subcommand)]
    Service(vpc_cmd::ServiceCommand),
    /// List a service's endpoints, or add or remove one.
    Endpoints(vpc_cmd::EndpointsArgs),
}

#[derive(Args)]
struct InitArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    /// All pod addresses of the cluster.
    #[arg(long, default_value = "10.42.0.0/16")]
    cluster_cidr: String,
    /// Prefix length of each node's pod CIDR.
    #[arg(long, default_value_t = 24)]
    node_prefix_len: u8,
    /// Addresses of the nodes' WireGuard interfaces.
    #[arg(long, default_value = "100.64.0.0/16")]
    mesh_cidr: String,
    /// WireGuard UDP port of every node.
    #[arg(long, default_value_t = 51820)]
    port: u16,
    /// MTU of the WireGuard interface.
    #[arg(long, default_value_t = 1420)]
    mtu: u16,
    /// `full` (every node peers with every node) or `location` (one leader per location carries inter-site tunnels).
    #[arg(long, default_value = "full")]
    granularity: String,
    /// Do not encrypt between nodes of one location (as Kilo does). Off by default: every cable is hostile.
    #[arg(long)]
    trust_location_network: bool,
    /// Dual-stack pods: the cluster's IPv6 pod CIDR (e.g. fd42::/48). Each node's IPv6
    /// block has the index of its IPv4 block. Default: IPv4-only pods.
    #[arg(long)]
    cluster_cidr_v6: Option<String>,
    /// Prefix length of each node's IPv6 block of --cluster-cidr-v6.
    #[arg(long, default_value_t = 64, requires = "cluster_cidr_v6")]
    node_prefix_len_v6: u8,
}

fn main() {
    // Die quietly on a closed pipe (`wiremesh status | head`), as command-line tools do.
    // SAFETY: setting a signal's disposition to its default installs no handler code.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init(a) => {
            let record = wiremesh_model::ClusterSettingsRecord {
                cluster_cidr: a.cluster_cidr,
                node_prefix_len: a.node_prefix_len,
                mesh_cidr: a.mesh_cidr,
                port: a.port,
                mtu: a.mtu,
                granularity: a.granularity,
                trust_location_network: a.trust_location_network,
                mesh_ula: Some(vpc_cmd::random_mesh_ula()?.to_string()),
                node_prefix_len_v6: a.cluster_cidr_v6.as_ref().map(|_| a.node_prefix_len_v6),
                cluster_cidr_v6: a.cluster_cidr_v6,
            };
            if a.registry.is_kubernetes() {
                bail!("on Kubernetes the settings are the ConfigMap wiremesh-settings (deploy/30-settings.yaml): edit it and `kubectl apply` it; `wiremesh init` is for dir: and etcd:// registries");
            }
            let wanted = wiremesh_model::ClusterSettings::try_from(record)?;
            let settings = a.registry.open_store("init")?.init(&wanted)?;
            if settings != wanted {
                eprintln!("the cluster was already initialised; its settings are unchanged:");
            }
            println!("{}", String::from_utf8_lossy(&settings.to_json()));
            Ok(())
        }
        Command::Agent(a) => agent_cmd::run(a),
        Command::Status { registry, json } => status::print(&*registry.open()?, json),
        Command::Graph { registry, svg } => status::graph(&*registry.open()?, svg),
        Command::Demo(a) => demo::run(a),
        Command::Ui { registry, listen } => ui::serve(registry.open_store("ui")?, listen),
        Command::RotateKey { state_dir } => {
            let public = wiremesh_agent::keys::request_rotation(&state_dir)
                .with_context(|| format!("writing a new key into {}", state_dir.display()))?;
            println!("new public key {public}; the agent picks it up on its next tick");
            Ok(())
        }
        Command::Peer(c) => peers::run_peer(c),
        Command::Cluster(c) => cluster_link::run(c),
        Command::Showconf(c) => peers::run_showconf(c),
        Command::Bench(b) => bench::run(b),
        Command::Vpc(c) => vpc_cmd::run_vpc(c),
        Command::Service(c) => vpc_cmd::run_service(c),
        Command::Endpoints(a) => vpc_cmd::run_endpoints(a),
    }
}

/// The directory for a node's state (private key, pod CIDR claim).
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/wiremesh")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(args: &[&str]) -> String {
        let cli = Cli::try_parse_from(args).expect("valid flags");
        format!("{:#}", run(cli).expect_err("must fail"))
    }

    /// What has no meaning on Kubernetes says so, and where to go instead, without
    /// trying to reach an API server.
    #[test]
    fn store_only_commands_refuse_kubernetes_clearly() {
        let init = error_of(&["wiremesh", "init", "--registry", "kubernetes"]);
        assert!(init.contains("ConfigMap wiremesh-settings"), "{init}");
        let ui = error_of(&["wiremesh", "ui", "--registry", "kubernetes"]);
        assert!(
            ui.contains("`wiremesh ui`") && ui.contains("Kubernetes"),
            "{ui}"
        );
    }
}
