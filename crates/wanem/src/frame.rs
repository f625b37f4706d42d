//! What a TUN read holds when the ports carry a `virtio_net_hdr` (`IFF_VNET_HDR` with
//! TCP and UDP segmentation offload): one IP packet, or a "super-packet" of up to
//! 64 KiB that stands for several wire packets (a TCP segment to be cut at the MSS, or
//! a UDP GSO batch of datagrams). An unimpaired link passes super-packets on whole
//! (one read and one write instead of forty); the stats still count the wire packets
//! they stand for. An impaired link splits them ([`split`]) and decides per packet.

use bytes::BytesMut;
use wiremesh_wg::offload::{self, checksum, OffloadError, VNET_HDR_LEN};

/// `virtio_net_hdr.gso_type` for UDP segmentation (`VIRTIO_NET_HDR_GSO_UDP_L4`).
const GSO_UDP_L4: u8 = 5;
/// The ECN bit that may ride along with a TCP `gso_type`.
const GSO_ECN: u8 = 0x80;
const UDP_HEADER_LEN: usize = 8;
const PROTO_UDP: u8 = 17;

/// The packets and IP bytes a frame puts on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireSize {
    pub packets: u64,
    pub bytes: u64,
}

/// The wire size of one frame (vnet header included). A frame whose layout cannot be
/// read counts as one packet of its length.
pub fn wire_size(frame: &[u8]) -> WireSize {
    let packet_len = frame.len().saturating_sub(VNET_HDR_LEN);
    let single = WireSize {
        packets: 1,
        bytes: packet_len as u64,
    };
    segments(frame).map_or(single, |(count, header_len)| WireSize {
        packets: count as u64,
        bytes: (packet_len + (count - 1) * header_len) as u64,
    })
}

/// For a super-packet: how many segments, and the IP + transport header length each
/// repeats. `None` if the frame is one packet or unreadable.
fn segments(frame: &[u8]) -> Option<(usize, usize)> {
    let header = frame.get(..VNET_HDR_LEN)?;
    let gso_type = header[1] & !GSO_ECN;
    if gso_type == 0 {
        return None;
    }
    let gso_size = usize::from(u16::from_ne_bytes([header[4], header[5]]));
    let transport_start = usize::from(u16::from_ne_bytes([header[6], header[7]]));
    let packet = &frame[VNET_HDR_LEN..];
    let transport_header_len = if gso_type == GSO_UDP_L4 {
        UDP_HEADER_LEN
    } else {
        usize::from(packet.get(transport_start + 12)? >> 4) * 4
    };
    let header_len = transport_start + transport_header_len;
    let payload = packet.len().checked_sub(header_len)?;
    if gso_size == 0 {
        return None;
    }
    Some((payload.div_ceil(gso_size).max(1), header_len))
}

/// Splits one frame (vnet header included) into complete IP packets with their
/// checksums filled in, appended to `out`: UDP GSO batches here, the rest by
/// `wiremesh_wg::offload::split`.
pub fn split(frame: &[u8], out: &mut Vec<BytesMut>) -> Result<(), OffloadError> {
    let header = frame.get(..VNET_HDR_LEN).ok_or(OffloadError::Truncated)?;
    if header[1] != GSO_UDP_L4 {
        return offload::split(frame, out);
    }
    let gso_size = usize::from(u16::from_ne_bytes([header[4], header[5]]));
    let udp_start = usize::from(u16::from_ne_bytes([header[6], header[7]]));
    let packet = &frame[VNET_HDR_LEN..];
    let (v4, ip_len, proto) = match packet.first().map(|b| b >> 4) {
        Some(4) => (true, usize::from(packet[0] & 0x0f) * 4, packet.get(9)),
        Some(6) => (false, 40, packet.get(6)),
        _ => return Err(OffloadError::Unsupported),
    };
    // IPv6 extension headers would move the UDP header; the kernel sends none here.
    if proto != Some(&PROTO_UDP) || udp_start != ip_len || ip_len < 20 || gso_size == 0 {
        return Err(OffloadError::Unsupported);
    }
    let header_len = ip_len + UDP_HEADER_LEN;
    let payload = packet.get(header_len..).ok_or(OffloadError::Truncated)?;
    let addresses = if v4 { &packet[12..20] } else { &packet[8..40] };
    // The addresses' share of the pseudo-header sum, folded (RFC 1071 sums may be
    // folded at any point).
    let address_sum = u64::from(!checksum(0, addresses));
    let id = u16::from_be_bytes([
        packet.get(4).copied().unwrap_or(0),
        packet.get(5).copied().unwrap_or(0),
    ]);
    for (i, chunk) in payload.chunks(gso_size).enumerate() {
        let mut segment = BytesMut::with_capacity(header_len + chunk.len());
        segment.extend_from_slice(&packet[..header_len]);
        segment.extend_from_slice(chunk);
        let total = segment.len();
        let udp_len = (UDP_HEADER_LEN + chunk.len()) as u16;
        if v4 {
            segment[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            segment[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
            segment[10..12].fill(0);
            let ip_checksum = checksum(0, &segment[..ip_len]);
            segment[10..12].copy_from_slice(&ip_checksum.to_be_bytes());
        } else {
            segment[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        }
        segment[ip_len + 4..ip_len + 6].copy_from_slice(&udp_len.to_be_bytes());
        segment[ip_len + 6..ip_len + 8].fill(0);
        let pseudo = address_sum + u64::from(PROTO_UDP) + u64::from(udp_len);
        // A computed 0 is sent as 0xffff: 0 means "no checksum" (RFC 768).
        let udp_checksum = match checksum(pseudo, &segment[ip_len..]) {
            0 => 0xffff,
            c => c,
        };
        segment[ip_len + 6..ip_len + 8].copy_from_slice(&udp_checksum.to_be_bytes());
        out.push(segment);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame: vnet header with `gso_type`/`gso_size`, a 20-byte IPv4 header, a
    /// 32-byte TCP header and `payload` bytes.
    fn frame(gso_type: u8, gso_size: u16, payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN + 20 + 32 + payload];
        f[0] = 1; // needs checksum
        f[1] = gso_type;
        f[4..6].copy_from_slice(&gso_size.to_ne_bytes());
        f[6..8].copy_from_slice(&20u16.to_ne_bytes());
        f[VNET_HDR_LEN] = 0x45;
        f[VNET_HDR_LEN + 20 + 12] = 8 << 4;
        f
    }

    #[test]
    fn a_super_packet_counts_as_its_segments_each_with_headers() {
        // 3000 bytes at MSS 1448: 1448 + 1448 + 104, each behind 52 bytes of headers.
        let f = frame(1, 1448, 3000);
        assert_eq!(
            wire_size(&f),
            WireSize {
                packets: 3,
                bytes: 3000 + 3 * 52
            }
        );
    }

    /// A UDP GSO frame of `payload` bytes cut at `gso_size`, IPv4 or IPv6, with the
    /// checksum partial as the kernel leaves it.
    fn udp_frame(v4: bool, gso_size: u16, payload: &[u8]) -> Vec<u8> {
        let ip_len = if v4 { 20 } else { 40 };
        let mut f = vec![0u8; VNET_HDR_LEN];
        f[0] = 1;
        f[1] = GSO_UDP_L4;
        f[4..6].copy_from_slice(&gso_size.to_ne_bytes());
        f[6..8].copy_from_slice(&(ip_len as u16).to_ne_bytes());
        f[8..10].copy_from_slice(&6u16.to_ne_bytes());
        let mut ip = vec![0u8; ip_len];
        let total = ip_len + 8 + payload.len();
        if v4 {
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&0xfffeu16.to_be_bytes());
            ip[8] = 64;
            ip[9] = PROTO_UDP;
            ip[12..20].copy_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        } else {
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            ip[6] = PROTO_UDP;
            ip[7] = 64;
            ip[23] = 1;
            ip[39] = 2;
        }
        f.extend_from_slice(&ip);
        f.extend_from_slice(&51820u16.to_be_bytes());
        f.extend_from_slice(&51821u16.to_be_bytes());
        f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0xab, 0xcd]); // a partial sum, to be replaced
        f.extend_from_slice(payload);
        f
    }

    /// The Internet checksum, bit by bit (an independent reference).
    fn reference_sum(words: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for pair in words.chunks(2) {
            let word = u32::from(pair[0]) << 8 | u32::from(*pair.get(1).unwrap_or(&0));
            sum += word;
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    #[test]
    fn udp_gso_batches_split_into_checksummed_datagrams() {
        let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
        for v4 in [true, false] {
            let f = udp_frame(v4, 1400, &payload);
            assert_eq!(wire_size(&f).packets, 3);
            let mut out = Vec::new();
            split(&f, &mut out).unwrap();
            let ip_len = if v4 { 20 } else { 40 };
            assert_eq!(
                out.iter().map(|s| s.len() - ip_len - 8).collect::<Vec<_>>(),
                [1400, 1400, 200]
            );
            let mut joined = Vec::new();
            for (i, s) in out.iter().enumerate() {
                joined.extend_from_slice(&s[ip_len + 8..]);
                let udp_len = u16::from_be_bytes([s[ip_len + 4], s[ip_len + 5]]);
                assert_eq!(usize::from(udp_len), s.len() - ip_len);
                let (addresses, len_ok) = if v4 {
                    assert_eq!(reference_sum(&s[..20]), 0xffff, "IPv4 header checksum");
                    assert_eq!(
                        u16::from_be_bytes([s[4], s[5]]),
                        0xfffe_u16.wrapping_add(i as u16)
                    );
                    (
                        &s[12..20],
                        usize::from(u16::from_be_bytes([s[2], s[3]])) == s.len(),
                    )
                } else {
                    (
                        &s[8..40],
                        usize::from(u16::from_be_bytes([s[4], s[5]])) == s.len() - 40,
                    )
                };
                assert!(len_ok, "IP length of segment {i}");
                let mut pseudo = addresses.to_vec();
                pseudo.extend_from_slice(&[0, PROTO_UDP]);
                pseudo.extend_from_slice(&udp_len.to_be_bytes());
                pseudo.extend_from_slice(&s[ip_len..]);
                assert_eq!(
                    reference_sum(&pseudo),
                    0xffff,
                    "UDP checksum of segment {i}"
                );
            }
            assert_eq!(joined, payload);
        }
    }

    #[test]
    fn plain_and_unreadable_frames_count_as_one_packet() {
        let plain = frame(0, 0, 100);
        assert_eq!(
            wire_size(&plain),
            WireSize {
                packets: 1,
                bytes: 152
            }
        );
        let no_mss = frame(1, 0, 3000);
        assert_eq!(wire_size(&no_mss).packets, 1);
        let truncated = &frame(1, 1448, 0)[..VNET_HDR_LEN + 10];
        assert_eq!(
            wire_size(truncated),
            WireSize {
                packets: 1,
                bytes: 10
            }
        );
        assert_eq!(
            wire_size(&[]),
            WireSize {
                packets: 1,
                bytes: 0
            }
        );
    }
}
