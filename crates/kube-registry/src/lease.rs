//! Liveness: one `coordination.k8s.io/v1` Lease per node, in wiremesh's namespace.
//!
//! With etcd a node's record lives under an etcd lease and vanishes when its agent
//! stops renewing it. Node objects outlive their agents, so here liveness is a
//! separate object, renewed by the agent, exactly as the kubelet renews its own
//! Leases in `kube-node-lease`: a Lease named after the node, `holderIdentity` the
//! node, `renewTime` its last heartbeat and `leaseDurationSeconds` how long that
//! counts. A node whose Lease is missing or expired is not in the mesh. The Node's
//! `Ready` condition is not used: the kubelet can be ready while the agent is not.
//!
//! Pure functions: `now` is an argument (unix seconds).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use wiremesh_model::NodeName;

/// The Lease a node's agent writes at each heartbeat (server-side apply makes it the
/// first time). `ttl` is rounded up to whole seconds, at least one.
pub fn lease_for(node: &NodeName, now: u64, ttl: Duration) -> Lease {
    let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    let seconds = i32::try_from(seconds.max(1)).unwrap_or(i32::MAX);
    let renewed = i64::try_from(now)
        .ok()
        .and_then(|s| Timestamp::from_second(s).ok())
        .unwrap_or(Timestamp::MAX);
    Lease {
        metadata: ObjectMeta {
            name: Some(node.to_string()),
            labels: Some([("app.kubernetes.io/name".into(), "wiremesh".into())].into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.to_string()),
            lease_duration_seconds: Some(seconds),
            renew_time: Some(MicroTime(renewed)),
            ..LeaseSpec::default()
        }),
    }
}

/// The node a Lease speaks for (its holder), if it has one.
pub fn holder(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref()?.holder_identity.as_deref()
}

/// Unix seconds of the Lease's last renewal, if it was ever renewed.
pub fn last_renewed(lease: &Lease) -> Option<u64> {
    let renewed = lease.spec.as_ref()?.renew_time.as_ref()?;
    u64::try_from(renewed.0.as_second()).ok()
}

/// Whether the Lease was renewed less than `leaseDurationSeconds` before `now`.
pub fn is_live(lease: &Lease, now: u64) -> bool {
    let Some(spec) = lease.spec.as_ref() else {
        return false;
    };
    let (Some(renewed), Some(duration)) = (last_renewed(lease), spec.lease_duration_seconds) else {
        return false;
    };
    let duration = u64::try_from(duration).unwrap_or(0);
    now < renewed.saturating_add(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_live_for_its_duration() {
        let node: NodeName = "a1".parse().unwrap();
        let lease = lease_for(&node, 1000, Duration::from_millis(14_200));
        assert_eq!(holder(&lease), Some("a1"));
        assert_eq!(lease.metadata.name.as_deref(), Some("a1"));
        assert_eq!(last_renewed(&lease), Some(1000));
        assert_eq!(
            lease.spec.as_ref().unwrap().lease_duration_seconds,
            Some(15)
        );
        assert!(is_live(&lease, 1000));
        assert!(is_live(&lease, 1014));
        assert!(!is_live(&lease, 1015));
        assert!(!is_live(&Lease::default(), 0));
    }

    #[test]
    fn renew_time_is_rfc3339_with_microseconds() {
        let node: NodeName = "a1".parse().unwrap();
        let json = serde_json::to_value(lease_for(&node, 1_700_000_000, Duration::ZERO)).unwrap();
        assert_eq!(json["spec"]["renewTime"], "2023-11-14T22:13:20.000000Z");
        assert_eq!(json["spec"]["leaseDurationSeconds"], 1);
    }
}
