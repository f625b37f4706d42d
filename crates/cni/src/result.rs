//! The result of ADD (spec §"Success"), rendered for the version the runtime asked
//! for, and merged into a `prevResult` when this plugin is not first in a chain.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use wiremesh_host::pod::POD_GATEWAY_V6;

use serde_json::{json, Map, Value};

use crate::version::Version;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: Option<String>,
    pub mtu: Option<u16>,
    /// The container's netns path; `None` for the node-side interface.
    pub sandbox: Option<String>,
}

/// What ADD set up: a node-side and a container-side interface, one address on the
/// latter (two for a dual-stack pod), one default route per family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddResult {
    pub host: Interface,
    pub container: Interface,
    pub address: Ipv4Addr,
    pub gateway: Ipv4Addr,
    /// A dual-stack pod's IPv6 address (its gateway is [`POD_GATEWAY_V6`]).
    pub address_v6: Option<Ipv6Addr>,
    /// The pod's resolver (a VPC's DNS service and search path); `None` keeps what
    /// earlier plugins said.
    pub dns: Option<Dns>,
}

/// Spec §"Success": the `dns` object of a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dns {
    pub nameservers: Vec<IpAddr>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

fn interface_json(i: &Interface, version: Version) -> Value {
    let mut o = Map::new();
    o.insert("name".into(), i.name.clone().into());
    if let Some(mac) = &i.mac {
        o.insert("mac".into(), mac.clone().into());
    }
    if let (Some(mtu), true) = (i.mtu, version >= Version::GC_STATUS) {
        o.insert("mtu".into(), mtu.into());
    }
    if let Some(sandbox) = &i.sandbox {
        o.insert("sandbox".into(), sandbox.clone().into());
    }
    Value::Object(o)
}

/// The result JSON. With a `prev` result (from earlier plugins of the chain), its
/// interfaces, addresses, routes and DNS stay first and ours are appended, with our
/// interface index shifted to match.
pub fn render(r: &AddResult, version: Version, prev: Option<&Value>) -> Value {
    let list = |key: &str| -> Vec<Value> {
        prev.and_then(|p| p.get(key))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let mut interfaces = list("interfaces");
    let mut ips = list("ips");
    let mut routes = list("routes");
    let container_index = interfaces.len() + 1;
    interfaces.push(interface_json(&r.host, version));
    interfaces.push(interface_json(&r.container, version));
    let mut ip = json!({
        "address": format!("{}/32", r.address),
        "gateway": r.gateway.to_string(),
        "interface": container_index,
    });
    if version < Version::V1 {
        ip["version"] = "4".into();
    }
    ips.push(ip);
    routes.push(json!({"dst": "0.0.0.0/0", "gw": r.gateway.to_string()}));
    if let Some(v6) = r.address_v6 {
        let mut ip = json!({
            "address": format!("{v6}/128"),
            "gateway": POD_GATEWAY_V6.to_string(),
            "interface": container_index,
        });
        if version < Version::V1 {
            ip["version"] = "6".into();
        }
        ips.push(ip);
        routes.push(json!({"dst": "::/0", "gw": POD_GATEWAY_V6.to_string()}));
    }
    let dns = match &r.dns {
        Some(d) => json!({
            "nameservers": d.nameservers.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "search": d.search,
            "options": d.options,
        }),
        None => prev
            .and_then(|p| p.get("dns"))
            .cloned()
            .unwrap_or_else(|| json!({})),
    };
    json!({
        "cniVersion": version.to_string(),
        "interfaces": interfaces,
        "ips": ips,
        "routes": routes,
        "dns": dns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AddResult {
        AddResult {
            host: Interface {
                name: "wm0123456789a".into(),
                mac: Some("aa:bb:cc:dd:ee:01".into()),
                mtu: Some(1420),
                sandbox: None,
            },
            container: Interface {
                name: "eth0".into(),
                mac: Some("aa:bb:cc:dd:ee:02".into()),
                mtu: Some(1420),
                sandbox: Some("/var/run/netns/c1".into()),
            },
            address: Ipv4Addr::new(10, 42, 1, 5),
            gateway: Ipv4Addr::new(169, 254, 1, 1),
            address_v6: None,
            dns: None,
        }
    }

    #[test]
    fn dual_stack_lists_both_addresses_and_default_routes() {
        let r = AddResult {
            address_v6: Some("fd42:0:0:1::5".parse().unwrap()),
            ..sample()
        };
        let got = render(&r, Version(1, 1, 0), None);
        assert_eq!(
            got["ips"],
            json!([
                {"address": "10.42.1.5/32", "gateway": "169.254.1.1", "interface": 1},
                {"address": "fd42:0:0:1::5/128", "gateway": "fe80::1", "interface": 1}
            ])
        );
        assert_eq!(
            got["routes"],
            json!([{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}, {"dst": "::/0", "gw": "fe80::1"}])
        );
        let v040 = render(&r, Version(0, 4, 0), None);
        assert_eq!(v040["ips"][1]["version"], "6");
    }

    #[test]
    fn render_1_1_0() {
        let got = render(&sample(), Version(1, 1, 0), None);
        let want = json!({
            "cniVersion": "1.1.0",
            "interfaces": [
                {"name": "wm0123456789a", "mac": "aa:bb:cc:dd:ee:01", "mtu": 1420},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "mtu": 1420, "sandbox": "/var/run/netns/c1"}
            ],
            "ips": [{"address": "10.42.1.5/32", "gateway": "169.254.1.1", "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
            "dns": {}
        });
        assert_eq!(got, want);
    }

    #[test]
    fn older_versions() {
        let v100 = render(&sample(), Version(1, 0, 0), None);
        assert_eq!(v100["interfaces"][0].get("mtu"), None);
        assert_eq!(v100["ips"][0].get("version"), None);
        let v040 = render(&sample(), Version(0, 4, 0), None);
        assert_eq!(v040["cniVersion"], "0.4.0");
        assert_eq!(v040["ips"][0]["version"], "4");
    }

    #[test]
    fn appended_to_prev_result() {
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "lo", "sandbox": "/x"}],
            "ips": [{"address": "fd00::5/128", "interface": 0}],
            "routes": [{"dst": "::/0"}],
            "dns": {"nameservers": ["10.0.0.10"]}
        });
        let got = render(&sample(), Version(1, 0, 0), Some(&prev));
        assert_eq!(got["interfaces"].as_array().map(Vec::len), Some(3));
        assert_eq!(got["ips"][1]["interface"], 2);
        assert_eq!(got["ips"][0]["interface"], 0);
        assert_eq!(got["routes"].as_array().map(Vec::len), Some(2));
        assert_eq!(got["dns"]["nameservers"][0], "10.0.0.10");
    }
}
