//! An external peer: a device outside the cluster (laptop, VM, phone) that joins the mesh.
//! Only its public key is known to the cluster; its private key never enters a registry.

use std::net::SocketAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::node::{parse_cidr, parse_endpoint};
use crate::{FieldError, PeerName, PublicKey};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalPeer {
    pub name: PeerName,
    pub public_key: PublicKey,
    /// Addresses the peer may use as source inside the mesh (cryptokey routing).
    pub allowed_ips: Vec<IpNet>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalPeerRecord {
    pub name: String,
    pub public_key: String,
    pub allowed_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_keepalive: Option<u16>,
}

impl TryFrom<ExternalPeerRecord> for ExternalPeer {
    type Error = FieldError;

    fn try_from(r: ExternalPeerRecord) -> Result<Self, FieldError> {
        let name: PeerName = r.name.clone().try_into()?;
        let within = |e: FieldError| e.within(&format!("peer {}", r.name));
        let public_key = r
            .public_key
            .parse()
            .map_err(|e| within(FieldError::new("public_key", e)))?;
        if r.allowed_ips.is_empty() {
            return Err(within(FieldError::new(
                "allowed_ips",
                "at least one CIDR is needed",
            )));
        }
        let allowed_ips = r
            .allowed_ips
            .iter()
            .map(|s| parse_cidr("allowed_ips", s))
            .collect::<Result<_, _>>()
            .map_err(within)?;
        let endpoint = r
            .endpoint
            .as_deref()
            .map(|s| parse_endpoint("endpoint", s))
            .transpose()
            .map_err(within)?;
        Ok(ExternalPeer {
            name,
            public_key,
            allowed_ips,
            endpoint,
            persistent_keepalive: r.persistent_keepalive,
        })
    }
}

impl From<&ExternalPeer> for ExternalPeerRecord {
    fn from(p: &ExternalPeer) -> Self {
        ExternalPeerRecord {
            name: p.name.to_string(),
            public_key: p.public_key.to_string(),
            allowed_ips: p.allowed_ips.iter().map(|n| n.to_string()).collect(),
            endpoint: p.endpoint.map(|e| e.to_string()),
            persistent_keepalive: p.persistent_keepalive,
        }
    }
}

impl ExternalPeer {
    pub fn from_json(bytes: &[u8]) -> Result<ExternalPeer, FieldError> {
        let record: ExternalPeerRecord = serde_json::from_slice(bytes)
            .map_err(|e| FieldError::new("peer", format!("malformed record: {e}")))?;
        record.try_into()
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(&ExternalPeerRecord::from(self))
            .expect("a peer record always serializes")
    }
}
