//! [`EtcdOptions`]: how to reach and authenticate to etcd.
//!
//! Plain data, compiled with or without the `etcd` feature, so code that reads
//! flags into it and calls [`Address::open`](crate::Address::open) builds either
//! way. `Debug` never shows a password or a private key.

use std::fmt;
use std::time::Duration;

/// How to reach and authenticate to etcd.
#[derive(Clone)]
pub struct EtcdOptions {
    /// `(user, password)` for etcd's own authentication.
    pub user: Option<(String, String)>,
    /// TLS for `https://` endpoints.
    pub tls: Option<EtcdTls>,
    /// A limit on each request; past it the call fails with `Unavailable`.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

/// PEM-encoded TLS material. The client identity is optional (etcd's
/// `--client-cert-auth`).
#[derive(Clone)]
pub struct EtcdTls {
    /// The CA that signed the members' certificates.
    pub ca_pem: Vec<u8>,
    /// Client certificate and private key, both PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name to check in the members' certificates, if not the endpoint's host.
    pub domain: Option<String>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            user: None,
            tls: None,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

// Hand-written so passwords and private keys never reach a log.
impl fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("user", &self.user.as_ref().map(|(name, _)| name))
            .field("tls", &self.tls)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdTls")
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .field("domain", &self.domain)
            .finish()
    }
}
