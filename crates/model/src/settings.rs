//! Cluster-wide settings, shared by every node: address plan, port, MTU, topology granularity.

use std::fmt;
use std::str::FromStr;

use ipnet::{IpNet, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::node::parse_cidr;
use crate::FieldError;

/// How nodes are joined into a mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Granularity {
    /// Every node is a WireGuard peer of every other node.
    #[default]
    Full,
    /// Nodes of a location peer over their private network; one leader per location
    /// carries the tunnels to the other locations' leaders.
    Location,
}

impl FromStr for Granularity {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Self, FieldError> {
        match s {
            "full" => Ok(Granularity::Full),
            "location" => Ok(Granularity::Location),
            _ => Err(FieldError::new(
                "granularity",
                format!("{s:?} is neither \"full\" nor \"location\""),
            )),
        }
    }
}

impl fmt::Display for Granularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Granularity::Full => "full",
            Granularity::Location => "location",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// All pod addresses of the cluster; each node gets a `node_prefix_len` block of it.
    pub cluster_cidr: IpNet,
    pub node_prefix_len: u8,
    /// Addresses of the nodes' WireGuard interfaces.
    pub mesh_cidr: IpNet,
    /// WireGuard UDP port of every node.
    pub port: u16,
    /// MTU of the WireGuard interface.
    pub mtu: u16,
    pub granularity: Granularity,
    /// Skip encryption between nodes of one location (opt-in, as Kilo does).
    pub trust_location_network: bool,
    /// The mesh's RFC 4193 /48 for VPC traffic: node `n` owns `<mesh_ula>:<n>::/64`.
    /// `wiremesh init` picks one at random; settings written before VPCs existed
    /// have none, and VPCs are unavailable there.
    pub mesh_ula: Option<Ipv6Net>,
    /// Dual-stack pods: the cluster's IPv6 pod addresses. A node's IPv6 block has the
    /// index of its IPv4 block (`wiremesh_topology::ipam::pod_cidr_v6`), so it needs
    /// no claim of its own. `None`: IPv4-only pods.
    pub cluster_cidr_v6: Option<Ipv6Net>,
    /// Length of a node's IPv6 block of `cluster_cidr_v6`.
    pub node_prefix_len_v6: u8,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            cluster_cidr: "10.42.0.0/16".parse().expect("constant"),
            node_prefix_len: 24,
            mesh_cidr: "100.64.0.0/16".parse().expect("constant"),
            port: 51820,
            // 1500 underlay - 80 bytes of WireGuard over IPv6 (the worst case).
            mtu: 1420,
            granularity: Granularity::Full,
            trust_location_network: false,
            mesh_ula: None,
            cluster_cidr_v6: None,
            node_prefix_len_v6: 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettingsRecord {
    pub cluster_cidr: String,
    pub node_prefix_len: u8,
    pub mesh_cidr: String,
    pub port: u16,
    pub mtu: u16,
    pub granularity: String,
    #[serde(default)]
    pub trust_location_network: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_ula: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_cidr_v6: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_prefix_len_v6: Option<u8>,
}

impl TryFrom<ClusterSettingsRecord> for ClusterSettings {
    type Error = FieldError;

    fn try_from(r: ClusterSettingsRecord) -> Result<Self, FieldError> {
        let cluster_cidr = parse_cidr("cluster_cidr", &r.cluster_cidr)?;
        let mesh_cidr = parse_cidr("mesh_cidr", &r.mesh_cidr)?;
        let max = cluster_cidr.max_prefix_len();
        if r.node_prefix_len <= cluster_cidr.prefix_len() || r.node_prefix_len > max {
            return Err(FieldError::new(
                "node_prefix_len",
                format!(
                    "/{} must be longer than the cluster CIDR's /{} and at most /{max}",
                    r.node_prefix_len,
                    cluster_cidr.prefix_len()
                ),
            ));
        }
        if cluster_cidr.contains(&mesh_cidr.network())
            || mesh_cidr.contains(&cluster_cidr.network())
        {
            return Err(FieldError::new(
                "mesh_cidr",
                format!("{mesh_cidr} overlaps the cluster CIDR {cluster_cidr}"),
            ));
        }
        if r.port == 0 {
            return Err(FieldError::new("port", "0 is not a port"));
        }
        if !(576..=9000).contains(&r.mtu) {
            return Err(FieldError::new(
                "mtu",
                format!("{} is outside 576..=9000", r.mtu),
            ));
        }
        let mesh_ula = r.mesh_ula.as_deref().map(parse_mesh_ula).transpose()?;
        let node_prefix_len_v6 = r.node_prefix_len_v6.unwrap_or(64);
        let cluster_cidr_v6 = r
            .cluster_cidr_v6
            .as_deref()
            .map(|s| parse_cluster_cidr_v6(s, node_prefix_len_v6, &cluster_cidr, r.node_prefix_len))
            .transpose()?;
        if let (Some(v6), Some(ula)) = (cluster_cidr_v6, mesh_ula) {
            if v6.contains(&ula.network()) || ula.contains(&v6.network()) {
                return Err(FieldError::new(
                    "cluster_cidr_v6",
                    format!("{v6} overlaps the mesh ULA {ula}"),
                ));
            }
        }
        if let (Some(v6), IpNet::V6(mesh)) = (cluster_cidr_v6, mesh_cidr) {
            if v6.contains(&mesh.network()) || mesh.contains(&v6.network()) {
                return Err(FieldError::new(
                    "cluster_cidr_v6",
                    format!("{v6} overlaps the mesh CIDR {mesh}"),
                ));
            }
        }
        Ok(ClusterSettings {
            cluster_cidr,
            node_prefix_len: r.node_prefix_len,
            mesh_cidr,
            port: r.port,
            mtu: r.mtu,
            granularity: r.granularity.parse()?,
            trust_location_network: r.trust_location_network,
            mesh_ula,
            cluster_cidr_v6,
            node_prefix_len_v6,
        })
    }
}

/// The IPv6 cluster CIDR: an IPv6 network with at least as many
/// `node_prefix_len_v6` blocks as the IPv4 cluster CIDR has nodes' blocks, since
/// block `i` of each belongs to the same node.
fn parse_cluster_cidr_v6(
    s: &str,
    node_prefix_len_v6: u8,
    cluster_cidr: &IpNet,
    node_prefix_len: u8,
) -> Result<Ipv6Net, FieldError> {
    let IpNet::V6(net) = parse_cidr("cluster_cidr_v6", s)? else {
        return Err(FieldError::new(
            "cluster_cidr_v6",
            format!("{s:?} is not an IPv6 CIDR"),
        ));
    };
    if node_prefix_len_v6 <= net.prefix_len() || node_prefix_len_v6 > 128 {
        return Err(FieldError::new(
            "node_prefix_len_v6",
            format!(
                "/{node_prefix_len_v6} must be longer than the IPv6 cluster CIDR's /{} and at most /128",
                net.prefix_len()
            ),
        ));
    }
    let v4_block_bits = node_prefix_len.saturating_sub(cluster_cidr.prefix_len());
    if node_prefix_len_v6 - net.prefix_len() < v4_block_bits {
        return Err(FieldError::new(
            "cluster_cidr_v6",
            format!(
                "{net} has fewer /{node_prefix_len_v6} blocks than {cluster_cidr} has /{node_prefix_len} blocks"
            ),
        ));
    }
    Ok(net)
}

/// A /48 inside `fc00::/7` (RFC 4193 §3.1), given as its network address.
fn parse_mesh_ula(s: &str) -> Result<Ipv6Net, FieldError> {
    let net: Ipv6Net = s
        .parse()
        .map_err(|_| FieldError::new("mesh_ula", format!("{s:?} is not an IPv6 CIDR")))?;
    let ula: Ipv6Net = "fc00::/7".parse().expect("constant");
    if net.prefix_len() != 48 || net.trunc() != net || !ula.contains(&net) {
        return Err(FieldError::new(
            "mesh_ula",
            format!("{net} is not a /48 network of the unique local range fc00::/7"),
        ));
    }
    Ok(net)
}

/// A random RFC 4193 /48 (`fd` + 40 random bits, §3.2) from `random`, the caller's
/// randomness: this crate reads no RNG.
pub fn mesh_ula_from(random: [u8; 5]) -> Ipv6Net {
    let mut o = [0u8; 16];
    o[0] = 0xfd;
    o[1..6].copy_from_slice(&random);
    Ipv6Net::new(o.into(), 48).expect("48 is a valid length")
}

impl From<&ClusterSettings> for ClusterSettingsRecord {
    fn from(s: &ClusterSettings) -> Self {
        ClusterSettingsRecord {
            cluster_cidr: s.cluster_cidr.to_string(),
            node_prefix_len: s.node_prefix_len,
            mesh_cidr: s.mesh_cidr.to_string(),
            port: s.port,
            mtu: s.mtu,
            granularity: s.granularity.to_string(),
            trust_location_network: s.trust_location_network,
            mesh_ula: s.mesh_ula.map(|n| n.to_string()),
            cluster_cidr_v6: s.cluster_cidr_v6.map(|n| n.to_string()),
            node_prefix_len_v6: s.cluster_cidr_v6.map(|_| s.node_prefix_len_v6),
        }
    }
}

impl ClusterSettings {
    pub fn from_json(bytes: &[u8]) -> Result<ClusterSettings, FieldError> {
        let record: ClusterSettingsRecord = serde_json::from_slice(bytes)
            .map_err(|e| FieldError::new("settings", format!("malformed record: {e}")))?;
        record.try_into()
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(&ClusterSettingsRecord::from(self))
            .expect("settings always serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_round_trips_and_is_valid() {
        let s = ClusterSettings::default();
        assert_eq!(ClusterSettings::from_json(&s.to_json()).unwrap(), s);
    }

    #[test]
    fn errors_name_the_field() {
        let check = |edit: fn(&mut ClusterSettingsRecord), field: &str| {
            let mut r = ClusterSettingsRecord::from(&ClusterSettings::default());
            edit(&mut r);
            assert_eq!(ClusterSettings::try_from(r).unwrap_err().field, field);
        };
        check(|r| r.node_prefix_len = 8, "node_prefix_len");
        check(|r| r.mesh_cidr = "10.42.5.0/24".into(), "mesh_cidr");
        check(|r| r.granularity = "star".into(), "granularity");
        check(|r| r.port = 0, "port");
        check(|r| r.mtu = 100, "mtu");
        check(|r| r.mesh_ula = Some("fd00::/64".into()), "mesh_ula");
        check(|r| r.mesh_ula = Some("2001:db8::/48".into()), "mesh_ula");
        check(|r| r.mesh_ula = Some("fd00:1:2:3::/48".into()), "mesh_ula");
        check(|r| r.mesh_ula = Some("10.0.0.0/8".into()), "mesh_ula");
        check(
            |r| r.cluster_cidr_v6 = Some("10.0.0.0/8".into()),
            "cluster_cidr_v6",
        );
        check(
            |r| r.cluster_cidr_v6 = Some("fd42::1/56".into()),
            "cluster_cidr_v6",
        );
        // 256 IPv4 blocks need at least 8 bits of IPv6 blocks.
        check(
            |r| r.cluster_cidr_v6 = Some("fd42::/57".into()),
            "cluster_cidr_v6",
        );
        check(
            |r| {
                r.cluster_cidr_v6 = Some("fd42::/56".into());
                r.node_prefix_len_v6 = Some(48);
            },
            "node_prefix_len_v6",
        );
        check(
            |r| {
                r.cluster_cidr_v6 = Some("fd5e::/16".into());
                r.mesh_ula = Some("fd5e:1d2c:9a00::/48".into());
            },
            "cluster_cidr_v6",
        );
    }

    #[test]
    fn cluster_cidr_v6_round_trips_and_defaults_to_64s() {
        let mut r = ClusterSettingsRecord::from(&ClusterSettings::default());
        r.cluster_cidr_v6 = Some("fd42::/56".into());
        let s = ClusterSettings::try_from(r).unwrap();
        assert_eq!(s.cluster_cidr_v6, Some("fd42::/56".parse().unwrap()));
        assert_eq!(s.node_prefix_len_v6, 64);
        assert_eq!(ClusterSettings::from_json(&s.to_json()).unwrap(), s);
    }

    #[test]
    fn mesh_ula_round_trips_and_older_settings_have_none() {
        let s = ClusterSettings {
            mesh_ula: Some(mesh_ula_from([0x5e, 0x1d, 0x2c, 0x9a, 0x00])),
            ..ClusterSettings::default()
        };
        assert_eq!(s.mesh_ula.unwrap().to_string(), "fd5e:1d2c:9a00::/48");
        assert_eq!(ClusterSettings::from_json(&s.to_json()).unwrap(), s);
        let old = br#"{"cluster_cidr":"10.42.0.0/16","node_prefix_len":24,"mesh_cidr":"100.64.0.0/16","port":51820,"mtu":1420,"granularity":"full"}"#;
        assert_eq!(ClusterSettings::from_json(old).unwrap().mesh_ula, None);
    }
}
