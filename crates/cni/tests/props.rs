//! Properties of the pure core: IPAM never hands out an address twice, nor an IPv4
//! pool's network or broadcast address or an IPv6 pool's `::0`, and says "full"
//! only when it is; config parsing
//! never panics and always answers with a spec error code.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;
use wiremesh_cni::config::{self, Attachment};
use wiremesh_cni::ipam;

#[derive(Debug, Clone)]
enum Op {
    Add(u8),
    Del(u8),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![3 => any::<u8>().prop_map(Op::Add), 1 => any::<u8>().prop_map(Op::Del)],
        0..200,
    )
}

fn owner(id: u8) -> Attachment {
    Attachment {
        container_id: format!("c{id}"),
        ifname: "eth0".into(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn ipam_never_double_leases(v6 in any::<bool>(), host_bits in 0u8..=8, ops in ops()) {
        let pool = if v6 {
            IpNet::V6(Ipv6Net::new("fd10:0:0:7::".parse().unwrap(), 128 - host_bits).unwrap())
        } else {
            IpNet::V4(Ipv4Net::new(Ipv4Addr::new(10, 42, 7, 0), 32 - host_bits).unwrap())
        };
        let reserved = |ip: IpAddr| match pool {
            IpNet::V4(p) => p.prefix_len() < 31 && (ip == p.network() || ip == p.broadcast()),
            IpNet::V6(p) => ip == p.network(),
        };
        let mut taken = ipam::Taken::new();
        let mut last = None;
        for op in ops {
            match op {
                Op::Add(id) => {
                    let who = owner(id);
                    if ipam::held_by(&taken, &who).is_some() {
                        continue;
                    }
                    match ipam::pick(pool, &taken, last) {
                        Some(ip) => {
                            prop_assert!(pool.contains(&ip) && !reserved(ip), "{ip} of {pool}");
                            prop_assert!(taken.insert(ip, Some(who)).is_none(), "{ip} leased twice");
                            last = Some(ip);
                        }
                        None => prop_assert_eq!(taken.len() as u128, ipam::size(pool), "full while not full"),
                    }
                }
                Op::Del(id) => {
                    if let Some(ip) = ipam::held_by(&taken, &owner(id)) {
                        taken.remove(&ip);
                    }
                }
            }
        }
    }

    #[test]
    fn config_parse_never_panics(input in ".{0,200}") {
        if let Err(e) = config::parse(input.as_bytes()) {
            prop_assert!([1, 2, 6, 7].contains(&e.code()), "code {} for {input:?}", e.code());
        }
    }

    #[test]
    fn config_fields_of_any_json_type(
        key in prop::sample::select(vec!["cniVersion", "name", "type", "mtu", "podCidr",
            "stateDir", "dataDir", "interface", "prevResult", "cni.dev/valid-attachments"]),
        value in prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            ".{0,20}".prop_map(serde_json::Value::from),
            Just(serde_json::json!([])),
            Just(serde_json::json!({})),
        ],
    ) {
        let mut conf = serde_json::json!({"cniVersion": "1.1.0", "name": "wm", "type": "wiremesh-cni"});
        conf[key] = value;
        if let Err(e) = config::parse(conf.to_string().as_bytes()) {
            prop_assert!([1, 2, 6, 7].contains(&e.code()), "code {} for {conf}", e.code());
            if e.code() == 7 {
                prop_assert!(e.to_string().contains(key), "{e} does not name {key}");
            }
        }
    }
}
