//! The demo's second act: VPCs and services on the running mesh.
//!
//! Two tenants, `acme` and `globex`, get a VPC each on the same pod CIDR
//! (10.10.0.0/16). Each has a client pod on a1 (cloud-a) and an `api` backend on b1
//! (cloud-b) at the very same addresses, and a service `shop/api` whose VIP leads to
//! its own backend: the tenants never see each other. Then acme's backend moves to
//! e1 (the edge site, behind NAT) with a new address while acme's client keeps
//! calling the VIP it was given: the calls succeed before and after the move, with a
//! short gap in which they are refused (TCP reset), never left hanging. The client
//! finds the service by name once, from its VPC's DNS server, and then holds the
//! VIP: no lookup is needed to follow the move.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use wiremesh_host::netns;

use super::testbed::{CLUSTER, PREFIX};
use crate::vpc_pod;

const TENANTS: [(&str, u32); 2] = [("acme", 101), ("globex", 102)];
const POD_CIDR: &str = "10.10.0.0/16";
const SERVICE: &str = "shop/api";
const PORT: u16 = 80;
/// The client's pace while the backend moves.
const CALL_EVERY: Duration = Duration::from_millis(100);
/// The longest the move may leave the client without an answer.
const MAX_GAP: Duration = Duration::from_secs(10);

/// What the act found.
pub struct Outcome {
    /// Checks that failed, each said in a sentence.
    pub failures: Vec<String>,
}

/// A pod of a tenant: its namespace and address.
struct Pod {
    netns: String,
    ip: Ipv4Addr,
}

pub fn run(workdir: &Path) -> Result<Outcome> {
    let started = Instant::now();
    println!("\n=== act 2: VPCs and services ===");
    let cli = vpc_pod::Cli {
        registry: format!("dir:{}", workdir.join("registry").display()),
        cluster: CLUSTER.into(),
    };
    let mut failures = Vec::new();
    for (name, id) in TENANTS {
        let id = id.to_string();
        cli.run(&["vpc", "create", name, "--id", &id, "--pod-cidr", POD_CIDR])?;
    }
    println!("[act 2] VPCs acme and globex, both on {POD_CIDR}; a client on a1 and an api backend on b1 in each");
    // a1 asks for both VPCs before b1 does, so both give each node the same block:
    // the tenants' pods have the very same addresses.
    let mut clients = Vec::new();
    let mut backends = Vec::new();
    for (node, role) in [("a1", "client"), ("b1", "api")] {
        for (tenant, _) in TENANTS {
            let pod = plug(workdir, node, tenant, 1, role)?;
            if role == "api" {
                serve(&pod, format!("{tenant} api on {node}"))?;
                backends.push(pod);
            } else {
                clients.push(pod);
            }
        }
    }
    let mut vips = Vec::new();
    for (((tenant, _), backend), client) in TENANTS.iter().zip(&backends).zip(&clients) {
        let service = format!("{tenant}/{SERVICE}");
        let vip = cli.service(&service, &["http:80/tcp"], (backend.ip, "b1"))?;
        // The client asks its VPC's DNS server, as a pod's resolver would.
        let local = vpc_pod::hosted(&workdir.join("nodes").join("a1"), tenant)?;
        let (name, namespace) = SERVICE
            .split_once('/')
            .map(|(ns, n)| (n, ns))
            .expect("ns/name");
        let fqdn = format!("{name}.{namespace}.svc.{}.", local.zone);
        let resolved = resolve(client, &fqdn, local.nameserver)?;
        println!(
            "        {tenant}: client {} on a1, backend {} on b1; {fqdn} -> {resolved}",
            clients[0].ip, backend.ip
        );
        if resolved != vip {
            failures.push(format!(
                "{tenant}'s DNS answered {fqdn} with {resolved}, not the VIP {vip}"
            ));
        }
        vips.push(resolved);
    }

    // Isolation: the same addresses, each tenant reaching its own.
    println!("[act 2] isolation: each tenant's client calls its VIP and the backend's address");
    for (((tenant, _), client), vip) in TENANTS.iter().zip(&clients).zip(&vips) {
        let want = format!("{tenant} api on b1");
        for dst in [*vip, backends[0].ip] {
            let got = call_until(client, dst, Duration::from_secs(30));
            let ok = got.as_deref() == Ok(want.as_str());
            println!("        {tenant} -> {dst}: {}", shown(&got));
            if !ok {
                failures.push(format!(
                    "{tenant}'s client reached {dst} as {got:?}, not {want:?}"
                ));
            }
        }
    }

    // The move: acme's backend is recreated on e1 while its client calls the VIP.
    println!("[act 2] acme's api moves from b1 (cloud-b) to e1 (edge, behind NAT); its client keeps calling the VIP every {CALL_EVERY:?}");
    let acme = &TENANTS[0].0;
    let moved = plug(workdir, "e1", acme, 1, "api")?;
    serve(&moved, format!("{acme} api on e1"))?;
    let service = format!("{acme}/{SERVICE}");
    let (old, new) = (backends[0].ip.to_string(), moved.ip.to_string());
    let caller = Caller::start(&clients[0], vips[0]);
    caller.until(Duration::from_secs(10), |log| log.len() >= 5)?;
    cli.run(&["endpoints", &service, "--remove", &old])?;
    netns::delete(&backends[0].netns)?;
    cli.run(&["endpoints", &service, "--add", &new, "--node", "e1"])?;
    let after = format!("{acme} api on e1");
    caller.until(Duration::from_secs(30), |log| {
        log.iter()
            .filter(|(_, r)| r.as_deref() == Ok(after.as_str()))
            .count()
            >= 5
    })?;
    let log = caller.stop();
    let before = format!("{acme} api on b1");
    let count = |want: &str| log.iter().filter(|(_, r)| r.as_deref() == Ok(want)).count();
    let refused = log
        .iter()
        .filter(|(_, r)| r == &Err(ErrorKind::ConnectionRefused))
        .count();
    let other = log.len() - count(&before) - count(&after) - refused;
    let last_old = log
        .iter()
        .rev()
        .find(|(_, r)| r.as_deref() == Ok(before.as_str()));
    let first_new = log.iter().find(|(_, r)| r.as_deref() == Ok(after.as_str()));
    let gap = match (last_old, first_new) {
        (Some((a, _)), Some((b, _))) => b.saturating_sub(*a),
        _ => Duration::MAX,
    };
    println!(
        "        {} calls: {} answered on b1, {} refused during the move, {} answered on e1, {} other; gap {:.2}s",
        log.len(),
        count(&before),
        refused,
        count(&after),
        other,
        gap.as_secs_f64()
    );
    if gap > MAX_GAP || other > 0 {
        failures.push(format!(
            "the move left acme's client {gap:?} without an answer ({other} calls neither answered nor refused)"
        ));
    }
    // globex has no pod on e1: acme's new address is not globex's.
    let crossed = call(&clients[1], moved.ip);
    println!(
        "        globex -> {} (acme's new backend): {}",
        moved.ip,
        shown(&crossed)
    );
    if crossed.is_ok() {
        failures.push(format!("globex reached acme's pod at {}", moved.ip));
    }
    println!(
        "[act 2] {} ({:.1}s)",
        if failures.is_empty() {
            "passed"
        } else {
            "FAILED"
        },
        started.elapsed().as_secs_f64()
    );
    for f in &failures {
        println!("        FAIL {f}");
    }
    Ok(Outcome { failures })
}

/// A pod of `tenant` on demo node `node`, at host `host` of the node's block.
fn plug(workdir: &Path, node: &str, tenant: &str, host: usize, role: &str) -> Result<Pod> {
    let netns = format!("{PREFIX}{tenant}-{role}-{node}");
    let state_dir = workdir.join("nodes").join(node);
    let node_ns = format!("{PREFIX}{node}");
    let ip = vpc_pod::plug(&state_dir, &node_ns, tenant, host, &netns, PREFIX)?;
    Ok(Pod { netns, ip })
}

/// The A record of `fqdn` from `nameserver`, asked from inside `pod` until it has one
/// (the agent's DNS view follows the registry within a moment), for at most 10 s.
fn resolve(pod: &Pod, fqdn: &str, nameserver: IpAddr) -> Result<Ipv4Addr> {
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(Name::from_ascii(fqdn)?, RecordType::A));
    let query = query.to_vec()?;
    let ask = move || -> std::io::Result<Vec<u8>> {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        socket.set_read_timeout(Some(Duration::from_millis(500)))?;
        socket.send_to(&query, (nameserver, 53))?;
        let mut buf = [0u8; 1500];
        let n = socket.recv(&mut buf)?;
        Ok(buf[..n].to_vec())
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = netns::enter(&pod.netns, ask.clone())?;
        let a = answer.ok().and_then(|bytes| {
            Message::from_vec(&bytes)
                .ok()?
                .answers
                .iter()
                .find_map(|r| match &r.data {
                    RData::A(a) => Some(a.0),
                    _ => None,
                })
        });
        match a {
            Some(a) => return Ok(a),
            None if Instant::now() > deadline => {
                bail!("{nameserver} gave no A record for {fqdn} within 10 s")
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Answers every connection on port 80 with `tag`.
fn serve(pod: &Pod, tag: String) -> Result<()> {
    let addr = SocketAddr::from((pod.ip, PORT));
    let listener = netns::enter(&pod.netns, move || TcpListener::bind(addr))??;
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(tag.as_bytes());
        }
    });
    Ok(())
}

/// One call from `pod` to `dst`: the answer, or how it failed.
fn call(pod: &Pod, dst: Ipv4Addr) -> Result<String, ErrorKind> {
    netns::enter(&pod.netns, move || {
        let addr = SocketAddr::from((dst, PORT));
        let mut conn =
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| e.kind())?;
        conn.set_read_timeout(Some(Duration::from_secs(1)))
            .map_err(|e| e.kind())?;
        let mut answer = String::new();
        conn.read_to_string(&mut answer).map_err(|e| e.kind())?;
        Ok(answer)
    })
    .unwrap_or(Err(ErrorKind::Other))
}

/// A call retried until it is answered (first contact across sites takes a
/// handshake or two), for at most `within`.
fn call_until(pod: &Pod, dst: Ipv4Addr, within: Duration) -> Result<String, ErrorKind> {
    let start = Instant::now();
    loop {
        let got = call(pod, dst);
        if got.is_ok() || start.elapsed() > within {
            return got;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn shown(r: &Result<String, ErrorKind>) -> String {
    match r {
        Ok(answer) => format!("{answer:?}"),
        Err(kind) => format!("no answer ({kind:?})"),
    }
}

/// Calls a VIP from a pod every [`CALL_EVERY`] on a thread, logging each outcome with
/// the time it started.
struct Caller {
    log: Arc<Mutex<CallLog>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

type CallLog = Vec<(Duration, Result<String, ErrorKind>)>;

impl Caller {
    fn start(pod: &Pod, vip: Ipv4Addr) -> Caller {
        let log: Arc<Mutex<CallLog>> = Default::default();
        let stop: Arc<AtomicBool> = Default::default();
        let client = Pod {
            netns: pod.netns.clone(),
            ip: pod.ip,
        };
        let thread = {
            let (log, stop) = (log.clone(), stop.clone());
            std::thread::spawn(move || {
                let start = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let at = start.elapsed();
                    let outcome = call(&client, vip);
                    log.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((at, outcome));
                    std::thread::sleep(CALL_EVERY);
                }
            })
        };
        Caller { log, stop, thread }
    }

    /// Waits until `done` holds for the log, for at most `within`.
    fn until(&self, within: Duration, done: impl Fn(&CallLog) -> bool) -> Result<()> {
        let start = Instant::now();
        while !done(&self.log.lock().unwrap_or_else(|e| e.into_inner())) {
            if start.elapsed() > within {
                bail!("acme's client: no progress within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn stop(self) -> CallLog {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        std::mem::take(&mut self.log.lock().unwrap_or_else(|e| e.into_inner()))
    }
}
