//! Which port a packet goes to: the pure routing table of the hub.
//!
//! Every address of a port is a host route to it (`10.0.0.2/24` on port 1 sends
//! `10.0.0.2` to port 1, not the whole /24); extra prefixes may be routed to a port too
//! (a host's pod CIDR, when the underlay carries pods without a VPN). The longest
//! matching prefix wins.

use std::net::IpAddr;

use ipnet::IpNet;

/// Routes from destination prefixes to port indices.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes {
    /// Longest prefix first, so the first match is the best one.
    entries: Vec<(IpNet, usize)>,
}

impl Routes {
    /// The table for ports whose addresses are `addresses[port]` and whose extra
    /// routed prefixes are `prefixes[port]`.
    pub fn build(addresses: &[Vec<IpNet>], prefixes: &[Vec<IpNet>]) -> Self {
        let host_routes = addresses
            .iter()
            .enumerate()
            .flat_map(|(port, nets)| nets.iter().map(move |net| (IpNet::from(net.addr()), port)));
        let prefix_routes = prefixes
            .iter()
            .enumerate()
            .flat_map(|(port, nets)| nets.iter().map(move |net| (net.trunc(), port)));
        let mut entries: Vec<_> = host_routes.chain(prefix_routes).collect();
        // Stable: among equal prefixes the lower port (and host routes) win.
        entries.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        Self { entries }
    }

    /// The port for `destination`, if any.
    pub fn lookup(&self, destination: IpAddr) -> Option<usize> {
        self.entries
            .iter()
            .find(|(net, _)| net.contains(&destination))
            .map(|&(_, port)| port)
    }
}

/// The destination address of an IPv4 or IPv6 packet; `None` if it is neither or too
/// short.
pub fn destination(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => {
            let bytes: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            Some(IpAddr::from(bytes))
        }
        6 => {
            let bytes: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            Some(IpAddr::from(bytes))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn addresses_are_host_routes_and_prefixes_route_by_longest_match() {
        let routes = Routes::build(
            &[nets(&["10.0.0.1/24", "fd00::1/64"]), nets(&["10.0.0.2/24"])],
            &[vec![], nets(&["10.244.0.0/16", "10.244.1.7/24"])],
        );
        let check = |dst: &str, want: Option<usize>| {
            assert_eq!(routes.lookup(dst.parse().unwrap()), want, "{dst}");
        };
        check("10.0.0.1", Some(0));
        check("10.0.0.2", Some(1));
        check("fd00::1", Some(0));
        check("10.0.0.3", None);
        check("fd00::2", None);
        check("10.244.1.9", Some(1));
        check("10.244.200.1", Some(1));
        check("192.168.1.1", None);
    }

    #[test]
    fn destination_reads_ipv4_and_ipv6_headers() {
        let mut v4 = [0u8; 20];
        v4[0] = 0x45;
        v4[16..20].copy_from_slice(&[10, 0, 0, 2]);
        assert_eq!(destination(&v4), Some("10.0.0.2".parse().unwrap()));
        let mut v6 = [0u8; 40];
        v6[0] = 0x60;
        v6[39] = 1;
        assert_eq!(destination(&v6), Some("::1".parse().unwrap()));
        assert_eq!(destination(&v4[..19]), None);
        assert_eq!(destination(&[]), None);
        assert_eq!(destination(&[0x15; 40]), None);
    }
}
