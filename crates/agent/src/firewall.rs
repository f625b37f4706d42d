//! The node's nftables table `inet wiremesh`: what keeps pod traffic encrypted and
//! lets pods reach the world.
//!
//! - Leak guard: a packet forwarded to another node's pods must leave through the
//!   WireGuard interface. If a route is missing or wrong, it is dropped rather than
//!   sent in plaintext over the underlay (unless the location network is trusted).
//! - Egress: pods reaching outside the cluster are masqueraded behind the node.

use ipnet::IpNet;

pub const TABLE: &str = "wiremesh";

/// The whole table, as one `nft -f` transaction that replaces the previous one.
pub fn ruleset(
    interface: &str,
    cluster_cidr: IpNet,
    pod_cidr: IpNet,
    mesh_cidr: IpNet,
    trusted_location: bool,
) -> String {
    let family = match cluster_cidr {
        IpNet::V4(_) => "ip",
        IpNet::V6(_) => "ip6",
    };
    let leak_guard = if trusted_location {
        String::new()
    } else {
        format!(
            "        {family} daddr {cluster_cidr} {family} daddr != {pod_cidr} oifname != \"{interface}\" counter drop comment \"pod traffic to other nodes only through WireGuard\"\n"
        )
    };
    format!(
        "table inet {TABLE} {{}}\n\
         flush table inet {TABLE}\n\
         table inet {TABLE} {{\n\
         \x20   chain forward {{\n\
         \x20       type filter hook forward priority filter; policy accept;\n\
         {leak_guard}\
         \x20   }}\n\
         \x20   chain postrouting {{\n\
         \x20       type nat hook postrouting priority srcnat; policy accept;\n\
         \x20       {family} saddr {pod_cidr} {family} daddr != {{ {cluster_cidr}, {mesh_cidr} }} oifname != \"{interface}\" masquerade\n\
         \x20   }}\n\
         }}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_has_leak_guard_unless_trusted() {
        let r = ruleset(
            "wm0",
            "10.42.0.0/16".parse().unwrap(),
            "10.42.1.0/24".parse().unwrap(),
            "100.64.0.0/16".parse().unwrap(),
            false,
        );
        assert!(
            r.contains(
                "ip daddr 10.42.0.0/16 ip daddr != 10.42.1.0/24 oifname != \"wm0\" counter drop"
            ),
            "{r}"
        );
        assert!(r.contains("masquerade"));
        let t = ruleset(
            "wm0",
            "10.42.0.0/16".parse().unwrap(),
            "10.42.1.0/24".parse().unwrap(),
            "100.64.0.0/16".parse().unwrap(),
            true,
        );
        assert!(!t.contains("drop"));
    }
}
