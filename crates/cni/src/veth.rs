//! Naming the node-side veth, and reading what `ip -json` says about links, addresses
//! and routes (pure: the text comes in, facts come out).
//!
//! The node-side name is derived, not stored: DEL and GC must find the link from the
//! container ID and interface name alone, even after the store lost its record.

use std::net::IpAddr;

use serde_json::Value;

/// `wm` + 11 hex digits of a hash of the attachment: 13 bytes, within Linux's 15.
///
/// FNV-1a, not a cryptographic hash: the name only has to be stable across
/// processes and unlikely to collide (44 bits), and a collision is caught because
/// creating the second link fails.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    // A separator that cannot occur in either part keeps ("ab","c") apart from ("a","bc").
    for b in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    let hex = format!("{h:016x}");
    format!("wm{}", &hex[..11])
}

fn parse_list(json: &str) -> Vec<Value> {
    serde_json::from_str::<Vec<Value>>(json).unwrap_or_default()
}

/// MAC and MTU of the first link in `ip -json link show` output.
pub fn link_facts(json: &str) -> Option<(Option<String>, Option<u16>)> {
    let link = parse_list(json).into_iter().next()?;
    let mac = link
        .get("address")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let mtu = link
        .get("mtu")
        .and_then(Value::as_u64)
        .and_then(|m| u16::try_from(m).ok());
    Some((mac, mtu))
}

/// Whether `ip -json addr show` output has `ip` as a host address (/32, /128) on
/// some link.
pub fn has_address(json: &str, ip: IpAddr) -> bool {
    let want = ip.to_string();
    let host_len = if ip.is_ipv4() { 32 } else { 128 };
    parse_list(json).iter().any(|link| {
        link.get("addr_info")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|a| {
                a.get("local").and_then(Value::as_str) == Some(&want)
                    && a.get("prefixlen").and_then(Value::as_u64) == Some(host_len)
            })
    })
}

/// Whether `ip -json route show` output has a route to `dst` through `dev`
/// (optionally via `gateway`).
pub fn has_route(json: &str, dst: &str, dev: &str, gateway: Option<IpAddr>) -> bool {
    let gw = gateway.map(|g| g.to_string());
    parse_list(json).iter().any(|r| {
        r.get("dst").and_then(Value::as_str) == Some(dst)
            && r.get("dev").and_then(Value::as_str) == Some(dev)
            && gw
                .as_deref()
                .is_none_or(|g| r.get("gateway").and_then(Value::as_str) == Some(g))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_short_stable_and_distinct() {
        let a = host_ifname("c0ffee", "eth0");
        assert_eq!(a.len(), 13);
        assert!(a.starts_with("wm"));
        assert!(a[2..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(a, host_ifname("c0ffee", "eth0"));
        assert_ne!(a, host_ifname("c0ffee", "eth1"));
        assert_ne!(host_ifname("ab", "c"), host_ifname("a", "bc"));
        // Pinned: a change would orphan the links of running pods on upgrade.
        assert_eq!(host_ifname("c1", "eth0"), "wmf53f02b3bfe");
        let names: std::collections::HashSet<_> = (0..10_000)
            .map(|i| host_ifname(&format!("c{i}"), "eth0"))
            .collect();
        assert_eq!(names.len(), 10_000);
    }

    #[test]
    fn reads_ip_json() {
        let link = r#"[{"ifindex":5,"ifname":"eth0","mtu":1420,"address":"4a:1b:2c:3d:4e:5f"}]"#;
        assert_eq!(
            link_facts(link),
            Some((Some("4a:1b:2c:3d:4e:5f".into()), Some(1420)))
        );
        assert_eq!(link_facts("[]"), None);
        assert_eq!(link_facts("garbage"), None);

        let addr = r#"[{"ifname":"eth0","addr_info":[{"family":"inet","local":"10.42.1.5","prefixlen":32}]}]"#;
        assert!(has_address(addr, "10.42.1.5".parse().unwrap()));
        assert!(!has_address(addr, "10.42.1.6".parse().unwrap()));
        let addr6 = r#"[{"ifname":"eth0","addr_info":[{"family":"inet6","local":"fd10::5","prefixlen":128},
                                                       {"family":"inet6","local":"fd10::6","prefixlen":64}]}]"#;
        assert!(has_address(addr6, "fd10::5".parse().unwrap()));
        assert!(!has_address(addr6, "fd10::6".parse().unwrap()));

        let routes = r#"[{"dst":"default","gateway":"169.254.1.1","dev":"eth0","flags":[]},
                         {"dst":"169.254.1.1","dev":"eth0","scope":"link","flags":[]}]"#;
        let gw = Some("169.254.1.1".parse().unwrap());
        assert!(has_route(routes, "default", "eth0", gw));
        assert!(!has_route(routes, "default", "eth1", gw));
        assert!(has_route(routes, "169.254.1.1", "eth0", None));
    }
}
