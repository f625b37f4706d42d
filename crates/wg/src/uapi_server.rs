//! The UAPI unix socket: `/var/run/wireguard/IFNAME.sock`, as wireguard-go creates it.
//!
//! [`listen`] creates the socket (directory mode 0755, socket 0600, a stale socket
//! from a dead process is replaced, a live one is an error). [`serve_connection`]
//! speaks the framing: read one request — an operation line, `key=value` lines, a
//! blank line — hand it to the device, write the reply, repeat until EOF. Lines and
//! requests are bounded, and a client that stops mid-request is dropped after a
//! timeout, so no client can exhaust memory or hold the device.

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use wiremesh_uapi::{Errno, Request, UapiError, MAX_LINE_LEN};

/// Where wireguard-tools looks for userspace devices' sockets.
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/wireguard";

/// The largest request accepted (a `setconf` of some ten thousand peers fits).
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

/// How long a client may take to send the rest of a request.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// `DIR/IFNAME.sock`.
pub fn socket_path(dir: &Path, ifname: &str) -> PathBuf {
    dir.join(format!("{ifname}.sock"))
}

/// Creates the listening socket at `path`.
pub fn listen(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)?;
    }
    let bind = || -> io::Result<UnixListener> {
        let l = UnixListener::bind(path)?;
        // Only root (the owner) may configure the device.
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
        Ok(l)
    };
    match bind() {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running device", path.display()),
                ));
            }
            fs::remove_file(path)?;
            bind()
        }
        Err(e) => Err(e),
    }
}

enum ReadLine {
    Line(String),
    Eof,
}

fn read_line<R: BufRead>(r: &mut R, budget: &mut usize) -> Result<ReadLine, Errno> {
    let mut buf = Vec::new();
    let limit = (MAX_LINE_LEN + 1).min(*budget + 1) as u64;
    let n = <&mut R as io::Read>::take(r, limit)
        .read_until(b'\n', &mut buf)
        .map_err(|_| Errno::EIO)?;
    if n == 0 {
        return Ok(ReadLine::Eof);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if n as u64 == limit {
        return Err(Errno::EPROTO);
    }
    *budget = budget.saturating_sub(n);
    String::from_utf8(buf)
        .map(ReadLine::Line)
        .map_err(|_| Errno::EINVAL)
}

/// Reads one request's text (operation line through blank line). `Ok(None)` at EOF
/// before a request starts.
fn read_request(r: &mut impl BufRead) -> Result<Option<String>, Errno> {
    let mut budget = MAX_REQUEST_BYTES;
    let mut text = match read_line(r, &mut budget)? {
        ReadLine::Eof => return Ok(None),
        ReadLine::Line(op) => op,
    };
    text.push('\n');
    loop {
        match read_line(r, &mut budget)? {
            ReadLine::Eof => break,
            ReadLine::Line(l) if l.is_empty() => break,
            ReadLine::Line(l) => {
                text.push_str(&l);
                text.push('\n');
            }
        }
    }
    text.push('\n');
    Ok(Some(text))
}

/// What answers requests: returns the full reply text (ending with `errno=N\n\n`).
pub trait Handler {
    /// Answers one parsed request.
    fn handle(&self, request: Request) -> String;
}

/// Serves requests on one connection until EOF, an I/O error, or broken framing.
pub fn serve_connection(stream: UnixStream, handler: &dyn Handler) {
    let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut writer = io::BufWriter::new(write_half);
    let mut reader = BufReader::new(stream);
    loop {
        let reply = match read_request(&mut reader) {
            Ok(None) => return,
            Ok(Some(text)) => match Request::parse(&text) {
                Ok(req) => handler.handle(req),
                // wireguard-go hangs up on an unknown operation without answering.
                Err(UapiError::UnknownOperation) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "rejected UAPI request");
                    wiremesh_uapi::render_errno(e.errno())
                }
            },
            Err(errno) => {
                // Framing is lost: answer once and hang up.
                let _ = writer.write_all(wiremesh_uapi::render_errno(errno).as_bytes());
                let _ = writer.flush();
                return;
            }
        };
        if writer.write_all(reply.as_bytes()).is_err() || writer.flush().is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    struct Echo;
    impl Handler for Echo {
        fn handle(&self, request: Request) -> String {
            match request {
                Request::Get => "listen_port=1\nerrno=0\n\n".into(),
                Request::Set(s) => format!("errno={}\n\n", s.peers.len()),
                Request::SetVpcs(v) => format!("errno={}\n\n", v.vpcs.len()),
                Request::GetStats => "errno=0\n\n".into(),
            }
        }
    }

    fn exchange(input: &[u8]) -> String {
        let (a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || serve_connection(a, &Echo));
        b.write_all(input).unwrap();
        b.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        b.read_to_string(&mut out).unwrap();
        t.join().unwrap();
        out
    }

    #[test]
    fn framing() {
        let key = "ab".repeat(32);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"get=1\n\n".to_vec(), "listen_port=1\nerrno=0\n\n"),
            (
                b"get=1\n\nget=1\n\n".to_vec(),
                "listen_port=1\nerrno=0\n\nlisten_port=1\nerrno=0\n\n",
            ),
            (
                format!("set=1\npublic_key={key}\npublic_key={key}\n\n").into_bytes(),
                "errno=2\n\n",
            ),
            (b"set=1\nlisten_port=x\n\n".to_vec(), "errno=-22\n\n"),
            (b"set=1\nlisten_port=1".to_vec(), "errno=0\n\n"),
            (b"hello\n\n".to_vec(), ""),
            (b"".to_vec(), ""),
            (
                [b"set=1\n".as_slice(), &[b'a'; 5000]].concat(),
                "errno=-71\n\n",
            ),
            (b"set=1\n\xff\xfe=1\n\n".to_vec(), "errno=-22\n\n"),
        ];
        for (input, want) in cases {
            assert_eq!(
                exchange(&input),
                want,
                "input {:.60?}",
                String::from_utf8_lossy(&input)
            );
        }
    }

    #[test]
    fn stale_socket_is_replaced_live_one_refused() {
        let dir = std::env::temp_dir().join(format!("wmwg-uapi-{}", std::process::id()));
        let path = socket_path(&dir, "wgtest0");
        let l = listen(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(listen(&path).unwrap_err().kind(), io::ErrorKind::AddrInUse);
        drop(l);
        let _l = listen(&path).unwrap();
        let _ = fs::remove_dir_all(&dir);
    }
}
