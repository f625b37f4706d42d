//! The WireGuard interface's MTU, derived from the underlay so that an encrypted
//! full-size packet still fits in one underlay packet (no fragmentation).

/// Bytes WireGuard adds to each packet, inside the outer IP header: UDP (8) +
/// the data message header (16, whitepaper §5.4.6) + the AEAD tag (16).
pub const WIREGUARD_OVERHEAD: u16 = 8 + 16 + 16;

/// The largest inner packet that fits in `underlay_mtu` once encrypted. The outer
/// header is counted as IPv6 (40 bytes) unless the underlay is IPv4-only, since a
/// peer may be reached over either.
pub fn wireguard_mtu(underlay_mtu: u16, ipv6_underlay: bool) -> u16 {
    let outer_ip = if ipv6_underlay { 40 } else { 20 };
    underlay_mtu.saturating_sub(outer_ip + WIREGUARD_OVERHEAD)
}

/// The MTU for this node: the explicit one if given, else the cluster's setting,
/// lowered to what the underlay can carry.
pub fn choose(
    explicit: Option<u16>,
    cluster: u16,
    underlay_mtu: Option<u16>,
    ipv6_underlay: bool,
) -> u16 {
    match (explicit, underlay_mtu) {
        (Some(mtu), _) => mtu,
        (None, Some(underlay)) => cluster.min(wireguard_mtu(underlay, ipv6_underlay)),
        (None, None) => cluster,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_from_the_underlay() {
        assert_eq!(
            wireguard_mtu(1500, true),
            1420,
            "the classic WireGuard default"
        );
        assert_eq!(wireguard_mtu(1500, false), 1440);
        assert_eq!(choose(None, 1420, Some(1280), true), 1200);
        assert_eq!(
            choose(None, 1420, Some(9000), true),
            1420,
            "never above the cluster's setting"
        );
        assert_eq!(
            choose(Some(1300), 1420, Some(1280), true),
            1300,
            "--mtu overrides"
        );
        assert_eq!(choose(None, 1420, None, true), 1420);
    }
}
