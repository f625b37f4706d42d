//! Driving `wiremesh-cni` as a runtime does: `CNI_*` variables, the config on stdin,
//! run inside the node's network namespace; the reply parsed from stdout.

#![allow(dead_code)] // each test binary uses part of this

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;
use wiremesh_testkit::Netns;

pub const PLUGIN: &str = env!("CARGO_BIN_EXE_wiremesh-cni");

/// The plugin's exit status and what it printed on stdout (JSON, or `Null` if none).
#[derive(Debug)]
pub struct Reply {
    pub ok: bool,
    pub json: Value,
    pub stderr: String,
}

impl Reply {
    /// The result of a command that must succeed.
    pub fn expect_ok(self, what: &str) -> Value {
        assert!(self.ok, "{what} failed: {} {}", self.json, self.stderr);
        self.json
    }

    /// The error object of a command that must fail.
    pub fn expect_err(self, what: &str) -> Value {
        assert!(!self.ok, "{what} unexpectedly succeeded: {}", self.json);
        assert!(
            self.json["code"].is_u64(),
            "{what}: no error object: {self:?}"
        );
        self.json
    }
}

/// One container attachment as the runtime sees it.
pub struct Call<'a> {
    pub command: &'a str,
    pub container_id: &'a str,
    pub ifname: &'a str,
    /// The container's namespace path; `None` leaves CNI_NETNS unset.
    pub netns: Option<&'a Path>,
}

/// Run `plugin` (`wiremesh-cni` or a chained one) in `node`'s namespace.
pub fn invoke(plugin: &str, node: &Netns, call: &Call, conf: &Value) -> Reply {
    let ns = format!("--net=/var/run/netns/{}", node.name());
    let mut cmd = Command::new("nsenter");
    cmd.arg(ns)
        .arg(plugin)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", call.command)
        .env("CNI_CONTAINERID", call.container_id)
        .env("CNI_IFNAME", call.ifname)
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(netns) = call.netns {
        cmd.env("CNI_NETNS", netns);
    }
    let mut child = cmd.spawn().expect("spawning the plugin");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("writing the config");
    let out = child.wait_with_output().expect("waiting for the plugin");
    let text = String::from_utf8_lossy(&out.stdout);
    Reply {
        ok: out.status.success(),
        json: if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {text}"))
        },
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn netns_path(ns: &Netns) -> std::path::PathBuf {
    Path::new("/var/run/netns").join(ns.name())
}

/// The address ADD assigned (without the /32).
pub fn address_of(result: &Value) -> std::net::Ipv4Addr {
    let a = result["ips"][0]["address"]
        .as_str()
        .expect("ips[0].address");
    a.trim_end_matches("/32").parse().expect("an IPv4 address")
}
