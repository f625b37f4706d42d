//! Leader election: one node per location carries that location's tunnels to the
//! other locations.
//!
//! There is no election protocol: every node applies the same total order to the
//! same snapshot and so agrees on the leaders. When a leader's lease expires the
//! agent drops it from the snapshot and the next node in the order takes over.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::net::IpAddr;

use wiremesh_model::{Granularity, Location, Node, NodeName};

use crate::Snapshot;

/// The leader of every location: a node that most of its location does not suspect
/// of having stopped forwarding (see [`Node::suspected_leaders`]), then the highest
/// `leader_preference`, then a node with a public endpoint (nodes of other
/// locations can dial it), then the lowest name.
pub fn leaders(snapshot: &Snapshot) -> BTreeMap<Location, NodeName> {
    let mut best: BTreeMap<&Location, (Rank, &Node)> = BTreeMap::new();
    for node in &snapshot.nodes {
        let r = rank(snapshot, node);
        best.entry(&node.location)
            .and_modify(|(b_rank, b)| {
                if r < *b_rank {
                    *b_rank = r;
                    *b = node;
                }
            })
            .or_insert((r, node));
    }
    best.into_iter()
        .map(|(loc, (_, node))| (loc.clone(), node.name.clone()))
        .collect()
}

/// Smaller is better.
type Rank<'a> = (bool, Reverse<i32>, bool, &'a NodeName);

fn rank<'a>(snapshot: &Snapshot, node: &'a Node) -> Rank<'a> {
    (
        demoted(snapshot, node),
        Reverse(node.leader_preference),
        node.behind_nat(),
        &node.name,
    )
}

/// Whether more than half of `node`'s location (itself aside) suspects it. A
/// majority, so that one node whose own tunnel broke cannot depose a working
/// leader; if every node is suspected, the usual order decides among them.
fn demoted(snapshot: &Snapshot, node: &Node) -> bool {
    let (mut others, mut votes) = (0usize, 0usize);
    for n in &snapshot.nodes {
        if n.location == node.location && n.name != node.name {
            others += 1;
            votes += usize::from(n.suspected_leaders.contains(&node.name));
        }
    }
    votes * 2 > others
}

/// How a node that sends through its location's leader checks that the leader still
/// forwards: echo requests to `targets`, the other locations' leaders, which it
/// reaches only through `via`. All of them failing means `via` forwards nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardingProbe {
    pub via: NodeName,
    pub targets: Vec<IpAddr>,
}

/// The probe `me` runs, if its traffic to other locations goes through a leader:
/// location granularity, `me` not leading its location, and other locations exist.
pub fn forwarding_probe(snapshot: &Snapshot, me: &NodeName) -> Option<ForwardingProbe> {
    if snapshot.settings.granularity != Granularity::Location {
        return None;
    }
    let mine = snapshot.nodes.iter().find(|n| &n.name == me)?;
    let leaders = leaders(snapshot);
    let via = leaders.get(&mine.location)?;
    if via == me {
        return None;
    }
    let targets: Vec<IpAddr> = leaders
        .iter()
        .filter(|(location, _)| **location != mine.location)
        .filter_map(|(_, name)| snapshot.nodes.iter().find(|n| &n.name == name))
        .map(|n| n.mesh_ip)
        .collect();
    (!targets.is_empty()).then(|| ForwardingProbe {
        via: via.clone(),
        targets,
    })
}
