//! VPCs end to end: two real agents with `wiremesh-wg` devices on two nodes, two VPCs
//! made with `wiremesh vpc create` on one pod CIDR, pods plugged into the agents' VPC
//! namespaces as the CNI plugin does (`wiremesh_host::pod`), and a service made with
//! `wiremesh service create` whose VIP reaches its backend on the other node and
//! follows it when it moves (issue 8, tests 1 to 3 across nodes, 8 by CIDR); and a pod added by
//! the real `wiremesh-cni` plugin, which asks the agent for its VPC.

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

/// A pod in the VPC namespace `node_ns`, plugged in as the CNI plugin does, at
/// host `n` of the node's block.
fn plug(local: &LocalVpc, node_ns: &str, n: usize, tag: &'static str) -> Pod {
    let ns = Netns::new("vpod").unwrap();
    let ipnet::IpNet::V4(block) = local.pod_cidrs[0] else {
        panic!("an IPv4 block")
    };
    let ip = block.hosts().nth(n).unwrap();
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

/// Two started nodes, VPCs blue (id 7) and green (id 9) on one pod CIDR, and a pod of
/// each VPC on each node, n1's before n2's so both VPCs give the nodes the same
/// blocks: `pods` are blue-n1, green-n1, blue-n2, green-n2, at identical addresses
/// in both VPCs.
struct Bed {
    pods: Vec<Pod>,
    /// Each pod's VPC: the agent's answer, and its namespace as this test names it.
    locals: Vec<(LocalVpc, String)>,
    /// Held for its Drop, before the mesh's (which stops the agents).
    _namespaces: VpcNamespaces,
    mesh: Mesh,
}

impl Bed {
    fn new() -> Bed {
        let (mesh, n1, n2) = Mesh::pair();
        for (name, id) in [("blue", "7"), ("green", "9")] {
            let args = [
                "vpc",
                "create",
                name,
                "--id",
                id,
                "--pod-cidr",
                "10.10.0.0/16",
            ];
            wiremesh_ok(&mesh, &args);
        }
        let mut namespaces = VpcNamespaces(Vec::new());
        let (mut pods, mut locals) = (Vec::new(), Vec::new());
        for (i, vpc, tag) in [
            (n1, "blue", "blue-n1"),
            (n1, "green", "green-n1"),
            (n2, "blue", "blue-n2"),
            (n2, "green", "green-n2"),
        ] {
            let local = join_vpc(&mesh, i, vpc);
            assert_eq!(local.mtu, 1380, "1420 less the 40-byte outer header");
            let agent = mesh.nodes[i].agent.as_ref().unwrap().id();
            let alias = namespaces.alias(agent, &local.netns);
            pods.push(plug(&local, &alias, 1, tag));
            locals.push((local, alias));
        }
        assert_eq!((pods[0].ip, pods[2].ip), (pods[1].ip, pods[3].ip));
        Bed {
            pods,
            locals,
            _namespaces: namespaces,
            mesh,
        }
    }

    fn agent_pid(&self, i: usize) -> u32 {
        self.mesh.nodes[i].agent.as_ref().unwrap().id()
    }
}

const PATIENCE: Duration = Duration::from_secs(20);

#[test]
fn overlapping_vpcs_span_nodes_and_a_service_vip_reaches_the_other_node() {
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let mut bed = Bed::new();
    let mesh = &bed.mesh;
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
    let stderr = String::from_utf8_lossy(&dup.stderr);
    assert!(stderr.contains("id"), "{stderr}");
    let [blue1, green1, blue2, green2] = &bed.pods[..] else {
        unreachable!()
    };

    // Across nodes, each VPC reaches its own pod at the very same address.
    let b2 = blue2.ip.to_string();
    assert_eq!(fetch(blue1, &b2, PATIENCE).as_deref(), Ok("blue-n2"));
    assert_eq!(fetch(green1, &b2, PATIENCE).as_deref(), Ok("green-n2"));
    let b1 = blue1.ip.to_string();
    assert_eq!(fetch(green2, &b1, PATIENCE).as_deref(), Ok("green-n1"));

    // An address only blue has: blue reaches it, green (the same CIDR) does not.
    let (blue_n2, ns) = &bed.locals[2];
    let only_blue = plug(blue_n2, ns, 3, "blue-only").ip.to_string();
    assert_eq!(
        fetch(blue1, &only_blue, PATIENCE).as_deref(),
        Ok("blue-only")
    );
    assert!(fetch(green1, &only_blue, Duration::from_secs(2)).is_err());

    // A service in blue, its one endpoint on n2: the VIP from n1 lands there.
    let out = wiremesh_ok(
        mesh,
        &["service", "create", "blue/web/db", "--port", "http:80/tcp"],
    );
    let vip = out.trim().rsplit(' ').next().unwrap().to_owned();
    wiremesh_ok(
        mesh,
        &["endpoints", "blue/web/db", "--add", &b2, "--node", "n2"],
    );
    assert_eq!(fetch(blue1, &vip, PATIENCE).as_deref(), Ok("blue-n2"));
    // green has no such service: its pods cannot reach blue's VIP.
    assert!(fetch(green1, &vip, Duration::from_secs(2)).is_err());
    // Access policy: only blue1's address may call db2; another pod of blue is refused.
    let allow = format!("{b1}/32");
    let args = [
        "service",
        "create",
        "blue/web/db2",
        "--port",
        "http:80/tcp",
        "--allow",
        &allow,
    ];
    let out = wiremesh_ok(mesh, &args);
    let vip2 = out.trim().rsplit(' ').next().unwrap().to_owned();
    wiremesh_ok(
        mesh,
        &["endpoints", "blue/web/db2", "--add", &b2, "--node", "n2"],
    );
    assert_eq!(fetch(blue1, &vip2, PATIENCE).as_deref(), Ok("blue-n2"));
    let (blue_n1, ns) = &bed.locals[0];
    let other = plug(blue_n1, ns, 2, "blue-other");
    assert_eq!(fetch(&other, &vip, PATIENCE).as_deref(), Ok("blue-n2"));
    let refused = fetch(&other, &vip2, Duration::from_secs(2)).unwrap_err();
    assert!(refused.contains("ConnectionRefused"), "{refused}");

    let listed = wiremesh_ok(mesh, &["endpoints", "blue/web/db"]);
    assert!(listed.contains(&format!("{b2}\tn2")), "{listed}");

    // n2's agent stops: the endpoints on n2 expire with its lease (3 s here), and
    // the VIP refuses at once instead of sending clients to a node nobody runs.
    bed.mesh.stop(1);
    let stopped = Instant::now();
    let vip: SocketAddr = format!("{vip}:80").parse().unwrap();
    let refused = || attempt(blue1, vip) == Err(std::io::ErrorKind::ConnectionRefused);
    assert!(
        wait_until(PATIENCE, refused),
        "n2's endpoint outlived its lease"
    );
    eprintln!(
        "a dead node's endpoint left the VIP after {:?}",
        stopped.elapsed()
    );
    eprintln!("VPC test took {:?}", started.elapsed());
}

/// One connection attempt to `vip:80` from `pod`: the tag, or how it failed.
fn attempt(pod: &Pod, vip: SocketAddr) -> Result<String, std::io::ErrorKind> {
    pod.ns
        .run(|| {
            let mut s = TcpStream::connect_timeout(&vip, Duration::from_millis(500))
                .map_err(|e| e.kind())?;
            s.set_read_timeout(Some(Duration::from_secs(1)))
                .map_err(|e| e.kind())?;
            let mut tag = String::new();
            s.read_to_string(&mut tag).map_err(|e| e.kind())?;
            Ok(tag)
        })
        .unwrap()
}

#[test]
fn a_vip_follows_its_backend_to_another_node_and_a_vpc_leaves_with_its_last_pod() {
    if !require_root() {
        return;
    }
    let bed = Bed::new();
    let mesh = &bed.mesh;
    let [blue1, _, blue2, _] = &bed.pods[..] else {
        unreachable!()
    };
    let out = wiremesh_ok(
        mesh,
        &["service", "create", "blue/web/db", "--port", "http:80/tcp"],
    );
    let vip: SocketAddr = format!("{}:80", out.trim().rsplit(' ').next().unwrap())
        .parse()
        .unwrap();
    let b2 = blue2.ip.to_string();
    wiremesh_ok(
        mesh,
        &["endpoints", "blue/web/db", "--add", &b2, "--node", "n2"],
    );
    assert_eq!(
        fetch(blue1, &vip.ip().to_string(), PATIENCE).as_deref(),
        Ok("blue-n2")
    );

    // The backend moves from n2 to a new pod on n1 (a new address) while the client,
    // which never resolves anything again, calls the VIP every 50 ms.
    let (blue_n1, ns) = &bed.locals[0];
    let moved_pod = plug(blue_n1, ns, 2, "blue-n1");
    let b1 = moved_pod.ip.to_string();
    wiremesh_ok(mesh, &["endpoints", "blue/web/db", "--remove", &b2]);
    let mut log: Vec<(Duration, Result<String, std::io::ErrorKind>)> = Vec::new();
    let start = Instant::now();
    let mut moved = false;
    while start.elapsed() < PATIENCE {
        let outcome = attempt(blue1, vip);
        let refused = outcome == Err(std::io::ErrorKind::ConnectionRefused);
        log.push((start.elapsed(), outcome));
        if refused && !moved {
            wiremesh_ok(
                mesh,
                &["endpoints", "blue/web/db", "--add", &b1, "--node", "n1"],
            );
            moved = true;
        }
        if log.last().unwrap().1.as_deref() == Ok("blue-n1") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let summary: Vec<String> = log.iter().map(|(t, o)| format!("{t:.2?} {o:?}")).collect();
    let first_refusal = log.iter().find(|(_, o)| o.is_err()).map(|(t, _)| *t);
    let back = log.last().filter(|(_, o)| o.as_deref() == Ok("blue-n1"));
    assert!(
        back.is_some(),
        "the VIP never reached the moved backend:\n{summary:#?}"
    );
    // While it had no endpoint the VIP refused at once: never a hang.
    assert!(
        log.iter()
            .all(|(_, o)| matches!(o, Ok(_) | Err(std::io::ErrorKind::ConnectionRefused))),
        "{summary:#?}"
    );
    eprintln!(
        "moving backend: first refusal at {first_refusal:?}, back at {:?} on n1 ({} calls)",
        back.unwrap().0,
        log.len()
    );

    // green's last pod on n2 leaves (the plugin's last DEL removes its directory):
    // the agent gives n2's block back and removes the namespace.
    let dir = mesh.state_dir(1).join(VPCS_DIR).join("green");
    std::fs::remove_dir_all(&dir).unwrap();
    let agent_ns = format!(
        "/proc/{}/root/run/netns/{}",
        bed.agent_pid(1),
        bed.locals[3].0.netns
    );
    assert!(
        wait_until(PATIENCE, || !std::path::Path::new(&agent_ns).exists()),
        "n2 kept green's namespace:\n{}",
        mesh.log(1)
    );
    let shown = wiremesh_ok(mesh, &["vpc", "show", "green"]);
    assert!(
        shown.contains("member n1") && !shown.contains("member n2"),
        "{shown}"
    );
    // blue on n2 is untouched.
    assert_eq!(fetch(blue1, &b2, PATIENCE).as_deref(), Ok("blue-n2"));
}

/// Runs `wiremesh-cni` for container `id` as the runtime on node `i` would, inside
/// the agent's namespaces (mount included: see [`VpcNamespaces`]).
fn cni(
    bed: &Bed,
    i: usize,
    command: &str,
    id: &str,
    pod: &Netns,
    conf: &serde_json::Value,
) -> serde_json::Value {
    let pid = bed.agent_pid(i);
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
        .env("CNI_ARGS", "K8S_POD_NAMESPACE=web")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "CNI {command}: {text} {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        bed.mesh.log(i)
    );
    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
}

#[test]
fn a_pod_added_by_the_cni_plugin_joins_its_vpc_across_nodes() {
    if !require_root() || !wiremesh_testkit::require_tool("nsenter") {
        return;
    }
    if !wiremesh_testkit::cargo_bin("wiremesh-cni").exists() {
        eprintln!("skipped: build wiremesh-cni first (cargo build -p wiremesh-cni)");
        return;
    }
    let bed = Bed::new();
    let [_, _, blue2, _] = &bed.pods[..] else {
        unreachable!()
    };
    let conf = serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "blue",
        "type": "wiremesh-cni",
        "vpc": "blue",
        "stateDir": bed.mesh.state_dir(0),
        "dataDir": bed.mesh.dir.path().join("cni-n1"),
        "interface": bed.mesh.nodes[0].ifname,
    });
    let ctr = Netns::new("cpod").unwrap();
    let result = cni(&bed, 0, "ADD", "c1", &ctr, &conf);
    let ip = result["ips"][0]["address"].as_str().unwrap().to_owned();
    assert!(ip.starts_with("10.10.0."), "n1's block of blue: {result}");
    assert_eq!(result["interfaces"][1]["mtu"], 1380, "{result}");
    assert_eq!(result["dns"]["nameservers"][0], "10.96.0.10", "{result}");
    assert_eq!(
        result["dns"]["search"][0], "web.svc.cluster.local",
        "{result}"
    );
    let pod = Pod {
        ns: ctr,
        ip: ip.trim_end_matches("/32").parse().unwrap(),
    };
    assert_eq!(
        fetch(&pod, &blue2.ip.to_string(), PATIENCE).as_deref(),
        Ok("blue-n2")
    );
    cni(&bed, 0, "DEL", "c1", &pod.ns, &conf);
}
