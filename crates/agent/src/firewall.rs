//! The node's nftables table `inet wiremesh`: what keeps pod traffic encrypted and
//! lets pods reach the world.
//!
//! - Leak guard: a packet forwarded to another node's pods must leave through the
//!   WireGuard interface. If a route is missing or wrong, it is dropped rather than
//!   sent in plaintext over the underlay (unless the location network is trusted).
//! - Egress: pods reaching outside the cluster are masqueraded behind the node.
//!
//! With dual-stack pods both rules exist once per family.

use ipnet::IpNet;
use wiremesh_model::{ClusterSettings, Node};

pub const TABLE: &str = "wiremesh";

/// The whole table for node `me`, as one `nft -f` transaction that replaces the
/// previous one.
pub fn ruleset(interface: &str, settings: &ClusterSettings, me: &Node) -> String {
    let mut families = vec![(settings.cluster_cidr, me.pod_cidr)];
    if let (Some(cluster), Some(pod)) = (settings.cluster_cidr_v6, me.pod_cidr_v6) {
        families.push((IpNet::V6(cluster), IpNet::V6(pod)));
    }
    let mut forward = String::new();
    let mut postrouting = String::new();
    for (cluster_cidr, pod_cidr) in families {
        let family = match cluster_cidr {
            IpNet::V4(_) => "ip",
            IpNet::V6(_) => "ip6",
        };
        if !settings.trust_location_network {
            forward += &format!(
                "        {family} daddr {cluster_cidr} {family} daddr != {pod_cidr} oifname != \"{interface}\" counter drop comment \"pod traffic to other nodes only through WireGuard\"\n"
            );
        }
        let mesh = settings.mesh_cidr;
        let inside = if mesh.network().is_ipv4() == cluster_cidr.network().is_ipv4() {
            format!("{{ {cluster_cidr}, {mesh} }}")
        } else {
            cluster_cidr.to_string()
        };
        postrouting += &format!(
            "        {family} saddr {pod_cidr} {family} daddr != {inside} oifname != \"{interface}\" masquerade\n"
        );
    }
    format!(
        "table inet {TABLE} {{}}\n\
         flush table inet {TABLE}\n\
         table inet {TABLE} {{\n\
         \x20   chain forward {{\n\
         \x20       type filter hook forward priority filter; policy accept;\n\
         {forward}\
         \x20   }}\n\
         \x20   chain postrouting {{\n\
         \x20       type nat hook postrouting priority srcnat; policy accept;\n\
         {postrouting}\
         \x20   }}\n\
         }}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(pod_cidr: &str, pod_cidr_v6: Option<&str>) -> Node {
        let mut record = wiremesh_model::NodeRecord {
            name: "a1".into(),
            location: "x".into(),
            public_key: "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=".into(),
            pod_cidr: pod_cidr.into(),
            mesh_ip: "100.64.0.2".into(),
            ..Default::default()
        };
        record.pod_cidr_v6 = pod_cidr_v6.map(Into::into);
        Node::try_from(record).unwrap()
    }

    #[test]
    fn ruleset_has_leak_guard_unless_trusted() {
        let mut s = ClusterSettings::default();
        let r = ruleset("wm0", &s, &node("10.42.1.0/24", None));
        assert!(
            r.contains(
                "ip daddr 10.42.0.0/16 ip daddr != 10.42.1.0/24 oifname != \"wm0\" counter drop"
            ),
            "{r}"
        );
        assert!(r.contains(
            "ip saddr 10.42.1.0/24 ip daddr != { 10.42.0.0/16, 100.64.0.0/16 } oifname != \"wm0\" masquerade"
        ), "{r}");
        assert!(!r.contains("ip6"), "{r}");
        s.trust_location_network = true;
        let t = ruleset("wm0", &s, &node("10.42.1.0/24", None));
        assert!(!t.contains("drop"));
    }

    #[test]
    fn dual_stack_guards_and_masquerades_ipv6_pods_too() {
        let s = ClusterSettings {
            cluster_cidr_v6: Some("fd42::/48".parse().unwrap()),
            ..ClusterSettings::default()
        };
        let r = ruleset("wm0", &s, &node("10.42.1.0/24", Some("fd42:0:0:1::/64")));
        assert!(
            r.contains(
                "ip6 daddr fd42::/48 ip6 daddr != fd42:0:0:1::/64 oifname != \"wm0\" counter drop"
            ),
            "{r}"
        );
        assert!(
            r.contains(
                "ip6 saddr fd42:0:0:1::/64 ip6 daddr != fd42::/48 oifname != \"wm0\" masquerade"
            ),
            "{r}"
        );
        assert!(r.contains("ip daddr 10.42.0.0/16"), "{r}");
    }
}
