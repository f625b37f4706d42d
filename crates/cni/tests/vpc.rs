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
    invoke(PLUGIN, &vpc.node, &call("DEL", &path), &vpc.conf).expect_ok("DEL");
    assert!(vpc.ns.exec_ok(&["ip", "link", "show", &host_if]).is_err());
}

/// A VPC with an IPv6 pod CIDR only: ADD refuses, naming the field, and leaves
/// nothing behind.
#[test]
fn an_ipv6_only_vpc_is_refused_naming_the_field() {
    if !(require_root() && require_tool("nsenter")) {
        return;
    }
    let vpc = Vpc::new(&["fd10:0:0:3::/64"]);
    let ctr = Netns::new("ctr").unwrap();
    let path = netns_path(&ctr);
    let err = invoke(PLUGIN, &vpc.node, &call("ADD", &path), &vpc.conf).expect_err("ADD");
    assert_eq!(err["code"], 7, "{err}");
    let msg = err["msg"].as_str().unwrap().to_owned() + err["details"].as_str().unwrap_or("");
    assert!(
        msg.contains("`vpc`") && msg.contains("IPv6 pod CIDR only"),
        "{err}"
    );
    let host_if = wiremesh_cni::veth::host_ifname("c1", "eth0");
    assert!(vpc.ns.exec_ok(&["ip", "link", "show", &host_if]).is_err());
}
