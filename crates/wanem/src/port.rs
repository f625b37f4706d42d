//! A hub port's TUN interface, opened for forwarding: a `virtio_net_hdr` on every
//! read and write, with checksum, TCP and UDP segmentation offload when the kernel
//! grants them, and a non-blocking descriptor so a reader drains its queue with one
//! `poll` per batch.
//!
//! Unlike a VPN's TUN (`wiremesh_wg::tun`), the hub also asks for UDP segmentation
//! offload (`TUN_F_USO4/6`, Linux 6.2+): a VPN that sends with UDP GSO hands the hub
//! one read per batch of datagrams, which an unimpaired link passes on whole, as a
//! wire with GRO at the receiver would. MTU, addresses and link state are set with
//! iproute2 by the hub.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use wiremesh_wg::offload::VNET_HDR_LEN;

/// An open TUN interface; closing it (drop) deletes the interface.
#[derive(Debug)]
pub struct PortTun {
    file: File,
    /// Reads and writes carry a vnet header (offloads on).
    vnet_hdr: bool,
}

#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl PortTun {
    /// Creates TUN interface `name` in the calling thread's network namespace, with
    /// as many offloads as the kernel grants (none: plain packets).
    pub fn create(name: &str) -> io::Result<Self> {
        const TCP: libc::c_uint = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        const UDP: libc::c_uint = libc::TUN_F_USO4 | libc::TUN_F_USO6;
        let tun = Self::open(name, true)?;
        for features in [TCP | UDP, TCP] {
            // SAFETY: TUNSETOFFLOAD takes its argument by value.
            let rc = unsafe {
                libc::ioctl(
                    tun.file.as_raw_fd(),
                    libc::TUNSETOFFLOAD,
                    libc::c_ulong::from(features),
                )
            };
            if rc == 0 {
                return Ok(tun);
            }
        }
        drop(tun);
        Self::open(name, false)
    }

    fn open(name: &str, vnet_hdr: bool) -> io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "interface name must be 1-15 bytes",
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open("/dev/net/tun")?;
        let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
        if vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: flags as libc::c_short,
            _pad: [0; 22],
        };
        for (o, b) in req.name.iter_mut().zip(name.bytes()) {
            *o = b as libc::c_char;
        }
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is laid out as.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { file, vnet_hdr })
    }

    /// Whether reads and writes carry a vnet header.
    pub fn has_vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// Waits up to `timeout` until a read would find a packet; false on timeout.
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        Ok(rc > 0)
    }

    /// Reads one frame (vnet header first, if on) into `buf`; `None` if none is queued.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
                _ => Err(e),
            };
        }
        if n == 0 {
            // Readable but empty: the interface was deleted.
            return Err(io::Error::from_raw_os_error(libc::EBADFD));
        }
        Ok(Some(n as usize))
    }

    /// Writes a frame as read from another port with a vnet header.
    pub fn send_frame(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: frame is valid for frame.len() bytes.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Writes one complete IP packet (behind an all-zero vnet header, "no offload").
    pub fn send_packet(&self, packet: &[u8]) -> io::Result<()> {
        let header = [0u8; VNET_HDR_LEN];
        let iov = [
            libc::iovec {
                iov_base: header.as_ptr() as *mut libc::c_void,
                iov_len: header.len(),
            },
            libc::iovec {
                iov_base: packet.as_ptr() as *mut libc::c_void,
                iov_len: packet.len(),
            },
        ];
        let iov = if self.vnet_hdr { &iov[..] } else { &iov[1..] };
        // SAFETY: every iovec points at a live buffer of its length; writev only reads.
        let n = unsafe {
            libc::writev(
                self.file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
