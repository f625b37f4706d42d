//! The `CNI_*` environment variables (spec §"Parameters"), parsed into a [`Request`].
//!
//! The variables come in as a map so this is pure: the binary collects the
//! environment, tests write maps. Each command needs a different subset; a missing
//! or malformed one is a code 4 error naming the variable.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::error::CniError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

/// What the runtime asked for. Fields a command does not use are `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    pub container_id: Option<String>,
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
}

impl Request {
    /// The container ID, for commands that required it.
    pub fn container_id(&self) -> Result<&str, CniError> {
        self.container_id.as_deref().ok_or(CniError::InvalidEnv {
            var: "CNI_CONTAINERID",
            reason: "not set".into(),
        })
    }

    pub fn ifname(&self) -> Result<&str, CniError> {
        self.ifname.as_deref().ok_or(CniError::InvalidEnv {
            var: "CNI_IFNAME",
            reason: "not set".into(),
        })
    }

    pub fn netns(&self) -> Result<&std::path::Path, CniError> {
        self.netns.as_deref().ok_or(CniError::InvalidEnv {
            var: "CNI_NETNS",
            reason: "not set".into(),
        })
    }
}

fn get<'a>(env: &'a HashMap<String, String>, var: &'static str) -> Option<&'a str> {
    env.get(var).map(String::as_str).filter(|v| !v.is_empty())
}

fn required<'a>(env: &'a HashMap<String, String>, var: &'static str) -> Result<&'a str, CniError> {
    get(env, var).ok_or(CniError::InvalidEnv {
        var,
        reason: "not set".into(),
    })
}

/// Spec §"Parameters": alphanumeric first, then alphanumerics, `_`, `.`, `-`.
fn check_container_id(id: &str) -> Result<(), CniError> {
    if crate::config::valid_name(id) {
        Ok(())
    } else {
        Err(CniError::InvalidEnv {
            var: "CNI_CONTAINERID",
            reason: format!("{id:?}: use letters, digits, `_`, `.` and `-`"),
        })
    }
}

/// Linux interface name rules: 1-15 bytes, no `/`, `:` or whitespace, not `.`/`..`.
fn check_ifname(name: &str) -> Result<(), CniError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(CniError::InvalidEnv {
            var: "CNI_IFNAME",
            reason: format!("{name:?} is not a valid interface name"),
        })
    }
}

pub fn parse(env: &HashMap<String, String>) -> Result<Request, CniError> {
    let command = match required(env, "CNI_COMMAND")? {
        "ADD" => Command::Add,
        "DEL" => Command::Del,
        "CHECK" => Command::Check,
        "GC" => Command::Gc,
        "STATUS" => Command::Status,
        "VERSION" => Command::Version,
        other => {
            return Err(CniError::InvalidEnv {
                var: "CNI_COMMAND",
                reason: format!("unknown command {other:?}"),
            })
        }
    };
    // Which variables each command needs (spec §"CNI operations").
    let (needs_container, needs_netns) = match command {
        Command::Add | Command::Check => (true, true),
        Command::Del => (true, false),
        Command::Gc | Command::Status | Command::Version => (false, false),
    };
    let mut req = Request {
        command,
        container_id: None,
        netns: None,
        ifname: None,
    };
    if needs_container {
        let id = required(env, "CNI_CONTAINERID")?;
        check_container_id(id)?;
        let ifname = required(env, "CNI_IFNAME")?;
        check_ifname(ifname)?;
        req.container_id = Some(id.to_owned());
        req.ifname = Some(ifname.to_owned());
        // DEL may come after the namespace is gone: CNI_NETNS is optional there.
        req.netns = get(env, "CNI_NETNS").map(PathBuf::from);
    }
    if needs_netns {
        required(env, "CNI_NETNS")?;
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn add_needs_container_netns_and_ifname() {
        let full = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ];
        let r = parse(&env(&full)).unwrap();
        assert_eq!(r.command, Command::Add);
        assert_eq!(r.container_id.as_deref(), Some("abc123"));
        assert_eq!(
            r.netns.as_deref(),
            Some(std::path::Path::new("/var/run/netns/x"))
        );
        for missing in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_COMMAND"] {
            let partial: Vec<_> = full
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            let e = parse(&env(&partial)).unwrap_err();
            assert_eq!(e.code(), 4, "{missing}");
            assert!(e.to_string().contains(missing), "{e}");
        }
    }

    #[test]
    fn del_without_netns_is_fine() {
        let r = parse(&env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", ""),
        ]))
        .unwrap();
        assert_eq!(r.command, Command::Del);
        assert_eq!(r.netns, None);
    }

    #[test]
    fn gc_status_version_need_nothing() {
        for (cmd, want) in [
            ("GC", Command::Gc),
            ("STATUS", Command::Status),
            ("VERSION", Command::Version),
        ] {
            assert_eq!(parse(&env(&[("CNI_COMMAND", cmd)])).unwrap().command, want);
        }
    }

    #[test]
    fn bad_values() {
        let cases = [
            (
                [
                    ("CNI_COMMAND", "ADDD"),
                    ("CNI_CONTAINERID", "a"),
                    ("CNI_IFNAME", "eth0"),
                ],
                "CNI_COMMAND",
            ),
            (
                [
                    ("CNI_COMMAND", "DEL"),
                    ("CNI_CONTAINERID", "../x"),
                    ("CNI_IFNAME", "eth0"),
                ],
                "CNI_CONTAINERID",
            ),
            (
                [
                    ("CNI_COMMAND", "DEL"),
                    ("CNI_CONTAINERID", "a"),
                    ("CNI_IFNAME", "eth0/x"),
                ],
                "CNI_IFNAME",
            ),
            (
                [
                    ("CNI_COMMAND", "DEL"),
                    ("CNI_CONTAINERID", "a"),
                    ("CNI_IFNAME", "a-very-long-ifname"),
                ],
                "CNI_IFNAME",
            ),
        ];
        for (vars, var) in cases {
            let e = parse(&env(&vars)).unwrap_err();
            assert_eq!(e.code(), 4);
            assert!(e.to_string().contains(var), "{e}");
        }
    }
}
