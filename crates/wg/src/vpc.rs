//! VPCs in the data plane: one TUN device per VPC, created inside the VPC's network
//! namespace, whose packets cross the mesh inside an IPv6 header naming the sending
//! node, the receiving node and the VPC ([`wiremesh_vpc::wire`]).
//!
//! Sending: a packet read from VPC `v`'s TUN device is routed by its inner destination
//! to the member node whose pod CIDR holds it, wrapped, and then handled like any
//! packet from the main TUN device (cryptokey routing finds the peer by the outer
//! destination, the node's `/64`). Receiving: a decrypted packet whose outer
//! destination is one of this node's VPC addresses is checked
//! ([`MemberTable::decapsulate`]) and written to that VPC's TUN device, or dropped and
//! counted; every other packet goes to the main TUN device as before (a location
//! leader forwards other nodes' VPC packets there).
//!
//! The table comes whole from the agent (`set_vpcs=1`, [`VpcsRequest`]) and is swapped
//! atomically; TUN devices of VPCs that stay are kept, so their pods see no gap.

use std::collections::BTreeMap;
use std::io;
use std::net::Ipv6Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;

use wiremesh_uapi::{DeviceStats, Errno, VpcsRequest};
use wiremesh_vpc::wire::{DropReason, MemberTable, MeshPrefix, Verdict, HEADER_LEN};
use wiremesh_vpc::{NodeId, VpcId};

use crate::tun::{Offload, Tun};

/// The name of the TUN device in every VPC namespace.
pub const VPC_TUN_NAME: &str = "wm-vpc";

/// One VPC's TUN device and the thread reading it.
struct Port {
    tun: Arc<Tun>,
    netns: String,
    mtu: u16,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl Port {
    fn close(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// What [`Vpcs::receive`] did with a decrypted packet.
pub(crate) enum Received {
    /// Not addressed to a VPC of this node: the main TUN device takes it.
    NotVpc,
    /// Delivered to, or dropped for, a VPC of this node.
    Handled,
}

/// The VPC side of a device: the member table, the open TUN devices, the counters.
#[derive(Default)]
pub(crate) struct Vpcs {
    table: RwLock<Option<Arc<MemberTable>>>,
    ports: Mutex<BTreeMap<VpcId, Port>>,
    sent: AtomicU64,
    delivered: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
}

/// Starts the thread that reads one VPC's TUN device until `stop` is set.
pub(crate) type SpawnReader<'a> =
    &'a dyn Fn(VpcId, Arc<Tun>, Arc<AtomicBool>) -> io::Result<JoinHandle<()>>;

impl Vpcs {
    /// Replaces the table with `req`: opens the TUN devices of new VPCs (inside their
    /// namespaces), closes those of VPCs no longer listed, and swaps the table.
    pub(crate) fn apply(&self, req: &VpcsRequest, spawn_reader: SpawnReader<'_>) -> Errno {
        let prefix = match MeshPrefix::new(req.mesh_prefix) {
            Ok(p) => p,
            Err(_) => return Errno::EINVAL,
        };
        let table = MemberTable::new(
            prefix,
            NodeId(req.local_node),
            req.vpcs.iter().map(|v| {
                let members = v.members.iter().map(|(n, c)| (NodeId(*n), *c)).collect();
                (VpcId(v.id), members)
            }),
        );
        let mut ports = self.ports.lock().unwrap_or_else(PoisonError::into_inner);
        // Close what went away or moved (another namespace), or whose reader died
        // (its namespace was deleted under it).
        let stale: Vec<VpcId> = ports
            .iter()
            .filter(|(id, p)| {
                !req.vpcs
                    .iter()
                    .any(|v| VpcId(v.id) == **id && v.netns == p.netns)
                    || p.reader.as_ref().is_none_or(|r| r.is_finished())
            })
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some(p) = ports.remove(&id) {
                p.close();
            }
        }
        let mut result = Errno::OK;
        for v in &req.vpcs {
            let id = VpcId(v.id);
            if let Some(p) = ports.get_mut(&id) {
                if p.mtu != v.mtu {
                    match p.tun.set_mtu_in(&v.netns, v.mtu) {
                        Ok(()) => p.mtu = v.mtu,
                        Err(e) => {
                            tracing::warn!(vpc = v.id, error = %e, "setting the VPC TUN MTU failed");
                            result = Errno::EIO;
                        }
                    }
                }
                continue;
            }
            let opened = Tun::create_in_netns(&v.netns, VPC_TUN_NAME, Offload::None, v.mtu)
                .and_then(|tun| {
                    let tun = Arc::new(tun);
                    let stop = Arc::new(AtomicBool::new(false));
                    let reader = spawn_reader(id, Arc::clone(&tun), Arc::clone(&stop))?;
                    Ok(Port {
                        tun,
                        netns: v.netns.clone(),
                        mtu: v.mtu,
                        stop,
                        reader: Some(reader),
                    })
                });
            match opened {
                Ok(port) => {
                    tracing::info!(vpc = v.id, netns = %v.netns, "VPC TUN device up");
                    ports.insert(id, port);
                }
                Err(e) => {
                    tracing::warn!(vpc = v.id, netns = %v.netns, error = %e, "opening the VPC TUN device failed");
                    result = Errno::EIO;
                }
            }
        }
        *self.table.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(table));
        result
    }

    fn table(&self) -> Option<Arc<MemberTable>> {
        self.table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Wraps the inner packet `frame[HEADER_LEN..]` read from `vpc`'s TUN device for
    /// the node that hosts its destination; `false` if no member node does (or it is
    /// this node: local pods never need the tunnel).
    pub(crate) fn encapsulate(&self, vpc: VpcId, frame: &mut [u8]) -> bool {
        let Some(table) = self.table() else {
            return false;
        };
        let Some(dst) = frame
            .get(HEADER_LEN..)
            .and_then(crate::device::ip_destination)
        else {
            return false;
        };
        let Some((node, outer_src, outer_dst)) = table.route(vpc, dst) else {
            return false;
        };
        if node == table.local().1 {
            return false;
        }
        if wiremesh_vpc::wire::encapsulate(frame, outer_src, outer_dst).is_err() {
            return false;
        }
        self.sent.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Checks a decrypted packet and delivers it to its VPC's TUN device if it is
    /// addressed to a VPC of this node.
    ///
    /// Cryptokey routing has already accepted the outer source as one of the sending
    /// peer's allowed IPs (a node's `/64`), so the outer source names the sending node.
    pub(crate) fn receive(&self, packet: &[u8]) -> Received {
        // Checked before the table's lock: most packets are IPv4 and never need it.
        if packet.first().map(|b| b >> 4) != Some(6) {
            return Received::NotVpc;
        }
        let Some(table) = self.table() else {
            return Received::NotVpc;
        };
        let (prefix, local) = table.local();
        let outer = |range: std::ops::Range<usize>| -> Option<(NodeId, VpcId)> {
            let octets: [u8; 16] = packet.get(range)?.try_into().ok()?;
            prefix.parse_vpc_address(&Ipv6Addr::from(octets))
        };
        match outer(24..40) {
            Some((node, vpc)) if node == local && vpc != VpcId(0) => {}
            _ => return Received::NotVpc,
        }
        let peer = outer(8..24).map_or(NodeId(u16::MAX), |(node, _)| node);
        match table.decapsulate(packet, peer) {
            Verdict::Deliver { vpc, inner } => {
                let ports = self.ports.lock().unwrap_or_else(PoisonError::into_inner);
                match (ports.get(&vpc), packet.get(inner)) {
                    (Some(port), Some(inner)) => {
                        if let Err(e) = port.tun.send(inner) {
                            tracing::trace!(vpc = vpc.0, error = %e, "VPC TUN write failed");
                        } else {
                            self.delivered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // The table names the VPC but its TUN device could not be opened.
                    _ => self.count_drop(DropReason::UnknownVpc),
                }
            }
            Verdict::Drop(reason) => self.count_drop(reason),
        }
        Received::Handled
    }

    fn count_drop(&self, reason: DropReason) {
        if let Some(i) = DropReason::ALL.iter().position(|r| *r == reason) {
            self.dropped[i].fetch_add(1, Ordering::Relaxed);
        }
        tracing::trace!(reason = reason.as_str(), "dropped a VPC packet");
    }

    /// The VPC part of the device's statistics.
    pub(crate) fn stats(&self) -> DeviceStats {
        DeviceStats {
            vpcs: self
                .ports
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .keys()
                .map(|id| id.0)
                .collect(),
            vpc_sent: self.sent.load(Ordering::Relaxed),
            vpc_delivered: self.delivered.load(Ordering::Relaxed),
            dropped: DropReason::ALL
                .iter()
                .zip(&self.dropped)
                .map(|(r, n)| (r.as_str().to_owned(), n.load(Ordering::Relaxed)))
                .collect(),
        }
    }

    /// Closes every VPC TUN device (device shutdown).
    pub(crate) fn close_all(&self) {
        let ports = std::mem::take(&mut *self.ports.lock().unwrap_or_else(PoisonError::into_inner));
        for p in ports.into_values() {
            p.close();
        }
    }
}
