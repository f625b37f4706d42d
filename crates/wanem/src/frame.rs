//! What a TUN read holds when the ports carry a `virtio_net_hdr` (`IFF_VNET_HDR` with
//! TCP segmentation offload): one IP packet, or a TCP "super-packet" of up to 64 KiB
//! that stands for several wire packets. An unimpaired link passes super-packets on
//! whole (one read and one write instead of forty); the stats still count the wire
//! packets they stand for.

use wiremesh_wg::offload::VNET_HDR_LEN;

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

/// For a TCP super-packet: how many segments, and the IP + TCP header length each
/// repeats. `None` if the frame is one packet or unreadable.
fn segments(frame: &[u8]) -> Option<(usize, usize)> {
    let header = frame.get(..VNET_HDR_LEN)?;
    // gso_type: 0 is none; the ECN bit (0x80) may ride along.
    if header[1] & !0x80 == 0 {
        return None;
    }
    let gso_size = usize::from(u16::from_ne_bytes([header[4], header[5]]));
    let tcp_start = usize::from(u16::from_ne_bytes([header[6], header[7]]));
    let packet = &frame[VNET_HDR_LEN..];
    let tcp_header_len = usize::from(packet.get(tcp_start + 12)? >> 4) * 4;
    let header_len = tcp_start + tcp_header_len;
    let payload = packet.len().checked_sub(header_len)?;
    if gso_size == 0 {
        return None;
    }
    Some((payload.div_ceil(gso_size).max(1), header_len))
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
