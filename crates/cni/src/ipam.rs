//! Address decisions, as pure functions over what the store holds.
//!
//! Addresses come from the node's pod CIDR, never an IPv4 pool's network or
//! broadcast address, nor an IPv6 pool's subnet-router anycast address (its `::0`).
//! The first host address is handed out too: pods' gateways are link-local
//! (169.254.1.1, fe80::1), so nothing on the node needs an address from the pod CIDR.
//! Like host-local, allocation goes round-robin from the last address handed out, so
//! a freed address is not reused at once (a peer may still hold a connection to it).
//! The search is arithmetic and steps over taken addresses only, so an IPv6 /64 costs
//! what an IPv4 /24 does.
//!
//! The store holds one address per pod, of the pool's first family ([`Pools`]): a
//! dual-stack pod's IPv6 address is not allocated at all but is its IPv4 address's
//! offset in the node's IPv6 pod CIDR ([`address_v6`]), so the one store entry covers
//! both and DEL frees both; an IPv6-only pod's entry is its IPv6 address.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::config::Attachment;

/// What the store holds: each allocated address and its holder (`None`: the record
/// is unreadable).
pub type Taken = BTreeMap<IpAddr, Option<Attachment>>;

/// A network's pod CIDRs on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pools {
    V4(Ipv4Net),
    Dual(Ipv4Net, Ipv6Net),
    V6(Ipv6Net),
}

/// A pod's addresses: one per family its network has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodAddrs {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl Pools {
    /// From a node's blocks (at most one of each family is used); `None` if empty.
    pub fn new(v4: Option<Ipv4Net>, v6: Option<Ipv6Net>) -> Option<Pools> {
        match (v4, v6) {
            (Some(v4), None) => Some(Pools::V4(v4)),
            (Some(v4), Some(v6)) => Some(Pools::Dual(v4, v6)),
            (None, Some(v6)) => Some(Pools::V6(v6)),
            (None, None) => None,
        }
    }

    /// The pool the store allocates from.
    pub fn allocated(&self) -> IpNet {
        match *self {
            Pools::V4(v4) | Pools::Dual(v4, _) => v4.into(),
            Pools::V6(v6) => v6.into(),
        }
    }

    /// The pod's addresses for `ip`, the store's entry; `None` if `ip` is not of
    /// [`Pools::allocated`] or a dual-stack pool's IPv6 CIDR has no room for its offset.
    pub fn addresses(&self, ip: IpAddr) -> Option<PodAddrs> {
        if !self.allocated().contains(&ip) {
            return None;
        }
        Some(match (*self, ip) {
            (Pools::V4(_), IpAddr::V4(v4)) => PodAddrs {
                v4: Some(v4),
                v6: None,
            },
            (Pools::Dual(pool, pool_v6), IpAddr::V4(v4)) => PodAddrs {
                v4: Some(v4),
                v6: Some(address_v6(pool, pool_v6, v4)?),
            },
            (Pools::V6(_), IpAddr::V6(v6)) => PodAddrs {
                v4: None,
                v6: Some(v6),
            },
            _ => return None,
        })
    }
}

/// The first and last address a pod may get from `pool`, as integers: an IPv4 pool
/// less network and broadcast (a /31 or /32 has neither, RFC 3021), an IPv6 pool
/// less its `::0`. `None` for a pool with no such address (an IPv6 /128).
fn usable_range(pool: IpNet) -> Option<(u128, u128)> {
    let (first, last) = match pool {
        IpNet::V4(p) => {
            let (n, b) = (u32::from(p.network()), u32::from(p.broadcast()));
            if p.prefix_len() >= 31 {
                (n.into(), b.into())
            } else {
                (u128::from(n) + 1, u128::from(b) - 1)
            }
        }
        IpNet::V6(p) => (
            u128::from(p.network()).checked_add(1)?,
            p.broadcast().into(),
        ),
    };
    (first <= last).then_some((first, last))
}

fn ip_of(pool: IpNet, n: u128) -> IpAddr {
    match pool {
        // `n` lies in an IPv4 pool's range, so it fits.
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(n as u32)),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

fn int_of(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a).into(),
        IpAddr::V6(a) => a.into(),
    }
}

/// How many addresses of `pool` pods may get.
pub fn size(pool: IpNet) -> u128 {
    // A /0 IPv6 pool's count does not fit; one less is as good for a message.
    usable_range(pool).map_or(0, |(first, last)| (last - first).saturating_add(1))
}

/// The next free address after `last` (wrapping), or `None` when all are taken.
pub fn pick(pool: IpNet, taken: &Taken, last: Option<IpAddr>) -> Option<IpAddr> {
    let (first, end) = usable_range(pool)?;
    let start = match last.filter(|l| pool.contains(l)).map(int_of) {
        Some(l) if (first..end).contains(&l) => l + 1,
        _ => first,
    };
    // Each step past `start` is over a taken address, so one more than the number
    // taken finds a free one if there is any.
    let steps = size(pool).min(taken.len() as u128 + 1);
    (0..steps)
        .map(|i| match end - start {
            ahead if i <= ahead => start + i,
            ahead => first + (i - ahead - 1),
        })
        .map(|n| ip_of(pool, n))
        .find(|a| !taken.contains_key(a))
}

/// The address `who` already holds, if any (ADD retried after a partial failure,
/// DEL, CHECK).
pub fn held_by(taken: &Taken, who: &Attachment) -> Option<IpAddr> {
    taken
        .iter()
        .find(|(_, owner)| owner.as_ref() == Some(who))
        .map(|(ip, _)| *ip)
}

/// What GC frees: every address whose owner is not a valid attachment, including
/// records too damaged to name an owner. Returns each address with its owner.
pub fn garbage(taken: &Taken, valid: &[Attachment]) -> Vec<(IpAddr, Option<Attachment>)> {
    let valid: HashSet<&Attachment> = valid.iter().collect();
    taken
        .iter()
        .filter(|(_, owner)| !owner.as_ref().is_some_and(|o| valid.contains(o)))
        .map(|(ip, owner)| (*ip, owner.clone()))
        .collect()
}

/// Whether the pool has room for one more pod (STATUS).
pub fn has_room(pool: IpNet, taken: &Taken) -> bool {
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn pool(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// Every usable address of a small pool, by allocating until full.
    fn fill(p: IpNet) -> Vec<IpAddr> {
        let mut taken = Taken::new();
        let mut last = None;
        while let Some(a) = pick(p, &taken, last) {
            assert!(taken.insert(a, att(&a.to_string())).is_none(), "{a} twice");
            last = Some(a);
        }
        taken.into_keys().collect()
    }

    #[test]
    fn never_network_broadcast_or_subnet_router() {
        let all = fill(pool("10.42.1.0/24"));
        assert_eq!(all.len(), 254);
        assert_eq!((all[0], all[253]), (ip("10.42.1.1"), ip("10.42.1.254")));
        assert_eq!(fill(pool("10.0.0.0/30")).len(), 2);
        assert_eq!(fill(pool("10.0.0.0/31")).len(), 2);
        assert_eq!(fill(pool("10.0.0.7/32")), vec![ip("10.0.0.7")]);
        let v6 = fill(pool("fd10:0:0:3::/120"));
        assert_eq!(v6.len(), 255);
        assert_eq!(
            (v6[0], v6[254]),
            (ip("fd10:0:0:3::1"), ip("fd10:0:0:3::ff"))
        );
        assert_eq!(fill(pool("fd10::/127")), vec![ip("fd10::1")]);
        assert!(fill(pool("fd10::/128")).is_empty());
        assert_eq!(size(pool("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128")), 0);
        assert_eq!(size(pool("fd10:0:0:3::/64")), (1 << 64) - 1);
        assert_eq!(size(pool("::/0")), u128::MAX);
        assert_eq!(size(pool("10.0.0.0/8")), (1 << 24) - 2);
    }

    #[test]
    fn round_robin_from_last() {
        let p = pool("10.42.1.0/29"); // .1 to .6
        let mut taken = Taken::new();
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
        assert_eq!(pick(p, &taken, Some(ip("fd10::5"))), Some(ip("10.42.1.1")));
        taken.insert(ip("10.42.1.4"), att("a"));
        taken.insert(ip("10.42.1.5"), None);
        assert_eq!(
            pick(p, &taken, Some(ip("10.42.1.3"))),
            Some(ip("10.42.1.6"))
        );
        // The wrap steps over taken addresses at the start of the pool too.
        taken.insert(ip("10.42.1.1"), att("b"));
        assert_eq!(
            pick(p, &taken, Some(ip("10.42.1.5"))),
            Some(ip("10.42.1.6"))
        );
        taken.insert(ip("10.42.1.6"), att("c"));
        assert_eq!(
            pick(p, &taken, Some(ip("10.42.1.5"))),
            Some(ip("10.42.1.2"))
        );
        for last in 1..=6 {
            taken.insert(ip(&format!("10.42.1.{last}")), att("x"));
        }
        assert_eq!(pick(p, &taken, Some(ip("10.42.1.2"))), None);
        assert!(!has_room(p, &taken));
    }

    /// A /64 is searched by arithmetic: the next address after `last`, wrapping at
    /// the block's end to `::1`, stepping over the taken ones only.
    #[test]
    fn ipv6_blocks_round_robin_without_walking_the_block() {
        let p = pool("fd10:0:0:3::/64");
        let mut taken = Taken::new();
        assert_eq!(pick(p, &taken, None), Some(ip("fd10:0:0:3::1")));
        assert_eq!(
            pick(p, &taken, Some(ip("fd10:0:0:3::9"))),
            Some(ip("fd10:0:0:3::a"))
        );
        let top = ip("fd10:0:0:3:ffff:ffff:ffff:ffff");
        assert_eq!(pick(p, &taken, Some(top)), Some(ip("fd10:0:0:3::1")));
        taken.insert(ip("fd10:0:0:3::1"), att("a"));
        taken.insert(ip("fd10:0:0:3::2"), None);
        assert_eq!(pick(p, &taken, Some(top)), Some(ip("fd10:0:0:3::3")));
        assert_eq!(
            pick(p, &taken, Some(ip("10.10.3.4"))),
            Some(ip("fd10:0:0:3::3"))
        );
        assert!(has_room(p, &taken));
    }

    #[test]
    fn pools_say_which_family_the_store_holds() {
        let v4: Ipv4Net = "10.42.1.0/24".parse().unwrap();
        let v6: Ipv6Net = "fd42:0:0:1::/64".parse().unwrap();
        assert_eq!(Pools::new(None, None), None);
        let dual = Pools::new(Some(v4), Some(v6)).unwrap();
        assert_eq!(dual.allocated(), IpNet::V4(v4));
        assert_eq!(
            dual.addresses(ip("10.42.1.7")),
            Some(PodAddrs {
                v4: Some("10.42.1.7".parse().unwrap()),
                v6: Some("fd42:0:0:1::7".parse().unwrap())
            })
        );
        assert_eq!(dual.addresses(ip("fd42:0:0:1::7")), None);
        let only = Pools::new(None, Some(v6)).unwrap();
        assert_eq!(only.allocated(), IpNet::V6(v6));
        assert_eq!(
            only.addresses(ip("fd42:0:0:1::7")),
            Some(PodAddrs {
                v4: None,
                v6: Some("fd42:0:0:1::7".parse().unwrap())
            })
        );
        assert_eq!(only.addresses(ip("10.42.1.7")), None);
        assert_eq!(only.addresses(ip("fd42:0:0:2::7")), None);
        let plain = Pools::new(Some(v4), None).unwrap();
        assert_eq!(plain.addresses(ip("10.42.1.7")).unwrap().v6, None);
    }

    #[test]
    fn ipv6_address_has_the_ipv4_offset() {
        let v6: Ipv6Net = "fd42:0:0:1::/64".parse().unwrap();
        let p: Ipv4Net = "10.42.1.0/24".parse().unwrap();
        let check = |ip4: &str, expect: Option<&str>| {
            assert_eq!(
                address_v6(p, v6, ip4.parse().unwrap()),
                expect.map(|e| e.parse().unwrap()),
                "{ip4}"
            );
        };
        check("10.42.1.1", Some("fd42:0:0:1::1"));
        check("10.42.1.254", Some("fd42:0:0:1::fe"));
        check("10.42.2.1", None);
        check("10.42.0.255", None);
        let tiny: Ipv6Net = "fd42::/124".parse().unwrap();
        assert_eq!(address_v6(p, tiny, "10.42.1.1".parse().unwrap()), None);
    }

    #[test]
    fn held_and_garbage() {
        let mut taken = Taken::new();
        taken.insert(ip("10.42.1.2"), att("live"));
        taken.insert(ip("10.42.1.3"), att("dead"));
        taken.insert(ip("10.42.1.4"), None);
        taken.insert(ip("fd10::4"), att("dead6"));
        let live = att("live").unwrap();
        assert_eq!(held_by(&taken, &live), Some(ip("10.42.1.2")));
        assert_eq!(held_by(&taken, &att("dead6").unwrap()), Some(ip("fd10::4")));
        assert_eq!(held_by(&taken, &att("other").unwrap()), None);
        let freed: Vec<_> = garbage(&taken, &[live])
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        assert_eq!(freed, vec![ip("10.42.1.3"), ip("10.42.1.4"), ip("fd10::4")]);
        assert_eq!(garbage(&taken, &[]).len(), 4);
    }
}
