//! A VPC network (`"vpc": NAME` in the config) on real namespaces: the pod's veth goes
//! into the VPC's namespace, its address comes from the node's block of the VPC, its
//! MTU and DNS from the agent's `vpcs/<name>/vpc.json`, and the last DEL hands the
//! VPC back to the agent. The agent is stood in for: the test writes its answer and
//! makes the VPC namespace as `wiremesh_agent::vpc` does. Needs root.

mod common;

use std::time::Duration;

use common::{address_of, invoke, netns_path, Call, PLUGIN};
use serde_json::json;
use wiremesh_host::{pod, probe};
use wiremesh_testkit::{require_root, require_tool, Netns};

#[test]
fn a_vpc_pod_lives_in_the_vpc_namespace_with_the_vpc_s_dns() {
    if !(require_root() && require_tool("nsenter")) {
        return;
    }
    let node = Netns::new("node").unwrap();
    let vpc_ns = Netns::new("wm-vpc-7").unwrap();
    vpc_ns
        .exec_ok(&["ip", "address", "add", "169.254.1.1/32", "dev", "lo"])
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let answer = state.join("vpcs/blue");
    std::fs::create_dir_all(&answer).unwrap();
    std::fs::write(
        answer.join("vpc.json"),
        json!({"id": 7, "netns": vpc_ns.name(), "pod_cidrs": ["10.10.3.0/24"], "mtu": 1380,
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
    let ctr = Netns::new("ctr").unwrap();
    let path = netns_path(&ctr);
    let call = |command| Call {
        command,
        container_id: "c1",
        ifname: "eth0",
        netns: Some(&path),
    };

    let result = invoke(PLUGIN, &node, &call("ADD"), &conf).expect_ok("ADD");
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
    invoke(PLUGIN, &node, &call("CHECK"), &{
        let mut c = conf.clone();
        c["prevResult"] = result.clone();
        c
    })
    .expect_ok("CHECK");

    // The last pod leaves: the link goes, and the agent is told to drop the VPC.
    invoke(PLUGIN, &node, &call("DEL"), &conf).expect_ok("DEL");
    assert!(vpc_ns.exec_ok(&["ip", "link", "show", &host_if]).is_err());
    assert!(
        !answer.exists(),
        "the VPC's directory stays after its last pod"
    );
    invoke(PLUGIN, &node, &call("DEL"), &conf).expect_ok("DEL again");
}
