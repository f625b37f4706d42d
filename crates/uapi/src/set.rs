//! `set=1` requests: a device-level change followed by per-peer changes.
//!
//! The request is applied by the device in order; a peer section starts at each
//! `public_key=` line. [`SetRequest::parse`] is the device side, [`SetRequest::render`]
//! the client side, and `parse(render(r)) == r` holds for every request.

use std::fmt::Write as _;
use std::net::SocketAddr;

use ipnet::IpNet;

use crate::value;
use crate::{PresharedKey, PrivateKey, PublicKey, UapiError};

/// A `set=1` request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetRequest {
    /// New private key; an all-zero key removes it.
    pub private_key: Option<PrivateKey>,
    /// New UDP listen port; 0 picks a random one.
    pub listen_port: Option<u16>,
    /// New firewall mark for outgoing UDP; 0 removes it.
    pub fwmark: Option<u32>,
    /// Remove every peer before applying `peers`.
    pub replace_peers: bool,
    /// Per-peer changes, in request order.
    pub peers: Vec<PeerConfig>,
}

/// The changes for one peer, introduced by its `public_key=` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Which peer this section is about.
    pub public_key: PublicKey,
    /// Remove the peer (the rest of the section is ignored).
    pub remove: bool,
    /// Only change the peer if it already exists; never create it.
    pub update_only: bool,
    /// New preshared key; an all-zero key removes it.
    pub preshared_key: Option<PresharedKey>,
    /// New endpoint.
    pub endpoint: Option<SocketAddr>,
    /// New persistent keepalive interval in seconds; 0 disables it.
    pub persistent_keepalive_interval: Option<u16>,
    /// Remove the peer's allowed IPs before adding `allowed_ips`.
    pub replace_allowed_ips: bool,
    /// Allowed IPs to add, in request order.
    pub allowed_ips: Vec<IpNet>,
    /// `protocol_version=`; only 1 exists.
    pub protocol_version: Option<u32>,
}

impl PeerConfig {
    /// A section that only names the peer (and so creates it if missing).
    pub fn new(public_key: PublicKey) -> Self {
        Self {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive_interval: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
            protocol_version: None,
        }
    }
}

impl SetRequest {
    /// Parses a complete request: `set=1`, `key=value` lines, and an optional
    /// terminating blank line (text after it is ignored).
    pub fn parse(text: &str) -> Result<Self, UapiError> {
        let mut lines = text.split('\n');
        if lines.next() != Some("set=1") {
            return Err(UapiError::UnknownOperation);
        }
        let mut req = SetRequest::default();
        for (i, line) in lines.enumerate() {
            if line.is_empty() {
                break;
            }
            let (key, v) = crate::split_line(line, i + 2)?;
            if key == "public_key" {
                req.peers
                    .push(PeerConfig::new(value::public_key("public_key", v)?));
                continue;
            }
            match req.peers.last_mut() {
                None => req.apply_device_key(key, v)?,
                Some(peer) => peer.apply_key(key, v)?,
            }
        }
        Ok(req)
    }

    fn apply_device_key(&mut self, key: &str, v: &str) -> Result<(), UapiError> {
        match key {
            "private_key" => self.private_key = Some(value::private_key("private_key", v)?),
            "listen_port" => {
                self.listen_port = Some(value::number("listen_port", v, "expected 0-65535")?)
            }
            "fwmark" => {
                // `wg set fwmark off` sends 0; an empty value means the same to wireguard-go.
                self.fwmark = Some(if v.is_empty() {
                    0
                } else {
                    value::number("fwmark", v, "expected 0-4294967295")?
                })
            }
            "replace_peers" => self.replace_peers = value::flag("replace_peers", v)?,
            _ => {
                return Err(UapiError::UnexpectedKey {
                    key: crate::error::key_for_message(key),
                    context: "device",
                })
            }
        }
        Ok(())
    }

    /// Renders the complete request, ending with the blank line.
    pub fn render(&self) -> String {
        let mut out = String::from("set=1\n");
        if let Some(k) = &self.private_key {
            let _ = writeln!(out, "private_key={}", k.to_hex());
        }
        if let Some(p) = self.listen_port {
            let _ = writeln!(out, "listen_port={p}");
        }
        if let Some(m) = self.fwmark {
            let _ = writeln!(out, "fwmark={m}");
        }
        if self.replace_peers {
            out.push_str("replace_peers=true\n");
        }
        for peer in &self.peers {
            peer.render_into(&mut out);
        }
        out.push('\n');
        out
    }
}

impl PeerConfig {
    fn apply_key(&mut self, key: &str, v: &str) -> Result<(), UapiError> {
        match key {
            "remove" => self.remove = value::flag("remove", v)?,
            "update_only" => self.update_only = value::flag("update_only", v)?,
            "preshared_key" => self.preshared_key = Some(value::preshared_key("preshared_key", v)?),
            "endpoint" => self.endpoint = Some(value::endpoint("endpoint", v)?),
            "persistent_keepalive_interval" => {
                self.persistent_keepalive_interval = Some(value::number(
                    "persistent_keepalive_interval",
                    v,
                    "expected 0-65535 seconds",
                )?)
            }
            "replace_allowed_ips" => {
                self.replace_allowed_ips = value::flag("replace_allowed_ips", v)?
            }
            "allowed_ip" => self.allowed_ips.push(value::allowed_ip("allowed_ip", v)?),
            "protocol_version" => {
                self.protocol_version = Some(value::protocol_version("protocol_version", v)?)
            }
            _ => {
                return Err(UapiError::UnexpectedKey {
                    key: crate::error::key_for_message(key),
                    context: "peer",
                })
            }
        }
        Ok(())
    }

    fn render_into(&self, out: &mut String) {
        let _ = writeln!(out, "public_key={}", self.public_key.to_hex());
        if self.remove {
            out.push_str("remove=true\n");
        }
        if self.update_only {
            out.push_str("update_only=true\n");
        }
        if let Some(k) = &self.preshared_key {
            let _ = writeln!(out, "preshared_key={}", k.to_hex());
        }
        if let Some(e) = self.endpoint {
            let _ = writeln!(out, "endpoint={e}");
        }
        if let Some(k) = self.persistent_keepalive_interval {
            let _ = writeln!(out, "persistent_keepalive_interval={k}");
        }
        if self.replace_allowed_ips {
            out.push_str("replace_allowed_ips=true\n");
        }
        for ip in &self.allowed_ips {
            let _ = writeln!(out, "allowed_ip={ip}");
        }
        if let Some(v) = self.protocol_version {
            let _ = writeln!(out, "protocol_version={v}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUB1: &str = "b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33";
    const PUB2: &str = "58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376";
    const PRIV: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";
    const PSK: &str = "188515093e952f5f22e865cef3012e72f8b5f0b598ac0309d5dacce3b70fcf52";

    /// The example from the xplatform documentation, lightly trimmed.
    fn doc_example() -> String {
        format!(
            "set=1\nprivate_key={PRIV}\nfwmark=0\nlisten_port=12912\nreplace_peers=true\n\
             public_key={PUB1}\npreshared_key={PSK}\nreplace_allowed_ips=true\n\
             allowed_ip=192.168.4.4/32\nendpoint=[abcd:23::33%2]:51820\n\
             public_key={PUB2}\nreplace_allowed_ips=true\nallowed_ip=192.168.4.6/32\n\
             persistent_keepalive_interval=111\nendpoint=182.122.22.19:3233\n\
             public_key={PUB1}\nremove=true\n\n"
        )
    }

    #[test]
    fn parses_full_request() {
        // The doc's scoped IPv6 endpoint is not a plain SocketAddr; replace it.
        let text = doc_example().replace("[abcd:23::33%2]", "[abcd:23::33]");
        let r = SetRequest::parse(&text).unwrap();
        assert_eq!(r.private_key.as_ref().unwrap().to_hex(), PRIV);
        assert_eq!(r.fwmark, Some(0));
        assert_eq!(r.listen_port, Some(12912));
        assert!(r.replace_peers);
        assert_eq!(r.peers.len(), 3);
        let p = &r.peers[0];
        assert_eq!(p.public_key.to_hex(), PUB1);
        assert_eq!(p.preshared_key.as_ref().unwrap().to_hex(), PSK);
        assert!(p.replace_allowed_ips);
        assert_eq!(
            p.allowed_ips,
            vec!["192.168.4.4/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(p.endpoint, Some("[abcd:23::33]:51820".parse().unwrap()));
        let p = &r.peers[1];
        assert_eq!(p.persistent_keepalive_interval, Some(111));
        assert_eq!(p.endpoint, Some("182.122.22.19:3233".parse().unwrap()));
        assert!(r.peers[2].remove);
    }

    #[test]
    fn render_then_parse_is_identity() {
        let text = doc_example().replace("[abcd:23::33%2]", "[abcd:23::33]");
        let r = SetRequest::parse(&text).unwrap();
        let again = SetRequest::parse(&r.render()).unwrap();
        assert_eq!(again, r);
        let mut p = PeerConfig::new(PublicKey::from_hex(PUB2).unwrap());
        p.update_only = true;
        p.protocol_version = Some(1);
        let r = SetRequest {
            peers: vec![p],
            ..Default::default()
        };
        assert_eq!(SetRequest::parse(&r.render()).unwrap(), r);
        assert_eq!(SetRequest::default().render(), "set=1\n\n");
    }

    /// Each bad input must fail with an error naming the right key, never panic.
    #[test]
    fn errors_name_the_key() {
        let peer = format!("public_key={PUB1}\n");
        let cases: Vec<(String, &str)> = vec![
            ("set=1\nlisten_port=70000\n\n".into(), "listen_port"),
            ("set=1\nlisten_port=+1\n\n".into(), "listen_port"),
            ("set=1\nlisten_port=\n\n".into(), "listen_port"),
            ("set=1\nfwmark=-1\n\n".into(), "fwmark"),
            ("set=1\nprivate_key=abc\n\n".into(), "private_key"),
            ("set=1\nreplace_peers=false\n\n".into(), "replace_peers"),
            ("set=1\npublic_key=zz\n\n".into(), "public_key"),
            (format!("set=1\n{peer}endpoint=nope\n\n"), "endpoint"),
            (
                format!("set=1\n{peer}allowed_ip=10.0.0.0/33\n\n"),
                "allowed_ip",
            ),
            (
                format!("set=1\n{peer}persistent_keepalive_interval=65536\n\n"),
                "persistent_keepalive_interval",
            ),
            (
                format!("set=1\n{peer}protocol_version=2\n\n"),
                "protocol_version",
            ),
            (
                format!("set=1\n{peer}preshared_key=00\n\n"),
                "preshared_key",
            ),
            (format!("set=1\n{peer}remove=yes\n\n"), "remove"),
            ("set=1\nendpoint=1.2.3.4:5\n\n".into(), "endpoint"),
            (format!("set=1\n{peer}listen_port=1\n\n"), "listen_port"),
        ];
        for (text, want) in cases {
            let err = SetRequest::parse(&text).expect_err(&text);
            let key = match &err {
                UapiError::InvalidValue { key, .. } => key.to_string(),
                UapiError::UnexpectedKey { key, .. } => key.clone(),
                other => panic!("{text:?}: unexpected error {other:?}"),
            };
            assert_eq!(key, want, "input: {text:.80?}");
            assert!(err.to_string().contains(want));
            assert_eq!(err.errno(), crate::Errno::EINVAL);
        }
        let exact: Vec<(String, UapiError)> = vec![
            ("get=1\n\n".into(), UapiError::UnknownOperation),
            (
                "set=1\nnonsense\n\n".into(),
                UapiError::MalformedLine { line: 2 },
            ),
            (
                format!("set=1\n{}\n\n", "a".repeat(10_000)),
                UapiError::LineTooLong { len: 10_000 },
            ),
        ];
        for (text, want) in exact {
            assert_eq!(SetRequest::parse(&text), Err(want), "input: {text:.80?}");
        }
    }

    #[test]
    fn unexpected_key_is_truncated_in_error() {
        let text = format!("set=1\n{}=1\n\n", "k".repeat(400));
        let Err(UapiError::UnexpectedKey { key, .. }) = SetRequest::parse(&text) else {
            panic!("expected UnexpectedKey");
        };
        assert!(key.len() <= 32);
    }

    #[test]
    fn errors_never_echo_secret_values() {
        let text = format!("set=1\nprivate_key={}\n\n", &PRIV[..63]);
        let msg = SetRequest::parse(&text).unwrap_err().to_string();
        assert!(!msg.contains(&PRIV[..20]), "{msg}");
        let msg = SetRequest::parse(&format!("set=1\n{PRIV}\n\n"))
            .unwrap_err()
            .to_string();
        assert!(!msg.contains(&PRIV[..20]), "{msg}");
    }

    #[test]
    fn stops_at_blank_line_and_tolerates_missing_one() {
        let r = SetRequest::parse("set=1\nlisten_port=1\n\nlisten_port=2\n").unwrap();
        assert_eq!(r.listen_port, Some(1));
        let r = SetRequest::parse("set=1\nlisten_port=3").unwrap();
        assert_eq!(r.listen_port, Some(3));
    }
}
