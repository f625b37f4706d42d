//! `wiremesh vpc`, `wiremesh service` and `wiremesh endpoints`: VPC and service
//! records in the registry.
//!
//! Every write is checked twice before it is made: alone (the record's `TryFrom`,
//! whose errors name the field) and against what the registry holds, by building the
//! same `VpcSnapshot` the agents build and refusing a record it would set aside
//! (duplicate VPC id, clusterIP taken, endpoint on an unknown node, ...).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::IpAddr;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ipnet::Ipv6Net;
use wiremesh_agent::{Registry, ServiceId};
use wiremesh_model::{mesh_ula_from, NodeName};
use wiremesh_topology::ipam;
use wiremesh_vpc::record::{AccessRecord, ServicePortRecord};
use wiremesh_vpc::snapshot::{Mesh, Records};
use wiremesh_vpc::wire::MeshPrefix;
use wiremesh_vpc::{
    dns_cluster_ip, Endpoint, EndpointRecord, Label, NodeId, Service, ServiceRecord, Vpc,
    VpcRecord, VpcSnapshot,
};

use crate::RegistryArgs;

#[derive(Subcommand)]
pub enum VpcCommand {
    /// Create a VPC: an isolated layer-3 network spanning the nodes its pods land on.
    Create {
        /// DNS-1035 label, unique in the cluster.
        name: String,
        /// 32-bit id, unique and never reused while the VPC exists (1 and up).
        #[arg(long)]
        id: u32,
        /// The pods' addresses (IPv4 and/or IPv6; give twice for dual stack). Other
        /// VPCs may use the same CIDR: VPCs never see each other.
        #[arg(long = "pod-cidr", required = true)]
        pod_cidrs: Vec<String>,
        /// Where service clusterIPs come from; the DNS service takes its 10th address.
        #[arg(long, default_value = "10.96.0.0/16")]
        service_cidr: String,
        /// The VPC's DNS zone: services are `<svc>.<ns>.svc.<zone>`.
        #[arg(long, default_value = "cluster.local")]
        zone: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// List VPCs with their member nodes.
    List {
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Show one VPC: its record, members and services.
    Show {
        name: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Delete a VPC with its members, services and endpoints.
    Delete {
        name: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
}

#[derive(Subcommand)]
pub enum ServiceCommand {
    /// Create or replace a service: a clusterIP (kept across replacements) whose
    /// connections go to its ready endpoints, wherever they run.
    Create {
        /// VPC/NAMESPACE/NAME.
        service: String,
        /// `[name:]port/proto[:target]`, e.g. `http:80/tcp:8080`; proto is tcp or udp;
        /// target defaults to port. Repeat for more ports.
        #[arg(long = "port", required = true)]
        ports: Vec<String>,
        /// No clusterIP: DNS answers with the ready endpoints' addresses.
        #[arg(long)]
        headless: bool,
        /// `client-ip`: a client sticks to one endpoint (for --affinity-timeout seconds).
        #[arg(long)]
        affinity: Option<String>,
        /// Seconds a client-ip affinity lasts without traffic.
        #[arg(long, requires = "affinity")]
        affinity_timeout: Option<u32>,
        /// Only these may connect: a source CIDR, or a pod label `key=value`. Repeat
        /// for more; without any, every pod of the VPC may.
        #[arg(long = "allow")]
        allow: Vec<String>,
        /// Pods whose labels match `key=value` (all of them) are the endpoints.
        #[arg(long = "selector")]
        selector: Vec<String>,
        /// `local`: clients use only endpoints on their own node.
        #[arg(long)]
        internal_traffic_policy: Option<String>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// List services (of one VPC, if given) with their clusterIPs and endpoints.
    List {
        vpc: Option<String>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Show one service's record and endpoints.
    Show {
        /// VPC/NAMESPACE/NAME.
        service: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Delete a service and its endpoints.
    Delete {
        /// VPC/NAMESPACE/NAME.
        service: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
}

/// `wiremesh endpoints VPC/NS/SVC`: list, add or remove a service's endpoints.
#[derive(Args)]
pub struct EndpointsArgs {
    /// VPC/NAMESPACE/NAME.
    service: String,
    /// Add (or replace) the endpoint at this pod address; needs --node.
    #[arg(long, requires = "node", conflicts_with = "remove")]
    add: Option<String>,
    /// The node the --add endpoint runs on.
    #[arg(long)]
    node: Option<String>,
    /// The --add endpoint's hostname (headless DNS: `<hostname>.<svc>.<ns>.svc.<zone>`).
    #[arg(long, requires = "add")]
    hostname: Option<String>,
    /// The --add endpoint takes no new connections (terminating).
    #[arg(long, requires = "add")]
    not_ready: bool,
    /// Remove the endpoint at this address.
    #[arg(long)]
    remove: Option<String>,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// A new cluster's mesh ULA: RFC 4193's `fd` + 40 random bits (§3.2.2).
pub fn random_mesh_ula() -> Result<Ipv6Net> {
    let mut bits = [0u8; 5];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bits))
        .context("reading /dev/urandom for the mesh ULA")?;
    Ok(mesh_ula_from(bits))
}

/// The registry's VPC state as the agents see it, and the records it set aside.
struct Current {
    records: Records,
    nodes: BTreeMap<NodeName, NodeId>,
    prefix: MeshPrefix,
}

impl Current {
    fn read(registry: &dyn Registry) -> Result<Current> {
        let (snapshot, _) = registry.snapshot()?;
        let settings = &snapshot.settings;
        let Some(ula) = settings.mesh_ula else {
            bail!(wiremesh_agent::RegistryError::NoMeshUla);
        };
        let prefix = MeshPrefix::new(ula)?;
        let nodes = snapshot
            .nodes
            .iter()
            .filter_map(|n| Some((n.name.clone(), ipam::node_id(settings, n.pod_cidr).ok()?)))
            .collect();
        let (records, bad) = registry.vpc_records()?;
        for b in bad {
            eprintln!("warning: ignoring {b}");
        }
        Ok(Current {
            records,
            nodes,
            prefix,
        })
    }

    fn snapshot(&self, records: Records) -> (VpcSnapshot, Vec<wiremesh_vpc::BadRecord>) {
        let mesh = Mesh {
            prefix: self.prefix,
            nodes: &self.nodes,
        };
        VpcSnapshot::build(records, mesh)
    }

    /// Refuses `records` if the snapshot sets aside the record named `key`.
    fn check(&self, records: Records, key: &str) -> Result<VpcSnapshot> {
        let (snapshot, bad) = self.snapshot(records);
        if let Some(b) = bad.iter().find(|b| b.record == key) {
            bail!("{}", b.error);
        }
        Ok(snapshot)
    }
}

pub fn run_vpc(command: VpcCommand) -> Result<()> {
    match command {
        VpcCommand::Create {
            name,
            id,
            pod_cidrs,
            service_cidr,
            zone,
            registry,
        } => {
            let vpc = Vpc::try_from(VpcRecord {
                name,
                id,
                pod_cidrs,
                service_cidr,
                dns_zone: zone,
            })?;
            let registry = registry.open()?;
            let current = Current::read(&*registry)?;
            let mut records = current.records.clone();
            records.vpcs.push(vpc.clone());
            current.check(records, &format!("vpc {}", vpc.name))?;
            if !registry.create_vpc(&vpc)? {
                bail!("name: VPC {} exists", vpc.name);
            }
            println!(
                "created VPC {} (id {}, DNS {})",
                vpc.name,
                vpc.id,
                dns_cluster_ip(vpc.service_cidr)
            );
            Ok(())
        }
        VpcCommand::List { registry } => {
            let registry = registry.open()?;
            let current = Current::read(&*registry)?;
            let (snapshot, _) = current.snapshot(current.records.clone());
            println!("NAME\tID\tPOD-CIDRS\tSERVICE-CIDR\tZONE\tMEMBERS");
            for state in snapshot.vpcs.values() {
                let v = &state.vpc;
                let members: Vec<String> = state.members.keys().map(ToString::to_string).collect();
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    v.name,
                    v.id,
                    join(&v.pod_cidrs),
                    v.service_cidr,
                    v.dns_zone,
                    members.join(",")
                );
            }
            Ok(())
        }
        VpcCommand::Show { name, registry } => {
            let name = Label::parse("name", &name)?;
            let registry = registry.open()?;
            let current = Current::read(&*registry)?;
            let (snapshot, _) = current.snapshot(current.records.clone());
            let Some(state) = snapshot.vpcs.get(&name) else {
                bail!("name: no VPC {name}");
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&VpcRecord::from(&state.vpc))?
            );
            println!("DNS {}", dns_cluster_ip(state.vpc.service_cidr));
            for m in state.members.values() {
                println!("member {} {}", m.node, join(&m.pod_cidrs));
            }
            for svc in state.services.values() {
                print_service_line(&svc.service, svc.endpoints.len());
            }
            Ok(())
        }
        VpcCommand::Delete { name, registry } => {
            let name = Label::parse("name", &name)?;
            if !registry.open()?.delete_vpc(&name)? {
                bail!("name: no VPC {name}");
            }
            println!("deleted VPC {name}");
            Ok(())
        }
    }
}

pub fn run_service(command: ServiceCommand) -> Result<()> {
    match command {
        ServiceCommand::Create {
            service,
            ports,
            headless,
            affinity,
            affinity_timeout,
            allow,
            selector,
            internal_traffic_policy,
            registry,
        } => {
            let id: ServiceId = service.parse()?;
            let ports = ports
                .iter()
                .enumerate()
                .map(|(i, p)| parse_port(i, p))
                .collect::<Result<Vec<_>>>()?;
            let registry = registry.open()?;
            let current = Current::read(&*registry)?;
            let (snapshot, _) = current.snapshot(current.records.clone());
            let Some(state) = snapshot.vpcs.get(&id.vpc) else {
                bail!("vpc: no VPC {}", id.vpc);
            };
            // A replaced service keeps its clusterIP: clients hold it.
            let kept = state
                .services
                .get(&(id.namespace.clone(), id.name.clone()))
                .and_then(|s| s.service.cluster_ip);
            let cluster_ip = match (headless, kept) {
                (true, _) => "None".to_owned(),
                (false, Some(ip)) => ip.to_string(),
                (false, None) => state
                    .allocate_cluster_ip()
                    .with_context(|| {
                        format!(
                            "cluster_ip: service CIDR {} is full",
                            state.vpc.service_cidr
                        )
                    })?
                    .to_string(),
            };
            let record = ServiceRecord {
                vpc: id.vpc.to_string(),
                namespace: id.namespace.to_string(),
                name: id.name.to_string(),
                cluster_ip,
                ports,
                session_affinity: affinity.as_deref().map(parse_affinity).transpose()?,
                affinity_timeout_seconds: affinity_timeout,
                internal_traffic_policy: internal_traffic_policy
                    .as_deref()
                    .map(parse_policy)
                    .transpose()?,
                access: parse_access(&allow)?,
                selector: parse_labels("selector", &selector)?,
            };
            let svc = Service::try_from(record)?;
            let mut records = current.records.clone();
            records.services.retain(|s| ServiceId::from(s) != id);
            records.services.push(svc.clone());
            current.check(records, &format!("service {id}"))?;
            registry.put_service(&svc)?;
            match svc.cluster_ip {
                Some(ip) => println!("service {id} at {ip}"),
                None => println!("headless service {id}"),
            }
            Ok(())
        }
        ServiceCommand::List { vpc, registry } => {
            let vpc = vpc.map(|v| Label::parse("vpc", &v)).transpose()?;
            let registry = registry.open()?;
            let current = Current::read(&*registry)?;
            let (snapshot, _) = current.snapshot(current.records.clone());
            println!("SERVICE\tCLUSTER-IP\tPORTS\tENDPOINTS");
            for state in snapshot.vpcs.values() {
                if vpc.as_ref().is_some_and(|v| *v != state.vpc.name) {
                    continue;
                }
                for svc in state.services.values() {
                    print_service_line(&svc.service, svc.endpoints.len());
                }
            }
            Ok(())
        }
        ServiceCommand::Show { service, registry } => {
            let id: ServiceId = service.parse()?;
            let registry = registry.open()?;
            let current = Current::read(&*registry)?;
            let (snapshot, _) = current.snapshot(current.records.clone());
            let svc = snapshot
                .vpcs
                .get(&id.vpc)
                .and_then(|s| s.services.get(&(id.namespace.clone(), id.name.clone())))
                .with_context(|| format!("service: no service {id}"))?;
            let record = ServiceRecord::from(&svc.service);
            println!("{}", serde_json::to_string_pretty(&record)?);
            print_endpoints(&svc.endpoints);
            Ok(())
        }
        ServiceCommand::Delete { service, registry } => {
            let id: ServiceId = service.parse()?;
            if !registry.open()?.delete_service(&id)? {
                bail!("service: no service {id}");
            }
            println!("deleted service {id}");
            Ok(())
        }
    }
}

pub fn run_endpoints(a: EndpointsArgs) -> Result<()> {
    let id: ServiceId = a.service.parse()?;
    let registry = a.registry.open()?;
    let current = Current::read(&*registry)?;
    if let Some(address) = a.add {
        let endpoint = Endpoint::try_from(EndpointRecord {
            vpc: id.vpc.to_string(),
            namespace: id.namespace.to_string(),
            service: id.name.to_string(),
            address,
            node: a.node.unwrap_or_default(),
            hostname: a.hostname,
            ready: Some(!a.not_ready),
            serving: None,
            terminating: a.not_ready,
        })?;
        let mut records = current.records.clone();
        records
            .endpoints
            .retain(|e| !(ServiceId::of(e) == id && e.address == endpoint.address));
        records.endpoints.push(endpoint.clone());
        current.check(records, &format!("endpoint {id}/{}", endpoint.address))?;
        registry.put_endpoint(&endpoint)?;
        println!("endpoint {} of {id} on {}", endpoint.address, endpoint.node);
        return Ok(());
    }
    if let Some(address) = a.remove {
        let address: IpAddr = address
            .parse()
            .map_err(|_| anyhow::anyhow!("remove: {address:?} is not an IP address"))?;
        if !registry.delete_endpoint(&id, address)? {
            bail!("remove: {id} has no endpoint {address}");
        }
        println!("removed endpoint {address} of {id}");
        return Ok(());
    }
    let (snapshot, _) = current.snapshot(current.records.clone());
    let svc = snapshot
        .vpcs
        .get(&id.vpc)
        .and_then(|s| s.services.get(&(id.namespace.clone(), id.name.clone())))
        .with_context(|| format!("service: no service {id}"))?;
    print_endpoints(&svc.endpoints);
    Ok(())
}

fn join<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn print_service_line(s: &Service, endpoints: usize) {
    let ports: Vec<String> = s
        .ports
        .iter()
        .map(|p| {
            let name = p.name.as_ref().map(|n| format!("{n}:")).unwrap_or_default();
            format!("{name}{}/{}:{}", p.port, p.protocol.as_str(), p.target_port)
        })
        .collect();
    let ip = s.cluster_ip.map_or("None".into(), |ip| ip.to_string());
    println!(
        "{}/{}/{}\t{ip}\t{}\t{endpoints}",
        s.vpc,
        s.namespace,
        s.name,
        ports.join(",")
    );
}

fn print_endpoints(endpoints: &[Endpoint]) {
    println!("ADDRESS\tNODE\tHOSTNAME\tREADY");
    for e in endpoints {
        let host = e.hostname.as_ref().map_or("-".into(), ToString::to_string);
        println!("{}\t{}\t{host}\t{}", e.address, e.node, e.ready);
    }
}

/// `[name:]port/proto[:target]`; errors name `port[i]`.
fn parse_port(i: usize, s: &str) -> Result<ServicePortRecord> {
    let field = format!("port[{i}]");
    let bad =
        |why: &str| anyhow::anyhow!("{field}: {s:?} {why} (expected [name:]port/proto[:target])");
    let (name, rest) = match s.split_once(':') {
        Some((name, rest)) if !name.contains('/') => (Some(name.to_owned()), rest),
        _ => (None, s),
    };
    let (port, rest) = rest.split_once('/').ok_or_else(|| bad("has no /proto"))?;
    let (proto, target) = match rest.split_once(':') {
        Some((proto, target)) => (proto, Some(target)),
        None => (rest, None),
    };
    let number = |what: &str, v: &str| {
        v.parse::<i64>()
            .map_err(|_| bad(&format!("has a {what} that is not a number")))
    };
    Ok(ServicePortRecord {
        name,
        protocol: proto.to_ascii_uppercase(),
        port: number("port", port)?,
        target_port: target.map(|t| number("target", t)).transpose()?,
    })
}

fn parse_affinity(s: &str) -> Result<String> {
    match s {
        "client-ip" => Ok("ClientIP".into()),
        "none" => Ok("None".into()),
        other => bail!("affinity: {other:?} is neither client-ip nor none"),
    }
}

fn parse_policy(s: &str) -> Result<String> {
    match s {
        "local" => Ok("Local".into()),
        "cluster" => Ok("Cluster".into()),
        other => bail!("internal_traffic_policy: {other:?} is neither local nor cluster"),
    }
}

/// `--allow`: CIDRs and `key=value` pod labels (each label its own selector).
fn parse_access(allow: &[String]) -> Result<Option<AccessRecord>> {
    if allow.is_empty() {
        return Ok(None);
    }
    let mut access = AccessRecord::default();
    for a in allow {
        if a.contains('=') {
            access
                .allowed_pods
                .push(parse_labels("allow", std::slice::from_ref(a))?);
        } else {
            access.allowed_cidrs.push(a.clone());
        }
    }
    Ok(Some(access))
}

fn parse_labels(field: &str, pairs: &[String]) -> Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for p in pairs {
        let Some((k, v)) = p.split_once('=') else {
            bail!("{field}: {p:?} is not key=value");
        };
        if !seen.insert(k.to_owned()) {
            bail!("{field}: label {k} given twice");
        }
        labels.insert(k.to_owned(), v.to_owned());
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_or_name_the_field() {
        let p = parse_port(0, "http:80/tcp:8080").unwrap();
        assert_eq!(
            (
                p.name.as_deref(),
                p.protocol.as_str(),
                p.port,
                p.target_port
            ),
            (Some("http"), "TCP", 80, Some(8080))
        );
        let p = parse_port(1, "53/udp").unwrap();
        assert_eq!((p.name, p.port, p.target_port), (None, 53, None));
        for bad in ["http:80", "x:eighty/tcp", "80/tcp:x"] {
            let e = parse_port(2, bad).unwrap_err().to_string();
            assert!(e.starts_with("port[2]: "), "{e}");
        }
        // The record checks the rest, naming its field.
        let svc = ServiceRecord {
            vpc: "blue".into(),
            namespace: "web".into(),
            name: "db".into(),
            cluster_ip: "None".into(),
            ports: vec![parse_port(0, "70000/tcp").unwrap()],
            session_affinity: None,
            affinity_timeout_seconds: None,
            internal_traffic_policy: None,
            access: None,
            selector: BTreeMap::new(),
        };
        let e = Service::try_from(svc).unwrap_err();
        assert_eq!(e.field, "service blue/web/db.ports[0].port", "{e}");
    }
}
