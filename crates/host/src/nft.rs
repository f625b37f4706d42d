//! nftables, one atomic transaction per call (`nft -f -`).

use crate::cmd::run_with_input;
use crate::HostError;

/// Load a ruleset. Callers write it so that it first flushes their own table:
/// `table inet X {}` + `flush table inet X` + the table, so a re-apply replaces it whole.
pub fn apply(ruleset: &str) -> Result<(), HostError> {
    run_with_input(&["nft", "-f", "-"], Some(ruleset)).map(|_| ())
}

/// Remove a table; a missing table is not an error.
pub fn delete_table(family: &str, name: &str) -> Result<(), HostError> {
    let ruleset = format!("table {family} {name} {{}}\ndelete table {family} {name}\n");
    apply(&ruleset)
}

/// Packet counts of the named counters of a table (`counter NAME {}` objects).
pub fn named_counters(family: &str, table: &str) -> Result<Vec<(String, u64)>, HostError> {
    let out = crate::run(&["nft", "-j", "list", "counters", "table", family, table])?;
    let json: serde_json::Value = serde_json::from_str(&out).map_err(|e| HostError::Output {
        command: "nft -j list counters".into(),
        reason: e.to_string(),
    })?;
    let mut counters = Vec::new();
    for item in json["nftables"].as_array().into_iter().flatten() {
        let c = &item["counter"];
        if let (Some(name), Some(packets)) = (c["name"].as_str(), c["packets"].as_u64()) {
            counters.push((name.to_owned(), packets));
        }
    }
    Ok(counters)
}
