//! `get=1` replies: the device's configuration and per-peer statistics.
//!
//! The device renders a [`DeviceSnapshot`] in the order wireguard-go does; a client
//! parses any device's reply back into one. Parsing ignores keys it does not know,
//! since other implementations add their own, but rejects malformed values of known keys.

use std::fmt::Write as _;
use std::net::SocketAddr;

use ipnet::IpNet;

use crate::error::Errno;
use crate::value;
use crate::{PresharedKey, PrivateKey, PublicKey, UapiError};

/// A device's state as reported by `get=1`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceSnapshot {
    /// The private key, if one is set.
    pub private_key: Option<PrivateKey>,
    /// The bound UDP port; 0 when not listening.
    pub listen_port: u16,
    /// The firewall mark on outgoing UDP; 0 when unset.
    pub fwmark: u32,
    /// Every peer, in the device's order.
    pub peers: Vec<PeerSnapshot>,
}

/// One peer's state in a [`DeviceSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSnapshot {
    /// The peer's public key.
    pub public_key: PublicKey,
    /// The preshared key, if one is set.
    pub preshared_key: Option<PresharedKey>,
    /// Where the peer was last heard from (or configured).
    pub endpoint: Option<SocketAddr>,
    /// Persistent keepalive interval in seconds; 0 when off.
    pub persistent_keepalive_interval: u16,
    /// Wall-clock time of the last completed handshake, seconds since the Unix
    /// epoch; 0 when there was none.
    pub last_handshake_time_sec: u64,
    /// Nanoseconds part of the same time.
    pub last_handshake_time_nsec: u32,
    /// Bytes received from the peer.
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
    /// The peer's allowed IPs.
    pub allowed_ips: Vec<IpNet>,
    /// Protocol version; always 1.
    pub protocol_version: u32,
}

impl PeerSnapshot {
    /// A peer with nothing but its key.
    pub fn new(public_key: PublicKey) -> Self {
        Self {
            public_key,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive_interval: 0,
            last_handshake_time_sec: 0,
            last_handshake_time_nsec: 0,
            rx_bytes: 0,
            tx_bytes: 0,
            allowed_ips: Vec::new(),
            protocol_version: 1,
        }
    }
}

impl DeviceSnapshot {
    /// Renders the whole reply, including the final `errno=0` and blank line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(k) = &self.private_key {
            let _ = writeln!(out, "private_key={}", k.to_hex());
        }
        if self.listen_port != 0 {
            let _ = writeln!(out, "listen_port={}", self.listen_port);
        }
        if self.fwmark != 0 {
            let _ = writeln!(out, "fwmark={}", self.fwmark);
        }
        for p in &self.peers {
            let _ = writeln!(out, "public_key={}", p.public_key.to_hex());
            if let Some(k) = &p.preshared_key {
                let _ = writeln!(out, "preshared_key={}", k.to_hex());
            }
            let _ = writeln!(out, "protocol_version={}", p.protocol_version);
            if let Some(e) = p.endpoint {
                let _ = writeln!(out, "endpoint={e}");
            }
            let _ = writeln!(out, "last_handshake_time_sec={}", p.last_handshake_time_sec);
            let _ = writeln!(
                out,
                "last_handshake_time_nsec={}",
                p.last_handshake_time_nsec
            );
            let _ = writeln!(out, "tx_bytes={}", p.tx_bytes);
            let _ = writeln!(out, "rx_bytes={}", p.rx_bytes);
            let _ = writeln!(
                out,
                "persistent_keepalive_interval={}",
                p.persistent_keepalive_interval
            );
            for ip in &p.allowed_ips {
                let _ = writeln!(out, "allowed_ip={ip}");
            }
        }
        out.push_str(&crate::render_errno(Errno::OK));
        out
    }

    /// Parses a device's reply to `get=1` (everything after the request). A non-zero
    /// `errno` becomes [`UapiError::Errno`]; a reply without one is incomplete.
    pub fn parse(text: &str) -> Result<Self, UapiError> {
        let mut snap = DeviceSnapshot::default();
        for (i, line) in text.split('\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let (key, v) = crate::split_line(line, i + 1)?;
            match key {
                "errno" => {
                    let n: i64 = v.parse().map_err(|_| UapiError::InvalidValue {
                        key: "errno",
                        reason: "expected an integer",
                    })?;
                    // wireguard-go writes negative errnos; accept either sign.
                    let n = i32::try_from(n.unsigned_abs()).unwrap_or(i32::MAX);
                    return if n == 0 {
                        Ok(snap)
                    } else {
                        Err(UapiError::Errno(Errno(n)))
                    };
                }
                "public_key" => snap
                    .peers
                    .push(PeerSnapshot::new(value::public_key("public_key", v)?)),
                _ => match snap.peers.last_mut() {
                    None => snap.apply_device_key(key, v)?,
                    Some(p) => p.apply_key(key, v)?,
                },
            }
        }
        Err(UapiError::MissingErrno)
    }

    fn apply_device_key(&mut self, key: &str, v: &str) -> Result<(), UapiError> {
        match key {
            "private_key" => {
                let k = value::private_key("private_key", v)?;
                self.private_key = (!k.is_zero()).then_some(k);
            }
            "listen_port" => {
                self.listen_port = value::number("listen_port", v, "expected 0-65535")?
            }
            "fwmark" => self.fwmark = value::number("fwmark", v, "expected 0-4294967295")?,
            _ => {}
        }
        Ok(())
    }
}

impl PeerSnapshot {
    fn apply_key(&mut self, key: &str, v: &str) -> Result<(), UapiError> {
        const COUNT: &str = "expected a non-negative integer";
        match key {
            "preshared_key" => {
                let k = value::preshared_key("preshared_key", v)?;
                self.preshared_key = (!k.is_zero()).then_some(k);
            }
            "protocol_version" => {
                self.protocol_version = value::number("protocol_version", v, COUNT)?
            }
            "endpoint" => self.endpoint = Some(value::endpoint("endpoint", v)?),
            "last_handshake_time_sec" => {
                self.last_handshake_time_sec = value::number("last_handshake_time_sec", v, COUNT)?
            }
            "last_handshake_time_nsec" => {
                self.last_handshake_time_nsec = value::number("last_handshake_time_nsec", v, COUNT)?
            }
            "tx_bytes" => self.tx_bytes = value::number("tx_bytes", v, COUNT)?,
            "rx_bytes" => self.rx_bytes = value::number("rx_bytes", v, COUNT)?,
            "persistent_keepalive_interval" => {
                self.persistent_keepalive_interval =
                    value::number("persistent_keepalive_interval", v, "expected 0-65535")?
            }
            "allowed_ip" => self.allowed_ips.push(value::allowed_ip("allowed_ip", v)?),
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIV: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";
    const PUB1: &str = "b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33";
    const PSK: &str = "188515093e952f5f22e865cef3012e72f8b5f0b598ac0309d5dacce3b70fcf52";

    fn sample() -> DeviceSnapshot {
        let mut p = PeerSnapshot::new(PublicKey::from_hex(PUB1).unwrap());
        p.preshared_key = Some(PresharedKey::from_hex(PSK).unwrap());
        p.endpoint = Some("[abcd:23::33]:51820".parse().unwrap());
        p.persistent_keepalive_interval = 25;
        p.last_handshake_time_sec = 1_700_000_000;
        p.last_handshake_time_nsec = 42;
        p.rx_bytes = 1;
        p.tx_bytes = 2;
        p.allowed_ips = vec!["10.0.0.0/24".parse().unwrap(), "fd00::/64".parse().unwrap()];
        DeviceSnapshot {
            private_key: Some(PrivateKey::from_hex(PRIV).unwrap()),
            listen_port: 51820,
            fwmark: 7,
            peers: vec![p, PeerSnapshot::new(PublicKey([9; 32]))],
        }
    }

    #[test]
    fn renders_like_wireguard_go() {
        let want = format!(
            "private_key={PRIV}\nlisten_port=51820\nfwmark=7\npublic_key={PUB1}\n\
             preshared_key={PSK}\nprotocol_version=1\nendpoint=[abcd:23::33]:51820\n\
             last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=42\ntx_bytes=2\n\
             rx_bytes=1\npersistent_keepalive_interval=25\nallowed_ip=10.0.0.0/24\n\
             allowed_ip=fd00::/64\npublic_key={}\nprotocol_version=1\n\
             last_handshake_time_sec=0\nlast_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\n\
             persistent_keepalive_interval=0\nerrno=0\n\n",
            hex::encode([9u8; 32])
        );
        assert_eq!(sample().render(), want);
        assert_eq!(DeviceSnapshot::default().render(), "errno=0\n\n");
    }

    #[test]
    fn parse_inverts_render() {
        let s = sample();
        assert_eq!(DeviceSnapshot::parse(&s.render()), Ok(s));
    }

    #[test]
    fn parse_reports_errno_and_truncation() {
        assert_eq!(
            DeviceSnapshot::parse("errno=-22\n\n"),
            Err(UapiError::Errno(Errno::EINVAL))
        );
        assert_eq!(
            DeviceSnapshot::parse("errno=22\n\n"),
            Err(UapiError::Errno(Errno::EINVAL))
        );
        assert_eq!(
            DeviceSnapshot::parse("listen_port=1\n"),
            Err(UapiError::MissingErrno)
        );
        assert!(matches!(
            DeviceSnapshot::parse("listen_port=x\nerrno=0\n\n"),
            Err(UapiError::InvalidValue {
                key: "listen_port",
                ..
            })
        ));
    }

    #[test]
    fn parse_ignores_unknown_keys_and_zero_keys() {
        let text = format!(
            "private_key={}\nfuture_key=1\npublic_key={PUB1}\npreshared_key={}\nmystery=2\nerrno=0\n\n",
            "0".repeat(64),
            "0".repeat(64)
        );
        let s = DeviceSnapshot::parse(&text).unwrap();
        assert!(s.private_key.is_none());
        assert!(s.peers[0].preshared_key.is_none());
    }
}
