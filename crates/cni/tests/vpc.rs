//! A VPC network (`"vpc": NAME` in the config) on real namespaces: the pod's veth goes
//! into the VPC's namespace, its address comes from the node's block of the VPC, its
//! MTU and DNS from the agent's `vpcs/<name>/vpc.json`, and the last DEL hands the
//! VPC back to the agent. The agent is stood in for: the test writes its answer and
//! makes the VPC namespace as `wiremesh_agent::vpc` does. Needs root.

mod common;

use std::time::Duration;

use common::{address_of, invoke, netns_path, Call, PLUGIN};
use serde_json::{json, Value};
use wiremesh_host::{pod, probe};
use wiremesh_testkit::{require_root, require_tool, Netns};

/// A node, the VPC `blue` (id 7) set up on it as its agent would, with this node's
/// `blocks`, and the network config of a VPC network on it.
struct Vpc {
    node: Netns,
    ns: Netns,
    dir: tempfile::TempDir,
    conf: Value,
}

impl Vpc {
    fn new(blocks: &[&str]) -> Vpc {
        let node = Netns::new("node").unwrap();
        let ns = Netns::new("wm-vpc-7").unwrap();
        ns.exec_ok(&["ip", "address", "add", "169.254.1.1/32", "dev", "lo"])
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let answer = state.join("vpcs/blue");
        std::fs::create_dir_all(&answer).unwrap();
        std::fs::write(
            answer.join("vpc.json"),
            json!({"id": 7, "netns": ns.name(), "pod_cidrs": blocks, "mtu": 1380,
                   "nameserver": "10.96.0.10", "zone": "cluster.local"})
            .to_string(),
        )
        .unwrap();
        let conf = json!({
            "cniVersion": "1.1.0",
            "name": "wm-blue",
            "type": "wiremesh-cni",
            "vpc": "blue",
            "stateDir": state,
            "dataDir": dir.path().join("cni"),
        });
        Vpc {
            node,
            ns,
            dir,
            conf,
        }
    }

    fn answer(&self) -> std::path::PathBuf {
        self.dir.path().join("state/vpcs/blue")
    }
}

fn call<'a>(command: &'a str, path: &'a std::path::Path) -> Call<'a> {
    Call {
        command,
        container_id: "c1",
        ifname: "eth0",
        netns: Some(path),
    }
}

#[test]
fn a_vpc_pod_lives_in_the_vpc_namespace_with_the_vpc_s_dns() {
    if !(require_root() && require_tool("nsenter")) {
        return;
    }
    let vpc = Vpc::new(&["10.10.3.0/24"]);
    let Vpc {
        node,
        ns: vpc_ns,
        conf,
        ..
    } = &vpc;
    let ctr = Netns::new("ctr").unwrap();
    let path = netns_path(&ctr);
    let call = |command| call(command, &path);
    let result = invoke(PLUGIN, node, &call("ADD"), conf).expect_ok("ADD");
    let ip = address_of(&result);
    assert!(ip.to_string().starts_with("10.10.3."), "{result}");
    assert_eq!(result["interfaces"][1]["mtu"], 1380, "{result}");
    assert_eq!(
        result["dns"],
        json!({"nameservers": ["10.96.0.10"],
               "search": ["default.svc.cluster.local", "svc.cluster.local", "cluster.local"],
               "options": ["ndots:5"]})
    );
    let host_if = wiremesh_cni::veth::host_ifname("c1", "eth0");
    assert!(vpc_ns.exec_ok(&["ip", "link", "show", &host_if]).is_ok());
    assert!(node.exec_ok(&["ip", "link", "show", &host_if]).is_err());
    let routes = vpc_ns
        .exec_ok(&["ip", "route", "show", &ip.to_string()])
        .unwrap();
    assert!(routes.contains(&host_if), "{routes}");
    // The gateway is the VPC namespace's, never the node's.
    let gw = ctr.run(|| probe::ping(pod::POD_GATEWAY, Duration::from_secs(2)));
    assert!(gw.unwrap().is_ok());
    invoke(PLUGIN, node, &call("CHECK"), &{
        let mut c = conf.clone();
        c["prevResult"] = result.clone();
        c
    })
    .expect_ok("CHECK");

    // The last pod leaves: the link goes, and the agent is told to drop the VPC.
    invoke(PLUGIN, node, &call("DEL"), conf).expect_ok("DEL");
    assert!(vpc_ns.exec_ok(&["ip", "link", "show", &host_if]).is_err());
    assert!(
        !vpc.answer().exists(),
        "the VPC's directory stays after its last pod"
    );
    invoke(PLUGIN, node, &call("DEL"), conf).expect_ok("DEL again");
}

/// A dual-stack VPC: the pod gets its IPv6 address at its IPv4 address's offset in
/// the node's IPv6 block, a /128 route in the VPC namespace, a default route via
/// fe80::1; the result lists both and the agent is told both.
#[test]
fn a_dual_stack_vpc_pod_gets_an_address_of_each_family() {
    if !(require_root() && require_tool("nsenter")) {
        return;
    }
    let vpc = Vpc::new(&["10.10.3.0/24", "fd10:0:0:3::/64"]);
    let ctr = Netns::new("ctr").unwrap();
    let path = netns_path(&ctr);
    let result = invoke(PLUGIN, &vpc.node, &call("ADD", &path), &vpc.conf).expect_ok("ADD");
    let v4 = address_of(&result);
    let v6: std::net::Ipv6Addr = format!("fd10:0:0:3::{:x}", v4.octets()[3]).parse().unwrap();
    assert_eq!(
        result["ips"][1],
        json!({"address": format!("{v6}/128"), "gateway": "fe80::1", "interface": 1}),
        "{result}"
    );
    let host_if = wiremesh_cni::veth::host_ifname("c1", "eth0");
    let routes = vpc
        .ns
        .exec_ok(&["ip", "-6", "route", "show", &v6.to_string()])
        .unwrap();
    assert!(routes.contains(&host_if), "{routes}");
    let default = ctr
        .exec_ok(&["ip", "-6", "route", "show", "default"])
        .unwrap();
    assert!(default.contains("via fe80::1 dev eth0"), "{default}");
    let pod_file = vpc.answer().join("pods/c1.json");
    let told: Value = serde_json::from_slice(&std::fs::read(&pod_file).unwrap()).unwrap();
    assert_eq!(told["address"], v4.to_string());
    assert_eq!(told["address_v6"], v6.to_string());
    // The VPC namespace reaches the pod at its IPv6 address.
    let reached = vpc
        .ns
        .exec_ok(&["ping", "-6", "-c", "1", "-W", "2", &v6.to_string()]);
    assert!(reached.is_ok(), "{reached:?}");
    // CHECK covers both families: it fails once the pod's IPv6 default route is gone.
    check_needs_the_ipv6_default_route(&vpc, &ctr, &path, &result);
    invoke(PLUGIN, &vpc.node, &call("DEL", &path), &vpc.conf).expect_ok("DEL");
    assert!(vpc.ns.exec_ok(&["ip", "link", "show", &host_if]).is_err());
}

/// CHECK of the pod ADD answered with `result` passes, then fails (naming the
/// gateway) once the pod's IPv6 default route is gone.
fn check_needs_the_ipv6_default_route(
    vpc: &Vpc,
    ctr: &Netns,
    path: &std::path::Path,
    result: &Value,
) {
    let checked = with_prev_result(&vpc.conf, result);
    invoke(PLUGIN, &vpc.node, &call("CHECK", path), &checked).expect_ok("CHECK");
    ctr.exec_ok(&["ip", "-6", "route", "del", "default"])
        .unwrap();
    let err = invoke(PLUGIN, &vpc.node, &call("CHECK", path), &checked).expect_err("CHECK");
    assert!(
        err["details"].as_str().unwrap().contains("fe80::1"),
        "{err}"
    );
}

fn with_prev_result(conf: &Value, result: &Value) -> Value {
    let mut c = conf.clone();
    c["prevResult"] = result.clone();
    c
}

/// The one address of an IPv6-only pod's result.
fn address_v6_of(result: &Value) -> std::net::Ipv6Addr {
    let ips = result["ips"].as_array().expect("ips");
    assert_eq!(ips.len(), 1, "{result}");
    let a = ips[0]["address"].as_str().expect("ips[0].address");
    a.trim_end_matches("/128").parse().expect("an IPv6 address")
}

/// A VPC with an IPv6 pod CIDR only: the pod gets an address of the node's IPv6
/// block (never its `::0`) and no IPv4 at all, reaches its gateway fe80::1 in the
/// VPC namespace, passes CHECK, and the agent is told its IPv6 address as its
/// `address`. DEL frees it, and the next ADD goes on round-robin.
#[test]
fn an_ipv6_only_vpc_pod_gets_an_ipv6_address_only() {
    if !(require_root() && require_tool("nsenter")) {
        return;
    }
    let vpc = Vpc::new(&["fd10:0:0:3::/64"]);
    let (ctr, ctr2) = (Netns::new("ctr").unwrap(), Netns::new("ctr2").unwrap());
    let (path, path2) = (netns_path(&ctr), netns_path(&ctr2));
    let second = |command| Call {
        command,
        container_id: "c2",
        ifname: "eth0",
        netns: Some(&path2),
    };
    let result = invoke(PLUGIN, &vpc.node, &call("ADD", &path), &vpc.conf).expect_ok("ADD");
    let ip = address_v6_of(&result);
    assert_eq!(ip, "fd10:0:0:3::1".parse::<std::net::Ipv6Addr>().unwrap());
    assert_eq!(
        result["routes"],
        json!([{"dst": "::/0", "gw": "fe80::1"}]),
        "{result}"
    );
    let v4 = ctr
        .exec_ok(&["ip", "-4", "address", "show", "dev", "eth0"])
        .unwrap();
    assert!(!v4.contains("inet "), "{v4}");
    let v4_routes = ctr.exec_ok(&["ip", "-4", "route", "show"]).unwrap();
    assert!(v4_routes.trim().is_empty(), "{v4_routes}");
    let host_if = wiremesh_cni::veth::host_ifname("c1", "eth0");
    let routes = vpc
        .ns
        .exec_ok(&["ip", "-6", "route", "show", &ip.to_string()])
        .unwrap();
    assert!(routes.contains(&host_if), "{routes}");
    let reached = ctr.exec_ok(&["ping", "-6", "-c", "1", "-W", "2", "fe80::1%eth0"]);
    assert!(reached.is_ok(), "{reached:?}");
    let reached = vpc
        .ns
        .exec_ok(&["ping", "-6", "-c", "1", "-W", "2", &ip.to_string()]);
    assert!(reached.is_ok(), "{reached:?}");
    let told: Value =
        serde_json::from_slice(&std::fs::read(vpc.answer().join("pods/c1.json")).unwrap()).unwrap();
    assert_eq!(told["address"], ip.to_string());
    assert_eq!(told.get("address_v6"), None, "{told}");
    check_needs_the_ipv6_default_route(&vpc, &ctr, &path, &result);

    // A second pod keeps the VPC on the node while the first leaves and comes back.
    let other = invoke(PLUGIN, &vpc.node, &second("ADD"), &vpc.conf).expect_ok("ADD c2");
    assert_eq!(address_v6_of(&other).to_string(), "fd10:0:0:3::2");
    invoke(PLUGIN, &vpc.node, &call("DEL", &path), &vpc.conf).expect_ok("DEL");
    assert!(vpc.ns.exec_ok(&["ip", "link", "show", &host_if]).is_err());
    let store = vpc.dir.path().join("cni/wm-blue");
    assert!(!store.join(ip.to_string()).exists(), "DEL kept the lease");
    let again = invoke(PLUGIN, &vpc.node, &call("ADD", &path), &vpc.conf).expect_ok("ADD again");
    assert_eq!(address_v6_of(&again).to_string(), "fd10:0:0:3::3");
    for (c, p) in [("c1", &path), ("c2", &path2)] {
        let del = Call {
            command: "DEL",
            container_id: c,
            ifname: "eth0",
            netns: Some(p),
        };
        invoke(PLUGIN, &vpc.node, &del, &vpc.conf).expect_ok("DEL");
    }
    assert!(
        !vpc.answer().exists(),
        "the VPC's directory stays after its last pod"
    );
}
