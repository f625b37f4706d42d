//! The mesh as an outside device sees it: which nodes it peers with, and what it
//! routes to each. The mirror image of what [`compute`](crate::compute) gives those
//! nodes, so both ends of every tunnel agree on its allowed IPs.
//!
//! [`gateways`] is that view for any outsider: an external peer (a laptop, a VM)
//! through [`external_view`], or every node of another cluster linked to this one
//! (`wiremesh cluster link` imports a cluster's gateways as external peers).

use wiremesh_model::{Granularity, PeerName};

use crate::topology::{own_prefixes, validate};
use crate::{leaders, Peer, PeerKind, Snapshot, TopologyError};

/// The WireGuard peers of external peer `name`: its [`gateways`], with the
/// keepalive it asked for.
pub fn external_view(snapshot: &Snapshot, name: &PeerName) -> Result<Vec<Peer>, TopologyError> {
    let me = snapshot
        .peers
        .iter()
        .find(|p| &p.name == name)
        .ok_or_else(|| TopologyError::UnknownPeer { name: name.clone() })?;
    let mut peers = gateways(snapshot)?;
    for p in &mut peers {
        p.persistent_keepalive = me.persistent_keepalive;
    }
    Ok(peers)
}

/// The nodes that peer with every external peer: every node (full granularity) or
/// every location's leader (location granularity), each carrying the prefixes it
/// forwards, sorted by public key, without keepalive. Nodes without a public
/// endpoint are listed without one: an outsider cannot dial them, but they dial it
/// if it has an endpoint.
pub fn gateways(snapshot: &Snapshot) -> Result<Vec<Peer>, TopologyError> {
    validate(snapshot)?;
    let as_peer = |node: &wiremesh_model::Node, mut allowed_ips: Vec<ipnet::IpNet>| {
        allowed_ips.sort();
        allowed_ips.dedup();
        Peer {
            name: node.name.to_string(),
            kind: PeerKind::Node,
            public_key: node.public_key,
            endpoint: node.public_endpoint,
            allowed_ips,
            persistent_keepalive: None,
        }
    };
    let mut peers: Vec<Peer> = match snapshot.settings.granularity {
        Granularity::Full => snapshot
            .nodes
            .iter()
            .map(|n| as_peer(n, own_prefixes(n)))
            .collect(),
        Granularity::Location => leaders(snapshot)
            .iter()
            .filter_map(|(location, leader)| {
                let leader = snapshot.nodes.iter().find(|n| &n.name == leader)?;
                let prefixes = snapshot
                    .nodes
                    .iter()
                    .filter(|n| &n.location == location)
                    .flat_map(own_prefixes)
                    .collect();
                Some(as_peer(leader, prefixes))
            })
            .collect(),
    };
    peers.sort_by_key(|p| p.public_key);
    Ok(peers)
}
