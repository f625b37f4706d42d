//! The WireGuard cross-platform configuration protocol ("UAPI", <https://www.wireguard.com/xplatform/>)
//! as typed values, plus the key types every wiremesh crate shares.
//!
//! A userspace WireGuard device listens on `/var/run/wireguard/IFNAME.sock` and speaks a
//! line-oriented `key=value` text protocol: `set=1` configures the device, `get=1` reads
//! its state back, and every reply ends with `errno=N` and a blank line. This crate parses
//! and renders both directions — the device side (parse [`SetRequest`], render
//! [`DeviceSnapshot`]) and the client side (render [`SetRequest`], parse
//! [`DeviceSnapshot`]) — so the device and the node agent share one definition.
//!
//! Architecture invariant: this crate does no I/O and reads no clock; the only
//! randomness is [`PrivateKey::generate`] / [`PresharedKey::generate`].
//! Errors name the offending key, never its value: values may be secrets.

mod error;
mod get;
mod key;
mod set;
mod value;
mod vpc;

pub use error::{Errno, UapiError};
pub use get::{DeviceSnapshot, PeerSnapshot};
pub use key::{KeyError, PresharedKey, PrivateKey, PublicKey, KEY_LEN};
pub use set::{PeerConfig, SetRequest};
pub use vpc::{DeviceStats, VpcPlane, VpcsRequest};

/// Longest line accepted in either direction. The longest legitimate line is a
/// `preshared_key=` plus 64 hex digits; anything far beyond is hostile or broken.
pub const MAX_LINE_LEN: usize = 512;

/// A whole request read from a UAPI socket: the operation line, its body and the
/// terminating blank line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `get=1`: reply with a [`DeviceSnapshot`].
    Get,
    /// `set=1`: apply the configuration change.
    Set(SetRequest),
    /// `set_vpcs=1` (wiremesh's extension): replace the VPC table.
    SetVpcs(VpcsRequest),
    /// `get_stats=1` (wiremesh's extension): reply with [`DeviceStats`].
    GetStats,
}

impl Request {
    /// Parses a complete request (`get=1\n\n` or `set=1\n...\n\n`).
    pub fn parse(text: &str) -> Result<Self, UapiError> {
        let first = text.split('\n').next().unwrap_or("");
        match first {
            "get=1" => Ok(Request::Get),
            "set=1" => SetRequest::parse(text).map(Request::Set),
            "set_vpcs=1" => VpcsRequest::parse(text).map(Request::SetVpcs),
            "get_stats=1" => Ok(Request::GetStats),
            _ => Err(UapiError::UnknownOperation),
        }
    }
}

/// Renders the reply line that ends every response: `errno=0` on success.
///
/// wireguard-go writes the negated errno (e.g. `errno=-22` for `EINVAL`) and
/// wireguard-tools turns `-N` back into `errno = N`, so we write the same.
pub fn render_errno(errno: Errno) -> String {
    format!("errno={}\n\n", -errno.0)
}

/// Splits line number `n` (1-based) into `key=value`, bounding its length first.
pub(crate) fn split_line(line: &str, n: usize) -> Result<(&str, &str), UapiError> {
    if line.len() > MAX_LINE_LEN {
        return Err(UapiError::LineTooLong { len: line.len() });
    }
    line.split_once('=')
        .ok_or(UapiError::MalformedLine { line: n })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_dispatch() {
        assert_eq!(Request::parse("get=1\n\n"), Ok(Request::Get));
        assert!(matches!(Request::parse("set=1\n\n"), Ok(Request::Set(_))));
        assert_eq!(
            Request::parse("bogus=1\n\n"),
            Err(UapiError::UnknownOperation)
        );
        assert_eq!(Request::parse(""), Err(UapiError::UnknownOperation));
    }

    #[test]
    fn errno_rendering_matches_wireguard_go() {
        assert_eq!(render_errno(Errno(0)), "errno=0\n\n");
        assert_eq!(render_errno(Errno::EINVAL), "errno=-22\n\n");
    }
}
