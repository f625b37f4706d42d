//! The hub: TUN ports in the hosts' network namespaces, forwarding between them.

use ipnet::IpNet;

use crate::link::{DropReason, Impairment};
use crate::WanemError;

/// One host's port on the hub: a TUN interface created inside `netns`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    /// The host's network namespace (a name under `/var/run/netns`).
    pub netns: String,
    /// The TUN interface's name inside it.
    pub ifname: String,
    /// Addresses given to the interface; their prefixes become routes via the port.
    pub addresses: Vec<IpNet>,
    pub mtu: u16,
}

/// Counters of one directed link.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub from: usize,
    pub to: usize,
    /// Packets and bytes that passed the link model (delivered or in flight).
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    pub dropped_link_down: u64,
    pub dropped_random_loss: u64,
    pub dropped_burst_loss: u64,
    pub dropped_queue_overflow: u64,
    /// Packets whose bytes contain the pattern set by [`Hub::watch_for`].
    pub pattern_packets: u64,
}

impl LinkStats {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        match reason {
            DropReason::LinkDown => self.dropped_link_down,
            DropReason::RandomLoss => self.dropped_random_loss,
            DropReason::BurstLoss => self.dropped_burst_loss,
            DropReason::QueueOverflow => self.dropped_queue_overflow,
        }
    }
}

/// A running WAN emulator. Drop stops its threads and removes its TUN ports.
#[derive(Debug)]
pub struct Hub;

impl Hub {
    /// Creates port `i` from `ports[i]` and starts forwarding with no impairment.
    pub fn start(_seed: u64, _ports: Vec<PortSpec>) -> Result<Hub, WanemError> {
        Err(WanemError::Invalid {
            field: "hub".into(),
            reason: "not implemented yet".into(),
        })
    }

    /// Sets the impairment of the direction `from` → `to`.
    pub fn set_link(
        &self,
        _from: usize,
        _to: usize,
        impairment: Impairment,
    ) -> Result<(), WanemError> {
        impairment.validate()
    }

    /// Sets the impairment of every direction.
    pub fn set_all(&self, impairment: Impairment) -> Result<(), WanemError> {
        impairment.validate()
    }

    /// Replaces a port's addresses, on the TUN interface in its namespace too (a host
    /// whose address changes).
    pub fn set_port_addresses(
        &self,
        _port: usize,
        _addresses: Vec<IpNet>,
    ) -> Result<(), WanemError> {
        Ok(())
    }

    /// Counters per directed link.
    pub fn stats(&self) -> Vec<LinkStats> {
        Vec::new()
    }

    /// Packets from each port that had no destination port (index = port).
    pub fn unroutable(&self) -> Vec<u64> {
        Vec::new()
    }

    /// Starts counting packets whose bytes contain `pattern` ([`LinkStats::pattern_packets`]),
    /// e.g. a plaintext HTTP marker that must never cross the underlay; an empty pattern
    /// stops counting.
    pub fn watch_for(&self, _pattern: &[u8]) {}
}
