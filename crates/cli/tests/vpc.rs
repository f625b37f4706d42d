//! VPCs end to end: two real agents with `wiremesh-wg` devices on two nodes, two VPCs
//! made with `wiremesh vpc create` on one pod CIDR, pods plugged into the agents' VPC
//! namespaces as the CNI plugin does (`wiremesh_host::pod`), and a service made with
//! `wiremesh service create` whose VIP reaches its backend on the other node.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::Mesh;
use wiremesh_agent::vpc::{LocalVpc, LOCAL_VPC_FILE, VPCS_DIR};
use wiremesh_host::{netns, pod};
use wiremesh_testkit::{require_root, wait_until, Netns};

/// A pod of one VPC on one node, serving its own name on port 80.
struct Pod {
    ns: Netns,
    ip: std::net::Ipv4Addr,
}

/// The agents' VPC namespaces as this test sees them, removed on Drop (even on a
/// panic).
///
/// The test bed runs each agent under `ip netns exec`, which gives it a mount
/// namespace of its own: the namespaces it makes are bind mounts only it (and its
/// device) can see. The test reaches one through the agent's root
/// (`/proc/PID/root/run/netns/NAME`) and binds it under a name of its own.
/// The agents' own names remain here as empty mount points: they go too.
struct VpcNamespaces(Vec<String>);

impl VpcNamespaces {
    fn alias(&mut self, agent_pid: u32, name: &str) -> String {
        let alias = format!("t{}", wiremesh_testkit::random_suffix(8));
        let path = netns::path_of(&alias);
        std::fs::File::create(&path).unwrap();
        self.0.extend([alias.clone(), name.to_owned()]);
        // `/run`, not `/var/run`: an absolute symlink would resolve in our own root.
        let source = format!("/proc/{agent_pid}/root/run/netns/{name}");
        let out = std::process::Command::new("mount")
            // `--no-canonicalize`: resolving the path would leave the agent's root.
            .args(["--no-canonicalize", "--bind", &source])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        alias
    }
}

impl Drop for VpcNamespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = netns::delete(ns);
            let _ = std::fs::remove_file(netns::path_of(ns));
        }
    }
}

fn wiremesh_ok(mesh: &Mesh, args: &[&str]) -> String {
    let out = mesh.wiremesh(args);
    assert!(
        out.status.success(),
        "wiremesh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asks node `i`'s agent for `vpc` as the CNI plugin does, and waits for its answer.
fn join_vpc(mesh: &Mesh, i: usize, vpc: &str) -> LocalVpc {
    let dir: PathBuf = mesh.state_dir(i).join(VPCS_DIR).join(vpc);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(LOCAL_VPC_FILE);
    assert!(
        wait_until(Duration::from_secs(20), || file.exists()),
        "node {i}'s agent did not host VPC {vpc}:\n{}",
        mesh.log(i)
    );
    serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap()
}

/// A pod in the VPC namespace `node_ns`, plugged in as the CNI plugin does.
fn plug(local: &LocalVpc, node_ns: &str, tag: &'static str) -> Pod {
    let ns = Netns::new("vpod").unwrap();
    let ipnet::IpNet::V4(block) = local.pod_cidrs[0] else {
        panic!("an IPv4 block")
    };
    let ip = block.hosts().nth(1).unwrap();
    pod::attach(&pod::PodLink {
        node_netns: Some(node_ns),
        pod_netns: &netns::path_of(ns.name()),
        host_if: &format!("p{}", wiremesh_testkit::random_suffix(8)),
        pod_if: "eth0",
        pod_ip: ip,
        mtu: local.mtu,
    })
    .expect("pod link");
    let addr = SocketAddr::from((ip, 80));
    let listener = ns.run(|| TcpListener::bind(addr)).unwrap().unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(tag.as_bytes());
        }
    });
    Pod { ns, ip }
}

/// What `dst:80` answers from inside `pod`, retrying for up to `patience`; the last
/// error if it never answers.
fn fetch(pod: &Pod, dst: &str, patience: Duration) -> Result<String, String> {
    let dst: SocketAddr = format!("{dst}:80").parse().unwrap();
    pod.ns
        .run(|| {
            let deadline = Instant::now() + patience;
            loop {
                let attempt = || -> std::io::Result<String> {
                    let mut s = TcpStream::connect_timeout(&dst, Duration::from_millis(500))?;
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    let mut tag = String::new();
                    s.read_to_string(&mut tag)?;
                    Ok(tag)
                };
                match attempt() {
                    Ok(tag) if !tag.is_empty() => return Ok(tag),
                    other if Instant::now() > deadline => {
                        return Err(format!("{other:?}"));
                    }
                    _ => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })
        .unwrap()
}

#[test]
fn overlapping_vpcs_span_nodes_and_a_service_vip_reaches_the_other_node() {
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let (mesh, n1, n2) = Mesh::pair();
    let agent_pid = |i: usize| mesh.nodes[i].agent.as_ref().unwrap().id();
    wiremesh_ok(
        &mesh,
        &[
            "vpc",
            "create",
            "blue",
            "--id",
            "7",
            "--pod-cidr",
            "10.10.0.0/16",
        ],
    );
    wiremesh_ok(
        &mesh,
        &[
            "vpc",
            "create",
            "green",
            "--id",
            "9",
            "--pod-cidr",
            "10.10.0.0/16",
        ],
    );
    let dup = mesh.wiremesh(&[
        "vpc",
        "create",
        "red",
        "--id",
        "7",
        "--pod-cidr",
        "10.20.0.0/16",
    ]);
    assert!(!dup.status.success());
    assert!(
        String::from_utf8_lossy(&dup.stderr).contains("id"),
        "{dup:?}"
    );

    // n1 first in both VPCs, so both give it the same block: identical addresses.
    let mut namespaces = VpcNamespaces(Vec::new());
    let mut local = Vec::new();
    for (i, vpc) in [(n1, "blue"), (n1, "green"), (n2, "blue"), (n2, "green")] {
        let l = join_vpc(&mesh, i, vpc);
        let alias = namespaces.alias(agent_pid(i), &l.netns);
        local.push((l, alias));
    }
    assert_eq!(local[0].0.pod_cidrs, local[1].0.pod_cidrs);
    assert_eq!(local[2].0.pod_cidrs, local[3].0.pod_cidrs);
    assert_eq!(local[0].0.mtu, 1380, "1420 less the 40-byte outer header");
    let pods: Vec<Pod> = local
        .iter()
        .zip(["blue-n1", "green-n1", "blue-n2", "green-n2"])
        .map(|((l, ns), tag)| plug(l, ns, tag))
        .collect();
    let [blue1, green1, blue2, green2] = &pods[..] else {
        unreachable!()
    };
    assert_eq!((blue1.ip, blue2.ip), (green1.ip, green2.ip));

    // Across nodes, each VPC reaches its own pod at the very same address.
    let patience = Duration::from_secs(20);
    let b2 = blue2.ip.to_string();
    assert_eq!(fetch(blue1, &b2, patience).as_deref(), Ok("blue-n2"));
    assert_eq!(fetch(green1, &b2, patience).as_deref(), Ok("green-n2"));
    assert_eq!(
        fetch(green2, &blue1.ip.to_string(), patience).as_deref(),
        Ok("green-n1")
    );

    // A service in blue, its one endpoint on n2: the VIP from n1 lands there.
    let out = wiremesh_ok(
        &mesh,
        &["service", "create", "blue/web/db", "--port", "http:80/tcp"],
    );
    let vip = out.trim().rsplit(' ').next().unwrap().to_owned();
    wiremesh_ok(
        &mesh,
        &["endpoints", "blue/web/db", "--add", &b2, "--node", "n2"],
    );
    assert_eq!(fetch(blue1, &vip, patience).as_deref(), Ok("blue-n2"));
    // green has no such service: its pods cannot reach blue's VIP.
    assert!(fetch(green1, &vip, Duration::from_secs(2)).is_err());
    let listed = wiremesh_ok(&mesh, &["endpoints", "blue/web/db"]);
    assert!(listed.contains(&format!("{b2}\tn2")), "{listed}");
    eprintln!("VPC test took {:?}", started.elapsed());
}
