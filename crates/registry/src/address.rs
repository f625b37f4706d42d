//! [`Address`]: where a registry is, as users write it on the command line.
//!
//! One string picks the backend, so `--registry` means the same to every command:
//! - `dir:/var/lib/wiremesh/registry`, or just a path: the embedded store;
//! - `etcd://10.0.0.1:2379,10.0.0.2:2379`: etcd over plain HTTP;
//! - `etcd+https://etcd-1:2379,etcd-2`: etcd over TLS (material in the options).
//!
//! A missing etcd port is 2379. Parsing checks the shape only; reaching the
//! registry is [`Address::open`]'s job.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use crate::{EmbeddedStore, EtcdOptions, Store, StoreError};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// The embedded store in this directory.
    Dir(PathBuf),
    /// etcd members as `http://host:port` or `https://host:port` URLs.
    Etcd { endpoints: Vec<String> },
}

/// etcd's client port.
const ETCD_PORT: u16 = 2379;

impl FromStr for Address {
    type Err = StoreError;

    fn from_str(text: &str) -> Result<Self, StoreError> {
        let invalid = |why: &str| StoreError::InvalidArgument(format!("registry {text:?}: {why}"));
        let (scheme, members) = if let Some(rest) = text.strip_prefix("etcd://") {
            ("http", rest)
        } else if let Some(rest) = text.strip_prefix("etcd+https://") {
            ("https", rest)
        } else if text.contains("://") {
            return Err(invalid(
                "unknown scheme; use dir:PATH, etcd:// or etcd+https://",
            ));
        } else {
            let path = text.strip_prefix("dir:").unwrap_or(text);
            if path.is_empty() {
                return Err(invalid("empty directory"));
            }
            return Ok(Address::Dir(PathBuf::from(path)));
        };
        let endpoints = members
            .split(',')
            .map(|member| {
                let member = member.trim_end_matches('/');
                if member.is_empty() || member.contains(['/', '@', ' ']) {
                    return Err(invalid(&format!(
                        "bad etcd member {member:?}; want host[:port]"
                    )));
                }
                // A bracketed IPv6 address has colons of its own.
                let has_port = match member.rfind(']') {
                    Some(end) => member[end..].contains(':'),
                    None => member.contains(':'),
                };
                if has_port {
                    let port = member.rsplit(':').next().unwrap_or_default();
                    port.parse::<u16>()
                        .map_err(|_| invalid(&format!("bad port in {member:?}")))?;
                    Ok(format!("{scheme}://{member}"))
                } else {
                    Ok(format!("{scheme}://{member}:{ETCD_PORT}"))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Address::Etcd { endpoints })
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Dir(path) => write!(f, "dir:{}", path.display()),
            Address::Etcd { endpoints } => {
                let https = endpoints.iter().any(|e| e.starts_with("https://"));
                let members: Vec<&str> = endpoints
                    .iter()
                    .map(|e| e.split_once("://").map_or(e.as_str(), |(_, m)| m))
                    .collect();
                let scheme = if https { "etcd+https" } else { "etcd" };
                write!(f, "{scheme}://{}", members.join(","))
            }
        }
    }
}

impl Address {
    /// Opens the registry. `etcd` (credentials, TLS) is used only for etcd.
    pub fn open(&self, etcd: EtcdOptions) -> Result<Arc<dyn Store>, StoreError> {
        match self {
            Address::Dir(path) => Ok(Arc::new(EmbeddedStore::open(path)?)),
            #[cfg(feature = "etcd")]
            Address::Etcd { endpoints } => {
                Ok(Arc::new(crate::EtcdStore::connect(endpoints, etcd)?))
            }
            #[cfg(not(feature = "etcd"))]
            Address::Etcd { .. } => {
                drop(etcd);
                Err(StoreError::InvalidArgument(format!(
                    "registry {self}: this build has no etcd backend (cargo feature `etcd`)"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expect: &str) {
        let got = match text.parse::<Address>() {
            Ok(Address::Dir(path)) => format!("dir {}", path.display()),
            Ok(Address::Etcd { endpoints }) => format!("etcd {}", endpoints.join(" ")),
            Err(e) => format!("error {e}"),
        };
        assert_eq!(got, expect, "parsing {text:?}");
    }

    #[test]
    fn parses_what_users_write() {
        check("dir:/var/lib/wiremesh", "dir /var/lib/wiremesh");
        check("/tmp/reg", "dir /tmp/reg");
        check("relative/reg", "dir relative/reg");
        check("etcd://10.0.0.1:2379", "etcd http://10.0.0.1:2379");
        check("etcd://a,b:2380/", "etcd http://a:2379 http://b:2380");
        check(
            "etcd+https://[fd00::1]:2379,[fd00::2]",
            "etcd https://[fd00::1]:2379 https://[fd00::2]:2379",
        );
    }

    #[test]
    fn rejects_what_it_cannot_use() {
        check(
            "dir:",
            "error invalid argument: registry \"dir:\": empty directory",
        );
        check("http://a:2379", "error invalid argument: registry \"http://a:2379\": unknown scheme; use dir:PATH, etcd:// or etcd+https://");
        check(
            "etcd://",
            "error invalid argument: registry \"etcd://\": bad etcd member \"\"; want host[:port]",
        );
        check(
            "etcd://a:99999",
            "error invalid argument: registry \"etcd://a:99999\": bad port in \"a:99999\"",
        );
        check("etcd://user@a", "error invalid argument: registry \"etcd://user@a\": bad etcd member \"user@a\"; want host[:port]");
    }

    #[test]
    fn display_parses_back() {
        for text in [
            "dir:/x/y",
            "etcd://a:2379,b:1",
            "etcd+https://[fd00::1]:2379",
        ] {
            let address: Address = text.parse().unwrap();
            assert_eq!(address.to_string(), text);
            assert_eq!(address.to_string().parse::<Address>().unwrap(), address);
        }
    }
}
