//! `wiremesh cluster link|unlink`: join two clusters that keep their own registries.
//!
//! A link is one-way: it reads the other (remote) cluster's registry, takes the
//! nodes any outsider must peer with ([`gateways`]: every node, or each location's
//! leader) and writes them into this cluster's registry as external peers named
//! `LINK-<node>`, carrying the prefixes each forwards. This cluster's agents then
//! treat them like any external peer (full granularity: every node peers with
//! them; location: the leaders do, and the other nodes route through them). Run
//! the link on both sides, each importing the other, and the two meshes' gateways
//! agree on every tunnel: what A imports from B is exactly B's view of A, mirrored.
//! `--follow` keeps a link fresh: it watches the remote registry and re-syncs on
//! every change, so a remote node leaving leaves this cluster too.
//!
//! Only public data crosses: public keys, endpoints and prefixes. The link owns
//! every external peer whose name starts with `LINK-`; that is why a link name has
//! no `-` of its own (link `east` must not own link `east-2`'s peers).
//!
//! Pure parts ([`imported_peers`], [`sync`]) decide; [`run`] only reads and writes.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ipnet::IpNet;
use wiremesh_agent::{Change, Changes, Registry};
use wiremesh_model::{ClusterSettings, ExternalPeer, PeerName};
use wiremesh_topology::{gateways, Snapshot};

use crate::RegistryArgs;

/// With `--follow`, a full re-sync this often even if no change came (someone may
/// have removed an imported peer by hand).
const RESYNC: Duration = Duration::from_secs(30);

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Import another cluster's gateway nodes as external peers of this one; run it on both sides to link them.
    Link(LinkArgs),
    /// Remove the external peers a link imported (LINK-*).
    Unlink {
        #[command(flatten)]
        registry: RegistryArgs,
        /// The link's name.
        name: String,
    },
}

#[derive(Args)]
pub struct LinkArgs {
    // This cluster's registry: where the peers are written.
    #[command(flatten)]
    registry: RegistryArgs,
    /// The link's name, a DNS label without '-': the imported peers are named NAME-<node>.
    name: String,
    /// The other cluster's registry, read only: `dir:/path` or `etcd://host:port,...` (the --etcd-* flags apply to --registry only).
    #[arg(long)]
    remote_registry: String,
    /// The other cluster's name in its registry.
    #[arg(long, default_value = "default")]
    remote_cluster: String,
    /// Keep running: follow the other cluster's changes and re-sync on each.
    #[arg(long)]
    follow: bool,
}

/// A link's name: a DNS label without `-`, so that `NAME-` prefixes never nest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkName(String);

impl std::str::FromStr for LinkName {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let label: PeerName = s.parse().context("link name")?;
        if s.contains('-') {
            bail!("link name {s:?} may not contain '-': the link owns every peer named {s}-*, and a name with '-' could own another link's");
        }
        Ok(LinkName(label.as_str().to_owned()))
    }
}

impl LinkName {
    /// The prefix of every peer this link owns.
    fn prefix(&self) -> String {
        format!("{}-", self.0)
    }

    fn owns(&self, peer: &PeerName) -> bool {
        peer.as_str().starts_with(&self.prefix())
    }
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The external peers link `link` wants in the local cluster: the remote's gateways,
/// renamed `LINK-<node>` (a dotted node name's dots become `-`). Refuses clusters
/// whose address plans overlap, naming the fields: one address would mean two pods.
pub fn imported_peers(
    link: &LinkName,
    local: &ClusterSettings,
    remote: &Snapshot,
) -> Result<Vec<ExternalPeer>> {
    let plan = |s: &ClusterSettings| [("cluster_cidr", s.cluster_cidr), ("mesh_cidr", s.mesh_cidr)];
    for (local_field, mine) in plan(local) {
        for (remote_field, theirs) in plan(&remote.settings) {
            if overlaps(&mine, &theirs) {
                bail!("the remote cluster's {remote_field} {theirs} overlaps this cluster's {local_field} {mine}: linked clusters need disjoint address plans (`wiremesh init --cluster-cidr ... --mesh-cidr ...`)");
            }
        }
    }
    let mut names = BTreeSet::new();
    gateways(remote)
        .context("the remote cluster's topology")?
        .into_iter()
        .map(|g| {
            let name: PeerName = format!("{}{}", link.prefix(), g.name.replace('.', "-"))
                .parse()
                .with_context(|| format!("remote node {}: no peer name for it", g.name))?;
            if !names.insert(name.clone()) {
                bail!(
                    "remote node {}: its peer name {name} is taken by another remote node",
                    g.name
                );
            }
            Ok(ExternalPeer {
                name,
                public_key: g.public_key,
                allowed_ips: g.allowed_ips,
                endpoint: g.endpoint,
                persistent_keepalive: None,
            })
        })
        .collect()
}

/// What to write so that the link's peers in `current` become `wanted`: peers new
/// or changed, and owned peers no longer wanted. Peers the link does not own are
/// never touched.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sync {
    pub put: Vec<ExternalPeer>,
    pub delete: Vec<PeerName>,
}

pub fn sync(link: &LinkName, current: &[ExternalPeer], wanted: &[ExternalPeer]) -> Sync {
    let put = wanted
        .iter()
        .filter(|w| !current.contains(w))
        .cloned()
        .collect();
    let delete = current
        .iter()
        .filter(|c| link.owns(&c.name) && !wanted.iter().any(|w| w.name == c.name))
        .map(|c| c.name.clone())
        .collect();
    Sync { put, delete }
}

pub fn run(command: ClusterCommand) -> Result<()> {
    match command {
        ClusterCommand::Link(a) => link(a),
        ClusterCommand::Unlink { registry, name } => {
            let link: LinkName = name.parse()?;
            let local = registry.open()?;
            let (snapshot, _) = local.snapshot()?;
            let removed = apply(&link, &*local, sync(&link, &snapshot.peers, &[]))?;
            eprintln!(
                "unlinked {}: removed {removed} peers; nodes drop them on their next reconcile",
                link.0
            );
            Ok(())
        }
    }
}

fn link(a: LinkArgs) -> Result<()> {
    let link: LinkName = a.name.parse()?;
    if a.remote_registry == crate::KUBERNETES {
        bail!("--remote-registry kubernetes is not supported yet: link from a dir: or etcd:// registry");
    }
    let local = a.registry.open()?;
    let store = wiremesh_agent::open_store(&a.remote_registry)
        .with_context(|| format!("opening the remote registry {}", a.remote_registry))?;
    let remote = wiremesh_agent::Cluster::new(store, &a.remote_cluster);
    if !a.follow {
        let applied = sync_once(&link, &*local, &remote)?;
        eprintln!("link {}: {applied} peers written or removed", link.0);
        return Ok(());
    }
    // Subscribed before the first read, so no change falls between the two.
    let mut changes = remote.changes()?;
    sync_once(&link, &*local, &remote)?;
    loop {
        if let Err(e) = wait_for_change(&mut *changes) {
            tracing::warn!(error = %format!("{e:#}"), "the remote registry's change stream ended; reading it again");
            changes = reopen(&remote);
        }
        if let Err(e) = sync_once(&link, &*local, &remote) {
            tracing::warn!(error = %format!("{e:#}"), link = %link.0, "sync failed; retrying on the next change");
        }
    }
}

/// A new change stream from the remote registry, however long it is away.
fn reopen(remote: &dyn Registry) -> Box<dyn Changes> {
    loop {
        match remote.changes() {
            Ok(c) => return c,
            Err(e) => {
                tracing::warn!(error = %e, "the remote registry is unreachable; retrying");
                // A retry pause against a registry that is down, not synchronisation.
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Returns when the remote's gateways may have changed, or after [`RESYNC`]; the
/// changes already waiting are taken with it, so a burst costs one sync.
fn wait_for_change(changes: &mut dyn Changes) -> Result<()> {
    let deadline = std::time::Instant::now() + RESYNC;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match changes.recv_timeout(left)? {
            None => return Ok(()),
            // Only nodes and settings make gateways; the remote's own external
            // peers (its import of this cluster among them), reports and VPCs do not.
            Some(Change::Node(_) | Change::Settings | Change::Resync) => break,
            Some(_) => continue,
        }
    }
    while changes.try_recv()?.is_some() {}
    Ok(())
}

/// Reads both registries and writes the difference; the number of writes.
fn sync_once(link: &LinkName, local: &dyn Registry, remote: &dyn Registry) -> Result<usize> {
    let (remote_snapshot, bad) = remote.snapshot().context("reading the remote cluster")?;
    for b in &bad {
        tracing::warn!(record = %b, "the remote cluster has a record it cannot use; not imported");
    }
    let (local_snapshot, _) = local.snapshot().context("reading this cluster")?;
    let wanted = imported_peers(link, &local_snapshot.settings, &remote_snapshot)?;
    apply(link, local, sync(link, &local_snapshot.peers, &wanted))
}

fn apply(link: &LinkName, local: &dyn Registry, sync: Sync) -> Result<usize> {
    let writes = sync.put.len() + sync.delete.len();
    for p in &sync.put {
        local
            .put_peer(p)
            .with_context(|| format!("writing peer {}", p.name))?;
        tracing::info!(link = %link.0, peer = %p.name, "imported");
    }
    for name in &sync.delete {
        local
            .delete_peer(name)
            .with_context(|| format!("removing peer {name}"))?;
        tracing::info!(link = %link.0, peer = %name, "removed");
    }
    Ok(writes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wiremesh_model::{Granularity, Node, PublicKey};

    fn node(name: &str, location: &str, i: u8) -> Node {
        let json = serde_json::json!({
            "name": name,
            "location": location,
            "public_key": PublicKey([i; 32]).to_string(),
            "public_endpoint": format!("192.0.2.{i}:51820"),
            "pod_cidr": format!("10.50.{i}.0/24"),
            "mesh_ip": format!("100.80.0.{i}"),
        });
        Node::from_json(json.to_string().as_bytes()).unwrap()
    }

    /// Cluster B: 10.50.0.0/16 and 100.80.0.0/16, nodes in two locations.
    fn remote(granularity: Granularity) -> Snapshot {
        Snapshot {
            settings: ClusterSettings {
                cluster_cidr: "10.50.0.0/16".parse().unwrap(),
                mesh_cidr: "100.80.0.0/16".parse().unwrap(),
                granularity,
                ..ClusterSettings::default()
            },
            nodes: vec![
                node("b1", "east", 1),
                node("b2", "east", 2),
                node("b3.example.com", "west", 3),
            ],
            peers: Vec::new(),
        }
    }

    fn link(name: &str) -> LinkName {
        name.parse().unwrap()
    }

    fn names(peers: &[ExternalPeer]) -> Vec<&str> {
        peers.iter().map(|p| p.name.as_str()).collect()
    }

    #[test]
    fn link_names_are_labels_without_dashes() {
        assert!("east".parse::<LinkName>().is_ok());
        let dash = format!("{:#}", "us-east".parse::<LinkName>().unwrap_err());
        assert!(dash.contains("link name") && dash.contains("'-'"), "{dash}");
        let upper = format!("{:#}", "East".parse::<LinkName>().unwrap_err());
        assert!(upper.contains("link name"), "{upper}");
    }

    #[test]
    fn imports_the_remote_gateways_under_the_link_name() {
        let local = ClusterSettings::default();
        let full = imported_peers(&link("b"), &local, &remote(Granularity::Full)).unwrap();
        let mut got = names(&full);
        got.sort();
        assert_eq!(got, ["b-b1", "b-b2", "b-b3-example-com"]);
        let b1 = full.iter().find(|p| p.name.as_str() == "b-b1").unwrap();
        assert_eq!(b1.public_key, PublicKey([1; 32]));
        assert_eq!(b1.endpoint, Some("192.0.2.1:51820".parse().unwrap()));
        assert_eq!(
            b1.allowed_ips,
            [
                "10.50.1.0/24".parse().unwrap(),
                "100.80.0.1/32".parse().unwrap()
            ]
        );
        // Location granularity: one leader a location, carrying its whole location.
        let location = imported_peers(&link("b"), &local, &remote(Granularity::Location)).unwrap();
        assert_eq!(location.len(), 2, "{:?}", names(&location));
        let east = location
            .iter()
            .find(|p| p.allowed_ips.contains(&"10.50.1.0/24".parse().unwrap()))
            .unwrap();
        assert!(east.allowed_ips.contains(&"10.50.2.0/24".parse().unwrap()));
    }

    #[test]
    fn overlapping_address_plans_are_refused_naming_the_fields() {
        let remote = remote(Granularity::Full);
        let check = |local: ClusterSettings, expect: &str| {
            let e = format!(
                "{:#}",
                imported_peers(&link("b"), &local, &remote).unwrap_err()
            );
            assert!(e.contains(expect), "{e}");
        };
        check(
            ClusterSettings {
                cluster_cidr: "10.50.0.0/16".parse().unwrap(),
                ..ClusterSettings::default()
            },
            "remote cluster's cluster_cidr 10.50.0.0/16 overlaps this cluster's cluster_cidr",
        );
        check(
            ClusterSettings {
                mesh_cidr: "100.80.0.0/12".parse().unwrap(),
                ..ClusterSettings::default()
            },
            "remote cluster's mesh_cidr 100.80.0.0/16 overlaps this cluster's mesh_cidr",
        );
        check(
            ClusterSettings {
                cluster_cidr: "100.80.5.0/24".parse().unwrap(),
                ..ClusterSettings::default()
            },
            "remote cluster's mesh_cidr 100.80.0.0/16 overlaps this cluster's cluster_cidr",
        );
    }

    #[test]
    fn sync_writes_only_the_difference_and_touches_only_its_own_peers() {
        let local = ClusterSettings::default();
        let wanted = imported_peers(&link("b"), &local, &remote(Granularity::Full)).unwrap();
        // Already in place: nothing to write.
        assert_eq!(sync(&link("b"), &wanted, &wanted), Sync::default());

        let mut current = wanted.clone();
        current[0].endpoint = Some("192.0.2.99:51820".parse().unwrap()); // moved
        let gone = ExternalPeer {
            name: "b-b9".parse().unwrap(),
            ..wanted[1].clone()
        };
        let laptop = ExternalPeer {
            name: "laptop".parse().unwrap(),
            ..wanted[1].clone()
        };
        let other_link = ExternalPeer {
            name: "bx-b1".parse().unwrap(),
            ..wanted[1].clone()
        };
        current.remove(2); // new on the remote
        current.extend([gone, laptop, other_link]);
        let s = sync(&link("b"), &current, &wanted);
        assert_eq!(
            names(&s.put),
            [wanted[0].name.as_str(), wanted[2].name.as_str()]
        );
        assert_eq!(s.delete, ["b-b9".parse::<PeerName>().unwrap()]);
        // Unlinking deletes every peer of the link, and only those.
        let unlink = sync(&link("b"), &current, &[]);
        assert!(unlink.put.is_empty());
        let deleted: Vec<&str> = unlink.delete.iter().map(PeerName::as_str).collect();
        assert_eq!(deleted.len(), 3, "{deleted:?}");
        assert!(deleted.iter().all(|n| n.starts_with("b-")), "{deleted:?}");
    }
}
