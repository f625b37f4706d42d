//! VPC records in the conformance suite: what every [`Registry`] backend must do with
//! VPCs, members, services and endpoints, as the agent and the CLI use them. Waits
//! are bounded polls; the only sleep-free wait for time passing is a poll on a
//! lease's expiry.

use std::collections::BTreeMap;
use std::thread;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use wiremesh_agent::{Change, Membership, ServiceId};
use wiremesh_model::{Node, NodeName, PublicKey};
use wiremesh_vpc::snapshot::Mesh;
use wiremesh_vpc::wire::MeshPrefix;
use wiremesh_vpc::{
    Endpoint, Label, Pod, PodName, Service, ServiceRecord, Vpc, VpcRecord, VpcSnapshot,
};

use crate::cases::Bed;

/// A registry under test that can also write malformed VPC records behind its back.
pub trait VpcBed: Bed {
    /// Writes a VPC `red` whose service CIDR overlaps its pod CIDR; returns where it
    /// is reported (key) and the field the error must name.
    fn write_malformed_vpc(&self) -> (String, String);
    /// Writes service `blue/web/bad` with port 0; returns its key and field.
    fn write_malformed_service(&self) -> (String, String);
}

/// How long a case waits for what should happen promptly.
const WAIT: Duration = Duration::from_secs(15);
/// The bound: a dead node's endpoints are gone within 10 s.
const ENDPOINT_EXPIRY: Duration = Duration::from_secs(10);

pub type Case = fn(&dyn VpcBed);

/// Every case, by name.
pub const CASES: &[(&str, Case)] = &[
    ("vpcs_create_list_delete", vpcs_create_list_delete),
    ("vpc_claims_never_collide", vpc_claims_never_collide),
    ("services_put_list_delete", services_put_list_delete),
    (
        "endpoints_expire_with_their_node",
        endpoints_expire_with_their_node,
    ),
    (
        "malformed_vpc_records_are_named",
        malformed_vpc_records_are_named,
    ),
    ("vpc_changes_are_streamed", vpc_changes_are_streamed),
];

/// One `#[test]` per VPC case; `$bed` is evaluated afresh in each.
#[macro_export]
macro_rules! vpc_conformance_tests {
    ($bed:expr) => {
        $crate::vpc_conformance_tests!(@cases $bed; vpcs_create_list_delete,
            vpc_claims_never_collide, services_put_list_delete,
            endpoints_expire_with_their_node, malformed_vpc_records_are_named,
            vpc_changes_are_streamed);
    };
    (@cases $bed:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let bed = $bed;
                $crate::vpc_cases::$case(&bed);
            }
        )*

        #[test]
        fn vpc_conformance_macro_lists_every_case() {
            let listed = [$(stringify!($case)),*];
            let cases: Vec<&str> =
                $crate::vpc_cases::CASES.iter().map(|(name, _)| *name).collect();
            assert_eq!(listed.as_slice(), cases.as_slice());
        }
    };
}

pub fn vpc(name: &str, id: u32) -> Vpc {
    VpcRecord {
        name: name.into(),
        id,
        pod_cidrs: vec!["10.10.0.0/16".into(), "fd10::/56".into()],
        service_cidr: "10.96.0.0/24".into(),
        dns_zone: "cluster.local".into(),
    }
    .try_into()
    .expect("a VPC")
}

fn label(s: &str) -> Label {
    Label::parse("label", s).expect("a label")
}

fn node_name(s: &str) -> NodeName {
    s.parse().expect("a node name")
}

fn service(name: &str, port: u16) -> Service {
    serde_json::from_value::<ServiceRecord>(serde_json::json!({
        "vpc": "blue", "namespace": "web", "name": name, "cluster_ip": "10.96.0.20",
        "ports": [{"protocol": "TCP", "port": port, "target_port": 8080}],
        "selector": {"app": name},
    }))
    .expect("a service record")
    .try_into()
    .expect("a service")
}

fn endpoint(service: &str, address: &str, node: &NodeName) -> Endpoint {
    Endpoint {
        vpc: label("blue"),
        namespace: label("web"),
        service: label(service),
        address: address.parse().expect("an address"),
        node: node.clone(),
        hostname: Some(label("db-0")),
        ready: true,
        serving: true,
        terminating: false,
    }
}

fn service_id(name: &str) -> ServiceId {
    format!("blue/web/{name}").parse().expect("a service id")
}

/// `node` joined the mesh (a machine with the `n`th pod CIDR) with liveness `ttl`.
fn join(bed: &dyn VpcBed, node: &NodeName, n: u8, ttl: Duration) -> Box<dyn Membership> {
    let registry = bed.open();
    let cidr: IpNet = format!("10.42.{n}.0/24").parse().expect("a CIDR");
    bed.add_machine(node, cidr);
    let settings = registry.settings().expect("settings");
    let block = registry
        .claim_block(node, &settings, None)
        .expect("a pod CIDR");
    let record = serde_json::json!({
        "name": node.as_str(), "location": "site-a",
        "public_key": PublicKey::from_hex(&format!("{:02x}", n + 1).repeat(32)).unwrap().to_string(),
        "pod_cidr": block.pod_cidr.to_string(), "mesh_ip": block.mesh_ip.to_string(),
    });
    let record = Node::from_json(record.to_string().as_bytes()).expect("a node record");
    registry.join(&record, ttl).expect("join")
}

/// Polls `check` until it holds or `within` passes; returns whether it held.
fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Names are unique in the registry; ids are checked when the records are built
/// into a snapshot, where the second VPC on an id is set aside naming `id`.
pub fn vpcs_create_list_delete(bed: &dyn VpcBed) {
    let registry = bed.open();
    assert!(registry.create_vpc(&vpc("blue", 7)).unwrap());
    assert!(
        !registry.create_vpc(&vpc("blue", 8)).unwrap(),
        "a second VPC of one name"
    );
    assert!(registry.create_vpc(&vpc("green", 7)).unwrap());
    let (records, bad) = bed.open().vpc_records().unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    let mut names: Vec<&str> = records.vpcs.iter().map(|v| v.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["blue", "green"]);
    assert_eq!(
        records.vpcs.iter().find(|v| v.name.as_str() == "blue"),
        Some(&vpc("blue", 7))
    );

    let prefix = MeshPrefix::new("fd00:1:2::/48".parse().unwrap()).unwrap();
    let nodes = BTreeMap::new();
    let (snapshot, bad) = VpcSnapshot::build(
        records,
        Mesh {
            prefix,
            nodes: &nodes,
        },
    );
    assert_eq!(
        snapshot.vpcs.keys().map(Label::as_str).collect::<Vec<_>>(),
        ["blue"]
    );
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0].error.field, "vpc green.id", "{}", bad[0].error);

    assert!(registry.delete_vpc(&label("blue")).unwrap());
    assert!(!registry.delete_vpc(&label("blue")).unwrap());
    let (records, _) = registry.vpc_records().unwrap();
    assert_eq!(records.vpcs, [vpc("green", 7)]);
}

/// Nodes claiming at once get disjoint blocks; a node that claims again keeps its
/// blocks; blocks given back are free again.
pub fn vpc_claims_never_collide(bed: &dyn VpcBed) {
    let blue = vpc("blue", 7);
    assert!(bed.open().create_vpc(&blue).unwrap());
    let nodes: Vec<NodeName> = (1..=4).map(|i| node_name(&format!("n{i}"))).collect();
    let members: Vec<_> = thread::scope(|s| {
        let claims: Vec<_> = nodes
            .iter()
            .map(|node| {
                let registry = bed.open();
                let blue = &blue;
                s.spawn(move || registry.claim_vpc_member(blue, node).expect("a claim"))
            })
            .collect();
        claims.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let blocks: Vec<IpNet> = members.iter().flat_map(|m| m.pod_cidrs.clone()).collect();
    for (i, a) in blocks.iter().enumerate() {
        for b in &blocks[i + 1..] {
            assert!(
                !a.contains(&b.network()) && !b.contains(&a.network()),
                "{a} and {b} overlap: {members:?}"
            );
        }
    }
    for m in &members {
        assert_eq!(m.pod_cidrs.len(), 2, "one block of each pod CIDR: {m:?}");
        assert!(m
            .pod_cidrs
            .iter()
            .all(|b| blue.pod_cidrs.iter().any(|c| c.contains(b))));
    }

    let registry = bed.open();
    let again = registry.claim_vpc_member(&blue, &nodes[0]).unwrap();
    assert_eq!(again, members[0], "a node keeps its blocks");
    let (records, bad) = registry.vpc_records().unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    let mut listed = records.members.clone();
    listed.sort_by(|a, b| a.node.cmp(&b.node));
    assert_eq!(listed, members);

    registry.leave_vpc(&blue.name, &nodes[0]).unwrap();
    let (records, _) = registry.vpc_records().unwrap();
    assert!(records.members.iter().all(|m| m.node != nodes[0]));
    let newcomer = registry.claim_vpc_member(&blue, &node_name("n5")).unwrap();
    assert_eq!(
        newcomer.pod_cidrs, members[0].pod_cidrs,
        "the lowest free block"
    );
}

/// Services are put, replaced, listed and deleted; deleting one takes its endpoints.
pub fn services_put_list_delete(bed: &dyn VpcBed) {
    let registry = bed.open();
    assert!(registry.create_vpc(&vpc("blue", 7)).unwrap());
    let n1 = node_name("n1");
    let _member = join(bed, &n1, 1, Duration::from_secs(60));
    registry.put_service(&service("db", 5432)).unwrap();
    registry.put_service(&service("db", 5433)).unwrap();
    registry.put_service(&service("cache", 6379)).unwrap();
    let db = endpoint("db", "10.10.0.5", &n1);
    registry.put_endpoint(&db).unwrap();
    registry
        .put_endpoint(&endpoint("db", "fd10::5", &n1))
        .unwrap();

    let (records, bad) = bed.open().vpc_records().unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    let mut services = records.services.clone();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(services, [service("cache", 6379), service("db", 5433)]);
    assert_eq!(records.endpoints.len(), 2, "{:?}", records.endpoints);
    assert!(records.endpoints.contains(&db));

    assert!(registry
        .delete_endpoint(&service_id("db"), db.address)
        .unwrap());
    assert!(!registry
        .delete_endpoint(&service_id("db"), db.address)
        .unwrap());
    assert!(registry.delete_service(&service_id("db")).unwrap());
    assert!(!registry.delete_service(&service_id("db")).unwrap());
    let (records, _) = registry.vpc_records().unwrap();
    assert_eq!(records.services, [service("cache", 6379)]);
    assert!(records.endpoints.is_empty(), "{:?}", records.endpoints);
}

fn pod(name: &str, address: &str, node: &NodeName) -> Pod {
    Pod {
        vpc: label("blue"),
        namespace: label("web"),
        name: PodName::parse("name", name).expect("a pod name"),
        address: address.parse().expect("an address"),
        address_v6: None,
        node: node.clone(),
        labels: BTreeMap::from([("app".into(), "db".into())]),
    }
}

/// An endpoint or pod published under a node's liveness is gone once the node
/// stops renewing it (a crash: no leave), within the 10 s; a pod is
/// deleted by name.
pub fn endpoints_expire_with_their_node(bed: &dyn VpcBed) {
    let registry = bed.open();
    assert!(registry.create_vpc(&vpc("blue", 7)).unwrap());
    registry.put_service(&service("db", 5432)).unwrap();
    let n1 = node_name("n1");
    let n2 = node_name("n2");
    let mut dying = join(bed, &n1, 1, Duration::from_secs(2));
    let mut staying = join(bed, &n2, 2, Duration::from_secs(60));
    dying
        .publish_endpoint(&endpoint("db", "10.10.0.5", &n1))
        .unwrap();
    staying
        .publish_endpoint(&endpoint("db", "10.10.1.5", &n2))
        .unwrap();
    dying.publish_pod(&pod("db-0", "10.10.0.5", &n1)).unwrap();
    staying.publish_pod(&pod("db-1", "10.10.1.5", &n2)).unwrap();
    staying.publish_pod(&pod("db-2", "10.10.1.6", &n2)).unwrap();
    let (records, bad) = registry.vpc_records().unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(records.endpoints.len(), 2, "{:?}", records.endpoints);
    assert_eq!(records.pods.len(), 3, "{:?}", records.pods);
    let db2 = PodName::parse("name", "db-2").unwrap();
    assert!(registry
        .delete_pod(&label("blue"), &label("web"), &db2)
        .unwrap());
    assert!(!registry
        .delete_pod(&label("blue"), &label("web"), &db2)
        .unwrap());

    drop(dying);
    let died = Instant::now();
    let gone = eventually(ENDPOINT_EXPIRY + Duration::from_secs(1), || {
        let (records, _) = registry.vpc_records().unwrap();
        records.endpoints.iter().all(|e| e.node != n1) && records.pods.iter().all(|p| p.node != n1)
    });
    assert!(
        gone,
        "n1's endpoint or pod outlived it by {:?}",
        died.elapsed()
    );
    let (records, _) = registry.vpc_records().unwrap();
    assert_eq!(records.endpoints, [endpoint("db", "10.10.1.5", &n2)]);
    assert_eq!(records.pods, [pod("db-1", "10.10.1.5", &n2)]);
}

/// A record that does not parse is reported with its key and field; the rest stays.
pub fn malformed_vpc_records_are_named(bed: &dyn VpcBed) {
    let registry = bed.open();
    assert!(registry.create_vpc(&vpc("blue", 7)).unwrap());
    registry.put_service(&service("db", 5432)).unwrap();
    let expected = [bed.write_malformed_vpc(), bed.write_malformed_service()];
    let (records, bad) = registry.vpc_records().unwrap();
    assert_eq!(records.vpcs, [vpc("blue", 7)]);
    assert_eq!(records.services, [service("db", 5432)]);
    assert_eq!(bad.len(), 2, "{bad:?}");
    for (key, field) in expected {
        assert!(
            bad.iter().any(|b| b.key == key && b.error.field == field),
            "no {key}: {field} in {bad:?}"
        );
    }
}

/// The agent learns of VPC changes from the stream: a new VPC, a service and an
/// endpoint each arrive as a change of that VPC.
pub fn vpc_changes_are_streamed(bed: &dyn VpcBed) {
    let registry = bed.open();
    let n1 = node_name("n1");
    let _member = join(bed, &n1, 1, Duration::from_secs(60));
    let mut changes = registry.changes().unwrap();
    let writer = bed.open();
    let writes: [&dyn Fn(); 3] = [
        &|| assert!(writer.create_vpc(&vpc("blue", 7)).unwrap()),
        &|| writer.put_service(&service("db", 5432)).unwrap(),
        &|| {
            writer
                .put_endpoint(&endpoint("db", "10.10.0.5", &n1))
                .unwrap()
        },
    ];
    for (i, write) in writes.iter().enumerate() {
        write();
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "write {i} was not reported within {WAIT:?}"
            );
            if changes.recv_timeout(left).unwrap() == Some(Change::Vpc("blue".into())) {
                break;
            }
        }
    }
}
