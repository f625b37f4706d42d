//! Running host tools (iproute2, nft) and turning their failures into errors that say what was run.

use std::io::Write;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("unexpected output from `{command}`: {reason}")]
    Output { command: String, reason: String },
    #[error("UAPI socket {path}: {reason}")]
    Uapi { path: String, reason: String },
    #[error("network namespace {name}: {reason}")]
    Netns { name: String, reason: String },
}

/// Run `args[0] args[1..]`, feeding `stdin` if given; returns stdout.
pub fn run_with_input(args: &[&str], stdin: Option<&str>) -> Result<String, HostError> {
    let command = args.join(" ");
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| HostError::Spawn {
            command: command.clone(),
            source,
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|source| HostError::Spawn {
                command: command.clone(),
                source,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| HostError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(HostError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run(args: &[&str]) -> Result<String, HostError> {
    run_with_input(args, None)
}
