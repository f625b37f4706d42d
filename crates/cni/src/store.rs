//! The IPAM store on disk, laid out like host-local's so operators know it:
//! `<dataDir>/<network>/<ip>` holds `containerID\r\nifname` of the holder,
//! `last_reserved_ip` the last address handed out, and `lock` is flocked while a
//! command reads or changes the folder.
//!
//! Files survive plugin and node restarts, so a running pod keeps its address. The
//! lock is exclusive and held from reading the allocations to writing the new one,
//! which is what makes parallel ADDs get distinct addresses; the kernel drops it when
//! the process dies, so a crash never leaves the store locked.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::config::Attachment;
use crate::error::CniError;
use crate::ipam::Taken;

const LOCK: &str = "lock";
const LAST: &str = "last_reserved_ip";

/// Allocations of one network; the lock is held until this is dropped.
pub struct Store {
    dir: PathBuf,
    _lock: Flock<File>,
}

/// An owner record as host-local writes it (it also reads plain `\n`).
fn encode(owner: &Attachment) -> String {
    format!("{}\r\n{}", owner.container_id, owner.ifname)
}

pub fn decode(text: &str) -> Option<Attachment> {
    let mut lines = text.lines().map(str::trim);
    let container_id = lines.next().filter(|s| !s.is_empty())?.to_owned();
    let ifname = lines.next().filter(|s| !s.is_empty())?.to_owned();
    Some(Attachment {
        container_id,
        ifname,
    })
}

impl Store {
    /// Open (creating) `<data_dir>/<network>` and take its lock, waiting for it.
    pub fn open(data_dir: &Path, network: &str) -> Result<Store, CniError> {
        let dir = data_dir.join(network);
        fs::create_dir_all(&dir)
            .map_err(|e| CniError::io(format!("creating IPAM store {}", dir.display()), e))?;
        let lock_path = dir.join(LOCK);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| CniError::io(format!("opening {}", lock_path.display()), e))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| {
            CniError::io(format!("locking {}", lock_path.display()), errno.into())
        })?;
        Ok(Store { dir, _lock: lock })
    }

    /// Every allocated address and its holder (`None`: the record is unreadable).
    /// Addresses of either family: stores older than IPv6-only pools hold IPv4 ones.
    pub fn allocations(&self) -> Result<Taken, CniError> {
        let entries = fs::read_dir(&self.dir)
            .map_err(|e| CniError::io(format!("listing {}", self.dir.display()), e))?;
        let mut out = Taken::new();
        for entry in entries.flatten() {
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<IpAddr>().ok())
            else {
                continue;
            };
            let owner = fs::read_to_string(entry.path())
                .ok()
                .and_then(|t| decode(&t));
            out.insert(ip, owner);
        }
        Ok(out)
    }

    /// Record `owner` as the holder of `ip`; fails if someone holds it already.
    pub fn reserve(&self, ip: IpAddr, owner: &Attachment) -> Result<(), CniError> {
        let path = self.dir.join(ip.to_string());
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)?;
            f.write_all(encode(owner).as_bytes())?;
            // The record must outlive a power cut: a pod keeps using the address.
            f.sync_all()
        };
        write().map_err(|e| CniError::io(format!("reserving {}", path.display()), e))?;
        // Only a hint for round-robin: losing it costs nothing.
        let _ = fs::write(self.dir.join(LAST), ip.to_string());
        Ok(())
    }

    /// Forget `ip`; a missing record is fine (DEL is idempotent).
    pub fn release(&self, ip: IpAddr) -> Result<(), CniError> {
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                Err(CniError::io(format!("releasing {}", path.display()), e))
            }
            _ => Ok(()),
        }
    }

    pub fn last_reserved(&self) -> Option<IpAddr> {
        fs::read_to_string(self.dir.join(LAST))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_records_round_trip_and_read_host_local() {
        let a = Attachment {
            container_id: "c1".into(),
            ifname: "eth0".into(),
        };
        assert_eq!(decode(&encode(&a)), Some(a.clone()));
        assert_eq!(decode("c1\neth0\n"), Some(a));
        assert_eq!(decode(""), None);
        assert_eq!(decode("c1"), None);
    }

    #[test]
    fn reserve_release_and_survive_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let a = Attachment {
            container_id: "c1".into(),
            ifname: "eth0".into(),
        };
        for ip in ["10.42.1.9", "fd10:0:0:3::9"] {
            let ip: IpAddr = ip.parse().unwrap();
            {
                let s = Store::open(dir, "net").unwrap();
                s.reserve(ip, &a).unwrap();
                assert!(s.reserve(ip, &a).is_err(), "double reservation");
            }
            let s = Store::open(dir, "net").unwrap();
            assert_eq!(s.allocations().unwrap().get(&ip), Some(&Some(a.clone())));
            assert_eq!(s.last_reserved(), Some(ip));
            s.release(ip).unwrap();
            s.release(ip).unwrap();
            assert!(s.allocations().unwrap().is_empty());
        }
    }

    /// A node upgraded in place keeps its pods' leases: files as the IPv4-only
    /// store wrote them (host-local's layout) read as before.
    #[test]
    fn reads_a_store_written_before_ipv6_pools() {
        let tmp = tempfile::tempdir().unwrap();
        let net = tmp.path().join("net");
        fs::create_dir_all(&net).unwrap();
        fs::write(net.join("10.42.1.7"), "c1\r\neth0").unwrap();
        fs::write(net.join("10.42.1.8"), "garbled").unwrap();
        fs::write(net.join(LAST), "10.42.1.8").unwrap();
        fs::write(net.join(LOCK), "").unwrap();
        let s = Store::open(tmp.path(), "net").unwrap();
        let taken = s.allocations().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            taken.into_iter().collect::<Vec<_>>(),
            vec![
                (
                    ip("10.42.1.7"),
                    Some(Attachment {
                        container_id: "c1".into(),
                        ifname: "eth0".into()
                    })
                ),
                (ip("10.42.1.8"), None)
            ]
        );
        assert_eq!(s.last_reserved(), Some(ip("10.42.1.8")));
    }
}
