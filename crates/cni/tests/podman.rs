//! End to end with a real runtime: two simulated nodes (network namespaces joined by
//! a veth), each running `wiremesh agent`; podman on each node runs containers
//! through a conflist of `wiremesh-cni` + `portmap`; a container on node 1 reaches a
//! container on node 2 by address, through the WireGuard mesh.
//!
//! Needs root, podman with runc and the CNI backend, Debian's containernetworking-
//! plugins and busybox-static (see `crates/cni/APT-PACKAGES`), and the binaries of
//! `cargo build -p wiremesh -p wiremesh-wg`. Prints `skipped: why` when it cannot run.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use wiremesh_testkit::{
    cargo_bin, random_suffix, require_root, require_tool, skip, unique_ifname, veth_pair,
    wait_until, Netns,
};

const NETWORK: &str = "wiremesh";
const TOKEN: &str = "wiremesh-cni-e2e-ok";

struct SimNode {
    ns: Netns,
    /// The agent's WireGuard interface.
    interface: String,
    state_dir: PathBuf,
    containers_conf: PathBuf,
    agent: Option<Child>,
}

impl SimNode {
    /// `podman ARGS` inside this node's network namespace only (not `ip netns exec`,
    /// which remounts /sys and leaves podman without cgroups).
    fn podman(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.ns.name()))
            .arg("podman")
            .args(args)
            .env("CONTAINERS_CONF", &self.containers_conf)
            .stdin(Stdio::null())
            .output()
            .expect("running podman")
    }

    fn podman_ok(&self, args: &[&str]) -> String {
        let out = self.podman(args);
        assert!(
            out.status.success(),
            "podman {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Packets sent through the node's WireGuard interface so far.
    fn wireguard_tx_packets(&self) -> u64 {
        let out = self
            .ns
            .exec_ok(&["ip", "-json", "-s", "link", "show", "dev", &self.interface])
            .unwrap_or_default();
        let links: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        links[0]["stats64"]["tx"]["packets"].as_u64().unwrap_or(0)
    }

    fn allocated(&self) -> Vec<String> {
        fs::read_dir(self.state_dir.join("cni").join(NETWORK))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        // SIGTERM so the agent stops its WireGuard device and removes its socket;
        // the namespace guard then kills whatever is left inside.
        if let Some(agent) = &mut self.agent {
            let _ = kill(Pid::from_raw(agent.id() as i32), Signal::SIGTERM);
            wait_until(Duration::from_secs(3), || {
                matches!(agent.try_wait(), Ok(Some(_)))
            });
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }
}

/// Containers and the image this test made, removed even when it fails.
struct Cleanup<'a> {
    containers: Vec<(&'a SimNode, String)>,
    image: String,
    first: &'a SimNode,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for (node, name) in &self.containers {
            let _ = node.podman(&["rm", "-f", "-t", "0", name]);
        }
        let _ = self.first.podman(&["rmi", "-f", &self.image]);
    }
}

fn skip_unless_ready() -> Option<(PathBuf, PathBuf)> {
    if !require_root() {
        return None;
    }
    for tool in [
        "podman",
        "runc",
        "nsenter",
        "/bin/busybox",
        "/usr/lib/cni/portmap",
    ] {
        if !require_tool(tool) {
            println!("install the packages in crates/cni/APT-PACKAGES");
            return None;
        }
    }
    let (wiremesh, wg) = (cargo_bin("wiremesh"), cargo_bin("wiremesh-wg"));
    if !wiremesh.exists() || !wg.exists() {
        skip("build the agent first: cargo build -p wiremesh -p wiremesh-wg");
        return None;
    }
    Some((wiremesh, wg))
}

fn write_node_config(dir: &Path, state_dir: &Path, interface: &str) -> PathBuf {
    let net_d = dir.join("net.d");
    fs::create_dir_all(&net_d).expect("net.d");
    // Debian's plugins speak CNI up to 1.0.0, and so does podman 4.3's libcni.
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [
            {"type": "wiremesh-cni", "stateDir": state_dir, "dataDir": state_dir.join("cni"),
             "interface": interface},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    });
    fs::write(net_d.join("10-wiremesh.conflist"), conflist.to_string()).expect("conflist");
    let plugin_dir = Path::new(common::PLUGIN)
        .parent()
        .expect("plugin directory")
        .to_owned();
    let conf = dir.join("containers.conf");
    fs::write(
        &conf,
        format!(
            "[containers]\ndefault_ulimits = []\n\
             [network]\nnetwork_backend = \"cni\"\n\
             cni_plugin_dirs = [{:?}, \"/usr/lib/cni\"]\n\
             network_config_dir = {:?}\n\
             [engine]\nruntime = \"runc\"\n",
            plugin_dir.display().to_string(),
            net_d.display().to_string()
        ),
    )
    .expect("containers.conf");
    conf
}

/// A busybox image with a page to serve, imported without a registry.
fn import_image(dir: &Path, node: &SimNode, tag: &str) {
    let root = dir.join("image");
    fs::create_dir_all(root.join("bin")).expect("image dir");
    fs::create_dir_all(root.join("www")).expect("image dir");
    fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copying busybox");
    for applet in ["sh", "ping", "ip", "nc", "httpd", "sleep", "cat", "seq"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("symlink");
    }
    fs::write(root.join("www/index.html"), TOKEN).expect("index.html");
    let tar = dir.join("image.tar");
    let ok = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .expect("tar")
        .success();
    assert!(ok, "tar failed");
    node.podman_ok(&["import", &tar.display().to_string(), tag]);
}

#[test]
fn containers_on_two_nodes_reach_each_other() {
    let Some((wiremesh, _)) = skip_unless_ready() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("temp dir");
    let registry = format!("dir:{}", tmp.path().join("registry").display());
    let cluster = format!("cni{}", random_suffix(6));
    let init = Command::new(&wiremesh)
        .args(["init", "--registry", &registry, "--cluster", &cluster])
        .output()
        .expect("wiremesh init");
    assert!(
        init.status.success(),
        "init: {}",
        String::from_utf8_lossy(&init.stderr)
    );

    let mut nodes = Vec::new();
    for n in 1..=2 {
        let ns = Netns::new(&format!("pn{n}")).expect("node namespace");
        let dir = tmp.path().join(format!("n{n}"));
        let state_dir = dir.join("state");
        fs::create_dir_all(&state_dir).expect("state dir");
        let interface = unique_ifname("wmc");
        let containers_conf = write_node_config(&dir, &state_dir, &interface);
        nodes.push((ns, state_dir, containers_conf, interface, dir));
    }
    veth_pair(
        &nodes[0].0,
        &nodes[1].0,
        "192.168.99.1/24",
        "192.168.99.2/24",
    )
    .expect("underlay");
    let nodes: Vec<SimNode> = nodes
        .into_iter()
        .enumerate()
        .map(|(i, (ns, state_dir, containers_conf, interface, dir))| {
            let endpoint = format!("192.168.99.{}:51820", i + 1);
            let log = fs::File::create(dir.join("agent.log")).expect("agent log");
            let agent = Command::new("nsenter")
                .arg(format!("--net=/var/run/netns/{}", ns.name()))
                .arg(&wiremesh)
                .args(["agent", "--registry", &registry, "--cluster", &cluster])
                .args(["--name", &format!("n{}", i + 1), "--interface", &interface])
                .arg("--state-dir")
                .arg(&state_dir)
                .args([
                    "--private-endpoint",
                    &endpoint,
                    "--public-endpoint",
                    &endpoint,
                ])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("starting an agent");
            SimNode {
                ns,
                interface,
                state_dir,
                containers_conf,
                agent: Some(agent),
            }
        })
        .collect();
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let claimed = wait_until(Duration::from_secs(20), || {
        nodes.iter().all(|n| n.state_dir.join("pod-cidr").exists())
    });
    assert!(
        claimed,
        "agents did not claim pod CIDRs; see {}",
        tmp.path().display()
    );

    // podman itself may not run on every host: say so instead of failing.
    let info = n1.podman(&["info", "--format", "{{.Host.NetworkBackend}}"]);
    if !info.status.success() {
        skip(&format!(
            "podman cannot run here: {}",
            String::from_utf8_lossy(&info.stderr).trim()
        ));
        return;
    }

    let suffix = random_suffix(6);
    let image = format!("localhost/wiremesh-cni-test:{suffix}");
    let (server, client) = (format!("wmcni-srv-{suffix}"), format!("wmcni-cli-{suffix}"));
    let _cleanup = Cleanup {
        containers: vec![(n2, server.clone()), (n1, client.clone())],
        image: image.clone(),
        first: n1,
    };
    import_image(tmp.path(), n1, &image);
    let run = |node: &SimNode, name: &str, cmd: &[&str]| {
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--network",
            NETWORK,
            "--pull=never",
            &image,
        ];
        args.extend(cmd);
        node.podman_ok(&args);
    };
    run(n2, &server, &["httpd", "-f", "-p", "8080", "-h", "/www"]);
    run(n1, &client, &["sleep", "120"]);

    let ip_of = |node: &SimNode, name: &str| {
        let format = format!("{{{{(index .NetworkSettings.Networks \"{NETWORK}\").IPAddress}}}}");
        node.podman_ok(&["inspect", "--format", &format, name])
    };
    let server_ip = ip_of(n2, &server);
    let client_ip = ip_of(n1, &client);
    let cidr = |n: &SimNode| -> ipnet::Ipv4Net {
        fs::read_to_string(n.state_dir.join("pod-cidr"))
            .expect("pod-cidr")
            .trim()
            .parse()
            .expect("a CIDR")
    };
    let addr = |s: &str| s.parse::<std::net::Ipv4Addr>().expect("an address");
    assert!(
        cidr(n2).contains(&addr(&server_ip)),
        "{server_ip} not in {}",
        cidr(n2)
    );
    assert!(
        cidr(n1).contains(&addr(&client_ip)),
        "{client_ip} not in {}",
        cidr(n1)
    );
    assert_eq!(n1.allocated(), vec![client_ip.clone()]);

    // The MTU came from the agent's WireGuard interface.
    let mtu = n1.podman_ok(&["exec", &client, "cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!(mtu, "1420");

    // Node 1's container reaches node 2's by address: ICMP, then HTTP, through
    // WireGuard (the agent's leak guard drops pod traffic leaving any other way).
    let tx_before = n1.wireguard_tx_packets();
    let pinged = wait_until(Duration::from_secs(20), || {
        n1.podman(&["exec", &client, "ping", "-c", "1", "-W", "1", &server_ip])
            .status
            .success()
    });
    assert!(pinged, "{client_ip} on n1 cannot ping {server_ip} on n2");
    let request =
        format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {server_ip} 8080");
    let page = n1.podman_ok(&["exec", &client, "sh", "-c", &request]);
    assert!(page.contains(TOKEN), "unexpected reply: {page}");
    let tx_after = n1.wireguard_tx_packets();
    assert!(
        tx_after > tx_before,
        "nothing went through {}",
        n1.interface
    );

    // Removing the container runs DEL through the chain: the address is free again.
    n1.podman_ok(&["rm", "-f", "-t", "0", &client]);
    assert!(n1.allocated().is_empty(), "left: {:?}", n1.allocated());
}
