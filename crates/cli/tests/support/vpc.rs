//! VPCs on the test bed: the `wiremesh` CLI against the mesh's registry, asking a
//! node's agent for a VPC as the CNI plugin does, reaching the agent's VPC namespaces
//! from the test, pods plugged into them (by hand, or by the real `wiremesh-cni`
//! binary), and pods' TCP servers and clients.
//!
//! Included by a test crate that also has `mod support;` (as `#[path] mod`), so it
//! does not touch `support/mod.rs`.

#![allow(dead_code)] // each test binary uses a different part

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use wiremesh_agent::vpc::{LocalVpc, LOCAL_VPC_FILE, VPCS_DIR};
use wiremesh_host::{netns, pod};
use wiremesh_testkit::{random_suffix, wait_until, Netns};

use crate::support::Mesh;

/// `wiremesh <line>` (words split at spaces) against the mesh's registry, which must
/// succeed: its stdout.
pub fn cli(mesh: &Mesh, line: &str) -> String {
    let args: Vec<&str> = line.split_whitespace().collect();
    mesh.wiremesh_ok(&args)
}

/// The clusterIP `wiremesh service create` printed last on its line.
pub fn cluster_ip(created: &str) -> String {
    created
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_owned()
}

/// The pid of node `i`'s agent.
pub fn agent_pid(mesh: &Mesh, i: usize) -> u32 {
    mesh.nodes[i].agent.as_ref().expect("a running agent").id()
}

/// Node `i`'s agent's answer for `vpc`, asked for through the state directory (a
/// `vpcs/<vpc>/` directory, as the CNI plugin makes).
pub fn join_vpc(mesh: &Mesh, i: usize, vpc: &str) -> LocalVpc {
    let dir: PathBuf = mesh.state_dir(i).join(VPCS_DIR).join(vpc);
    std::fs::create_dir_all(&dir).unwrap();
    let answer = dir.join(LOCAL_VPC_FILE);
    let hosted = wait_until(Duration::from_secs(20), || answer.exists());
    assert!(hosted, "node {i} did not host {vpc}:\n{}", mesh.log(i));
    serde_json::from_slice(&std::fs::read(&answer).unwrap()).unwrap()
}

/// Agents' VPC namespaces under names of this test's own, unmounted on Drop.
///
/// An agent makes its namespaces in a mount namespace of its own, so their names
/// mean nothing here: the test binds `/proc/<agent>/root/run/netns/<name>` to a
/// fresh name. The agent's names stay behind here as empty files: they go too.
#[derive(Default)]
pub struct VpcNamespaces(Vec<String>);

impl VpcNamespaces {
    /// A name here for namespace `name` of the agent with pid `agent`.
    pub fn bind(&mut self, agent: u32, name: &str) -> String {
        let here = format!("t{}", random_suffix(8));
        let target = netns::path_of(&here);
        std::fs::File::create(&target).unwrap();
        self.0.push(here.clone());
        self.0.push(name.to_owned());
        // `/run`, not the `/var/run` symlink, which would resolve in this root.
        let source = format!("/proc/{agent}/root/run/netns/{name}");
        let out = std::process::Command::new("mount")
            .args(["--bind", "--no-canonicalize", &source])
            .arg(&target)
            .output()
            .unwrap();
        assert!(out.status.success(), "bind {source}: {out:?}");
        here
    }
}

impl Drop for VpcNamespaces {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = netns::delete(name);
            let _ = std::fs::remove_file(netns::path_of(name));
        }
    }
}

/// A pod namespace wired into VPC namespace `node_ns` (this test's name for it) as
/// the CNI plugin wires one, at host `n` of the node's IPv4 block.
pub fn attach_pod(local: &LocalVpc, node_ns: &str, n: usize) -> (Netns, Ipv4Addr) {
    let ns = Netns::new("vpod").unwrap();
    let block = local
        .pod_cidrs
        .iter()
        .find_map(|c| match c {
            ipnet::IpNet::V4(b) => Some(*b),
            ipnet::IpNet::V6(_) => None,
        })
        .expect("an IPv4 block");
    let ip = block.hosts().nth(n).unwrap();
    pod::attach(&pod::PodLink {
        node_netns: Some(node_ns),
        pod_netns: &netns::path_of(ns.name()),
        host_if: &format!("p{}", random_suffix(8)),
        pod_if: "eth0",
        pod_ip: Some(ip),
        pod_ip_v6: None,
        mtu: local.mtu,
    })
    .expect("pod link");
    (ns, ip)
}

/// The network config of the `wiremesh-cni` plugin on node `i` for VPC `vpc`.
pub fn cni_conf(mesh: &Mesh, i: usize, vpc: &str) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.1.0",
        "name": vpc,
        "type": "wiremesh-cni",
        "vpc": vpc,
        "stateDir": mesh.state_dir(i),
        "dataDir": mesh.dir.path().join(format!("cni-{i}")),
        "interface": mesh.nodes[i].ifname,
    })
}

/// Runs `wiremesh-cni` (`CNI_COMMAND` `command`, container `id`, `CNI_ARGS` `args`)
/// for the container in `pod` as node `i`'s runtime would: inside its agent's
/// network and mount namespaces (the agent's VPC namespaces are bind mounts only it
/// sees). It must succeed: its result, or `Null` if it printed none (DEL).
pub fn cni(
    mesh: &Mesh,
    i: usize,
    command: &str,
    id: &str,
    pod: &Netns,
    args: &str,
    conf: &serde_json::Value,
) -> serde_json::Value {
    let pid = agent_pid(mesh, i);
    let mut child = std::process::Command::new("nsenter")
        .arg(format!("--mount=/proc/{pid}/ns/mnt"))
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .arg(wiremesh_testkit::cargo_bin("wiremesh-cni"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_NETNS", netns::path_of(pod.name()))
        .env("CNI_ARGS", args)
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(conf.to_string().as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "CNI {command} {id}: {text} {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        mesh.log(i)
    );
    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
}

/// The network config of [`cni_conf`] with pod `labels` (key, value) in its
/// `args`, as a runtime passes a pod's labels.
pub fn cni_conf_labelled(
    mesh: &Mesh,
    i: usize,
    vpc: &str,
    labels: &[(&str, &str)],
) -> serde_json::Value {
    let labels: Vec<serde_json::Value> = labels
        .iter()
        .map(|(k, v)| serde_json::json!({"key": k, "value": v}))
        .collect();
    let mut conf = cni_conf(mesh, i, vpc);
    conf["args"] = serde_json::json!({"cni": {"labels": labels}});
    conf
}

/// Serves `tag` to every connection on `ip:80` inside `pod`; `::` takes both
/// families (the socket is not IPv6-only).
pub fn serve_tag(pod: &Netns, ip: impl Into<IpAddr>, tag: String) {
    let addr = SocketAddr::from((ip.into(), 80));
    let listener = pod.run(|| TcpListener::bind(addr)).unwrap().unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(tag.as_bytes());
        }
    });
}

/// One connection to `dst` from `pod`, given 500 ms to connect and `answer` to
/// answer: what it answered, or how it failed.
fn connect_once(pod: &Netns, dst: SocketAddr, answer: Duration) -> Result<String, ErrorKind> {
    pod.run(|| {
        let mut s =
            TcpStream::connect_timeout(&dst, Duration::from_millis(500)).map_err(|e| e.kind())?;
        s.set_read_timeout(Some(answer)).map_err(|e| e.kind())?;
        let mut tag = String::new();
        s.read_to_string(&mut tag).map_err(|e| e.kind())?;
        Ok(tag)
    })
    .unwrap()
}

/// One connection to `vip` from `pod` (1 s to answer): what it answered, or how it
/// failed.
pub fn attempt(pod: &Netns, vip: SocketAddr) -> Result<String, ErrorKind> {
    connect_once(pod, vip, Duration::from_secs(1))
}

/// What `dst` answers from `pod`: a connection every 100 ms (each given 2 s to
/// answer) until one answers or `patience` is over, then the last outcome as an
/// error. `Duration::ZERO` makes a single try.
pub fn fetch(pod: &Netns, dst: SocketAddr, patience: Duration) -> Result<String, String> {
    let deadline = Instant::now() + patience;
    loop {
        match connect_once(pod, dst, Duration::from_secs(2)) {
            Ok(tag) if !tag.is_empty() => return Ok(tag),
            other if Instant::now() >= deadline => return Err(format!("{other:?}")),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
