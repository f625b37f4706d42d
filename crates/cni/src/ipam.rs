//! Address decisions, as pure functions over what the store holds.
//!
//! Addresses come from the node's pod CIDR, never its network or broadcast address.
//! The first host address is handed out too: pods' gateway is the link-local
//! 169.254.1.1, so nothing on the node needs an address from the pod CIDR. Like
//! host-local, allocation goes round-robin from the last address handed out, so a
//! freed address is not reused at once (a peer may still hold a connection to it).
//!
//! A dual-stack pod's IPv6 address is not allocated at all: it is its IPv4
//! address's offset in the node's IPv6 pod CIDR ([`address_v6`]), so the one store
//! entry covers both and DEL frees both.

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::config::Attachment;

/// Addresses of `pool` a pod may get: all but network and broadcast (a /31 or /32
/// has neither, RFC 3021).
pub fn usable(pool: Ipv4Net) -> impl Iterator<Item = Ipv4Addr> + Clone {
    let (first, last) = (u32::from(pool.network()), u32::from(pool.broadcast()));
    let (first, last) = if pool.prefix_len() >= 31 {
        (first, last)
    } else {
        (first + 1, last - 1)
    };
    (first..=last).map(Ipv4Addr::from)
}

/// The next free address after `last` (wrapping), or `None` when all are taken.
pub fn pick(
    pool: Ipv4Net,
    taken: &BTreeMap<Ipv4Addr, Option<Attachment>>,
    last: Option<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let all = usable(pool);
    let start = last
        .filter(|l| pool.contains(l))
        .map_or(0, |l| all.clone().take_while(|a| *a <= l).count());
    let count = all.clone().count();
    all.clone()
        .skip(start)
        .chain(all.take(start))
        .take(count)
        .find(|a| !taken.contains_key(a))
}

/// The address `who` already holds, if any (ADD retried after a partial failure,
/// DEL, CHECK).
pub fn held_by(
    taken: &BTreeMap<Ipv4Addr, Option<Attachment>>,
    who: &Attachment,
) -> Option<Ipv4Addr> {
    taken
        .iter()
        .find(|(_, owner)| owner.as_ref() == Some(who))
        .map(|(ip, _)| *ip)
}

/// What GC frees: every address whose owner is not a valid attachment, including
/// records too damaged to name an owner. Returns each address with its owner.
pub fn garbage(
    taken: &BTreeMap<Ipv4Addr, Option<Attachment>>,
    valid: &[Attachment],
) -> Vec<(Ipv4Addr, Option<Attachment>)> {
    let valid: HashSet<&Attachment> = valid.iter().collect();
    taken
        .iter()
        .filter(|(_, owner)| !owner.as_ref().is_some_and(|o| valid.contains(o)))
        .map(|(ip, owner)| (*ip, owner.clone()))
        .collect()
}

/// Whether the pool has room for one more pod (STATUS).
pub fn has_room(pool: Ipv4Net, taken: &BTreeMap<Ipv4Addr, Option<Attachment>>) -> bool {
    pick(pool, taken, None).is_some()
}

/// The IPv6 address that goes with `ip` of `pool`: the same offset in `pool_v6`;
/// `None` if `pool_v6` is too small for `pool`'s offsets.
pub fn address_v6(pool: Ipv4Net, pool_v6: Ipv6Net, ip: Ipv4Addr) -> Option<Ipv6Addr> {
    let offset = u32::from(ip).checked_sub(u32::from(pool.network()))?;
    let v4_host_bits = 32 - pool.prefix_len();
    let v6_host_bits = 128 - pool_v6.prefix_len();
    if !pool.contains(&ip) || v6_host_bits < v4_host_bits {
        return None;
    }
    Some(Ipv6Addr::from(
        u128::from(pool_v6.network()) + u128::from(offset),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn att(id: &str) -> Option<Attachment> {
        Some(Attachment {
            container_id: id.into(),
            ifname: "eth0".into(),
        })
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn pool(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn never_network_or_broadcast() {
        let p = pool("10.42.1.0/24");
        let all: Vec<_> = usable(p).collect();
        assert_eq!(all.len(), 254);
        assert_eq!(all[0], ip("10.42.1.1"));
        assert_eq!(all[253], ip("10.42.1.254"));
        assert_eq!(usable(pool("10.0.0.0/30")).count(), 2);
        assert_eq!(usable(pool("10.0.0.0/31")).count(), 2);
        assert_eq!(usable(pool("10.0.0.7/32")).count(), 1);
    }

    #[test]
    fn round_robin_from_last() {
        let p = pool("10.42.1.0/29"); // .1 to .6
        let mut taken = BTreeMap::new();
        assert_eq!(pick(p, &taken, None), Some(ip("10.42.1.1")));
        assert_eq!(
            pick(p, &taken, Some(ip("10.42.1.3"))),
            Some(ip("10.42.1.4"))
        );
        // Wraps after the last usable address.
        assert_eq!(
            pick(p, &taken, Some(ip("10.42.1.6"))),
            Some(ip("10.42.1.1"))
        );
        // A `last` from another pool (the node got a new CIDR) starts at the beginning.
        assert_eq!(pick(p, &taken, Some(ip("10.9.9.9"))), Some(ip("10.42.1.1")));
        taken.insert(ip("10.42.1.4"), att("a"));
        taken.insert(ip("10.42.1.5"), None);
        assert_eq!(
            pick(p, &taken, Some(ip("10.42.1.3"))),
            Some(ip("10.42.1.6"))
        );
        for last in 1..=6 {
            taken.insert(Ipv4Addr::new(10, 42, 1, last), att("x"));
        }
        assert_eq!(pick(p, &taken, Some(ip("10.42.1.2"))), None);
        assert!(!has_room(p, &taken));
    }

    /// Allocating until full hands out every usable address exactly once.
    #[test]
    fn fills_the_pool_without_repeats() {
        let p = pool("10.42.3.0/26");
        let mut taken = BTreeMap::new();
        let mut last = None;
        while let Some(a) = pick(p, &taken, last) {
            assert!(taken.insert(a, att(&a.to_string())).is_none(), "{a} twice");
            last = Some(a);
        }
        assert_eq!(taken.len(), 62);
    }

    #[test]
    fn ipv6_address_has_the_ipv4_offset() {
        let v6: Ipv6Net = "fd42:0:0:1::/64".parse().unwrap();
        let p = pool("10.42.1.0/24");
        let check = |ip4: &str, expect: Option<&str>| {
            assert_eq!(
                address_v6(p, v6, ip(ip4)),
                expect.map(|e| e.parse().unwrap()),
                "{ip4}"
            );
        };
        check("10.42.1.1", Some("fd42:0:0:1::1"));
        check("10.42.1.254", Some("fd42:0:0:1::fe"));
        check("10.42.2.1", None);
        check("10.42.0.255", None);
        let tiny: Ipv6Net = "fd42::/124".parse().unwrap();
        assert_eq!(address_v6(p, tiny, ip("10.42.1.1")), None);
    }

    #[test]
    fn held_and_garbage() {
        let mut taken = BTreeMap::new();
        taken.insert(ip("10.42.1.2"), att("live"));
        taken.insert(ip("10.42.1.3"), att("dead"));
        taken.insert(ip("10.42.1.4"), None);
        let live = att("live").unwrap();
        assert_eq!(held_by(&taken, &live), Some(ip("10.42.1.2")));
        assert_eq!(held_by(&taken, &att("other").unwrap()), None);
        let freed: Vec<_> = garbage(&taken, &[live])
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        assert_eq!(freed, vec![ip("10.42.1.3"), ip("10.42.1.4")]);
        assert_eq!(garbage(&taken, &[]).len(), 3);
    }
}
