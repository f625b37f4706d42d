//! The pods' HTTP/1.1 server and the load generator's side of the protocol: just
//! enough HTTP for `GET /` over keep-alive or one-shot connections, so neither end
//! costs more CPU than the VPN under test.
//!
//! The server runs in the harness process, on a thread that joined the pod's
//! network namespace (a socket stays in the namespace it was made in). Every body
//! is [`MARKER`] repeated: the honesty check looks for it on the underlay.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What every response body is made of; seeing it between hosts means plaintext
/// pod traffic crossed the underlay.
pub const MARKER: &[u8] = b"WIREMESH-EDGE-PLAINTEXT ";

/// The port every pod serves on.
pub const PORT: u16 = 8080;

/// A head larger than this is not one we sent or serve: the peer is broken.
const MAX_HEAD: usize = 8192;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeadError {
    #[error("response head over {MAX_HEAD} bytes")]
    TooLong,
    #[error("response status is not 200: {0:?}")]
    Status(String),
    #[error("response has no valid content-length")]
    ContentLength,
}

/// Where a response's head ends and how long its body is; `Ok(None)` until the
/// whole head is in `buf`.
pub fn parse_response_head(buf: &[u8]) -> Result<Option<(usize, usize)>, HeadError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD {
            Err(HeadError::TooLong)
        } else {
            Ok(None)
        };
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if status.split(' ').nth(1) != Some("200") {
        return Err(HeadError::Status(status.chars().take(40).collect()));
    }
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .ok_or(HeadError::ContentLength)?;
    Ok(Some((end + 4, length)))
}

/// The response the server sends: a 200 with `body_bytes` of [`MARKER`]s.
pub fn response(body_bytes: usize) -> Vec<u8> {
    let mut r = format!("HTTP/1.1 200 OK\r\ncontent-length: {body_bytes}\r\n\r\n").into_bytes();
    r.extend(MARKER.iter().cycle().take(body_bytes));
    r
}

/// The request the load generator sends; `close` asks for a one-shot connection.
pub fn request(close: bool) -> &'static [u8] {
    if close {
        b"GET / HTTP/1.1\r\nhost: pod\r\nconnection: close\r\n\r\n"
    } else {
        b"GET / HTTP/1.1\r\nhost: pod\r\n\r\n"
    }
}

/// Serves `response` to every request on `listener` until `stop` is set.
pub async fn serve(listener: TcpListener, response: Arc<Vec<u8>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        let Ok(Ok((stream, _))) = accepted else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(stream, response.clone()));
    }
}

async fn serve_connection(mut stream: TcpStream, response: Arc<Vec<u8>>) -> io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        // Answer every complete request in the buffer (clients do not pipeline,
        // but a request may arrive in pieces).
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let close = String::from_utf8_lossy(&buf[..end])
                .to_ascii_lowercase()
                .contains("connection: close");
            buf.drain(..end + 4);
            stream.write_all(&response).await?;
            if close {
                return stream.shutdown().await;
            }
        }
        if buf.len() > MAX_HEAD {
            return Ok(());
        }
    }
}

/// One `GET /` on `stream`; the body's length.
pub async fn get(stream: &mut TcpStream, close: bool) -> io::Result<usize> {
    stream.write_all(request(close)).await?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if let Some((head, body)) = parse_response_head(&buf).map_err(io::Error::other)? {
            let want = head + body;
            while buf.len() < want {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(body);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Connects to `target` (no Nagle: requests are small and latency matters).
pub async fn connect(target: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(target).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_parses_when_complete() {
        let r = response(100);
        assert_eq!(parse_response_head(&r[..10]), Ok(None));
        let head = r.len() - 100;
        assert_eq!(parse_response_head(&r), Ok(Some((head, 100))));
        assert!(r[head..].starts_with(MARKER));
    }

    #[test]
    fn head_errors_name_the_problem() {
        assert_eq!(
            parse_response_head(b"HTTP/1.1 503 Busy\r\n\r\n"),
            Err(HeadError::Status("HTTP/1.1 503 Busy".into()))
        );
        assert_eq!(
            parse_response_head(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n"),
            Err(HeadError::ContentLength)
        );
        assert_eq!(
            parse_response_head(&vec![b'a'; MAX_HEAD + 1]),
            Err(HeadError::TooLong)
        );
    }

    #[test]
    fn server_answers_keep_alive_and_close() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            tokio::spawn(serve(listener, Arc::new(response(3000)), stop.clone()));
            let mut s = connect(addr).await.unwrap();
            assert_eq!(get(&mut s, false).await.unwrap(), 3000);
            assert_eq!(get(&mut s, true).await.unwrap(), 3000);
            let mut rest = Vec::new();
            assert_eq!(
                s.read_to_end(&mut rest).await.unwrap(),
                0,
                "closed after close"
            );
            stop.store(true, Ordering::Relaxed);
        });
    }
}
