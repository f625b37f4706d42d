//! A VPC's DNS from a pod (issue 8, test 6): two nodes with real agents, a VPC made
//! with `wiremesh vpc create`, services made with `wiremesh service create`, pods in
//! the agents' VPC namespaces with the `resolv.conf` a runtime writes from the CNI
//! result, and Debian's `dig` asking the agent's DNS server: A by full, short and
//! cross-namespace names, SRV of named ports, PTR of a clusterIP, headless records
//! and NXDOMAIN, any case, the schema's version TXT, the zone's SOA (and in the
//! authority section of NXDOMAIN and NODATA answers, so resolvers cache them), names
//! outside the zone sent to the node's resolver, forwarding that follows the node's
//! `resolv.conf` when it changes (no agent restart), and a new service resolving
//! within a bounded wait.

mod support;
#[path = "support/vpc.rs"]
mod vpc_support;

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::Mesh;
use vpc_support::{attach_pod, cli, cluster_ip, join_vpc, VpcNamespaces};
use wiremesh_testkit::{require_root, require_tool, wait_until, Netns};
use wiremesh_vpc::record::DnsZone;
use wiremesh_vpc::{dns, Label};

/// `/etc/netns/<name>/`, which `ip netns exec <name>` mounts over `/etc`'s files:
/// a namespace's own `resolv.conf`. Removed on Drop.
struct EtcNetns(PathBuf);

impl EtcNetns {
    fn resolv_conf(ns: &str, text: &str) -> EtcNetns {
        let dir = PathBuf::from("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), text).unwrap();
        EtcNetns(dir)
    }
}

impl Drop for EtcNetns {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where the fake upstream resolvers answer every name they are asked: n1's first,
/// then the one its `resolv.conf` names instead.
const UPSTREAM_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);
const NEW_UPSTREAM_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 54);

/// A resolver on `socket` that answers any query with one A record, `answer`
/// (RFC 1035 §4.1: the question echoed, a name pointer to it).
fn fake_upstream(socket: UdpSocket, answer: Ipv4Addr) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            if n < 12 {
                continue;
            }
            // The header and the question: its name's labels, a zero, type and class.
            let mut end = 12;
            while end < n && buf[end] != 0 {
                end += 1 + usize::from(buf[end]);
            }
            let Some(question) = buf.get(..end + 5) else {
                continue;
            };
            let mut reply = question.to_vec();
            reply[2] |= 0x80; // QR
            reply[3] = 0x80; // RA, NOERROR
            reply[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]); // one answer, no others
            reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            reply.extend_from_slice(&answer.octets());
            let _ = socket.send_to(&reply, from);
        }
    });
}

/// What `dig` printed: the status, the answer section as `TYPE data` lines and the
/// authority section as `name ttl TYPE data` lines. An SOA's serial (it follows the
/// records) reads `SERIAL`.
#[derive(Debug, PartialEq, Eq)]
struct Dig {
    status: String,
    answers: Vec<String>,
    authority: Vec<String>,
}

/// `dig ARGS` from inside `pod` (its `/etc/resolv.conf` is the pod's), one try.
fn dig(pod: &Netns, args: &[&str]) -> Dig {
    let mut all: Vec<&str> = "dig +time=3 +tries=1 +noall +comments +answer +authority"
        .split(' ')
        .collect();
    all.extend_from_slice(args);
    let out = pod.exec(&all).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("no answer")
        .to_owned();
    let (mut answers, mut authority) = (Vec::new(), Vec::new());
    let mut in_authority = false;
    for line in text.lines() {
        in_authority |= line.starts_with(";; AUTHORITY SECTION");
        if line.starts_with(';') || line.trim().is_empty() {
            continue;
        }
        // name ttl class TYPE data...
        let mut words: Vec<&str> = line.split_whitespace().collect();
        if words[3] == "SOA" {
            words[6] = "SERIAL";
        }
        let data = words[3..].join(" ");
        if in_authority {
            authority.push(format!("{} {} {data}", words[0], words[1]));
        } else {
            answers.push(data);
        }
    }
    answers.sort();
    Dig {
        status,
        answers,
        authority,
    }
}

fn ok(answers: &[&str]) -> Dig {
    let mut answers: Vec<String> = answers.iter().map(|a| a.to_string()).collect();
    answers.sort();
    Dig {
        status: "NOERROR".into(),
        answers,
        authority: vec![],
    }
}

/// The zone's SOA record's type and data, its serial masked.
const SOA: &str = "SOA ns.dns.cluster.local. hostmaster.cluster.local. SERIAL 7200 1800 86400 5";

/// A negative answer (`NXDOMAIN`, or `NOERROR` with no answer: NODATA) with the SOA
/// of `zone` in the authority section, its TTL the 5 s negative TTL.
fn negative(status: &str, zone: &str) -> Dig {
    Dig {
        status: status.into(),
        answers: vec![],
        authority: vec![format!("{zone} 5 {SOA}")],
    }
}

const PATIENCE: Duration = Duration::from_secs(20);

#[test]
fn a_pod_resolves_its_vpcs_services_by_name() {
    if !require_root() || !require_tool("dig") {
        return;
    }
    let started = Instant::now();
    // n1's resolver is a fake upstream on n1's own network: its agent forwards there.
    let mut mesh = Mesh::new("full", false);
    let n1 = mesh.add_node("n1", "site", true);
    let n2 = mesh.add_node("n2", "site", true);
    let upstream_ip = mesh.nodes[n1].lan_ip;
    let upstream = mesh.nodes[n1]
        .ns
        .run(|| UdpSocket::bind((upstream_ip, 53)))
        .unwrap()
        .unwrap();
    fake_upstream(upstream, UPSTREAM_ANSWER);
    let n1_etc = EtcNetns::resolv_conf(
        mesh.nodes[n1].ns.name(),
        &format!("nameserver {upstream_ip}\n"),
    );
    mesh.start(n1);
    mesh.start(n2);

    cli(&mesh, "vpc create blue --id 7 --pod-cidr 10.10.0.0/16");
    let mut namespaces = VpcNamespaces::default();
    let mut pods = Vec::new();
    let mut resolv = Vec::new();
    // A client in namespace `web` on each node; two backends on n2.
    for (i, n) in [(n1, 1), (n2, 1), (n2, 2), (n2, 3)] {
        let local = join_vpc(&mesh, i, "blue");
        let agent = mesh.nodes[i].agent.as_ref().unwrap().id();
        let node_ns = namespaces.bind(agent, &local.netns);
        let (pod, ip) = attach_pod(&local, &node_ns, n);
        // What a runtime writes from the CNI result's `dns` (nameserver, search).
        let zone = DnsZone::parse("zone", &local.zone).unwrap();
        let web = Label::parse("namespace", "web").unwrap();
        resolv.push(EtcNetns::resolv_conf(
            pod.name(),
            &dns::resolv_conf(local.nameserver, &web, &zone),
        ));
        pods.push((pod, ip));
    }
    let client = &pods[0].0;
    let (b1, b2) = (pods[2].1.to_string(), pods[3].1.to_string());

    let db = cluster_ip(&cli(
        &mesh,
        "service create blue/web/db --port http:80/tcp --port pg:5432/tcp",
    ));
    let metrics = cluster_ip(&cli(
        &mesh,
        "service create blue/ops/metrics --port 9090/tcp",
    ));
    cli(
        &mesh,
        "service create blue/web/peers --headless --port raft:7000/tcp",
    );
    for (ip, host) in [(&b1, "peer-0"), (&b2, "peer-1")] {
        let line = format!("endpoints blue/web/peers --add {ip} --node n2 --hostname {host}");
        cli(&mesh, &line);
    }
    cli(
        &mesh,
        "service create blue/web/idle --headless --port 80/tcp",
    );

    let a_db = ok(&[&format!("A {db}")]);
    let served = wait_until(PATIENCE, || {
        dig(client, &["db.web.svc.cluster.local"]) == a_db
    });
    assert!(served, "no DNS answer for db:\n{}", mesh.log(n1));
    eprintln!("first answer {:?} after the start", started.elapsed());

    let checks: Vec<(Vec<&str>, Dig)> = vec![
        // Short names through the search path; another namespace by `<svc>.<ns>`.
        (vec!["+search", "db"], ok(&[&format!("A {db}")])),
        (vec!["+search", "db.web"], ok(&[&format!("A {db}")])),
        (
            vec!["+search", "metrics.ops"],
            ok(&[&format!("A {metrics}")]),
        ),
        (
            vec!["metrics.ops.svc.cluster.local"],
            ok(&[&format!("A {metrics}")]),
        ),
        (vec!["DB.Web.SVC.Cluster.Local"], ok(&[&format!("A {db}")])),
        (
            vec!["+tcp", "db.web.svc.cluster.local"],
            ok(&[&format!("A {db}")]),
        ),
        (
            vec!["_pg._tcp.db.web.svc.cluster.local", "SRV"],
            ok(&["SRV 0 100 5432 db.web.svc.cluster.local."]),
        ),
        (vec!["-x", &db], ok(&["PTR db.web.svc.cluster.local."])),
        (
            vec!["peers.web.svc.cluster.local"],
            ok(&[&format!("A {b1}"), &format!("A {b2}")]),
        ),
        (
            vec!["peer-1.peers.web.svc.cluster.local"],
            ok(&[&format!("A {b2}")]),
        ),
        (
            vec!["_raft._tcp.peers.web.svc.cluster.local", "SRV"],
            ok(&[
                "SRV 0 50 7000 peer-0.peers.web.svc.cluster.local.",
                "SRV 0 50 7000 peer-1.peers.web.svc.cluster.local.",
            ]),
        ),
        // Negative answers, with the zone's SOA for resolvers' caches (RFC 2308).
        (
            vec!["idle.web.svc.cluster.local"],
            negative("NXDOMAIN", "cluster.local."),
        ),
        (
            vec!["nope.web.svc.cluster.local"],
            negative("NXDOMAIN", "cluster.local."),
        ),
        (
            vec!["db.web.svc.cluster.local", "AAAA"],
            negative("NOERROR", "cluster.local."),
        ),
        (
            vec!["-x", "10.10.250.250"],
            negative("NXDOMAIN", "10.10.in-addr.arpa."),
        ),
        (vec!["cluster.local", "SOA"], ok(&[SOA])),
        (
            vec!["cluster.local", "NS"],
            ok(&["NS ns.dns.cluster.local."]),
        ),
        (
            vec!["dns-version.cluster.local", "TXT"],
            ok(&["TXT \"1.1.0\""]),
        ),
        // Outside the zone: n1's resolver answers.
        (vec!["example.com"], ok(&[&format!("A {UPSTREAM_ANSWER}")])),
    ];
    for (args, want) in &checks {
        assert_eq!(&dig(client, args), want, "dig {args:?}");
    }
    // n2's agent serves the same names in n2's namespace.
    assert_eq!(
        dig(&pods[1].0, &["+search", "peer-0.peers"]),
        ok(&[&format!("A {b1}")])
    );

    // n1's resolver moves (to n2's address): the agent follows its resolv.conf,
    // rewritten in place as an edit would (it is bind-mounted into the agent's mount
    // namespace, so a new file would not be seen there; nor would it on a host).
    let new_upstream_ip = mesh.nodes[n2].lan_ip;
    let new_upstream = mesh.nodes[n2]
        .ns
        .run(|| UdpSocket::bind((new_upstream_ip, 53)))
        .unwrap()
        .unwrap();
    fake_upstream(new_upstream, NEW_UPSTREAM_ANSWER);
    let n1_resolv = n1_etc.0.join("resolv.conf");
    std::fs::write(&n1_resolv, format!("nameserver {new_upstream_ip}\n")).unwrap();
    let moved = ok(&[&format!("A {NEW_UPSTREAM_ANSWER}")]);
    let followed = wait_until(PATIENCE, || dig(client, &["example.com"]) == moved);
    assert!(
        followed,
        "forwards did not follow resolv.conf:\n{}",
        mesh.log(n1)
    );
    // Emptied (as a half-written file would be): the agent says so when a forward
    // next looks, and the last resolvers stay in use.
    std::fs::write(&n1_resolv, "").unwrap();
    let kept = wait_until(PATIENCE, || {
        let answer = dig(client, &["example.com"]);
        assert_eq!(answer, moved, "the last good resolvers");
        mesh.log(n1).contains("VPC DNS keeps forwarding to")
    });
    assert!(
        kept,
        "the empty resolv.conf went unnoticed:\n{}",
        mesh.log(n1)
    );

    // A new service resolves within a bounded wait.
    let added = Instant::now();
    let late = cluster_ip(&cli(&mesh, "service create blue/web/late --port 80/tcp"));
    let late_ip: IpAddr = late.parse().unwrap();
    let want = ok(&[&format!("A {late_ip}")]);
    let resolves = wait_until(PATIENCE, || dig(client, &["+search", "late"]) == want);
    assert!(resolves, "late never resolved:\n{}", mesh.log(n1));
    eprintln!(
        "a new service resolved {:?} after its creation",
        added.elapsed()
    );
    eprintln!("VPC DNS test took {:?}", started.elapsed());
    drop(namespaces);
}
