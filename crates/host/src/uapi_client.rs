//! A client for the WireGuard cross-platform configuration protocol (UAPI) over the
//! device's unix socket: how the agent drives wiremesh-wg, wireguard-go or boringtun.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use wiremesh_uapi::{DeviceSnapshot, SetRequest};

use crate::HostError;

pub const SOCKET_DIR: &str = "/var/run/wireguard";

pub fn socket_path(interface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{interface}.sock"))
}

fn uapi_err(path: &Path, reason: impl ToString) -> HostError {
    HostError::Uapi {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Send one request (`get=1\n\n` or `set=1\n...\n\n`) and return the reply's lines up
/// to the blank line that ends it, after checking its `errno=`.
pub fn exchange(path: &Path, request: &str) -> Result<String, HostError> {
    let mut stream = UnixStream::connect(path).map_err(|e| uapi_err(path, e))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| uapi_err(path, e))?;
    stream
        .write_all(request.as_bytes())
        .map_err(|e| uapi_err(path, e))?;
    let mut reply = String::new();
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).map_err(|e| uapi_err(path, e))?;
        if n == 0 || line == "\n" {
            break;
        }
        reply.push_str(&line);
    }
    let errno = reply
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("errno="))
        .ok_or_else(|| uapi_err(path, "reply has no errno"))?;
    if errno != "0" {
        return Err(uapi_err(
            path,
            format!("device refused the request: errno={errno}"),
        ));
    }
    Ok(reply)
}

/// The device's whole state.
pub fn get(path: &Path) -> Result<DeviceSnapshot, HostError> {
    let reply = exchange(path, "get=1\n\n")?;
    DeviceSnapshot::parse(&reply).map_err(|e| uapi_err(path, format!("malformed get reply: {e}")))
}

/// The counters of a `wiremesh-wg` device (`get_stats=1`): VPC traffic and drops by
/// reason. Other devices do not know the operation and answer with an error.
pub fn stats(path: &Path) -> Result<wiremesh_uapi::DeviceStats, HostError> {
    let reply = exchange(path, "get_stats=1\n\n")?;
    wiremesh_uapi::DeviceStats::parse(&reply)
        .map_err(|e| uapi_err(path, format!("malformed get_stats reply: {e}")))
}

/// Apply a configuration change.
pub fn set(path: &Path, request: &SetRequest) -> Result<(), HostError> {
    exchange(path, &request.render()).map(|_| ())
}

/// Whether a device answers on this socket.
pub fn is_alive(path: &Path) -> bool {
    exchange(path, "get=1\n\n").is_ok()
}
