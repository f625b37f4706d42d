//! Pods' labels in a VPC, end to end (issue 8): two real agents with `wiremesh-wg`
//! devices, pods added by the real `wiremesh-cni` plugin with labels in its network
//! config. A service whose selector matches a pod gets it as its endpoint without
//! anyone writing one, and loses it when the plugin deletes the pod; a service open
//! only to pods labelled `role=api` admits such pods and refuses the VPC's others,
//! from the backend's node and from the other one.

mod support;
#[path = "support/vpc.rs"]
mod vpc_support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use support::Mesh;
use vpc_support::{attempt, cli, cluster_ip, cni, cni_conf_labelled, join_vpc, serve_tag};
use wiremesh_testkit::{require_root, require_tool, Netns};

const PATIENCE: Duration = Duration::from_secs(20);

/// A container added by the plugin, serving its name on port 80.
struct Pod {
    ns: Netns,
    ip: Ipv4Addr,
    node: usize,
    id: String,
    conf: serde_json::Value,
}

/// Adds pod `name` (namespace `web`) with `labels` on node `i` through the plugin.
fn add_pod(mesh: &Mesh, i: usize, name: &str, labels: &[(&str, &str)]) -> Pod {
    let conf = cni_conf_labelled(mesh, i, "blue", labels);
    let ns = Netns::new("lpod").unwrap();
    let id = format!("ctr-{name}");
    let args = format!("K8S_POD_NAMESPACE=web;K8S_POD_NAME={name}");
    let result = cni(mesh, i, "ADD", &id, &ns, &args, &conf);
    let ip: Ipv4Addr = result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.trim_end_matches("/32").parse().ok())
        .unwrap_or_else(|| panic!("no address: {result}"));
    serve_tag(&ns, ip, name.to_owned());
    Pod {
        ns,
        ip,
        node: i,
        id,
        conf,
    }
}

/// Whether `pod`'s connections to `vip` come to answer `want` within [`PATIENCE`].
fn comes_to(pod: &Pod, vip: SocketAddr, want: Result<&str, std::io::ErrorKind>) -> bool {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if attempt(&pod.ns, vip).as_deref().map_err(|e| *e) == want {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `wiremesh service create blue/web/NAME` with `extra` flags; its VIP's port 80.
fn service(mesh: &Mesh, name: &str, extra: &str) -> SocketAddr {
    let line = format!("service create blue/web/{name} --port http:80/tcp {extra}");
    let vip = cluster_ip(&cli(mesh, &line));
    format!("{vip}:80").parse().unwrap()
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
    cli(&mesh, "vpc create blue --id 7 --pod-cidr 10.10.0.0/16");
    // Each agent hosts blue before the plugin's first ADD, which waits only 10 s.
    for i in [n1, n2] {
        join_vpc(&mesh, i, "blue");
    }

    // A selector picks a pod on n2; a client on n1 reaches it through the VIP.
    let web = add_pod(&mesh, n2, "web-0", &[("app", "web")]);
    let api1 = add_pod(&mesh, n1, "api-1", &[("role", "api")]);
    let plain1 = add_pod(&mesh, n1, "plain-1", &[]);
    let api2 = add_pod(&mesh, n2, "api-2", &[("role", "api"), ("tier", "b")]);
    let plain2 = add_pod(&mesh, n2, "plain-2", &[("role", "web")]);
    let started = Instant::now();
    let www = service(&mesh, "www", "--selector app=web");
    assert!(
        comes_to(&plain1, www, Ok("web-0")),
        "the selected pod never answered the VIP:\n{}",
        mesh.log(n2)
    );
    eprintln!(
        "a selected pod answered the VIP {:?} after the service was made",
        started.elapsed()
    );
    let listed = cli(&mesh, "endpoints blue/web/www");
    assert!(
        listed.contains(&web.ip.to_string()) && listed.contains("web-0"),
        "{listed}"
    );

    // Only pods labelled role=api may call `guarded`: on the backend's node and across.
    let guarded = service(&mesh, "guarded", "--selector app=web --allow role=api");
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
            attempt(&client.ns, guarded),
            Err(std::io::ErrorKind::ConnectionRefused),
            "{} (no role=api, on node {}) got through",
            client.ip,
            client.node
        );
    }
    // The same pods still reach the open service.
    assert_eq!(attempt(&plain2.ns, www).as_deref(), Ok("web-0"));

    // The plugin deletes the pod: it leaves the service, and the VIP refuses.
    cni(&mesh, web.node, "DEL", &web.id, &web.ns, "", &web.conf);
    let started = Instant::now();
    assert!(
        comes_to(&api1, www, Err(std::io::ErrorKind::ConnectionRefused)),
        "the deleted pod's endpoint stayed:\n{}",
        mesh.log(n2)
    );
    eprintln!("the deleted pod left the VIP after {:?}", started.elapsed());
    let listed = cli(&mesh, "endpoints blue/web/www");
    assert!(!listed.contains(&web.ip.to_string()), "{listed}");
    for pod in [&api1, &plain1, &api2, &plain2] {
        cni(&mesh, pod.node, "DEL", &pod.id, &pod.ns, "", &pod.conf);
    }
}
