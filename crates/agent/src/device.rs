//! Getting a WireGuard device to drive: wiremesh's own userspace device (started
//! once, then left running so agent restarts do not touch live sessions), or any
//! device already serving UAPI (wireguard-go, boringtun, a kernel device's
//! userspace shim).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use wiremesh_host::uapi_client;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceBackend {
    /// Start this userspace implementation (`wiremesh-wg`, `wireguard-go`, ...) with
    /// the interface name as its argument if no device answers yet. It detaches.
    Userspace { program: PathBuf },
    /// Only use a device that already serves UAPI for the interface.
    Existing,
}

/// The `wiremesh-wg` next to the running executable, else the one on `PATH`.
pub fn default_program() -> PathBuf {
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("wiremesh-wg")));
    match sibling {
        Some(path) if path.exists() => path,
        _ => PathBuf::from("wiremesh-wg"),
    }
}

/// Make sure a device answers on `interface`'s UAPI socket; returns the socket path.
pub fn ensure(interface: &str, backend: &DeviceBackend) -> std::io::Result<PathBuf> {
    let socket = uapi_client::socket_path(interface);
    if uapi_client::is_alive(&socket) {
        tracing::info!(interface, "using the running WireGuard device");
        return Ok(socket);
    }
    let DeviceBackend::Userspace { program } = backend else {
        return Err(std::io::Error::other(format!(
            "no WireGuard device answers on {}",
            socket.display()
        )));
    };
    tracing::info!(interface, program = %program.display(), "starting the WireGuard device");
    let status = Command::new(program)
        .arg(interface)
        .status()
        .map_err(|e| std::io::Error::other(format!("cannot start {}: {e}", program.display())))?;
    if !status.success() {
        return Err(std::io::Error::other(format!(
            "{} {interface} failed: {status}",
            program.display()
        )));
    }
    wait_for_socket(&socket, Duration::from_secs(10))?;
    Ok(socket)
}

fn wait_for_socket(socket: &Path, timeout: Duration) -> std::io::Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if uapi_client::is_alive(socket) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(std::io::Error::other(format!(
        "the device did not answer on {} within {timeout:?}",
        socket.display()
    )))
}
