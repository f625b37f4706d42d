//! `wiremesh-cni`, the binary a container runtime executes: `CNI_*` variables and the
//! network config on stdin in, the result or an error object on stdout (spec 1.1
//! §"Protocol"). Exit status 0 on success, 1 on error.

use std::collections::HashMap;
use std::io::Read;
use std::process::ExitCode;

use wiremesh_cni::{commands, CniError};

fn main() -> ExitCode {
    // Only CNI's own variables; a non-UTF-8 value is left out and reported as unset.
    let env: HashMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with("CNI_"))
        .collect();
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => commands::run_command(&env, &stdin),
        Err(e) => Err(CniError::io("reading the network config from stdin", e)),
    };
    match outcome {
        Ok(Some(reply)) => {
            println!("{reply}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            // The runtime reads the error object from stdout; stderr is for humans.
            eprintln!("wiremesh-cni: {e}");
            println!("{}", e.to_json(commands::error_version(&stdin)));
            ExitCode::FAILURE
        }
    }
}
