//! Leader election: one node per location carries that location's tunnels to the
//! other locations.
//!
//! There is no election protocol: every node applies the same total order to the
//! same snapshot and so agrees on the leaders. When a leader's lease expires the
//! agent drops it from the snapshot and the next node in the order takes over.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use wiremesh_model::{Location, Node, NodeName};

use crate::Snapshot;

/// The leader of every location: highest `leader_preference`, then a node with a
/// public endpoint (nodes of other locations can dial it), then the lowest name.
pub fn leaders(snapshot: &Snapshot) -> BTreeMap<Location, NodeName> {
    let mut best: BTreeMap<&Location, &Node> = BTreeMap::new();
    for node in &snapshot.nodes {
        best.entry(&node.location)
            .and_modify(|b| {
                if rank(node) < rank(b) {
                    *b = node;
                }
            })
            .or_insert(node);
    }
    best.into_iter()
        .map(|(loc, node)| (loc.clone(), node.name.clone()))
        .collect()
}

/// Smaller is better.
fn rank(node: &Node) -> (Reverse<i32>, bool, &NodeName) {
    (
        Reverse(node.leader_preference),
        node.behind_nat(),
        &node.name,
    )
}
