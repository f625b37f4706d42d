//! Errors from parsing UAPI text, and the errno values a device answers with.
//!
//! Every error names the key it concerns (truncated, in case a hostile client sends a
//! huge one) and never the value, which may be key material.

/// A positive POSIX errno as carried on the `errno=` line (0 means success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// Success.
    pub const OK: Errno = Errno(0);
    /// I/O error (EIO).
    pub const EIO: Errno = Errno(5);
    /// Invalid argument (EINVAL): a bad key or value.
    pub const EINVAL: Errno = Errno(22);
    /// Address in use (EADDRINUSE): `listen_port` could not be bound.
    pub const EADDRINUSE: Errno = Errno(98);
    /// Protocol error (EPROTO): framing broken.
    pub const EPROTO: Errno = Errno(71);
}

/// Why UAPI text was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UapiError {
    /// The first line was not a known operation.
    #[error("unknown operation: expected get=1, set=1, get_stats=1 or set_vpcs=1")]
    UnknownOperation,
    /// A line exceeded [`crate::MAX_LINE_LEN`].
    #[error("line too long ({len} bytes)")]
    LineTooLong {
        /// Length of the offending line.
        len: usize,
    },
    /// A line had no `=`. Its text is not echoed: it may be key material.
    #[error("malformed line {line}: expected key=value")]
    MalformedLine {
        /// 1-based line number.
        line: usize,
    },
    /// A key that is not valid where it appeared (unknown, or a peer key before any
    /// `public_key`, or a device key after one).
    #[error("unexpected key {key:?} in {context} section")]
    UnexpectedKey {
        /// The key.
        key: String,
        /// `"device"` or `"peer"`.
        context: &'static str,
    },
    /// A known key with a value that does not parse.
    #[error("invalid value for {key}: {reason}")]
    InvalidValue {
        /// The key.
        key: &'static str,
        /// What was expected.
        reason: &'static str,
    },
    /// A reply did not end with an `errno=` line.
    #[error("reply has no errno line")]
    MissingErrno,
    /// The device answered with a non-zero errno.
    #[error("device answered errno={}", .0.0)]
    Errno(Errno),
}

impl UapiError {
    /// The errno a device answers this error with.
    pub fn errno(&self) -> Errno {
        match self {
            UapiError::UnknownOperation | UapiError::LineTooLong { .. } => Errno::EPROTO,
            UapiError::MalformedLine { .. } => Errno::EPROTO,
            UapiError::Errno(e) => *e,
            _ => Errno::EINVAL,
        }
    }
}

/// The key part of a line, cut to a length fit for an error message.
pub(crate) fn key_for_message(line: &str) -> String {
    let key = line.split('=').next().unwrap_or("");
    key.chars().take(32).collect()
}
