//! The result of ADD (spec §"Success"), rendered for the version the runtime asked
//! for, and merged into a `prevResult` when this plugin is not first in a chain.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use wiremesh_host::pod::{POD_GATEWAY, POD_GATEWAY_V6};

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

/// What ADD set up: a node-side and a container-side interface, the pod's address of
/// each family on the latter (IPv4, IPv6 or both), one default route per family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddResult {
    pub host: Interface,
    pub container: Interface,
    /// The pod's IPv4 address (its gateway is [`POD_GATEWAY`]).
    pub address: Option<Ipv4Addr>,
    /// The pod's IPv6 address (its gateway is [`POD_GATEWAY_V6`]).
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
    let addresses = [
        r.address.map(|a| (IpAddr::V4(a), IpAddr::V4(POD_GATEWAY))),
        r.address_v6
            .map(|a| (IpAddr::V6(a), IpAddr::V6(POD_GATEWAY_V6))),
    ];
    for (address, gateway) in addresses.into_iter().flatten() {
        let (host_len, family, default) = match address {
            IpAddr::V4(_) => (32, "4", "0.0.0.0/0"),
            IpAddr::V6(_) => (128, "6", "::/0"),
        };
        let mut ip = json!({
            "address": format!("{address}/{host_len}"),
            "gateway": gateway.to_string(),
            "interface": container_index,
        });
        // 0.4.0 results name each address's family; 1.0.0 dropped the field.
        if version < Version::V1 {
            ip["version"] = family.into();
        }
        ips.push(ip);
        routes.push(json!({"dst": default, "gw": gateway.to_string()}));
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
            address: Some(Ipv4Addr::new(10, 42, 1, 5)),
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

    /// An IPv6-only pod's result lists its IPv6 address and route only, in every
    /// version, and after a prevResult's.
    #[test]
    fn ipv6_only_lists_no_ipv4() {
        let r = AddResult {
            address: None,
            address_v6: Some("fd10:0:0:3::1".parse().unwrap()),
            ..sample()
        };
        let ip6 = json!({"address": "fd10:0:0:3::1/128", "gateway": "fe80::1", "interface": 1});
        let route6 = json!([{"dst": "::/0", "gw": "fe80::1"}]);
        for v in [Version(1, 1, 0), Version(1, 0, 0)] {
            let got = render(&r, v, None);
            assert_eq!(got["ips"], json!([ip6]), "{v}");
            assert_eq!(got["routes"], route6, "{v}");
        }
        let v040 = render(&r, Version(0, 4, 0), None);
        let mut ip6_040 = ip6.clone();
        ip6_040["version"] = "6".into();
        assert_eq!(v040["ips"], json!([ip6_040]));
        assert_eq!(v040["routes"], route6);
        let prev = json!({"interfaces": [{"name": "lo"}], "ips": [], "routes": []});
        let chained = render(&r, Version(1, 1, 0), Some(&prev));
        assert_eq!(chained["ips"][0]["interface"], 2);
        assert_eq!(chained["ips"].as_array().map(Vec::len), Some(1));
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
