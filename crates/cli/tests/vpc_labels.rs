//! Pods' labels in a VPC, end to end (issue 8): two real agents with `wiremesh-wg`
//! devices, pods added by the real `wiremesh-cni` plugin with labels in its network
//! config. A service whose selector matches a pod gets it as its endpoint without
//! anyone writing one, and loses it when the plugin deletes the pod; a service open
//! only to pods labelled `role=api` admits such pods and refuses the VPC's others,
//! from the backend's node and from the other one.

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use support::Mesh;
use wiremesh_agent::vpc::{LOCAL_VPC_FILE, VPCS_DIR};
use wiremesh_host::netns;
use wiremesh_testkit::{require_root, require_tool, wait_until, Netns};

const PATIENCE: Duration = Duration::from_secs(20);

/// `wiremesh ARGS`, which must succeed: its stdout.
fn cli(mesh: &Mesh, args: &[&str]) -> String {
    let out = mesh.wiremesh(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "wiremesh {args:?}: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asks node `i`'s agent for `vpc` as the plugin does (a directory in its state
/// dir), and waits for its answer: the plugin's ADD waits only 10 s for it.
fn host_vpc(mesh: &Mesh, i: usize, vpc: &str) {
    let dir = mesh.state_dir(i).join(VPCS_DIR).join(vpc);
    std::fs::create_dir_all(&dir).unwrap();
    let hosted = wait_until(PATIENCE, || dir.join(LOCAL_VPC_FILE).exists());
    assert!(hosted, "node {i} did not host {vpc}:\n{}", mesh.log(i));
}

/// A container added by the plugin, serving `tag` on port 80.
struct Pod {
    ns: Netns,
    ip: Ipv4Addr,
    node: usize,
    id: String,
    conf: serde_json::Value,
}

/// Runs `wiremesh-cni` as node `i`'s runtime would: inside its agent's network and
/// mount namespaces (the agent's VPC namespaces are bind mounts only it sees).
fn cni(
    mesh: &Mesh,
    i: usize,
    command: &str,
    id: &str,
    pod: &Netns,
    args: &str,
    conf: &serde_json::Value,
) -> serde_json::Value {
    let pid = mesh.nodes[i].agent.as_ref().unwrap().id();
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
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
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

/// Adds pod `name` (namespace `web`) with `labels` on node `i` through the plugin.
fn add_pod(mesh: &Mesh, i: usize, name: &str, labels: &[(&str, &str)]) -> Pod {
    let labels: Vec<serde_json::Value> = labels
        .iter()
        .map(|(k, v)| serde_json::json!({"key": k, "value": v}))
        .collect();
    let conf = serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "blue",
        "type": "wiremesh-cni",
        "vpc": "blue",
        "stateDir": mesh.state_dir(i),
        "dataDir": mesh.dir.path().join(format!("cni-{i}")),
        "interface": mesh.nodes[i].ifname,
        "args": {"cni": {"labels": labels}},
    });
    let ns = Netns::new("lpod").unwrap();
    let id = format!("ctr-{name}");
    let args = format!("K8S_POD_NAMESPACE=web;K8S_POD_NAME={name}");
    let result = cni(mesh, i, "ADD", &id, &ns, &args, &conf);
    let ip: Ipv4Addr = result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.trim_end_matches("/32").parse().ok())
        .unwrap_or_else(|| panic!("no address: {result}"));
    let listener = ns
        .run(|| TcpListener::bind(SocketAddr::from((ip, 80))))
        .unwrap()
        .unwrap();
    let tag = name.to_owned();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(tag.as_bytes());
        }
    });
    Pod {
        ns,
        ip,
        node: i,
        id,
        conf,
    }
}

/// One connection to `vip` from `pod`: what it answered, or how it failed.
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

/// Whether `pod`'s connections to `vip` come to answer `want` within [`PATIENCE`].
fn comes_to(pod: &Pod, vip: SocketAddr, want: Result<&str, std::io::ErrorKind>) -> bool {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if attempt(pod, vip).as_deref().map_err(|e| *e) == want {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `wiremesh service create blue/web/NAME` with `extra` flags; its VIP's port 80.
fn service(mesh: &Mesh, name: &str, extra: &[&str]) -> SocketAddr {
    let id = format!("blue/web/{name}");
    let mut args = vec!["service", "create", &id, "--port", "http:80/tcp"];
    args.extend_from_slice(extra);
    let out = cli(mesh, &args);
    format!("{}:80", out.trim().rsplit(' ').next().unwrap())
        .parse()
        .unwrap()
}

#[test]
fn labels_pick_a_services_backends_and_who_may_call_it() {
    if !require_root() || !require_tool("nsenter") {
        return;
    }
    if !wiremesh_testkit::cargo_bin("wiremesh-cni").exists() {
        wiremesh_testkit::skip("build wiremesh-cni first (cargo build -p wiremesh-cni)");
        return;
    }
    let (mesh, n1, n2) = Mesh::pair();
    let args = [
        "vpc",
        "create",
        "blue",
        "--id",
        "7",
        "--pod-cidr",
        "10.10.0.0/16",
    ];
    cli(&mesh, &args);
    // Each agent hosts blue before the plugin's first ADD, which waits only 10 s.
    for i in [n1, n2] {
        host_vpc(&mesh, i, "blue");
    }

    // A selector picks a pod on n2; a client on n1 reaches it through the VIP.
    let web = add_pod(&mesh, n2, "web-0", &[("app", "web")]);
    let api1 = add_pod(&mesh, n1, "api-1", &[("role", "api")]);
    let plain1 = add_pod(&mesh, n1, "plain-1", &[]);
    let api2 = add_pod(&mesh, n2, "api-2", &[("role", "api"), ("tier", "b")]);
    let plain2 = add_pod(&mesh, n2, "plain-2", &[("role", "web")]);
    let started = Instant::now();
    let www = service(&mesh, "www", &["--selector", "app=web"]);
    assert!(
        comes_to(&plain1, www, Ok("web-0")),
        "the selected pod never answered the VIP:\n{}",
        mesh.log(n2)
    );
    eprintln!(
        "a selected pod answered the VIP {:?} after the service was made",
        started.elapsed()
    );
    let listed = cli(&mesh, &["endpoints", "blue/web/www"]);
    assert!(
        listed.contains(&web.ip.to_string()) && listed.contains("web-0"),
        "{listed}"
    );

    // Only pods labelled role=api may call `guarded`: on the backend's node and across.
    let guarded = service(
        &mesh,
        "guarded",
        &["--selector", "app=web", "--allow", "role=api"],
    );
    for client in [&api1, &api2] {
        assert!(
            comes_to(client, guarded, Ok("web-0")),
            "{} (role=api, on node {}) was not let through:\n{}",
            client.ip,
            client.node,
            mesh.log(n2)
        );
    }
    for client in [&plain1, &plain2] {
        assert_eq!(
            attempt(client, guarded),
            Err(std::io::ErrorKind::ConnectionRefused),
            "{} (no role=api, on node {}) got through",
            client.ip,
            client.node
        );
    }
    // The same pods still reach the open service.
    assert_eq!(attempt(&plain2, www).as_deref(), Ok("web-0"));

    // The plugin deletes the pod: it leaves the service, and the VIP refuses.
    cni(&mesh, web.node, "DEL", &web.id, &web.ns, "", &web.conf);
    let started = Instant::now();
    assert!(
        comes_to(&api1, www, Err(std::io::ErrorKind::ConnectionRefused)),
        "the deleted pod's endpoint stayed:\n{}",
        mesh.log(n2)
    );
    eprintln!("the deleted pod left the VIP after {:?}", started.elapsed());
    let listed = cli(&mesh, &["endpoints", "blue/web/www"]);
    assert!(!listed.contains(&web.ip.to_string()), "{listed}");
    for pod in [&api1, &plain1, &api2, &plain2] {
        cni(&mesh, pod.node, "DEL", &pod.id, &pod.ns, "", &pod.conf);
    }
}
