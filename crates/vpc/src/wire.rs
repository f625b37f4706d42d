//! The VPC wire format: a VPC's IPv4 or IPv6 packet inside an IPv6 header whose
//! addresses name the sending and receiving node and the VPC, inside an ordinary
//! WireGuard transport message.
//!
//! Outer address: `<mesh ULA /48> : <node id, 16 bits> : <VPC id, 32 bits> : 0` (VPC
//! id 0 is never a VPC's: `<mesh>:<node>:0:0::/96` is left to the node itself). Each
//! peer's WireGuard allowed-IPs stay one `/64` (`<mesh /48>:<node id>::/64`), so
//! cryptokey routing has proved which *node* sent a packet; [`MemberTable::decapsulate`]
//! then checks that the node may speak for that VPC and for that inner source. A
//! forged or malformed packet becomes a [`DropReason`] for per-reason counters, never
//! a delivery and never a panic.
//!
//! Encapsulation writes into headroom the caller leaves in front of the inner packet,
//! so the per-packet path allocates nothing.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::str::FromStr;

use ipnet::{IpNet, Ipv6Net};
use wiremesh_model::{FieldError, NodeName};

use crate::{NodeId, VpcId, VpcSnapshot};

/// Bytes of the outer IPv6 header (RFC 8200 §3).
pub const HEADER_LEN: usize = 40;
/// Next header values for the inner packet (IANA protocol numbers).
const NEXT_HEADER_IPV4: u8 = 4;
const NEXT_HEADER_IPV6: u8 = 41;
/// Hop limit of outer headers: the outer packet crosses exactly one WireGuard hop.
pub const HOP_LIMIT: u8 = 64;

/// The mesh's RFC 4193 /48: every node and VPC address lies under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MeshPrefix([u8; 6]);

impl MeshPrefix {
    pub fn new(net: Ipv6Net) -> Result<MeshPrefix, FieldError> {
        if net.prefix_len() != 48 || net != net.trunc() {
            return Err(FieldError::new(
                "mesh_ula",
                format!("{net} is not a /48 prefix"),
            ));
        }
        let mut p = [0; 6];
        p.copy_from_slice(&net.addr().octets()[..6]);
        Ok(MeshPrefix(p))
    }

    pub fn net(&self) -> IpNet {
        let mut o = [0; 16];
        o[..6].copy_from_slice(&self.0);
        IpNet::V6(Ipv6Net::new(o.into(), 48).expect("48 is a valid length"))
    }

    /// `<mesh>:<node>::/64`: a node's WireGuard allowed-IPs, covering all its VPCs.
    pub fn node_net(&self, node: NodeId) -> Ipv6Net {
        Ipv6Net::new(self.vpc_address(node, VpcId(0)), 64).expect("64 is a valid length")
    }

    /// The outer address of `vpc` on `node`.
    pub fn vpc_address(&self, node: NodeId, vpc: VpcId) -> Ipv6Addr {
        let mut o = [0; 16];
        o[..6].copy_from_slice(&self.0);
        o[6..8].copy_from_slice(&node.0.to_be_bytes());
        o[8..12].copy_from_slice(&vpc.0.to_be_bytes());
        o.into()
    }

    /// The node and VPC of an outer address, if it is one of this mesh's.
    pub fn parse_vpc_address(&self, addr: &Ipv6Addr) -> Option<(NodeId, VpcId)> {
        parse_octets(&self.0, &addr.octets())
    }
}

fn parse_octets(prefix: &[u8; 6], o: &[u8]) -> Option<(NodeId, VpcId)> {
    if o[..6] != prefix[..] || o[12..16] != [0; 4] {
        return None;
    }
    let node = u16::from_be_bytes([o[6], o[7]]);
    let vpc = u32::from_be_bytes([o[8], o[9], o[10], o[11]]);
    Some((NodeId(node), VpcId(vpc)))
}

impl FromStr for MeshPrefix {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Self, FieldError> {
        let net: Ipv6Net = s
            .parse()
            .map_err(|_| FieldError::new("mesh_ula", format!("{s:?} is not an IPv6 CIDR")))?;
        MeshPrefix::new(net)
    }
}

impl fmt::Display for MeshPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.net().fmt(f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncapError {
    #[error("frame has no {HEADER_LEN}-byte headroom in front of an inner packet")]
    NoRoom,
    #[error("inner packet is neither IPv4 nor IPv6")]
    NotIp,
    #[error("inner packet of {0} bytes exceeds an IPv6 payload's 65535")]
    TooLong(usize),
}

/// Writes the outer IPv6 header into `frame[..HEADER_LEN]`; the inner packet is the
/// rest of `frame`. The inner packet's DSCP and ECN bits are copied out, so congestion
/// marks survive the tunnel (RFC 6040 normal mode).
pub fn encapsulate(frame: &mut [u8], src: Ipv6Addr, dst: Ipv6Addr) -> Result<(), EncapError> {
    let Some(inner) = frame.get(HEADER_LEN..) else {
        return Err(EncapError::NoRoom);
    };
    let (next_header, traffic_class) = match inner.first().map(|b| b >> 4) {
        Some(4) if inner.len() >= 2 => (NEXT_HEADER_IPV4, inner[1]),
        Some(6) if inner.len() >= 2 => (NEXT_HEADER_IPV6, (inner[0] << 4) | (inner[1] >> 4)),
        _ => return Err(EncapError::NotIp),
    };
    let payload_len = u16::try_from(inner.len()).map_err(|_| EncapError::TooLong(inner.len()))?;
    let h = &mut frame[..HEADER_LEN];
    h[0] = 0x60 | (traffic_class >> 4);
    h[1] = traffic_class << 4;
    h[2] = 0;
    h[3] = 0;
    h[4..6].copy_from_slice(&payload_len.to_be_bytes());
    h[6] = next_header;
    h[7] = HOP_LIMIT;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    Ok(())
}

/// Why a received packet was dropped; one counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Shorter than an IPv6 header, or than the payload length it declares.
    Truncated,
    /// The outer header is not IPv6.
    NotIpv6,
    /// The outer next header is neither 4 (IPv4) nor 41 (IPv6).
    BadNextHeader,
    /// An outer address is not a VPC address of this mesh.
    NotVpcAddress,
    /// Addressed to another node.
    WrongNode,
    /// Source and destination name different VPCs.
    VpcMismatch,
    /// The outer source's node is not the WireGuard peer that sent the packet.
    PeerMismatch,
    /// The VPC has no namespace on this node.
    UnknownVpc,
    /// The sending node is not a member of the VPC.
    NotMember,
    /// The inner packet's version, header or length disagrees with the outer header.
    InnerMalformed,
    /// The inner source is outside the sending node's pod CIDRs for the VPC.
    InnerSourceOutside,
}

impl DropReason {
    pub const ALL: [DropReason; 11] = [
        DropReason::Truncated,
        DropReason::NotIpv6,
        DropReason::BadNextHeader,
        DropReason::NotVpcAddress,
        DropReason::WrongNode,
        DropReason::VpcMismatch,
        DropReason::PeerMismatch,
        DropReason::UnknownVpc,
        DropReason::NotMember,
        DropReason::InnerMalformed,
        DropReason::InnerSourceOutside,
    ];

    /// A metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::NotIpv6 => "not_ipv6",
            DropReason::BadNextHeader => "bad_next_header",
            DropReason::NotVpcAddress => "not_vpc_address",
            DropReason::WrongNode => "wrong_node",
            DropReason::VpcMismatch => "vpc_mismatch",
            DropReason::PeerMismatch => "peer_mismatch",
            DropReason::UnknownVpc => "unknown_vpc",
            DropReason::NotMember => "not_member",
            DropReason::InnerMalformed => "inner_malformed",
            DropReason::InnerSourceOutside => "inner_source_outside",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Write `packet[inner]` to `vpc`'s TUN.
    Deliver {
        vpc: VpcId,
        inner: Range<usize>,
    },
    Drop(DropReason),
}

/// What the data plane of one node knows about VPCs: which exist here, and for each,
/// which node owns which pod CIDRs. Built from a [`VpcSnapshot`]; swapped whole on change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberTable {
    prefix: MeshPrefix,
    local: NodeId,
    /// Only VPCs with a member on this node: packets of other VPCs are dropped.
    vpcs: BTreeMap<VpcId, Members>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Members {
    /// For the receiver's check: each member node's pod CIDRs.
    by_node: BTreeMap<NodeId, Vec<IpNet>>,
    /// For the sender's lookup, by network address. A VPC's member CIDRs are disjoint
    /// (the snapshot sets overlapping ones aside), so the only one that can hold an
    /// address is the last one starting at or below it: O(log n), not a scan.
    by_net: BTreeMap<IpAddr, (IpNet, NodeId)>,
}

impl MemberTable {
    /// The table of node `local`. A node the snapshot gives no id hosts no VPC, so its
    /// table delivers nothing.
    pub fn build(snapshot: &VpcSnapshot, prefix: MeshPrefix, local: &NodeName) -> MemberTable {
        let Some(local_id) = snapshot.node_ids.get(local).copied() else {
            return MemberTable::new(prefix, NodeId(u16::MAX), []);
        };
        let vpcs = snapshot
            .vpcs
            .values()
            .filter(|s| s.members.contains_key(local))
            .map(|s| {
                let members = s
                    .members
                    .values()
                    .filter_map(|m| Some((*snapshot.node_ids.get(&m.node)?, &m.pod_cidrs)))
                    .flat_map(|(id, cidrs)| cidrs.iter().map(move |c| (id, *c)))
                    .collect();
                (s.vpc.id, members)
            });
        MemberTable::new(prefix, local_id, vpcs)
    }

    /// The table as the data plane receives it from the agent: this node's id and, for
    /// each VPC hosted here, every member node's pod CIDRs (disjoint within a VPC).
    pub fn new(
        prefix: MeshPrefix,
        local: NodeId,
        vpcs: impl IntoIterator<Item = (VpcId, Vec<(NodeId, IpNet)>)>,
    ) -> MemberTable {
        let vpcs = vpcs
            .into_iter()
            .map(|(vpc, cidrs)| {
                let mut members = Members::default();
                for (node, cidr) in cidrs {
                    members.by_node.entry(node).or_default().push(cidr);
                    members.by_net.insert(cidr.network(), (cidr, node));
                }
                (vpc, members)
            })
            .collect();
        MemberTable {
            prefix,
            local,
            vpcs,
        }
    }

    /// The mesh prefix and this node's id: what outer addresses are made of.
    pub fn local(&self) -> (MeshPrefix, NodeId) {
        (self.prefix, self.local)
    }

    /// The VPCs this node hosts.
    pub fn local_vpcs(&self) -> impl Iterator<Item = VpcId> + '_ {
        self.vpcs.keys().copied()
    }

    /// The node whose pod CIDR in `vpc` holds `dst`, and the outer addresses to send with.
    pub fn route(&self, vpc: VpcId, dst: IpAddr) -> Option<(NodeId, Ipv6Addr, Ipv6Addr)> {
        let members = self.vpcs.get(&vpc)?;
        let (_, (net, node)) = members.by_net.range(..=dst).next_back()?;
        if !net.contains(&dst) {
            return None;
        }
        Some((
            *node,
            self.prefix.vpc_address(self.local, vpc),
            self.prefix.vpc_address(*node, vpc),
        ))
    }

    /// The receiver's checks on a decrypted packet from WireGuard peer node `peer`.
    /// Bytes after the outer payload (WireGuard's padding) are ignored.
    pub fn decapsulate(&self, packet: &[u8], peer: NodeId) -> Verdict {
        match self.check(packet, peer) {
            Ok((vpc, inner)) => Verdict::Deliver { vpc, inner },
            Err(reason) => Verdict::Drop(reason),
        }
    }

    fn check(&self, packet: &[u8], peer: NodeId) -> Result<(VpcId, Range<usize>), DropReason> {
        let h = packet.get(..HEADER_LEN).ok_or(DropReason::Truncated)?;
        if h[0] >> 4 != 6 {
            return Err(DropReason::NotIpv6);
        }
        let payload_len = usize::from(u16::from_be_bytes([h[4], h[5]]));
        let inner = HEADER_LEN..HEADER_LEN + payload_len;
        let inner_bytes = packet.get(inner.clone()).ok_or(DropReason::Truncated)?;
        let inner_version = match h[6] {
            NEXT_HEADER_IPV4 => 4,
            NEXT_HEADER_IPV6 => 6,
            _ => return Err(DropReason::BadNextHeader),
        };
        let (src_node, src_vpc) =
            parse_octets(&self.prefix.0, &h[8..24]).ok_or(DropReason::NotVpcAddress)?;
        let (dst_node, dst_vpc) =
            parse_octets(&self.prefix.0, &h[24..40]).ok_or(DropReason::NotVpcAddress)?;
        if dst_node != self.local {
            return Err(DropReason::WrongNode);
        }
        if src_vpc != dst_vpc {
            return Err(DropReason::VpcMismatch);
        }
        if src_node != peer {
            return Err(DropReason::PeerMismatch);
        }
        let members = self.vpcs.get(&src_vpc).ok_or(DropReason::UnknownVpc)?;
        let cidrs = members
            .by_node
            .get(&src_node)
            .ok_or(DropReason::NotMember)?;
        let src = inner_source(inner_bytes, inner_version).ok_or(DropReason::InnerMalformed)?;
        if !cidrs.iter().any(|c| c.contains(&src)) {
            return Err(DropReason::InnerSourceOutside);
        }
        Ok((src_vpc, inner))
    }
}

/// The source of a well-formed inner packet of `version` whose length is exactly
/// `p.len()`; `None` otherwise.
fn inner_source(p: &[u8], version: u8) -> Option<IpAddr> {
    if p.first()? >> 4 != version {
        return None;
    }
    match version {
        4 => {
            let header_len = usize::from(p.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*p.get(2)?, *p.get(3)?]));
            if header_len < 20 || total != p.len() || total < header_len {
                return None;
            }
            let s: [u8; 4] = p[12..16].try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(s)))
        }
        _ => {
            let payload = usize::from(u16::from_be_bytes([*p.get(4)?, *p.get(5)?]));
            if p.len() < 40 || 40 + payload != p.len() {
                return None;
            }
            let s: [u8; 16] = p[8..24].try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(s)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{VpcMemberRecord, VpcRecord};
    use crate::snapshot::tests::{nodes, prefix, records};
    use crate::snapshot::{Mesh, VpcSnapshot};
    use proptest::prelude::*;

    const BLUE: VpcId = VpcId(7);
    const RED: VpcId = VpcId(8);
    const GREEN: VpcId = VpcId(9);
    const N1: NodeId = NodeId(1);
    const N2: NodeId = NodeId(2);
    const N3: NodeId = NodeId(3);

    /// The member table of node n1 (blue: n1 10.10.1.0/24, n2 10.10.2.0/24; red: n1
    /// only; green, dual-stack: n1 and n2).
    fn table() -> MemberTable {
        let nodes = nodes();
        let mut records = records();
        let green = VpcRecord {
            name: "green".into(),
            id: GREEN.0,
            pod_cidrs: vec!["10.20.0.0/16".into(), "fd20::/56".into()],
            service_cidr: "10.97.0.0/24".into(),
            dns_zone: "cluster.local".into(),
        };
        records.vpcs.push(green.try_into().unwrap());
        for (node, n) in [("n1", 1), ("n2", 2)] {
            let member = VpcMemberRecord {
                vpc: "green".into(),
                node: node.into(),
                pod_cidrs: vec![format!("10.20.{n}.0/24"), format!("fd20:0:0:{n}::/64")],
            };
            records.members.push(member.try_into().unwrap());
        }
        let (snap, bads) = VpcSnapshot::build(
            records,
            Mesh {
                prefix: prefix(),
                nodes: &nodes,
            },
        );
        assert!(bads.is_empty());
        MemberTable::build(&snap, prefix(), &"n1".parse().unwrap())
    }

    fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
        let total = (20 + payload.len()) as u16;
        let mut p = vec![0x45, 0xb8];
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(payload);
        p
    }

    fn ipv6_packet(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        p.extend_from_slice(&[17, 64]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(payload);
        p
    }

    /// `inner` encapsulated from node `from` to node n1 in `vpc`.
    fn frame(inner: &[u8], from: NodeId, vpc: VpcId) -> Vec<u8> {
        let mut f = vec![0; HEADER_LEN];
        f.extend_from_slice(inner);
        let p = prefix();
        encapsulate(&mut f, p.vpc_address(from, vpc), p.vpc_address(N1, vpc)).unwrap();
        f
    }

    fn from_n2(payload: &[u8]) -> Vec<u8> {
        ipv4_packet(
            "10.10.2.5".parse().unwrap(),
            "10.10.1.5".parse().unwrap(),
            payload,
        )
    }

    #[test]
    fn addresses_round_trip() {
        let p = prefix();
        let a = p.vpc_address(NodeId(0xbeef), VpcId(0xdead_f00d));
        assert_eq!(a.to_string(), "fd77:aa:bbcc:beef:dead:f00d::");
        assert_eq!(
            p.parse_vpc_address(&a),
            Some((NodeId(0xbeef), VpcId(0xdead_f00d)))
        );
        assert!(p.node_net(NodeId(0xbeef)).contains(&a));
        assert_eq!(
            p.parse_vpc_address(&"fd77:aa:bbcd:1::".parse().unwrap()),
            None
        );
        assert_eq!(
            p.parse_vpc_address(&"fd77:aa:bbcc:1:0:7:0:1".parse().unwrap()),
            None
        );
        assert_eq!(
            "fd77:aa:bbcc::/56".parse::<MeshPrefix>().unwrap_err().field,
            "mesh_ula"
        );
        assert_eq!(
            "fd77:aa:bbcc::1/48"
                .parse::<MeshPrefix>()
                .unwrap_err()
                .field,
            "mesh_ula"
        );
    }

    #[test]
    fn encapsulate_writes_the_header() {
        let f = frame(&from_n2(b"hi"), N2, BLUE);
        assert_eq!(f[0], 0x6b); // version 6, traffic class 0xb8 (EF) copied
        assert_eq!(f[1], 0x80);
        assert_eq!(u16::from_be_bytes([f[4], f[5]]), 22);
        assert_eq!((f[6], f[7]), (4, HOP_LIMIT));
        let inner6 = ipv6_packet("fd10::1".parse().unwrap(), "fd10::2".parse().unwrap(), b"");
        assert_eq!(frame(&inner6, N2, BLUE)[6], 41);
        assert_eq!(
            encapsulate(&mut [0; 39], Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST),
            Err(EncapError::NoRoom)
        );
        assert_eq!(
            encapsulate(&mut [0; 41], Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST),
            Err(EncapError::NotIp)
        );
        let mut big = vec![0x45; HEADER_LEN + 65536];
        assert_eq!(
            encapsulate(&mut big, Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST),
            Err(EncapError::TooLong(65536))
        );
    }

    #[test]
    fn route_finds_the_member_node() {
        let t = table();
        let (node, src, dst) = t.route(BLUE, "10.10.2.9".parse().unwrap()).unwrap();
        assert_eq!(node, N2);
        assert_eq!(src, prefix().vpc_address(N1, BLUE));
        assert_eq!(dst, prefix().vpc_address(N2, BLUE));
        assert_eq!(t.route(BLUE, "10.10.3.9".parse().unwrap()), None);
        assert_eq!(t.route(VpcId(99), "10.10.2.9".parse().unwrap()), None);
        let mut vpcs: Vec<_> = t.local_vpcs().collect();
        vpcs.sort();
        assert_eq!(vpcs, [BLUE, RED, GREEN]);
    }

    #[test]
    fn forged_packets_are_dropped_for_their_reason() {
        let t = table();
        let good = frame(&from_n2(b"payload"), N2, BLUE);
        assert_eq!(
            t.decapsulate(&good, N2),
            Verdict::Deliver {
                vpc: BLUE,
                inner: 40..good.len()
            }
        );
        let drop = |f: &[u8], peer| match t.decapsulate(f, peer) {
            Verdict::Drop(r) => r,
            v => panic!("delivered {v:?}"),
        };
        let p = prefix();
        let with_addrs = |src: Ipv6Addr, dst: Ipv6Addr| {
            let mut f = good.clone();
            encapsulate(&mut f, src, dst).unwrap();
            f
        };
        // Padding after the payload (WireGuard pads to 16 bytes) is not part of the inner packet.
        let mut padded = good.clone();
        padded.extend_from_slice(&[0; 9]);
        assert_eq!(
            t.decapsulate(&padded, N2),
            Verdict::Deliver {
                vpc: BLUE,
                inner: 40..good.len()
            }
        );

        assert_eq!(drop(&good[..39], N2), DropReason::Truncated);
        assert_eq!(drop(&good[..good.len() - 1], N2), DropReason::Truncated);
        let mut v4 = good.clone();
        v4[0] = 0x45;
        assert_eq!(drop(&v4, N2), DropReason::NotIpv6);
        let mut nh = good.clone();
        nh[6] = 17;
        assert_eq!(drop(&nh, N2), DropReason::BadNextHeader);
        let other_mesh = "fd00::".parse().unwrap();
        assert_eq!(
            drop(&with_addrs(other_mesh, p.vpc_address(N1, BLUE)), N2),
            DropReason::NotVpcAddress
        );
        assert_eq!(
            drop(
                &with_addrs(p.vpc_address(N2, BLUE), p.vpc_address(N3, BLUE)),
                N2
            ),
            DropReason::WrongNode
        );
        assert_eq!(
            drop(
                &with_addrs(p.vpc_address(N2, RED), p.vpc_address(N1, BLUE)),
                N2
            ),
            DropReason::VpcMismatch
        );
        assert_eq!(drop(&good, N3), DropReason::PeerMismatch);
        assert_eq!(
            drop(&frame(&from_n2(b""), N2, VpcId(99)), N2),
            DropReason::UnknownVpc
        );
        // n2 is not a member of red, though red uses the same CIDRs as blue.
        assert_eq!(
            drop(&frame(&from_n2(b""), N2, RED), N2),
            DropReason::NotMember
        );
        let mut version = good.clone();
        version[6] = 41;
        assert_eq!(drop(&version, N2), DropReason::InnerMalformed);
        let mut short_inner = good.clone();
        short_inner[43] += 1; // inner total length one more than the outer payload
        assert_eq!(drop(&short_inner, N2), DropReason::InnerMalformed);
        let spoofed = ipv4_packet(
            "10.10.1.7".parse().unwrap(),
            "10.10.1.5".parse().unwrap(),
            b"",
        );
        assert_eq!(
            drop(&frame(&spoofed, N2, BLUE), N2),
            DropReason::InnerSourceOutside
        );
    }

    #[test]
    fn a_node_without_an_id_accepts_nothing() {
        let t = MemberTable::build(&VpcSnapshot::default(), prefix(), &"n1".parse().unwrap());
        assert_eq!(t.local_vpcs().count(), 0);
        assert_eq!(
            t.decapsulate(&frame(&from_n2(b""), N2, BLUE), N2),
            Verdict::Drop(DropReason::WrongNode)
        );
    }

    proptest! {
        /// Any IPv4 or IPv6 packet from a member's CIDR comes out exactly as it went in.
        #[test]
        fn round_trip(host in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..1400), v6 in any::<bool>()) {
            let t = table();
            let inner = if v6 {
                let src = Ipv6Addr::new(0xfd20, 0, 0, 2, 0, 0, 0, host.into());
                ipv6_packet(src, "fd20:0:0:1::5".parse().unwrap(), &payload)
            } else {
                ipv4_packet(Ipv4Addr::new(10, 20, 2, host), "10.20.1.5".parse().unwrap(), &payload)
            };
            let f = frame(&inner, N2, GREEN);
            match t.decapsulate(&f, N2) {
                Verdict::Deliver { vpc, inner: r } => {
                    prop_assert_eq!(vpc, GREEN);
                    prop_assert_eq!(&f[r], &inner[..]);
                }
                v => prop_assert!(false, "{:?}", v),
            }
        }

        /// The sender's lookup agrees with a scan of the members (disjoint CIDRs of any length).
        #[test]
        fn route_agrees_with_a_scan(blocks in proptest::collection::btree_map(0u8..=255, (16u8..=24, 1u16..50), 0..40), dst in any::<[u8; 2]>()) {
            // Block b starts at 10.10.b.0: a /16../24 there, cut short so none overlaps the next.
            let starts: Vec<u8> = blocks.keys().copied().collect();
            let cidrs: Vec<(NodeId, IpNet)> = blocks
                .iter()
                .enumerate()
                .map(|(i, (b, (len, node)))| {
                    let next = starts.get(i + 1).map_or(256, |n| u32::from(*n));
                    let room = next - u32::from(*b);
                    // The longest prefix that fits both the alignment and the room.
                    let mut len = u32::from(*len).max(24 - (u32::from(*b).trailing_zeros().min(8)));
                    while (1u32 << (24 - len)) > room { len += 1; }
                    let net = IpNet::new(Ipv4Addr::new(10, 10, *b, 0).into(), len as u8).unwrap();
                    (NodeId(*node), net)
                })
                .collect();
            let t = MemberTable::new(prefix(), N1, [(BLUE, cidrs.clone())]);
            let dst = IpAddr::V4(Ipv4Addr::new(10, 10, dst[0], dst[1]));
            let scan = cidrs.iter().find(|(_, c)| c.contains(&dst)).map(|(n, _)| *n);
            prop_assert_eq!(t.route(BLUE, dst).map(|(n, _, _)| n), scan);
        }

        /// Garbage never panics, and whatever is delivered passed every check.
        #[test]
        fn garbage_is_never_delivered_unchecked(mut bytes in proptest::collection::vec(any::<u8>(), 0..200), keep_header in any::<bool>(), peer in 0u16..4) {
            let t = table();
            if keep_header && bytes.len() >= HEADER_LEN {
                // Valid outer addresses, so the fuzzing reaches the inner checks.
                let good = frame(&from_n2(b""), N2, BLUE);
                bytes[..HEADER_LEN].copy_from_slice(&good[..HEADER_LEN]);
            }
            if let Verdict::Deliver { vpc, inner } = t.decapsulate(&bytes, NodeId(peer)) {
                prop_assert_eq!(vpc, BLUE);
                prop_assert_eq!(peer, 2);
                let src = inner_source(&bytes[inner], 4).unwrap();
                prop_assert!("10.10.2.0/24".parse::<IpNet>().unwrap().contains(&src));
            }
        }
    }
}
