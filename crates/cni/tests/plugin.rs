//! The plugin driven as a runtime drives it, on real network namespaces: one for the
//! node, one per container. Needs root; otherwise each test prints `skipped: why`.

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use common::{address_of, invoke, netns_path, Call, PLUGIN};
use serde_json::{json, Value};
use wiremesh_host::probe;
use wiremesh_testkit::{require_root, require_tool, wait_until, Netns};

/// A node (namespace) with its own IPAM folder and agent state dir.
struct Node {
    ns: Netns,
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        Node {
            ns: Netns::new("node").expect("node namespace"),
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// A config with an explicit pod CIDR.
    fn conf(&self, pod_cidr: &str) -> Value {
        json!({
            "cniVersion": "1.1.0",
            "name": "wmtest",
            "type": "wiremesh-cni",
            "podCidr": pod_cidr,
            "dataDir": self.dir.path().join("cni"),
        })
    }

    /// A config that reads the pod CIDR from the agent's state directory (made here),
    /// with `extra` fields merged in; and that directory.
    fn state_conf(&self, extra: Value) -> (Value, std::path::PathBuf) {
        let state = self.dir.path().join("state");
        std::fs::create_dir_all(&state).expect("state dir");
        let mut conf = json!({
            "cniVersion": "1.1.0",
            "name": "wmtest",
            "type": "wiremesh-cni",
            "stateDir": state,
            "dataDir": self.dir.path().join("cni"),
        });
        if let (Some(c), Value::Object(e)) = (conf.as_object_mut(), extra) {
            c.extend(e);
        }
        (conf, state)
    }

    fn call(&self, command: &str, c: &Container, conf: &Value) -> common::Reply {
        let path = netns_path(&c.ns);
        let call = Call {
            command,
            container_id: &c.id,
            ifname: "eth0",
            netns: Some(&path),
        };
        invoke(PLUGIN, &self.ns, &call, conf)
    }

    /// Allocation files in the store.
    fn allocated(&self) -> BTreeSet<Ipv4Addr> {
        std::fs::read_dir(self.dir.path().join("cni/wmtest"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn link_exists(&self, name: &str) -> bool {
        self.ns
            .exec_ok(&["ip", "link", "show", "dev", name])
            .is_ok()
    }
}

struct Container {
    ns: Netns,
    id: String,
}

impl Container {
    fn new(id: &str) -> Container {
        Container {
            ns: Netns::new("ctr").expect("container namespace"),
            id: format!("{id}-{}", wiremesh_testkit::random_suffix(6)),
        }
    }
}

fn veth_name(c: &Container) -> String {
    wiremesh_cni::veth::host_ifname(&c.id, "eth0")
}

fn can_run() -> bool {
    require_root() && require_tool("nsenter")
}

fn with_gc_list(conf: &Value, live: &[&Container]) -> Value {
    let mut c = conf.clone();
    c["cni.dev/valid-attachments"] = live
        .iter()
        .map(|c| json!({"containerID": c.id, "ifname": "eth0"}))
        .collect();
    c
}

#[test]
fn add_check_del_and_del_again() {
    if !can_run() {
        return;
    }
    let node = Node::new();
    let conf = node.conf("10.77.1.0/24");
    let ctr = Container::new("seq");

    let result = node.call("ADD", &ctr, &conf).expect_ok("ADD");
    assert_eq!(result["cniVersion"], "1.1.0");
    let ip = address_of(&result);
    assert!(
        "10.77.1.0/24"
            .parse::<ipnet::Ipv4Net>()
            .unwrap()
            .contains(&ip)
            && ip.octets()[3] != 0,
        "{ip}"
    );
    assert_eq!(result["ips"][0]["gateway"], "169.254.1.1");
    assert_eq!(result["ips"][0]["interface"], 1);
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(
        result["interfaces"][1]["sandbox"],
        netns_path(&ctr.ns).display().to_string()
    );
    assert_eq!(result["interfaces"][1]["mtu"], 1420);
    assert_eq!(result["routes"][0]["dst"], "0.0.0.0/0");
    let host_if = result["interfaces"][0]["name"].as_str().unwrap().to_owned();
    assert!(
        host_if.starts_with("wm") && host_if.len() == 13,
        "{host_if}"
    );
    assert!(node.link_exists(&host_if));

    // The node reaches the container over the veth, and back.
    let rtt = node.ns.run(move || probe::ping(ip, Duration::from_secs(3)));
    assert!(matches!(rtt, Ok(Ok(_))), "node cannot ping {ip}: {rtt:?}");

    let mut checked = conf.clone();
    checked["prevResult"] = result.clone();
    assert_eq!(
        node.call("CHECK", &ctr, &checked).expect_ok("CHECK"),
        Value::Null
    );

    // CHECK notices what was changed behind the plugin's back.
    ctr.ns
        .exec_ok(&["ip", "route", "del", "default"])
        .expect("removing the route");
    let err = node
        .call("CHECK", &ctr, &checked)
        .expect_err("CHECK without route");
    assert_eq!(err["code"], 100);
    assert!(
        err["details"].as_str().unwrap().contains("default route"),
        "{err}"
    );

    assert_eq!(node.call("DEL", &ctr, &conf).expect_ok("DEL"), Value::Null);
    assert!(!node.link_exists(&host_if), "node link left behind");
    assert!(node.allocated().is_empty(), "address not freed");
    node.call("DEL", &ctr, &conf).expect_ok("second DEL");
    let err = node
        .call("CHECK", &ctr, &checked)
        .expect_err("CHECK after DEL");
    assert_eq!(err["code"], 100);
}

#[test]
fn fifty_parallel_adds_get_distinct_addresses() {
    if !can_run() {
        return;
    }
    let node = Node::new();
    let conf = node.conf("10.77.2.0/24");
    let containers: Vec<Container> = (0..50)
        .map(|i| Container::new(&format!("par{i}")))
        .collect();
    let results: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = containers
            .iter()
            .map(|c| s.spawn(|| node.call("ADD", c, &conf).expect_ok("parallel ADD")))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("ADD thread"))
            .collect()
    });
    let addresses: BTreeSet<Ipv4Addr> = results.iter().map(address_of).collect();
    assert_eq!(addresses.len(), 50, "duplicates among {addresses:?}");
    assert_eq!(node.allocated(), addresses);
    let hosts: BTreeSet<&str> = results
        .iter()
        .filter_map(|r| r["interfaces"][0]["name"].as_str())
        .collect();
    assert_eq!(hosts.len(), 50);

    std::thread::scope(|s| {
        for c in &containers {
            let (node, conf) = (&node, &conf);
            s.spawn(move || node.call("DEL", c, conf).expect_ok("parallel DEL"));
        }
    });
    assert!(node.allocated().is_empty(), "left: {:?}", node.allocated());
}

#[test]
fn gc_frees_what_no_container_holds() {
    if !can_run() {
        return;
    }
    let node = Node::new();
    let conf = node.conf("10.77.3.0/24");
    let live = Container::new("live");
    let dead = Container::new("dead");
    let live_ip = address_of(&node.call("ADD", &live, &conf).expect_ok("ADD live"));
    let dead_result = node.call("ADD", &dead, &conf).expect_ok("ADD dead");
    let dead_ip = address_of(&dead_result);
    let dead_host_if = dead_result["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_owned();

    // The container dies without a DEL: its namespace goes, and with it (soon: the
    // kernel tears namespaces down in the background) its veth pair.
    drop(dead);
    assert_eq!(node.allocated(), BTreeSet::from([live_ip, dead_ip]));

    // GC without the list is refused rather than taken as "nothing is valid".
    let err = node.call("GC", &live, &conf).expect_err("GC without list");
    assert_eq!(err["code"], 7);
    assert!(err["msg"]
        .as_str()
        .unwrap()
        .contains("cni.dev/valid-attachments"));

    node.call("GC", &live, &with_gc_list(&conf, &[&live]))
        .expect_ok("GC");
    assert_eq!(node.allocated(), BTreeSet::from([live_ip]));
    assert!(wait_until(Duration::from_secs(5), || !node.link_exists(&dead_host_if)));
    node.call("CHECK", &live, &conf).expect_ok("CHECK survivor");

    // An empty list frees everything, including the survivor's link.
    let live_host_if = veth_name(&live);
    assert!(node.link_exists(&live_host_if));
    node.call("GC", &live, &with_gc_list(&conf, &[]))
        .expect_ok("GC all");
    assert!(node.allocated().is_empty());
    assert!(!node.link_exists(&live_host_if));
}

#[test]
fn errors_are_spec_error_objects() {
    if !can_run() {
        return;
    }
    let node = Node::new();
    let ctr = Container::new("err");

    let mut bad = node.conf("10.77.4.0/24");
    bad["mtu"] = json!("big");
    let err = node.call("ADD", &ctr, &bad).expect_err("bad mtu");
    assert_eq!(err["code"], 7);
    assert_eq!(err["cniVersion"], "1.1.0");
    assert!(err["msg"].as_str().unwrap().contains("mtu"), "{err}");

    let mut bad = node.conf("10.77.4.0/24");
    bad["podCidr"] = json!("10.77.4.0/33");
    let err = node.call("ADD", &ctr, &bad).expect_err("bad podCidr");
    assert_eq!(err["code"], 7);
    assert!(err["msg"].as_str().unwrap().contains("podCidr"), "{err}");

    let mut old = node.conf("10.77.4.0/24");
    old["cniVersion"] = json!("0.4.0");
    old["mtu"] = json!(0);
    let err = node.call("ADD", &ctr, &old).expect_err("bad mtu, 0.4.0");
    assert_eq!(err["cniVersion"], "0.4.0");

    let conf = node.conf("10.77.4.0/24");
    let missing = Path::new("/var/run/netns/wiremesh-cni-no-such-ns");
    let call = Call {
        command: "ADD",
        container_id: &ctr.id,
        ifname: "eth0",
        netns: Some(missing),
    };
    let err = invoke(PLUGIN, &node.ns, &call, &conf).expect_err("missing netns");
    assert_eq!(err["code"], 4);
    assert!(err["msg"].as_str().unwrap().contains("CNI_NETNS"), "{err}");
    assert!(node.allocated().is_empty(), "a failed ADD kept its address");

    let call = Call {
        command: "CHECK",
        netns: Some(missing),
        ..call
    };
    let err = invoke(PLUGIN, &node.ns, &call, &conf).expect_err("CHECK, missing netns");
    assert_eq!(err["code"], 3);

    // A /30 has two addresses: the third ADD must wait for a DEL (code 11).
    let tiny = node.conf("10.77.5.0/30");
    let (a, b, c) = (
        Container::new("a"),
        Container::new("b"),
        Container::new("c"),
    );
    node.call("ADD", &a, &tiny).expect_ok("ADD 1/2");
    node.call("ADD", &b, &tiny).expect_ok("ADD 2/2");
    let err = node.call("ADD", &c, &tiny).expect_err("ADD to a full pool");
    assert_eq!(err["code"], 11);
    let err = node
        .call("STATUS", &c, &tiny)
        .expect_err("STATUS of a full pool");
    assert_eq!(err["code"], 50);
    node.call("DEL", &a, &tiny).expect_ok("DEL");
    node.call("STATUS", &c, &tiny).expect_ok("STATUS with room");
    node.call("ADD", &c, &tiny).expect_ok("ADD after DEL");
}

#[test]
fn pod_cidr_from_the_agent_state_dir() {
    if !can_run() {
        return;
    }
    let node = Node::new();
    let (conf, state) = node.state_conf(json!({"interface": "wmwgtest0"}));
    let ctr = Container::new("state");

    // No agent yet: not available (STATUS), try again later (ADD).
    let err = node
        .call("STATUS", &ctr, &conf)
        .expect_err("STATUS without agent");
    assert_eq!(err["code"], 50);
    assert!(
        err["details"].as_str().unwrap().contains("pod-cidr"),
        "{err}"
    );
    assert_eq!(
        node.call("ADD", &ctr, &conf)
            .expect_err("ADD without agent")["code"],
        11
    );

    std::fs::write(state.join("pod-cidr"), "garbage\n").unwrap();
    assert_eq!(
        node.call("ADD", &ctr, &conf).expect_err("garbage state")["code"],
        5
    );

    // The agent's file, and its WireGuard interface's MTU (a stand-in link here).
    std::fs::write(state.join("pod-cidr"), "10.77.6.0/24\n").unwrap();
    node.ns
        .exec_ok(&[
            "ip",
            "link",
            "add",
            "wmwgtest0",
            "mtu",
            "1380",
            "type",
            "veth",
            "peer",
            "name",
            "wmwgtest1",
        ])
        .expect("stand-in WireGuard link");
    node.call("STATUS", &ctr, &conf).expect_ok("STATUS");
    let result = node.call("ADD", &ctr, &conf).expect_ok("ADD");
    assert!(
        address_of(&result).to_string().starts_with("10.77.6."),
        "{result}"
    );
    assert_eq!(result["interfaces"][1]["mtu"], 1380);
    let mtu = ctr
        .ns
        .exec_ok(&["cat", "/sys/class/net/eth0/mtu"])
        .unwrap_or_default();
    assert_eq!(mtu.trim(), "1380");
}

/// With the agent's `pod-cidr-v6` beside `pod-cidr`, a container is dual-stack: both
/// addresses in the result, both reachable from the node, both gone after DEL.
#[test]
fn dual_stack_add_and_del() {
    if !can_run() {
        return;
    }
    let node = Node::new();
    let (conf, state) = node.state_conf(json!({"mtu": 1400}));
    std::fs::write(state.join("pod-cidr"), "10.77.7.0/24\n").unwrap();
    std::fs::write(state.join("pod-cidr-v6"), "fd77:0:0:7::/64\n").unwrap();
    let ctr = Container::new("dual");
    let result = node.call("ADD", &ctr, &conf).expect_ok("ADD");
    let ip = address_of(&result);
    let ip6: std::net::Ipv6Addr = result["ips"][1]["address"]
        .as_str()
        .and_then(|a| a.strip_suffix("/128"))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("an IPv6 /128 second: {result}"));
    // The IPv6 address has the IPv4 address's host part.
    assert_eq!(
        u128::from(ip6) & 0xff,
        u128::from(ip.octets()[3]),
        "{ip} {ip6}"
    );
    assert!(ip6.to_string().starts_with("fd77:0:0:7::"), "{ip6}");
    assert_eq!(result["ips"][1]["gateway"], "fe80::1");
    assert_eq!(result["ips"][1]["interface"], 1);
    assert_eq!(result["routes"][1], json!({"dst": "::/0", "gw": "fe80::1"}));
    for dst in [std::net::IpAddr::V4(ip), std::net::IpAddr::V6(ip6)] {
        let rtt = node
            .ns
            .run(move || probe::ping(dst, Duration::from_secs(3)));
        assert!(matches!(rtt, Ok(Ok(_))), "node cannot ping {dst}: {rtt:?}");
    }
    // And the container's IPv6 default route works through the node-side gateway.
    let node_v6 = "fd77:ffff::1";
    for cmd in [
        &["ip", "link", "set", "lo", "up"][..],
        &[
            "ip",
            "-6",
            "address",
            "add",
            &format!("{node_v6}/128"),
            "dev",
            "lo",
        ],
    ] {
        node.ns.exec_ok(cmd).expect("an address on the node");
    }
    let back = ctr.ns.run(move || {
        probe::ping(
            node_v6.parse::<std::net::Ipv6Addr>().unwrap(),
            Duration::from_secs(3),
        )
    });
    assert!(
        matches!(back, Ok(Ok(_))),
        "container cannot ping the node: {back:?}"
    );
    // CHECK covers the IPv6 address too: it fails once the node's /128 route is gone.
    node.call("CHECK", &ctr, &conf).expect_ok("CHECK");
    node.ns
        .exec_ok(&["ip", "-6", "route", "del", &ip6.to_string()])
        .unwrap();
    let err = node
        .call("CHECK", &ctr, &conf)
        .expect_err("CHECK without the /128 route");
    assert!(
        err["details"]
            .as_str()
            .is_some_and(|d| d.contains(&format!("no route to {ip6}"))),
        "{err}"
    );

    node.call("DEL", &ctr, &conf).expect_ok("DEL");
    assert!(node.allocated().is_empty(), "DEL frees the one reservation");
    let routes = node
        .ns
        .exec_ok(&["ip", "-6", "route", "show", &ip6.to_string()]);
    assert_eq!(
        routes.unwrap_or_default().trim(),
        "",
        "the /128 route is gone"
    );
}

#[test]
fn version_and_older_cni_versions() {
    if !can_run() {
        return;
    }
    let node = Node::new();
    let ctr = Container::new("ver");
    let reply = node.call("VERSION", &ctr, &json!({"cniVersion": "1.1.0"}));
    let v = reply.expect_ok("VERSION");
    assert_eq!(v["cniVersion"], "1.1.0");
    assert!(v["supportedVersions"]
        .as_array()
        .unwrap()
        .contains(&json!("0.4.0")));

    let mut conf = node.conf("10.77.7.0/24");
    conf["cniVersion"] = json!("0.4.0");
    let result = node.call("ADD", &ctr, &conf).expect_ok("ADD 0.4.0");
    assert_eq!(result["cniVersion"], "0.4.0");
    assert_eq!(result["ips"][0]["version"], "4");
    node.call("CHECK", &ctr, &conf).expect_ok("CHECK 0.4.0");
    conf["cniVersion"] = json!("0.3.1");
    let err = node.call("CHECK", &ctr, &conf).expect_err("CHECK 0.3.1");
    assert_eq!(err["code"], 1);
    node.call("DEL", &ctr, &conf).expect_ok("DEL 0.3.1");
}
