//! A node of the cluster: one host running `wiremesh agent`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::{IpNet, Ipv6Net};
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
    /// The containers' IPv6 addresses on this node, in a dual-stack cluster.
    pub pod_cidr_v6: Option<Ipv6Net>,
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
    /// Nodes behind NAT in other locations this node never completed a handshake
    /// with on the direct path: the pair is carried through a relay (see
    /// `wiremesh_topology::relay`). Sticky: a pair does not go back to direct.
    pub unreachable_direct: BTreeSet<NodeName>,
    /// The UDP ports this node relays on, per pair it serves: the first port faces
    /// the pair's first node, the second port its second.
    pub relay_ports: BTreeMap<NodePair, [u16; 2]>,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr_v6: Option<String>,
    pub mesh_ip: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_keepalive: Option<u16>,
    #[serde(default)]
    pub leader_preference: i32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub observed_endpoints: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub suspected_leaders: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable_direct: Vec<String>,
    /// `"<a>/<b>"` (names in sorted order) → `[port facing a, port facing b]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub relay_ports: BTreeMap<String, [u16; 2]>,
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
        let pod_cidr_v6 = r
            .pod_cidr_v6
            .as_deref()
            .map(|s| match parse_cidr("pod_cidr_v6", s)? {
                IpNet::V6(net) => Ok(net),
                IpNet::V4(_) => Err(FieldError::new(
                    "pod_cidr_v6",
                    format!("{s:?} is not an IPv6 CIDR"),
                )),
            })
            .transpose()
            .map_err(within)?;
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
        let unreachable_direct = r
            .unreachable_direct
            .iter()
            .map(|n| {
                NodeName::try_from(n.clone()).map_err(|e| within(e.within("unreachable_direct")))
            })
            .collect::<Result<_, _>>()?;
        let mut relay_ports = BTreeMap::new();
        for (pair, ports) in &r.relay_ports {
            let field = format!("relay_ports.{pair}");
            let key: NodePair = pair
                .parse()
                .map_err(|e: FieldError| within(e.within("relay_ports")))?;
            if ports.contains(&0) || ports[0] == ports[1] {
                return Err(within(FieldError::new(
                    field,
                    format!("{ports:?} needs two different ports, neither 0"),
                )));
            }
            relay_ports.insert(key, *ports);
        }
        Ok(Node {
            name,
            location,
            public_key,
            public_endpoint,
            private_endpoint,
            pod_cidr,
            pod_cidr_v6,
            mesh_ip,
            persistent_keepalive: r.persistent_keepalive,
            leader_preference: r.leader_preference,
            observed_endpoints,
            suspected_leaders,
            unreachable_direct,
            relay_ports,
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
            pod_cidr_v6: n.pod_cidr_v6.map(|c| c.to_string()),
            mesh_ip: n.mesh_ip.to_string(),
            persistent_keepalive: n.persistent_keepalive,
            leader_preference: n.leader_preference,
            observed_endpoints: n
                .observed_endpoints
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            suspected_leaders: n.suspected_leaders.iter().map(|n| n.to_string()).collect(),
            unreachable_direct: n.unreachable_direct.iter().map(|n| n.to_string()).collect(),
            relay_ports: n
                .relay_ports
                .iter()
                .map(|(pair, ports)| (pair.to_string(), *ports))
                .collect(),
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

/// Two different nodes, in name order: the key of a relayed pair, written `a/b`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodePair {
    first: NodeName,
    second: NodeName,
}

impl NodePair {
    /// The pair of `a` and `b` in either order; `None` if they are the same node.
    pub fn new(a: NodeName, b: NodeName) -> Option<NodePair> {
        match a.cmp(&b) {
            std::cmp::Ordering::Less => Some(NodePair {
                first: a,
                second: b,
            }),
            std::cmp::Ordering::Greater => Some(NodePair {
                first: b,
                second: a,
            }),
            std::cmp::Ordering::Equal => None,
        }
    }

    pub fn first(&self) -> &NodeName {
        &self.first
    }

    pub fn second(&self) -> &NodeName {
        &self.second
    }

    /// 0 if `node` is the first of the pair, 1 if the second: its index in `[u16; 2]`
    /// port arrays.
    pub fn side_of(&self, node: &NodeName) -> Option<usize> {
        [&self.first, &self.second].iter().position(|n| *n == node)
    }

    /// The other node of the pair.
    pub fn other(&self, node: &NodeName) -> Option<&NodeName> {
        match self.side_of(node)? {
            0 => Some(&self.second),
            _ => Some(&self.first),
        }
    }
}

impl std::fmt::Display for NodePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.first, self.second)
    }
}

impl std::str::FromStr for NodePair {
    type Err = FieldError;

    /// `a/b` with `a` before `b`: one spelling per pair, so two records cannot name
    /// the same pair twice.
    fn from_str(s: &str) -> Result<Self, FieldError> {
        let (a, b) = s
            .split_once('/')
            .ok_or_else(|| FieldError::new(s, "is not a node pair \"a/b\""))?;
        let a: NodeName = a.parse().map_err(|e: FieldError| e.within(s))?;
        let b: NodeName = b.parse().map_err(|e: FieldError| e.within(s))?;
        if a >= b {
            return Err(FieldError::new(
                s,
                "names a pair out of order or twice the same node (write \"a/b\" with a < b)",
            ));
        }
        Ok(NodePair {
            first: a,
            second: b,
        })
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
            pod_cidr_v6: Some("fd42:0:0:1::/64".into()),
            mesh_ip: "100.64.0.1".into(),
            persistent_keepalive: None,
            leader_preference: 0,
            observed_endpoints: BTreeMap::new(),
            suspected_leaders: vec!["a2".into()],
            unreachable_direct: vec!["b1".into()],
            relay_ports: BTreeMap::from([("b1/c1".into(), [51900, 51901])]),
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
            |r| r.pod_cidr_v6 = Some("10.42.1.0/24".into()),
            "node a1.pod_cidr_v6",
        );
        check(
            |r| r.pod_cidr_v6 = Some("fd42::1/64".into()),
            "node a1.pod_cidr_v6",
        );
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
        check(
            |r| r.unreachable_direct = vec!["B1".into()],
            "node a1.unreachable_direct.name",
        );
        fn ports(key: &str, ports: [u16; 2]) -> BTreeMap<String, [u16; 2]> {
            BTreeMap::from([(key.to_owned(), ports)])
        }
        check(
            |r| r.relay_ports = ports("c1/b1", [1, 2]),
            "node a1.relay_ports.c1/b1",
        );
        check(
            |r| r.relay_ports = ports("b1", [1, 2]),
            "node a1.relay_ports.b1",
        );
        check(
            |r| r.relay_ports = ports("b1/B2", [1, 2]),
            "node a1.relay_ports.b1/B2.name",
        );
        check(
            |r| r.relay_ports = ports("b1/c1", [0, 2]),
            "node a1.relay_ports.b1/c1",
        );
        check(
            |r| r.relay_ports = ports("b1/c1", [7, 7]),
            "node a1.relay_ports.b1/c1",
        );
    }

    #[test]
    fn a_pair_has_one_spelling_and_two_sides() {
        let (b, c): (NodeName, NodeName) = ("b1".parse().unwrap(), "c1".parse().unwrap());
        let pair = NodePair::new(c.clone(), b.clone()).unwrap();
        assert_eq!(pair.to_string(), "b1/c1");
        assert_eq!(pair, "b1/c1".parse().unwrap());
        assert_eq!((pair.side_of(&b), pair.side_of(&c)), (Some(0), Some(1)));
        assert_eq!(pair.other(&b), Some(&c));
        assert_eq!(NodePair::new(b.clone(), b), None);
    }

    #[test]
    fn malformed_json_is_an_error_not_a_panic() {
        let err = Node::from_json(b"{\"name\": 3").unwrap_err();
        assert_eq!(err.field, "node");
    }
}
