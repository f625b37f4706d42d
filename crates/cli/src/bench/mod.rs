//! `wiremesh bench`: measurements that are too slow or too noisy to be tests.

mod convergence;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time from a node joining until every other node's device has it as a peer,
    /// for clusters of several sizes (full granularity, real agents and devices).
    Convergence(convergence::Args),
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Convergence(args) => convergence::run(args),
    }
}
