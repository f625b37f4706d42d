//! A node of the cluster: one host running `wiremesh agent`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{FieldError, Location, NodeName, PublicKey};

/// A node as the rest of wiremesh sees it: every field parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: NodeName,
    pub location: Location,
    pub public_key: PublicKey,
    /// Where nodes of other locations reach it; `None` for a node behind NAT.
    pub public_endpoint: Option<SocketAddr>,
    /// Where nodes of its own location reach it, over the site's private network.
    pub private_endpoint: Option<SocketAddr>,
    /// The containers' addresses on this node.
    pub pod_cidr: IpNet,
    /// The node's own address inside the mesh (on its WireGuard interface).
    pub mesh_ip: IpAddr,
    /// Keepalive this node asks for on its tunnels; set for nodes behind NAT.
    pub persistent_keepalive: Option<u16>,
    /// Higher wins the location's leader election; ties go to the lowest name.
    pub leader_preference: i32,
    /// Endpoints this node has observed for peers that have no public endpoint,
    /// learned from their authenticated packets (NAT discovery).
    pub observed_endpoints: BTreeMap<NodeName, SocketAddr>,
    /// Leaders of this node's location that stopped forwarding for it: its probes
    /// through them to other locations failed. A majority of a location's other
    /// nodes suspecting its leader takes the leadership away (see
    /// `wiremesh_topology::leaders`).
    pub suspected_leaders: BTreeSet<NodeName>,
    /// Unix seconds of the node's last heartbeat.
    pub last_seen: u64,
}

/// The JSON form of a [`Node`] in a registry: plain strings, checked by `TryFrom`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    pub name: String,
    pub location: String,
    pub public_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_endpoint: Option<String>,
    pub pod_cidr: String,
    pub mesh_ip: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_keepalive: Option<u16>,
    #[serde(default)]
    pub leader_preference: i32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub observed_endpoints: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub suspected_leaders: Vec<String>,
    #[serde(default)]
    pub last_seen: u64,
}

pub(crate) fn parse_endpoint(field: &str, s: &str) -> Result<SocketAddr, FieldError> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| FieldError::new(field, format!("{s:?} is not an IP:port endpoint")))?;
    if addr.port() == 0 {
        return Err(FieldError::new(field, format!("{s:?} has port 0")));
    }
    Ok(addr)
}

pub(crate) fn parse_cidr(field: &str, s: &str) -> Result<IpNet, FieldError> {
    let net: IpNet = s
        .parse()
        .map_err(|_| FieldError::new(field, format!("{s:?} is not a CIDR")))?;
    if net != net.trunc() {
        return Err(FieldError::new(
            field,
            format!("{s:?} has host bits set (did you mean {}?)", net.trunc()),
        ));
    }
    Ok(net)
}

impl TryFrom<NodeRecord> for Node {
    type Error = FieldError;

    fn try_from(r: NodeRecord) -> Result<Self, FieldError> {
        let name: NodeName = r.name.clone().try_into()?;
        let within = |e: FieldError| e.within(&format!("node {}", r.name));
        let location: Location = r.location.clone().try_into().map_err(within)?;
        let public_key: PublicKey = r
            .public_key
            .parse()
            .map_err(|e| within(FieldError::new("public_key", e)))?;
        let public_endpoint = r
            .public_endpoint
            .as_deref()
            .map(|s| parse_endpoint("public_endpoint", s))
            .transpose()
            .map_err(within)?;
        let private_endpoint = r
            .private_endpoint
            .as_deref()
            .map(|s| parse_endpoint("private_endpoint", s))
            .transpose()
            .map_err(within)?;
        let pod_cidr = parse_cidr("pod_cidr", &r.pod_cidr).map_err(within)?;
        let mesh_ip: IpAddr = r.mesh_ip.parse().map_err(|_| {
            within(FieldError::new(
                "mesh_ip",
                format!("{:?} is not an IP address", r.mesh_ip),
            ))
        })?;
        if r.persistent_keepalive == Some(0) {
            return Err(within(FieldError::new(
                "persistent_keepalive",
                "0 would disable it; leave it out instead",
            )));
        }
        let mut observed_endpoints = BTreeMap::new();
        for (peer, endpoint) in &r.observed_endpoints {
            let peer: NodeName = peer
                .clone()
                .try_into()
                .map_err(|e: FieldError| within(e.within("observed_endpoints")))?;
            let field = format!("observed_endpoints.{peer}");
            observed_endpoints.insert(peer, parse_endpoint(&field, endpoint).map_err(within)?);
        }
        let suspected_leaders = r
            .suspected_leaders
            .iter()
            .map(|n| {
                NodeName::try_from(n.clone()).map_err(|e| within(e.within("suspected_leaders")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Node {
            name,
            location,
            public_key,
            public_endpoint,
            private_endpoint,
            pod_cidr,
            mesh_ip,
            persistent_keepalive: r.persistent_keepalive,
            leader_preference: r.leader_preference,
            observed_endpoints,
            suspected_leaders,
            last_seen: r.last_seen,
        })
    }
}

impl From<&Node> for NodeRecord {
    fn from(n: &Node) -> Self {
        NodeRecord {
            name: n.name.to_string(),
            location: n.location.to_string(),
            public_key: n.public_key.to_string(),
            public_endpoint: n.public_endpoint.map(|e| e.to_string()),
            private_endpoint: n.private_endpoint.map(|e| e.to_string()),
            pod_cidr: n.pod_cidr.to_string(),
            mesh_ip: n.mesh_ip.to_string(),
            persistent_keepalive: n.persistent_keepalive,
            leader_preference: n.leader_preference,
            observed_endpoints: n
                .observed_endpoints
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            suspected_leaders: n.suspected_leaders.iter().map(|n| n.to_string()).collect(),
            last_seen: n.last_seen,
        }
    }
}

impl Node {
    /// Parse a registry record; the error names the field.
    pub fn from_json(bytes: &[u8]) -> Result<Node, FieldError> {
        let record: NodeRecord = serde_json::from_slice(bytes)
            .map_err(|e| FieldError::new("node", format!("malformed record: {e}")))?;
        record.try_into()
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(&NodeRecord::from(self)).expect("a node record always serializes")
    }

    /// A node without a public endpoint sits behind NAT: it must dial out and keep the mapping alive.
    pub fn behind_nat(&self) -> bool {
        self.public_endpoint.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    fn record() -> NodeRecord {
        NodeRecord {
            name: "a1".into(),
            location: "cloud-a".into(),
            public_key: KEY.into(),
            public_endpoint: Some("203.0.113.1:51820".into()),
            private_endpoint: None,
            pod_cidr: "10.42.1.0/24".into(),
            mesh_ip: "100.64.0.1".into(),
            persistent_keepalive: None,
            leader_preference: 0,
            observed_endpoints: BTreeMap::new(),
            suspected_leaders: vec!["a2".into()],
            last_seen: 1,
        }
    }

    #[test]
    fn round_trips_through_json() {
        let node = Node::try_from(record()).unwrap();
        assert_eq!(Node::from_json(&node.to_json()).unwrap(), node);
    }

    #[test]
    fn errors_name_the_field() {
        let check = |edit: fn(&mut NodeRecord), field: &str| {
            let mut r = record();
            edit(&mut r);
            let err = Node::try_from(r).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        };
        check(|r| r.public_key = "not-a-key".into(), "node a1.public_key");
        check(|r| r.pod_cidr = "10.42.1.1/24".into(), "node a1.pod_cidr");
        check(|r| r.pod_cidr = "banana".into(), "node a1.pod_cidr");
        check(|r| r.mesh_ip = "100.64.0.300".into(), "node a1.mesh_ip");
        check(
            |r| r.public_endpoint = Some("1.2.3.4".into()),
            "node a1.public_endpoint",
        );
        check(|r| r.location = "Cloud A".into(), "node a1.location");
        check(
            |r| r.persistent_keepalive = Some(0),
            "node a1.persistent_keepalive",
        );
        check(|r| r.name = "A1".into(), "name");
        check(
            |r| r.suspected_leaders = vec!["Not A Name".into()],
            "node a1.suspected_leaders.name",
        );
    }

    #[test]
    fn malformed_json_is_an_error_not_a_panic() {
        let err = Node::from_json(b"{\"name\": 3").unwrap_err();
        assert_eq!(err.field, "node");
    }
}
