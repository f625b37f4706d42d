//! Properties of the pure core: IPAM never hands out an address twice, nor a pool's
//! network or broadcast address, and says "full" only when it is; config parsing
//! never panics and always answers with a spec error code.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
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
    fn ipam_never_double_leases(prefix in 24u8..=32, ops in ops()) {
        let pool = Ipv4Net::new(Ipv4Addr::new(10, 42, 7, 0), prefix).unwrap().trunc();
        let usable: Vec<Ipv4Addr> = ipam::usable(pool).collect();
        let mut taken: BTreeMap<Ipv4Addr, Option<Attachment>> = BTreeMap::new();
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
                            prop_assert!(usable.contains(&ip), "{ip} outside {pool}");
                            if prefix < 31 {
                                prop_assert!(ip != pool.network() && ip != pool.broadcast());
                            }
                            prop_assert!(taken.insert(ip, Some(who)).is_none(), "{ip} leased twice");
                            last = Some(ip);
                        }
                        None => prop_assert_eq!(taken.len(), usable.len(), "full while not full"),
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
