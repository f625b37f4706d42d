//! `wiremesh bench`: measurements that are too slow or too noisy to be tests.

mod convergence;
mod edge;
mod etcd;
mod fanout;
mod vip;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time from a node joining until every other node's device has it as a peer,
    /// for clusters of several sizes (full granularity, real agents and devices).
    Convergence(convergence::Args),
    /// Time from a new node record until each of N agents watching the registry (etcd
    /// by default, started locally) has applied it: median, 90th percentile, slowest.
    Fanout(fanout::Args),
    /// The edge-VPN study (Goethals et al., CNSM 2019) on this host: a master and
    /// workers in namespaces over an emulated WAN, every installed VPN under load,
    /// loss, latency, NAT, an address change and a link flap; tables and SVG plots.
    Edge(Box<edge::Args>),
    /// What a service VIP costs over the pod's own address (connections/s, connect
    /// and request-response latency), two nodes over wiremesh-wg, with 1, 10 and 100
    /// VPCs on the nodes.
    Vip(vip::Args),
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Convergence(args) => convergence::run(args),
        BenchCommand::Fanout(args) => fanout::run(args),
        BenchCommand::Edge(args) => edge::run(*args),
        BenchCommand::Vip(args) => vip::run(args),
    }
}
