//! wiremesh's extension of the protocol: the VPCs a `wiremesh-wg` device carries.
//!
//! `set_vpcs=1` replaces the whole VPC table of the device (the agent always sends
//! all of it, so a lost or repeated request cannot leave a stale entry behind);
//! `get_stats=1` reads the device's counters: VPC traffic, and packets dropped, by
//! reason. wireguard-tools never sends either operation, and a stock device answers
//! them with an error, so `wg` and other devices are unaffected.
//!
//! ```text
//! set_vpcs=1
//! mesh_prefix=fd5e:1d2c:9a00::/48     the mesh ULA every outer address lies in
//! local_node=1                        this node's 16-bit id
//! vpc=7                               a VPC hosted here; its section follows
//! netns=/var/run/netns/wm-vpc-7       the namespace its TUN device is created in
//! mtu=1380
//! member=1,10.10.1.0/24               node id, one of its pod CIDRs in this VPC
//! member=2,10.10.2.0/24
//!
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;

use ipnet::{IpNet, Ipv6Net};

use crate::{split_line, UapiError};

/// A `set_vpcs=1` request: every VPC this node hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpcsRequest {
    pub mesh_prefix: Ipv6Net,
    pub local_node: u16,
    pub vpcs: Vec<VpcPlane>,
}

/// One VPC as the data plane sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpcPlane {
    pub id: u32,
    /// Path of the VPC's network namespace (`/var/run/netns/NAME`).
    pub netns: String,
    pub mtu: u16,
    /// (node id, pod CIDR) for every member node, this one included.
    pub members: Vec<(u16, IpNet)>,
}

/// The reply to `get_stats=1`: the VPCs carried and the device's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceStats {
    pub vpcs: Vec<u32>,
    /// Packets read from VPC TUN devices and sent encapsulated.
    pub vpc_sent: u64,
    /// Packets received, checked and written to a VPC TUN device.
    pub vpc_delivered: u64,
    /// Packets dropped, by reason (`disallowed_source`, `unknown_vpc`, ...).
    pub dropped: BTreeMap<String, u64>,
}

fn invalid(key: &'static str, reason: &'static str) -> UapiError {
    UapiError::InvalidValue { key, reason }
}

fn unexpected(key: &str, context: &'static str) -> UapiError {
    UapiError::UnexpectedKey {
        key: key.chars().take(32).collect(),
        context,
    }
}

/// The lines after the operation line, up to the blank line that ends the request.
fn body<'a>(
    text: &'a str,
    operation: &str,
) -> Result<impl Iterator<Item = (usize, &'a str)>, UapiError> {
    let mut lines = text.split('\n');
    if lines.next() != Some(operation) {
        return Err(UapiError::UnknownOperation);
    }
    Ok(lines
        .enumerate()
        .map(|(i, l)| (i + 2, l))
        .take_while(|(_, l)| !l.is_empty()))
}

impl VpcsRequest {
    /// Parses a complete `set_vpcs=1` request.
    pub fn parse(text: &str) -> Result<Self, UapiError> {
        let mut prefix = None;
        let mut local = None;
        let mut vpcs: Vec<VpcPlane> = Vec::new();
        for (n, line) in body(text, "set_vpcs=1")? {
            let (key, value) = split_line(line, n)?;
            match (key, vpcs.last_mut()) {
                ("mesh_prefix", None) => {
                    let net: Ipv6Net = value
                        .parse()
                        .map_err(|_| invalid("mesh_prefix", "expected an IPv6 /48"))?;
                    if net.prefix_len() != 48 || net != net.trunc() {
                        return Err(invalid("mesh_prefix", "expected an IPv6 /48"));
                    }
                    prefix = Some(net);
                }
                ("local_node", None) => {
                    local = Some(
                        value
                            .parse()
                            .map_err(|_| invalid("local_node", "expected 0-65535"))?,
                    )
                }
                ("vpc", _) => {
                    let id: u32 = value
                        .parse()
                        .map_err(|_| invalid("vpc", "expected a 32-bit VPC id"))?;
                    if id == 0 || vpcs.iter().any(|v| v.id == id) {
                        return Err(invalid("vpc", "ids are non-zero and listed once"));
                    }
                    vpcs.push(VpcPlane {
                        id,
                        netns: String::new(),
                        mtu: 0,
                        members: Vec::new(),
                    });
                }
                ("netns", Some(v)) => {
                    if !value.starts_with('/') {
                        return Err(invalid("netns", "expected an absolute path"));
                    }
                    v.netns = value.to_owned();
                }
                ("mtu", Some(v)) => {
                    v.mtu = value
                        .parse()
                        .ok()
                        .filter(|m| *m >= 576)
                        .ok_or(invalid("mtu", "expected 576-65535"))?;
                }
                ("member", Some(v)) => {
                    let member = value
                        .split_once(',')
                        .and_then(|(node, cidr)| Some((node.parse().ok()?, cidr.parse().ok()?)))
                        .ok_or(invalid("member", "expected NODE_ID,CIDR"))?;
                    v.members.push(member);
                }
                (key, v) => {
                    return Err(unexpected(key, if v.is_some() { "vpc" } else { "device" }))
                }
            }
        }
        let mesh_prefix = prefix.ok_or(invalid("mesh_prefix", "missing"))?;
        let local_node = local.ok_or(invalid("local_node", "missing"))?;
        for v in &vpcs {
            if v.netns.is_empty() {
                return Err(invalid("netns", "every vpc needs one"));
            }
            if v.mtu == 0 {
                return Err(invalid("mtu", "every vpc needs one"));
            }
        }
        Ok(VpcsRequest {
            mesh_prefix,
            local_node,
            vpcs,
        })
    }

    /// The request as sent on the socket, ending with the blank line.
    pub fn render(&self) -> String {
        let mut s = format!(
            "set_vpcs=1\nmesh_prefix={}\nlocal_node={}\n",
            self.mesh_prefix, self.local_node
        );
        for v in &self.vpcs {
            let _ = writeln!(s, "vpc={}\nnetns={}\nmtu={}", v.id, v.netns, v.mtu);
            for (node, cidr) in &v.members {
                let _ = writeln!(s, "member={node},{cidr}");
            }
        }
        s.push('\n');
        s
    }
}

impl DeviceStats {
    /// The reply body (the caller appends the `errno=` line).
    pub fn render(&self) -> String {
        let mut s = String::new();
        for id in &self.vpcs {
            let _ = writeln!(s, "vpc={id}");
        }
        let _ = writeln!(
            s,
            "vpc_sent_packets={}\nvpc_delivered_packets={}",
            self.vpc_sent, self.vpc_delivered
        );
        for (reason, n) in &self.dropped {
            let _ = writeln!(s, "dropped_{reason}={n}");
        }
        s
    }

    /// Parses a reply (the client side), up to and including its `errno=` line.
    pub fn parse(text: &str) -> Result<Self, UapiError> {
        let mut c = DeviceStats::default();
        for (i, line) in text.split('\n').enumerate() {
            if line.is_empty() {
                break;
            }
            let (key, value) = split_line(line, i + 1)?;
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| invalid("counter", "expected a number"))
            };
            match key {
                "errno" => {
                    let errno: i32 = value
                        .parse()
                        .map_err(|_| invalid("errno", "expected a number"))?;
                    if errno != 0 {
                        return Err(UapiError::Errno(crate::Errno(errno.abs())));
                    }
                    return Ok(c);
                }
                "vpc" => c.vpcs.push(
                    value
                        .parse()
                        .map_err(|_| invalid("vpc", "expected a VPC id"))?,
                ),
                "vpc_sent_packets" => c.vpc_sent = number()?,
                "vpc_delivered_packets" => c.vpc_delivered = number()?,
                _ => match key.strip_prefix("dropped_") {
                    Some(reason) => {
                        c.dropped.insert(reason.to_owned(), number()?);
                    }
                    None => return Err(unexpected(key, "stats")),
                },
            }
        }
        Err(UapiError::MissingErrno)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> VpcsRequest {
        VpcsRequest {
            mesh_prefix: "fd5e:1d2c:9a00::/48".parse().unwrap(),
            local_node: 1,
            vpcs: vec![VpcPlane {
                id: 7,
                netns: "/var/run/netns/wm-vpc-7".into(),
                mtu: 1380,
                members: vec![
                    (1, "10.10.1.0/24".parse().unwrap()),
                    (2, "fd10::/64".parse().unwrap()),
                ],
            }],
        }
    }

    #[test]
    fn set_vpcs_round_trips() {
        let r = request();
        assert_eq!(VpcsRequest::parse(&r.render()), Ok(r));
        let empty = VpcsRequest {
            vpcs: vec![],
            ..request()
        };
        assert_eq!(VpcsRequest::parse(&empty.render()), Ok(empty));
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("mesh_prefix=fd00::/64", "mesh_prefix"),
            ("mesh_prefix=10.0.0.0/8", "mesh_prefix"),
            ("local_node=70000", "local_node"),
            ("vpc=0", "vpc"),
            ("vpc=7\nvpc=7", "vpc"),
            ("vpc=7\nnetns=relative\nmtu=1380", "netns"),
            ("vpc=7\nnetns=/x\nmtu=100", "mtu"),
            ("vpc=7\nnetns=/x\nmtu=1380\nmember=1", "member"),
            ("vpc=7\nnetns=/x\nmtu=1380\nmember=x,10.0.0.0/8", "member"),
            ("vpc=7\nmtu=1380", "netns"),
        ];
        for (body, key) in cases {
            let text =
                format!("set_vpcs=1\nmesh_prefix=fd5e:1d2c:9a00::/48\nlocal_node=1\n{body}\n\n");
            match VpcsRequest::parse(&text) {
                Err(UapiError::InvalidValue { key: k, .. }) => assert_eq!(k, key, "{body}"),
                other => panic!("{body}: expected an error about {key}, got {other:?}"),
            }
        }
        assert!(matches!(
            VpcsRequest::parse(
                "set_vpcs=1\nmesh_prefix=fd5e:1d2c:9a00::/48\nlocal_node=1\nnetns=/x\n\n"
            ),
            Err(UapiError::UnexpectedKey { .. })
        ));
        assert_eq!(
            VpcsRequest::parse("set=1\n\n"),
            Err(UapiError::UnknownOperation)
        );
    }

    #[test]
    fn counters_round_trip() {
        let c = DeviceStats {
            vpcs: vec![7, 9],
            vpc_sent: 10,
            vpc_delivered: 8,
            dropped: [("unknown_vpc".to_owned(), 2)].into_iter().collect(),
        };
        let reply = format!("{}errno=0\n\n", c.render());
        assert_eq!(DeviceStats::parse(&reply), Ok(c));
        assert_eq!(
            DeviceStats::parse("errno=-22\n\n"),
            Err(UapiError::Errno(crate::Errno::EINVAL))
        );
    }
}
