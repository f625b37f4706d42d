//! Address management: which pod CIDR and mesh IP a new node gets.
//!
//! The cluster CIDR is cut into blocks of `node_prefix_len`; block `i` is the
//! `i`-th such subnet, and its node's mesh IP is the `(i + 1)`-th address of the
//! mesh CIDR. Tying the two together by index means a node's mesh IP can always
//! be recomputed from its pod CIDR ([`mesh_ip_of`]), so the two can never drift
//! apart and no second allocation table is needed. Allocation is pure: the caller
//! passes the blocks already taken (read from the registry) and writes the result
//! back with a compare-and-swap, which is where races between nodes are settled.
//!
//! Dual-stack pods use the same index a second time: a node's IPv6 block is block
//! `i` of the IPv6 cluster CIDR ([`pod_cidr_v6`]), so it needs no claim of its own and
//! the two families can never disagree about whose block is whose.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv6Net};
use wiremesh_model::{ClusterSettings, FieldError, Node};
use wiremesh_vpc::NodeId;

/// The addresses of one node: its containers' block and its WireGuard address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeBlock {
    pub pod_cidr: IpNet,
    pub mesh_ip: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("cluster CIDR {cluster_cidr} has no free /{node_prefix_len} block left")]
    Exhausted {
        cluster_cidr: IpNet,
        node_prefix_len: u8,
    },
    #[error(
        "mesh CIDR {mesh_cidr} has no address for block {index} (it needs address {index} + 1)"
    )]
    MeshExhausted { mesh_cidr: IpNet, index: u128 },
    #[error(
        "node_prefix_len /{node_prefix_len} cannot cut cluster CIDR {cluster_cidr} into blocks"
    )]
    BadPrefixLen {
        cluster_cidr: IpNet,
        node_prefix_len: u8,
    },
    #[error(
        "pod CIDR {pod_cidr} is not a /{node_prefix_len} block of cluster CIDR {cluster_cidr}"
    )]
    NotABlock {
        pod_cidr: IpNet,
        cluster_cidr: IpNet,
        node_prefix_len: u8,
    },
    #[error("pod CIDR {pod_cidr} is block {index}: past the 65535 node ids VPC addresses hold")]
    NodeIdExhausted { pod_cidr: IpNet, index: u128 },
}

/// Block `i` of the cluster: the lowest `i` whose pod CIDR overlaps nothing in `taken`.
///
/// `taken` may hold prefixes of any size (a block, or a range reserved by hand);
/// a block is free only if it overlaps none of them.
pub fn allocate(settings: &ClusterSettings, taken: &[IpNet]) -> Result<NodeBlock, IpamError> {
    let host_bits = block_host_bits(settings)?;
    let i = free_block(settings.cluster_cidr, host_bits, taken).ok_or(IpamError::Exhausted {
        cluster_cidr: settings.cluster_cidr,
        node_prefix_len: settings.node_prefix_len,
    })?;
    Ok(NodeBlock {
        pod_cidr: block(settings.cluster_cidr, i, host_bits),
        mesh_ip: mesh_ip_at(settings.mesh_cidr, i)?,
    })
}

/// A node's block of a VPC's pod CIDR `vpc_cidr`: 1/256 of it, but at least 16
/// addresses; the lowest that overlaps nothing in `taken` (the VPC's other members).
/// `None` when the VPC has no block left.
pub fn allocate_member(vpc_cidr: IpNet, taken: &[IpNet]) -> Option<IpNet> {
    let max = vpc_cidr.max_prefix_len();
    let len = (vpc_cidr.prefix_len() + 8)
        .min(max - 4)
        .max(vpc_cidr.prefix_len());
    let host_bits = u32::from(max - len);
    let i = free_block(vpc_cidr.trunc(), host_bits, taken)?;
    Some(block(vpc_cidr.trunc(), i, host_bits))
}

/// The index of the lowest block of `2^host_bits` addresses of `cidr` that overlaps
/// nothing in `taken` (prefixes of any size).
fn free_block(cidr: IpNet, host_bits: u32, taken: &[IpNet]) -> Option<u128> {
    let blocks = 1u128
        .checked_shl(u32::from(cidr.max_prefix_len()) - host_bits - u32::from(cidr.prefix_len()))
        .unwrap_or(u128::MAX);
    let base = to_u128(cidr.network());
    // Sorted by start, so we can jump past a taken prefix bigger than one block
    // instead of stepping through (possibly 2^64) blocks one by one.
    let mut taken: Vec<(u128, u128)> = taken
        .iter()
        .filter(|t| same_family(t, &cidr))
        .map(|t| (to_u128(t.network()), to_u128(t.broadcast())))
        .collect();
    taken.sort_unstable();

    let mut i: u128 = 0;
    'blocks: while i < blocks {
        let start = base + (i << host_bits);
        let end = start + ((1u128 << host_bits) - 1);
        for &(t_start, t_end) in &taken {
            if t_start <= end && start <= t_end {
                // Skip every block up to the end of this taken prefix.
                let next = (t_end - base) >> host_bits;
                i = next.max(i) + 1;
                continue 'blocks;
            }
        }
        return Some(i);
    }
    None
}

/// The mesh IP that belongs with `pod_cidr`: the inverse of [`allocate`]'s pairing.
pub fn mesh_ip_of(settings: &ClusterSettings, pod_cidr: IpNet) -> Result<IpAddr, IpamError> {
    mesh_ip_at(settings.mesh_cidr, block_index(settings, pod_cidr)?)
}

/// The node's 16-bit id in VPC outer addresses (`<mesh ULA>:<id>::/64`): its block
/// index + 1, so it is as stable and unique as the pod CIDR and needs no table of
/// its own. Id 0 is no node's.
pub fn node_id(settings: &ClusterSettings, pod_cidr: IpNet) -> Result<NodeId, IpamError> {
    let index = block_index(settings, pod_cidr)?;
    u16::try_from(index + 1)
        .map(NodeId)
        .map_err(|_| IpamError::NodeIdExhausted { pod_cidr, index })
}

/// The IPv6 block that goes with IPv4 block `pod_cidr`: the one with the same index
/// in the IPv6 cluster CIDR; `None` when the cluster has IPv4-only pods.
pub fn pod_cidr_v6(
    settings: &ClusterSettings,
    pod_cidr: IpNet,
) -> Result<Option<Ipv6Net>, IpamError> {
    let Some(cluster_v6) = settings.cluster_cidr_v6 else {
        return Ok(None);
    };
    let index = block_index(settings, pod_cidr)?;
    let host_bits = u32::from(128 - settings.node_prefix_len_v6);
    let blocks_bits = u32::from(settings.node_prefix_len_v6 - cluster_v6.prefix_len());
    if blocks_bits < 128 && index >> blocks_bits != 0 {
        return Err(IpamError::Exhausted {
            cluster_cidr: IpNet::V6(cluster_v6),
            node_prefix_len: settings.node_prefix_len_v6,
        });
    }
    match block(IpNet::V6(cluster_v6), index, host_bits) {
        IpNet::V6(net) => Ok(Some(net)),
        IpNet::V4(_) => unreachable!("a block of an IPv6 prefix is IPv6"),
    }
}

/// A node record's `pod_cidr_v6` must be [`pod_cidr_v6`] of its `pod_cidr`, or absent
/// (a node whose agent predates dual-stack keeps IPv4-only pods).
pub fn check_pod_cidr_v6(settings: &ClusterSettings, node: &Node) -> Result<(), FieldError> {
    let Some(have) = node.pod_cidr_v6 else {
        return Ok(());
    };
    match pod_cidr_v6(settings, node.pod_cidr) {
        Ok(Some(want)) if want == have => Ok(()),
        Ok(Some(want)) => Err(FieldError::new(
            "pod_cidr_v6",
            format!(
                "{have} is not {want}, the IPv6 block with the index of pod_cidr {}",
                node.pod_cidr
            ),
        )),
        Ok(None) => Err(FieldError::new(
            "pod_cidr_v6",
            format!("{have}: the cluster has no cluster_cidr_v6"),
        )),
        Err(e) => Err(FieldError::new("pod_cidr_v6", e.to_string())),
    }
}

/// Which block of the cluster `pod_cidr` is.
fn block_index(settings: &ClusterSettings, pod_cidr: IpNet) -> Result<u128, IpamError> {
    let cluster = settings.cluster_cidr;
    let host_bits = block_host_bits(settings)?;
    if !same_family(&pod_cidr, &cluster)
        || pod_cidr.prefix_len() != settings.node_prefix_len
        || pod_cidr.trunc() != pod_cidr
        || !cluster.contains(&pod_cidr)
    {
        return Err(IpamError::NotABlock {
            pod_cidr,
            cluster_cidr: cluster,
            node_prefix_len: settings.node_prefix_len,
        });
    }
    Ok((to_u128(pod_cidr.network()) - to_u128(cluster.network())) >> host_bits)
}

fn block_host_bits(settings: &ClusterSettings) -> Result<u32, IpamError> {
    let cluster = settings.cluster_cidr;
    let len = settings.node_prefix_len;
    if len < cluster.prefix_len() || len > cluster.max_prefix_len() {
        return Err(IpamError::BadPrefixLen {
            cluster_cidr: cluster,
            node_prefix_len: len,
        });
    }
    Ok(u32::from(cluster.max_prefix_len() - len))
}

fn block(cidr: IpNet, index: u128, host_bits: u32) -> IpNet {
    let network = to_u128(cidr.network()) + (index << host_bits);
    let addr = from_u128(network, cidr.network());
    IpNet::new(addr, cidr.max_prefix_len() - host_bits as u8)
        .expect("the block length was checked against the CIDR")
}

/// Address `index + 1` of the mesh CIDR. The network address (offset 0) is never a
/// node's, nor is the IPv4 broadcast address of a prefix that has one.
fn mesh_ip_at(mesh_cidr: IpNet, index: u128) -> Result<IpAddr, IpamError> {
    let exhausted = || IpamError::MeshExhausted { mesh_cidr, index };
    let offset = index.checked_add(1).ok_or_else(exhausted)?;
    let host_bits = u32::from(mesh_cidr.max_prefix_len() - mesh_cidr.prefix_len());
    let size = 1u128.checked_shl(host_bits).unwrap_or(u128::MAX);
    let has_broadcast = matches!(mesh_cidr, IpNet::V4(_)) && host_bits >= 2;
    let last = if has_broadcast { size - 2 } else { size - 1 };
    if offset > last {
        return Err(exhausted());
    }
    Ok(from_u128(
        to_u128(mesh_cidr.network()) + offset,
        mesh_cidr.network(),
    ))
}

fn same_family(a: &IpNet, b: &IpNet) -> bool {
    matches!(
        (a, b),
        (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
    )
}

fn to_u128(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// Back to an address of the same family as `like`; callers stay inside a prefix of
/// that family, so an IPv4 value always fits in 32 bits.
fn from_u128(value: u128, like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(
            u32::try_from(value).expect("stays inside an IPv4 prefix"),
        )),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn settings(cluster: &str, len: u8, mesh: &str) -> ClusterSettings {
        ClusterSettings {
            cluster_cidr: cluster.parse().unwrap(),
            node_prefix_len: len,
            mesh_cidr: mesh.parse().unwrap(),
            ..ClusterSettings::default()
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn first_blocks_in_order() {
        let s = ClusterSettings::default();
        let a = allocate(&s, &[]).unwrap();
        assert_eq!(
            a,
            NodeBlock {
                pod_cidr: net("10.42.0.0/24"),
                mesh_ip: "100.64.0.1".parse().unwrap()
            }
        );
        let b = allocate(&s, &[a.pod_cidr]).unwrap();
        assert_eq!(
            b,
            NodeBlock {
                pod_cidr: net("10.42.1.0/24"),
                mesh_ip: "100.64.0.2".parse().unwrap()
            }
        );
        // A freed hole is reused before the next new block.
        let c = allocate(&s, &[net("10.42.1.0/24"), net("10.42.2.0/24")]).unwrap();
        assert_eq!(c.pod_cidr, net("10.42.0.0/24"));
    }

    #[test]
    fn node_ids_follow_the_block_index() {
        let check = |s: &ClusterSettings, cidr: &str, expect: Result<u16, ()>| {
            assert_eq!(
                node_id(s, net(cidr)).map(|n| n.0).map_err(|_| ()),
                expect,
                "{cidr}"
            );
        };
        let s = ClusterSettings::default();
        check(&s, "10.42.0.0/24", Ok(1));
        check(&s, "10.42.1.0/24", Ok(2));
        check(&s, "10.42.255.0/24", Ok(256));
        check(&s, "10.42.1.0/25", Err(()));
        check(&s, "10.43.0.0/24", Err(()));
        let wide = settings("10.0.0.0/8", 28, "fd00::/64");
        check(&wide, "10.0.255.224/28", Ok(4095));
        check(&wide, "10.15.255.224/28", Ok(65535));
        assert!(matches!(
            node_id(&wide, net("10.15.255.240/28")),
            Err(IpamError::NodeIdExhausted { index: 65535, .. })
        ));
    }

    #[test]
    fn member_blocks_are_a_256th_of_the_vpc_at_least_16_addresses() {
        let check = |vpc: &str, taken: &[&str], expect: Option<&str>| {
            let taken: Vec<IpNet> = taken.iter().map(|t| net(t)).collect();
            assert_eq!(allocate_member(net(vpc), &taken), expect.map(net), "{vpc}");
        };
        check("10.10.0.0/16", &[], Some("10.10.0.0/24"));
        check("10.10.0.0/16", &["10.10.0.0/24"], Some("10.10.1.0/24"));
        check(
            "10.10.0.0/16",
            &["10.10.0.0/23", "fd00::/8"],
            Some("10.10.2.0/24"),
        );
        check("10.10.0.0/24", &["10.10.0.0/28"], Some("10.10.0.16/28"));
        check("10.10.0.0/28", &[], Some("10.10.0.0/28"));
        check("10.10.0.0/28", &["10.10.0.0/28"], None);
        check("fd10::/48", &[], Some("fd10::/56"));
        check("10.10.0.0/16", &["10.10.0.0/16"], None);
    }

    #[test]
    fn a_bigger_taken_prefix_blocks_all_its_blocks() {
        let s = ClusterSettings::default();
        let a = allocate(&s, &[net("10.42.0.0/20")]).unwrap();
        assert_eq!(a.pod_cidr, net("10.42.16.0/24"));
        assert_eq!(a.mesh_ip, "100.64.0.17".parse::<IpAddr>().unwrap());
        // Prefixes of the other family or outside the cluster change nothing.
        let b = allocate(&s, &[net("fd00::/8"), net("192.168.0.0/16")]).unwrap();
        assert_eq!(b.pod_cidr, net("10.42.0.0/24"));
    }

    #[test]
    fn exhaustion_names_the_cluster_cidr() {
        let s = settings("10.42.0.0/23", 24, "100.64.0.0/16");
        let taken = [net("10.42.0.0/24"), net("10.42.1.0/24")];
        let err = allocate(&s, &taken).unwrap_err();
        assert_eq!(
            err,
            IpamError::Exhausted {
                cluster_cidr: net("10.42.0.0/23"),
                node_prefix_len: 24
            }
        );
        assert!(err.to_string().contains("10.42.0.0/23"), "{err}");
    }

    #[test]
    fn mesh_exhaustion_skips_network_and_broadcast() {
        // A /30 mesh has two node addresses: .1 and .2 (.3 is broadcast).
        let s = settings("10.42.0.0/16", 24, "100.64.0.0/30");
        assert_eq!(
            mesh_ip_of(&s, net("10.42.1.0/24")).unwrap(),
            "100.64.0.2".parse::<IpAddr>().unwrap()
        );
        let err = mesh_ip_of(&s, net("10.42.2.0/24")).unwrap_err();
        assert_eq!(
            err,
            IpamError::MeshExhausted {
                mesh_cidr: net("100.64.0.0/30"),
                index: 2
            }
        );
    }

    #[test]
    fn ipv6() {
        let s = settings("fd42::/48", 64, "fd64::/64");
        let a = allocate(&s, &[net("fd42::/64")]).unwrap();
        assert_eq!(
            a,
            NodeBlock {
                pod_cidr: net("fd42:0:0:1::/64"),
                mesh_ip: "fd64::2".parse().unwrap()
            }
        );
    }

    #[test]
    fn ipv6_blocks_share_the_ipv4_index() {
        let s = ClusterSettings {
            cluster_cidr_v6: Some("fd42::/48".parse().unwrap()),
            ..ClusterSettings::default()
        };
        let check = |cidr: &str, expect: Option<&str>| {
            assert_eq!(
                pod_cidr_v6(&s, net(cidr)).unwrap(),
                expect.map(|e| e.parse().unwrap()),
                "{cidr}"
            );
        };
        check("10.42.0.0/24", Some("fd42::/64"));
        check("10.42.1.0/24", Some("fd42:0:0:1::/64"));
        check("10.42.255.0/24", Some("fd42:0:0:ff::/64"));
        let narrow = ClusterSettings {
            cluster_cidr_v6: Some("fd42::/120".parse().unwrap()),
            node_prefix_len_v6: 124,
            ..s.clone()
        };
        assert_eq!(
            pod_cidr_v6(&narrow, net("10.42.15.0/24")).unwrap(),
            Some("fd42::f0/124".parse().unwrap())
        );
        assert!(matches!(
            pod_cidr_v6(&narrow, net("10.42.16.0/24")),
            Err(IpamError::Exhausted { .. })
        ));
        assert_eq!(
            pod_cidr_v6(&ClusterSettings::default(), net("10.42.1.0/24")),
            Ok(None)
        );
    }

    #[test]
    fn mesh_ip_of_rejects_what_is_not_a_block() {
        let s = ClusterSettings::default();
        for bad in ["10.43.0.0/24", "10.42.0.0/25", "10.42.0.0/23", "fd00::/64"] {
            let err = mesh_ip_of(&s, net(bad)).unwrap_err();
            assert!(matches!(err, IpamError::NotABlock { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn bad_prefix_len() {
        let s = settings("10.42.0.0/16", 8, "100.64.0.0/16");
        assert!(matches!(
            allocate(&s, &[]),
            Err(IpamError::BadPrefixLen { .. })
        ));
    }

    proptest! {
        /// With taken prefixes of any size, in or out of the cluster, the block picked
        /// is the lowest that overlaps none of them, as a naive scan finds it.
        #[test]
        fn picks_the_lowest_free_block(taken in proptest::collection::vec((0u32..1 << 13, 18u8..=28), 0..12)) {
            let s = settings("10.42.0.0/20", 24, "100.64.0.0/24");
            let taken: Vec<IpNet> = taken
                .iter()
                .map(|&(offset, len)| IpNet::new(IpAddr::V4(Ipv4Addr::from(0x0a2a_0000 + offset)), len).unwrap().trunc())
                .collect();
            let naive = s.cluster_cidr.subnets(24).unwrap().enumerate().find(|(_, b)| {
                taken.iter().all(|t| !t.contains(&b.network()) && !b.contains(&t.network()))
            });
            match (allocate(&s, &taken), naive) {
                (Ok(got), Some((i, block))) => {
                    prop_assert_eq!(got.pod_cidr, block);
                    prop_assert_eq!(got.mesh_ip, IpAddr::V4(Ipv4Addr::new(100, 64, 0, u8::try_from(i + 1).unwrap())));
                }
                (Err(IpamError::Exhausted { .. }), None) => {}
                (got, naive) => prop_assert!(false, "allocate gave {:?}, the naive scan {:?}", got, naive),
            }
        }

        /// Allocating one block after another, with random blocks released in between,
        /// never hands out a pod CIDR or mesh IP that is still held, and every
        /// allocation's mesh IP is the one `mesh_ip_of` derives from its pod CIDR.
        #[test]
        fn never_double_allocates(ops in proptest::collection::vec(any::<Option<prop::sample::Index>>(), 1..60)) {
            let s = settings("10.42.0.0/20", 24, "100.64.0.0/24");
            let mut held: Vec<NodeBlock> = Vec::new();
            for op in ops {
                match op {
                    Some(ix) if !held.is_empty() => {
                        held.remove(ix.index(held.len()));
                    }
                    _ => {
                        let taken: Vec<IpNet> = held.iter().map(|b| b.pod_cidr).collect();
                        match allocate(&s, &taken) {
                            Ok(b) => {
                                prop_assert!(held.iter().all(|h| h.pod_cidr != b.pod_cidr && h.mesh_ip != b.mesh_ip));
                                prop_assert!(s.cluster_cidr.contains(&b.pod_cidr));
                                prop_assert!(s.mesh_cidr.contains(&b.mesh_ip));
                                prop_assert_eq!(mesh_ip_of(&s, b.pod_cidr), Ok(b.mesh_ip));
                                held.push(b);
                            }
                            Err(e) => {
                                prop_assert_eq!(held.len(), 16, "{}", e);
                            }
                        }
                    }
                }
            }
        }
    }
}
