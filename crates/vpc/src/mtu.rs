//! The MTU of a VPC's pods: what is left of the underlay's MTU after WireGuard and the
//! VPC's IPv6 header. Derived, never hard-coded, so a 9000-byte underlay gets jumbo
//! pods and a PPPoE link (1492) does not black-hole full-size packets.

use crate::wire::HEADER_LEN;
use crate::IpFamily;

/// WireGuard's overhead per packet over an IPv4 underlay: IPv4 20 + UDP 8 + transport
/// header 16 + Poly1305 tag 16 (whitepaper §5.4.6).
pub const WIREGUARD_OVERHEAD_V4: u16 = 60;
/// The same over IPv6 (a 40-byte IP header).
pub const WIREGUARD_OVERHEAD_V6: u16 = 80;
/// IPv6's minimum link MTU (RFC 8200 §5): pods of a dual-stack VPC need at least this.
pub const MIN_POD_MTU: u16 = 1280;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("underlay MTU {underlay_mtu} leaves pods {pod_mtu} bytes, under IPv6's minimum of {MIN_POD_MTU}")]
pub struct MtuTooSmall {
    pub underlay_mtu: u16,
    pub pod_mtu: u16,
}

/// The pod MTU for an underlay of `underlay_mtu` bytes carrying WireGuard over
/// `underlay` (IPv6 when a node may be reached over either: the larger overhead).
pub fn pod_mtu(underlay_mtu: u16, underlay: IpFamily) -> Result<u16, MtuTooSmall> {
    let wireguard = match underlay {
        IpFamily::V4 => WIREGUARD_OVERHEAD_V4,
        IpFamily::V6 => WIREGUARD_OVERHEAD_V6,
    };
    let pod_mtu = underlay_mtu.saturating_sub(wireguard + HEADER_LEN as u16);
    if pod_mtu < MIN_POD_MTU {
        return Err(MtuTooSmall {
            underlay_mtu,
            pod_mtu,
        });
    }
    Ok(pod_mtu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        assert_eq!(pod_mtu(1500, IpFamily::V6), Ok(1380));
        assert_eq!(pod_mtu(1500, IpFamily::V4), Ok(1400));
        assert_eq!(pod_mtu(9000, IpFamily::V6), Ok(8880));
        assert_eq!(pod_mtu(1492, IpFamily::V6), Ok(1372));
        assert_eq!(pod_mtu(1400, IpFamily::V6), Ok(1280));
        assert_eq!(
            pod_mtu(1399, IpFamily::V6),
            Err(MtuTooSmall {
                underlay_mtu: 1399,
                pod_mtu: 1279
            })
        );
        assert!(pod_mtu(0, IpFamily::V4).is_err());
    }

    proptest! {
        /// A full-size pod packet with both headers fits the underlay, and no byte is wasted.
        #[test]
        fn a_full_pod_packet_fits_exactly(underlay_mtu in any::<u16>(), v6 in any::<bool>()) {
            let family = if v6 { IpFamily::V6 } else { IpFamily::V4 };
            let overhead = if v6 { 80 } else { 60 } + 40;
            match pod_mtu(underlay_mtu, family) {
                Ok(mtu) => prop_assert_eq!(u32::from(mtu) + overhead, u32::from(underlay_mtu)),
                Err(_) => prop_assert!(u32::from(underlay_mtu) < u32::from(MIN_POD_MTU) + overhead),
            }
        }
    }
}
