//! External peers as a custom resource: `Peer`, group `wiremesh.io`, cluster-scoped,
//! as Kilo keeps them. The CRD is generated from [`PeerSpec`] (kube's
//! `CustomResource` and schemars), so the manifest in `deploy/` and the code agree;
//! [`peer_from_kube`] and [`peer_to_kube`] map it to and from
//! [`wiremesh_model::ExternalPeer`], with the model's checks and errors naming the
//! field (`spec.allowedIPs`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use wiremesh_model::{ExternalPeer, ExternalPeerRecord, FieldError};

/// A device outside the cluster (laptop, VM, phone) that joins the mesh. The peer's
/// name is the object's name; only its public key is known to the cluster.
#[derive(CustomResource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "wiremesh.io",
    version = "v1alpha1",
    kind = "Peer",
    plural = "peers",
    shortname = "wmpeer",
    doc = "A device outside the cluster (laptop, VM, phone) that joins the wiremesh mesh.",
    // Raw JSON: clippy's duplicated_attributes misreads repeated `printcolumn(...)`.
    printcolumn = r#"{"name": "Public key", "type": "string", "jsonPath": ".spec.publicKey"}"#,
    printcolumn = r#"{"name": "Allowed IPs", "type": "string", "jsonPath": ".spec.allowedIPs"}"#,
    printcolumn = r#"{"name": "Endpoint", "type": "string", "jsonPath": ".spec.endpoint"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PeerSpec {
    /// The peer's WireGuard public key, base64.
    pub public_key: String,
    /// CIDRs the peer may use as source addresses inside the mesh.
    #[serde(rename = "allowedIPs")]
    #[schemars(length(min = 1))]
    pub allowed_ips: Vec<String>,
    /// `IP:port` where the mesh reaches the peer; leave out for a roaming peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Keepalive in seconds (1 to 65535), for a peer behind NAT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub persistent_keepalive: Option<u16>,
}

/// The Peer object as an external peer; errors name the object's field.
pub fn peer_from_kube(object: &Peer) -> Result<ExternalPeer, FieldError> {
    let name = object.metadata.name.clone().unwrap_or_default();
    let spec = &object.spec;
    if spec.persistent_keepalive == Some(0) {
        return Err(FieldError::new(
            "spec.persistentKeepalive",
            "0 would disable it; leave it out instead",
        ));
    }
    let record = ExternalPeerRecord {
        name: name.clone(),
        public_key: spec.public_key.clone(),
        allowed_ips: spec.allowed_ips.clone(),
        endpoint: spec.endpoint.clone(),
        persistent_keepalive: spec.persistent_keepalive,
    };
    ExternalPeer::try_from(record).map_err(|e| {
        let model_field = e
            .field
            .strip_prefix(&format!("peer {name}."))
            .unwrap_or(&e.field);
        let field = match model_field {
            "name" => "metadata.name",
            "public_key" => "spec.publicKey",
            "allowed_ips" => "spec.allowedIPs",
            "endpoint" => "spec.endpoint",
            "persistent_keepalive" => "spec.persistentKeepalive",
            other => other,
        };
        FieldError::new(field, e.reason)
    })
}

/// The Peer object that describes `peer` (for `kubectl apply`, or a CLI that adds peers).
pub fn peer_to_kube(peer: &ExternalPeer) -> Peer {
    Peer {
        metadata: ObjectMeta {
            name: Some(peer.name.to_string()),
            ..ObjectMeta::default()
        },
        spec: PeerSpec {
            public_key: peer.public_key.to_string(),
            allowed_ips: peer.allowed_ips.iter().map(ToString::to_string).collect(),
            endpoint: peer.endpoint.map(|e| e.to_string()),
            persistent_keepalive: peer.persistent_keepalive,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    fn model_peer() -> ExternalPeer {
        ExternalPeer {
            name: "laptop".parse().unwrap(),
            public_key: KEY.parse().unwrap(),
            allowed_ips: vec![
                "10.99.0.1/32".parse().unwrap(),
                "fd99::1/128".parse().unwrap(),
            ],
            endpoint: Some("198.51.100.2:51820".parse().unwrap()),
            persistent_keepalive: Some(25),
        }
    }

    #[test]
    fn round_trips_through_the_custom_resource() {
        let peer = model_peer();
        assert_eq!(peer_from_kube(&peer_to_kube(&peer)).unwrap(), peer);
        let roaming = ExternalPeer {
            endpoint: None,
            persistent_keepalive: None,
            ..model_peer()
        };
        assert_eq!(peer_from_kube(&peer_to_kube(&roaming)).unwrap(), roaming);
    }

    #[test]
    fn the_object_uses_kubernetes_spelling() {
        let json = serde_json::to_value(peer_to_kube(&model_peer())).unwrap();
        assert_eq!(json["apiVersion"], "wiremesh.io/v1alpha1");
        assert_eq!(json["kind"], "Peer");
        assert_eq!(json["spec"]["allowedIPs"][1], "fd99::1/128");
        assert_eq!(json["spec"]["persistentKeepalive"], 25);
        assert_eq!(json["spec"]["publicKey"], KEY);
    }

    #[test]
    fn errors_name_the_field() {
        let check = |edit: fn(&mut Peer), field: &str| {
            let mut object = peer_to_kube(&model_peer());
            edit(&mut object);
            let err = peer_from_kube(&object).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        };
        check(|p| p.metadata.name = Some("Laptop".into()), "metadata.name");
        check(|p| p.spec.public_key = "xyz".into(), "spec.publicKey");
        check(|p| p.spec.allowed_ips.clear(), "spec.allowedIPs");
        check(
            |p| p.spec.allowed_ips[1] = "10.0.0.1/8".into(),
            "spec.allowedIPs",
        );
        check(|p| p.spec.endpoint = Some("laptop".into()), "spec.endpoint");
        check(
            |p| p.spec.persistent_keepalive = Some(0),
            "spec.persistentKeepalive",
        );
    }
}
