//! The Linux TUN adapter: open `/dev/net/tun` as a layer-3 interface without packet
//! information headers (`IFF_TUN | IFF_NO_PI`), set its MTU, bring it up, and read
//! and write whole IP packets.
//!
//! The descriptor is non-blocking: readers wait with `poll(2)` and a timeout (so the
//! reading thread notices shutdown), then may drain what is queued.
//! When the interface is deleted (`ip link del`), reads fail with `EBADFD`, which the
//! runtime treats as "stop".

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

/// Default MTU, as wireguard-go and wg-quick use: 1500 minus IPv6 (40) + UDP (8) +
/// WireGuard (32) overheads.
pub const DEFAULT_MTU: u16 = 1420;

/// The segmentation offloads a TUN device is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offload {
    /// Plain packets, no vnet header.
    None,
    /// Checksum and TCP segmentation offload: reads may be TCP super-packets.
    Tcp,
    /// Also UDP segmentation offload (Linux 6.2+): a sender's UDP GSO batch is one read.
    TcpAndUdp,
}

/// An open TUN interface. Closing it (drop) deletes the interface.
#[derive(Debug)]
pub struct Tun {
    file: File,
    name: String,
    /// Reads and writes carry a `virtio_net_hdr` and reads may be TSO super-packets
    /// (see [`crate::offload`]).
    vnet_hdr: bool,
}

#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

#[repr(C)]
struct IfReqInt {
    name: [libc::c_char; libc::IFNAMSIZ],
    value: libc::c_int,
    _pad: [u8; 20],
}

fn ifname_bytes(name: &str) -> io::Result<[libc::c_char; libc::IFNAMSIZ]> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name must be 1-15 bytes without '/', space or NUL",
        ));
    }
    let mut out = [0 as libc::c_char; libc::IFNAMSIZ];
    for (o, b) in out.iter_mut().zip(name.bytes()) {
        *o = b as libc::c_char;
    }
    Ok(out)
}

/// A datagram socket used only as a handle for interface ioctls.
fn ioctl_socket() -> io::Result<File> {
    // SAFETY: plain socket(2) call; the fd is owned by the returned File.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, owned descriptor.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Runs `f` on a thread that has joined the network namespace at `path`: interface
/// ioctls and new devices act on that namespace, the caller's stays as it was.
fn in_netns<T: Send>(path: &str, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let ns = File::open(path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on a valid namespace descriptor; it affects only this
                // short-lived thread.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Waits up to `timeout` until any of `fds` can be read; which ones can (none on
/// timeout or a signal).
pub fn wait_readable<const N: usize>(fds: [RawFd; N], timeout: Duration) -> io::Result<[bool; N]> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: N valid pollfds.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), N as libc::nfds_t, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok([false; N])
        } else {
            Err(e)
        };
    }
    Ok(pfds.map(|p| p.revents != 0))
}

impl Tun {
    /// Creates (or attaches to) the TUN interface `name`, asking for `offload` and
    /// settling for less (down to plain packets) if the kernel refuses.
    pub fn create(name: &str, offload: Offload) -> io::Result<Self> {
        Self::create_queue(name, offload, false)
    }

    /// [`Self::create`] with `queues` queues (`IFF_MULTI_QUEUE`): each queue is its
    /// own descriptor with its own packet ring, so several threads can drain packets
    /// the kernel sends. Falls back to one queue where the kernel refuses (an existing
    /// single-queue interface of that name), and to fewer where it refuses more.
    pub fn create_queues(name: &str, offload: Offload, queues: usize) -> io::Result<Vec<Self>> {
        if queues > 1 {
            match Self::create_queue(name, offload, true) {
                Ok(first) => {
                    let (name, vnet_hdr) = (first.name.clone(), first.vnet_hdr);
                    let mut all = vec![first];
                    // Every queue must carry the same flags as the first. Fewer
                    // queues than asked for still make a working device.
                    for _ in 1..queues {
                        match Self::open(&name, vnet_hdr, true) {
                            Ok(q) => all.push(q),
                            Err(e) => {
                                tracing::info!(error = %e, queues = all.len(), "no more TUN queues");
                                break;
                            }
                        }
                    }
                    return Ok(all);
                }
                Err(e) => {
                    tracing::info!(error = %e, "multi-queue TUN unavailable; using one queue")
                }
            }
        }
        Ok(vec![Self::create(name, offload)?])
    }

    fn create_queue(name: &str, offload: Offload, multi: bool) -> io::Result<Self> {
        const TCP: libc::c_uint = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        const UDP: libc::c_uint = libc::TUN_F_USO4 | libc::TUN_F_USO6;
        let wanted: &[libc::c_uint] = match offload {
            Offload::None => &[],
            Offload::Tcp => &[TCP],
            Offload::TcpAndUdp => &[TCP | UDP, TCP],
        };
        if !wanted.is_empty() {
            match Self::open(name, true, multi) {
                Ok(tun) => {
                    for features in wanted {
                        // SAFETY: TUNSETOFFLOAD takes its argument by value.
                        let rc = unsafe {
                            libc::ioctl(
                                tun.fd(),
                                libc::TUNSETOFFLOAD,
                                libc::c_ulong::from(*features),
                            )
                        };
                        if rc == 0 {
                            return Ok(tun);
                        }
                    }
                    tracing::info!(
                        error = %io::Error::last_os_error(),
                        "TUN offloads unavailable; using plain packets"
                    );
                }
                Err(e) => tracing::info!(error = %e, "TUN vnet header unavailable"),
            }
        }
        Self::open(name, false, multi)
    }

    fn open(name: &str, vnet_hdr: bool, multi: bool) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            // Non-blocking: a reader drains what is queued after one `poll` and must
            // not sleep in `read` when the queue is empty.
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open("/dev/net/tun")?;
        let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
        if vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        if multi {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut req = IfReqFlags {
            name: ifname_bytes(name)?,
            flags: flags as libc::c_short,
            _pad: [0; 22],
        };
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is laid out as.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let len = req
            .name
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(req.name.len());
        let name = req.name[..len].iter().map(|&c| c as u8 as char).collect();
        Ok(Self {
            file,
            name,
            vnet_hdr,
        })
    }

    /// Creates the TUN interface `name` inside the network namespace at `netns` (a
    /// path such as `/var/run/netns/NAME`), with `offload`, MTU `mtu`, up. The
    /// descriptor works from any namespace; closing it deletes the interface.
    pub fn create_in_netns(
        netns: &str,
        name: &str,
        offload: Offload,
        mtu: u16,
    ) -> io::Result<Self> {
        in_netns(netns, || {
            let tun = Self::create(name, offload)?;
            tun.set_mtu(mtu)?;
            tun.set_up()?;
            Ok(tun)
        })
    }

    /// [`Self::set_mtu`] for an interface made by [`Self::create_in_netns`].
    pub fn set_mtu_in(&self, netns: &str, mtu: u16) -> io::Result<()> {
        in_netns(netns, || self.set_mtu(mtu))
    }

    /// Whether reads and writes carry a `virtio_net_hdr` (offloads on).
    pub fn has_vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// The kernel's name for the interface.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the interface still exists. Asks the TUN file descriptor itself
    /// (`TUNGETIFF` fails once the interface is deleted), so the answer does not depend
    /// on which network namespace the calling thread is in.
    pub fn is_attached(&self) -> bool {
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes an ifreq, which `req` is laid out as.
        unsafe { libc::ioctl(self.fd(), libc::TUNGETIFF, &mut req) == 0 }
    }

    /// Sets the MTU.
    pub fn set_mtu(&self, mtu: u16) -> io::Result<()> {
        let sock = ioctl_socket()?;
        let mut req = IfReqInt {
            name: ifname_bytes(&self.name)?,
            value: libc::c_int::from(mtu),
            _pad: [0; 20],
        };
        // SAFETY: SIOCSIFMTU reads an ifreq with ifr_mtu, laid out as `req`.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The current MTU.
    pub fn mtu(&self) -> io::Result<u16> {
        let sock = ioctl_socket()?;
        let mut req = IfReqInt {
            name: ifname_bytes(&self.name)?,
            value: 0,
            _pad: [0; 20],
        };
        // SAFETY: SIOCGIFMTU writes ifr_mtu into an ifreq laid out as `req`.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        u16::try_from(req.value).map_err(|_| io::Error::other("MTU out of range"))
    }

    /// Brings the interface up.
    pub fn set_up(&self) -> io::Result<()> {
        let sock = ioctl_socket()?;
        let mut req = IfReqFlags {
            name: ifname_bytes(&self.name)?,
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: SIOCGIFFLAGS / SIOCSIFFLAGS use an ifreq with ifr_flags, as `req`.
        unsafe {
            if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
                return Err(io::Error::last_os_error());
            }
            req.flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Waits up to `timeout` until a read would find a packet; `false` on timeout.
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        let [ready] = wait_readable([self.fd()], timeout)?;
        Ok(ready)
    }

    /// Waits up to `timeout` for a packet and reads it into `buf`; `Ok(None)` on
    /// timeout.
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        if !self.wait_readable(timeout)? {
            return Ok(None);
        }
        self.try_recv(buf)
    }

    /// Reads one packet into `buf` if one is queued; `Ok(None)` if none is.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
                _ => Err(e),
            };
        }
        // The interface vanished under us: poll reports readable, read returns 0.
        if n == 0 {
            return Err(io::Error::from_raw_os_error(libc::EBADFD));
        }
        Ok(Some(n as usize))
    }

    /// Writes one frame that already starts with its vnet header (see
    /// [`crate::offload::coalesce`]); only for a TUN with [`Self::has_vnet_hdr`].
    pub fn send_frame(&self, frame: &[u8]) -> io::Result<()> {
        if !self.vnet_hdr {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        // SAFETY: frame is valid for frame.len() bytes.
        let n = unsafe { libc::write(self.fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Writes one IP packet.
    pub fn send(&self, packet: &[u8]) -> io::Result<()> {
        // With a vnet header, an all-zero one says "no offload, checksums complete".
        let hdr = [0u8; crate::offload::VNET_HDR_LEN];
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut libc::c_void,
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: packet.as_ptr() as *mut libc::c_void,
                iov_len: packet.len(),
            },
        ];
        let iov = if self.vnet_hdr { &iov[..] } else { &iov[1..] };
        // SAFETY: every iovec points at a live buffer of its length; writev only reads.
        let n = unsafe { libc::writev(self.fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.fd()
    }
}
