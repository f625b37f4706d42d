//! Every way the plugin can fail, each mapped to a code of CNI spec 1.1 §"Error"
//! (well-known codes 1-7, 11, 50, 51; 100 and up are this plugin's own), and the
//! error JSON a runtime reads from stdout.
//!
//! Messages name the field or variable at fault, so whoever reads the runtime's log
//! can fix the right line of the network config.

use serde_json::{json, Value};
use wiremesh_host::HostError;

use crate::version::Version;

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// Code 1.
    #[error("incompatible CNI version {requested}: this plugin supports {supported}")]
    IncompatibleVersion {
        requested: String,
        supported: String,
    },
    /// Code 2.
    #[error("unsupported field `{field}` in network config: {reason}")]
    UnsupportedField { field: String, reason: String },
    /// Code 3.
    #[error("container unknown or does not exist: {0}")]
    ContainerUnknown(String),
    /// Code 4.
    #[error("invalid environment variable {var}: {reason}")]
    InvalidEnv { var: &'static str, reason: String },
    /// Code 5.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// Code 6.
    #[error("failed to decode {what}: {reason}")]
    Decode { what: &'static str, reason: String },
    /// Code 7.
    #[error("invalid network config field `{field}`: {reason}")]
    InvalidConfig { field: String, reason: String },
    /// Code 11: a condition that clears up by itself (the agent has not claimed a
    /// pod CIDR yet; every address is taken until a DEL or GC frees one).
    #[error("try again later: {0}")]
    TryAgain(String),
    /// Code 50 (STATUS only): cannot serve ADD now.
    #[error("plugin not available: {0}")]
    NotAvailable(String),
    /// Code 100: CHECK found the container's network not as ADD left it.
    #[error("check failed: {0}")]
    CheckFailed(String),
    /// Code 101: an `ip` command on the node or in the container failed.
    #[error(transparent)]
    Host(#[from] HostError),
}

impl CniError {
    pub fn code(&self) -> u32 {
        match self {
            CniError::IncompatibleVersion { .. } => 1,
            CniError::UnsupportedField { .. } => 2,
            CniError::ContainerUnknown(_) => 3,
            CniError::InvalidEnv { .. } => 4,
            CniError::Io { .. } => 5,
            CniError::Decode { .. } => 6,
            CniError::InvalidConfig { .. } => 7,
            CniError::TryAgain(_) => 11,
            CniError::NotAvailable(_) => 50,
            CniError::CheckFailed(_) => 100,
            CniError::Host(_) => 101,
        }
    }

    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        CniError::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        CniError::Io {
            what: what.into(),
            source,
        }
    }

    /// A short `msg` for the runtime's summary line; the full text goes in `details`.
    fn summary(&self) -> &'static str {
        match self {
            CniError::IncompatibleVersion { .. } => "incompatible CNI version",
            CniError::UnsupportedField { .. } => "unsupported field in network config",
            CniError::ContainerUnknown(_) => "container unknown or does not exist",
            CniError::InvalidEnv { .. } => "invalid environment variables",
            CniError::Io { .. } => "I/O failure",
            CniError::Decode { .. } => "failed to decode content",
            CniError::InvalidConfig { .. } => "invalid network config",
            CniError::TryAgain(_) => "try again later",
            CniError::NotAvailable(_) => "plugin not available",
            CniError::CheckFailed(_) => "check failed",
            CniError::Host(_) => "host network configuration failed",
        }
    }

    /// The error object of spec §"Error": `cniVersion`, `code`, `msg`, `details`.
    /// `msg` also carries the field at fault, since some runtimes print only `msg`.
    pub fn to_json(&self, version: Version) -> Value {
        let msg = match self {
            CniError::InvalidConfig { field, .. } | CniError::UnsupportedField { field, .. } => {
                format!("{}: field `{field}`", self.summary())
            }
            CniError::InvalidEnv { var, .. } => format!("{}: {var}", self.summary()),
            _ => self.summary().to_owned(),
        };
        json!({
            "cniVersion": version.to_string(),
            "code": self.code(),
            "msg": msg,
            "details": self.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_are_code_7_and_name_the_field() {
        let e = CniError::config("mtu", "must be between 68 and 65535, not 70000");
        let v = e.to_json(Version::LATEST);
        assert_eq!(v["code"], 7);
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["msg"], "invalid network config: field `mtu`");
        assert_eq!(
            v["details"],
            "invalid network config field `mtu`: must be between 68 and 65535, not 70000"
        );
    }

    #[test]
    fn well_known_codes() {
        let cases: [(CniError, u32); 4] = [
            (
                CniError::InvalidEnv {
                    var: "CNI_NETNS",
                    reason: "not set".into(),
                },
                4,
            ),
            (CniError::TryAgain("pool exhausted".into()), 11),
            (CniError::NotAvailable("no pod CIDR".into()), 50),
            (
                CniError::Decode {
                    what: "network config",
                    reason: "eof".into(),
                },
                6,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(e.code(), code, "{e}");
        }
    }
}
