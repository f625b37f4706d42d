//! The network configuration a runtime feeds on stdin, parsed into a [`NetConf`].
//!
//! Parsing is done field by field on a JSON value rather than with derive, so every
//! complaint names the key the user wrote (`mtu`, `podCidr`, ...) and is a code 7
//! error; malformed JSON is code 6, an unknown `cniVersion` code 1. Keys this plugin
//! does not know are ignored, as the spec asks, except `ipam`: this plugin does its
//! own address management, and silently ignoring an IPAM section would hand out
//! addresses the user did not ask for.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::{IpNet, Ipv4Net};
use serde_json::{Map, Value};

use wiremesh_vpc::Label;

use crate::error::CniError;
use crate::version::Version;

pub const PLUGIN_TYPE: &str = "wiremesh-cni";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/wiremesh";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/wiremesh/cni";
/// The agent's default `--interface`.
pub const DEFAULT_INTERFACE: &str = "wiremesh0";
/// WireGuard's usual MTU (1500 less 80 bytes of IPv6 + UDP + WireGuard overhead).
pub const FALLBACK_MTU: u16 = 1420;
/// The key of GC's list of attachments still in use (spec 1.1 §"GC").
pub const VALID_ATTACHMENTS: &str = "cni.dev/valid-attachments";

/// Who holds an address: one interface of one container.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: Version,
    pub name: String,
    /// `None`: derive from the WireGuard interface, else [`FALLBACK_MTU`].
    pub mtu: Option<u16>,
    /// Where the agent writes `pod-cidr`.
    pub state_dir: PathBuf,
    /// Set explicitly: the agent's `pod-cidr` file is not read.
    pub pod_cidr: Option<Ipv4Net>,
    /// Root of the IPAM store; each network gets a folder named after it.
    pub data_dir: PathBuf,
    /// The node's WireGuard interface, for the MTU.
    pub interface: String,
    /// What earlier plugins of a chain returned (ADD), or the cached result (CHECK).
    pub prev_result: Option<Value>,
    /// GC's list; `None` when absent.
    pub valid_attachments: Option<Vec<Attachment>>,
    /// The VPC this network plugs pods into (one CNI network per VPC): the pod's veth
    /// goes into the VPC's namespace on the node, its address comes from the node's
    /// block of the VPC, its DNS is the VPC's. `None`: the node's own pod network.
    pub vpc: Option<Label>,
    /// The pod's labels (a VPC network publishes them for services' selectors and
    /// access policies): `args.cni.labels`, then `runtimeConfig.labels` on top.
    pub labels: BTreeMap<String, String>,
}

/// Only the version, for error replies when the rest does not parse.
pub fn peek_version(stdin: &[u8]) -> Option<Version> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    v.get("cniVersion")?.as_str()?.parse().ok()
}

/// Names must be usable as a directory: spec §"Configuration format" allows
/// alphanumerics first, then alphanumerics, `_`, `.` and `-`.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn string_field<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(CniError::config(
            key,
            format!("must be a string, not {other}"),
        )),
    }
}

fn required_string<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str, CniError> {
    match string_field(obj, key)? {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(CniError::config(key, "is required")),
    }
}

fn absolute_path(obj: &Map<String, Value>, key: &str, default: &str) -> Result<PathBuf, CniError> {
    let Some(s) = string_field(obj, key)? else {
        return Ok(PathBuf::from(default));
    };
    let p = PathBuf::from(s);
    if !p.is_absolute() {
        return Err(CniError::config(
            key,
            format!("must be an absolute path, not {s:?}"),
        ));
    }
    Ok(p)
}

/// A pod CIDR the plugin can hand addresses out of: IPv4, in canonical form.
pub fn parse_pod_cidr(field: &str, s: &str) -> Result<Ipv4Net, CniError> {
    let net: IpNet = s
        .trim()
        .parse()
        .map_err(|_| CniError::config(field, format!("{s:?} is not a CIDR")))?;
    let IpNet::V4(net) = net else {
        return Err(CniError::config(
            field,
            format!("{s}: only IPv4 pod CIDRs are supported"),
        ));
    };
    if net.network() != net.addr() {
        return Err(CniError::config(
            field,
            format!("{s} has host bits set (did you mean {}?)", net.trunc()),
        ));
    }
    Ok(net)
}

fn parse_attachments(value: &Value) -> Result<Vec<Attachment>, CniError> {
    let field = VALID_ATTACHMENTS;
    let list = value
        .as_array()
        .ok_or_else(|| CniError::config(field, "must be an array"))?;
    list.iter()
        .enumerate()
        .map(|(i, item)| {
            let get = |key: &str| {
                item.get(key)
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .ok_or_else(|| CniError::config(format!("{field}[{i}].{key}"), "is required"))
            };
            Ok(Attachment {
                container_id: get("containerID")?,
                ifname: get("ifname")?,
            })
        })
        .collect()
}

/// Labels in the CNI conventions' form, `[{"key": .., "value": ..}]`, at `path`
/// (absent: none); later entries win over earlier ones.
fn parse_label_list(
    value: Option<&Value>,
    path: &str,
    labels: &mut BTreeMap<String, String>,
) -> Result<(), CniError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let list = value
        .as_array()
        .ok_or_else(|| CniError::config(path, "must be a list of {\"key\", \"value\"}"))?;
    for (i, entry) in list.iter().enumerate() {
        let text = |key: &str| {
            entry
                .get(key)
                .and_then(Value::as_str)
                .ok_or_else(|| CniError::config(format!("{path}[{i}].{key}"), "must be a string"))
        };
        labels.insert(text("key")?.to_owned(), text("value")?.to_owned());
    }
    Ok(())
}

/// The pod's labels from `args.cni.labels` and `runtimeConfig.labels`, each checked
/// as Kubernetes checks labels (the error names the key).
fn parse_labels(obj: &Map<String, Value>) -> Result<BTreeMap<String, String>, CniError> {
    let mut labels = BTreeMap::new();
    let args = obj.get("args").and_then(|a| a.get("cni"));
    parse_label_list(
        args.and_then(|c| c.get("labels")),
        "args.cni.labels",
        &mut labels,
    )?;
    let runtime = obj.get("runtimeConfig");
    parse_label_list(
        runtime.and_then(|r| r.get("labels")),
        "runtimeConfig.labels",
        &mut labels,
    )?;
    wiremesh_vpc::parse_labels("labels", &labels).map_err(|e| CniError::config(e.field, e.reason))
}

pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
    let value: Value = serde_json::from_slice(stdin).map_err(|e| CniError::Decode {
        what: "network config",
        reason: e.to_string(),
    })?;
    let Value::Object(obj) = value else {
        return Err(CniError::Decode {
            what: "network config",
            reason: "not a JSON object".into(),
        });
    };
    let version_text = required_string(&obj, "cniVersion")?;
    let cni_version: Version = version_text
        .parse()
        .ok()
        .filter(|v| Version::SUPPORTED.contains(v))
        .ok_or_else(|| CniError::IncompatibleVersion {
            requested: version_text.to_owned(),
            supported: Version::supported_list(),
        })?;
    let name = required_string(&obj, "name")?;
    if !valid_name(name) {
        return Err(CniError::config(
            "name",
            format!(
                "{name:?}: use letters, digits, `_`, `.` and `-`, starting with a letter or digit"
            ),
        ));
    }
    let plugin_type = required_string(&obj, "type")?;
    if plugin_type != PLUGIN_TYPE {
        return Err(CniError::config(
            "type",
            format!("is {plugin_type:?}, this plugin is {PLUGIN_TYPE:?}"),
        ));
    }
    if obj.contains_key("ipam") {
        return Err(CniError::UnsupportedField {
            field: "ipam".into(),
            reason: "wiremesh-cni assigns addresses from the node's pod CIDR itself; remove the ipam section".into(),
        });
    }
    let mtu = match obj.get("mtu") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|m| (68..=65535).contains(m))
                .and_then(|m| u16::try_from(m).ok())
                .ok_or_else(|| {
                    CniError::config(
                        "mtu",
                        format!("must be an integer from 68 to 65535, not {v}"),
                    )
                })?,
        ),
    };
    let pod_cidr = string_field(&obj, "podCidr")?
        .map(|s| parse_pod_cidr("podCidr", s))
        .transpose()?;
    let interface = string_field(&obj, "interface")?.unwrap_or(DEFAULT_INTERFACE);
    if interface.is_empty() || interface.len() > 15 || interface.contains(['/', ' ']) {
        return Err(CniError::config(
            "interface",
            format!("{interface:?} is not an interface name"),
        ));
    }
    let prev_result = match obj.get("prevResult") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(v.clone()),
        Some(_) => return Err(CniError::config("prevResult", "must be an object")),
    };
    let vpc = string_field(&obj, "vpc")?
        .map(|v| Label::parse("vpc", v))
        .transpose()
        .map_err(|e| CniError::config("vpc", e.reason))?;
    if vpc.is_some() && pod_cidr.is_some() {
        return Err(CniError::config(
            "podCidr",
            "a VPC network takes its addresses from the node's block of the VPC; remove podCidr",
        ));
    }
    let labels = parse_labels(&obj)?;
    let valid_attachments = obj
        .get(VALID_ATTACHMENTS)
        .map(parse_attachments)
        .transpose()?;
    Ok(NetConf {
        cni_version,
        name: name.to_owned(),
        mtu,
        state_dir: absolute_path(&obj, "stateDir", DEFAULT_STATE_DIR)?,
        pod_cidr,
        data_dir: absolute_path(&obj, "dataDir", DEFAULT_DATA_DIR)?,
        interface: interface.to_owned(),
        prev_result,
        valid_attachments,
        vpc,
        labels,
    })
}

/// The addresses a prevResult assigns (for CHECK to compare with the store).
pub fn prev_result_ips(prev: &Value) -> Vec<IpAddr> {
    prev.get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address")?.as_str())
        .filter_map(|a| a.parse::<IpNet>().ok())
        .map(|n| n.addr())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<NetConf, CniError> {
        parse(s.as_bytes())
    }

    const MINIMAL: &str = r#"{"cniVersion":"1.1.0","name":"wm","type":"wiremesh-cni"}"#;

    #[test]
    fn defaults() {
        let c = parse_str(MINIMAL).unwrap();
        assert_eq!(c.cni_version, Version(1, 1, 0));
        assert_eq!(c.name, "wm");
        assert_eq!(c.mtu, None);
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/wiremesh"));
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/wiremesh/cni"));
        assert_eq!(c.pod_cidr, None);
        assert_eq!(c.interface, "wiremesh0");
        assert_eq!(c.prev_result, None);
        assert_eq!(c.valid_attachments, None);
    }

    #[test]
    fn labels_come_from_args_then_runtime_config() {
        let c = parse_str(
            r#"{"cniVersion":"1.1.0","name":"blue","type":"wiremesh-cni","vpc":"blue",
                "args":{"cni":{"labels":[{"key":"app","value":"web"},{"key":"tier","value":"a"}]}},
                "runtimeConfig":{"labels":[{"key":"tier","value":"b"}]}}"#,
        )
        .unwrap();
        let want: BTreeMap<String, String> = [("app", "web"), ("tier", "b")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into();
        assert_eq!(c.labels, want);
        assert!(parse_str(MINIMAL).unwrap().labels.is_empty());
        let err = |labels: &str| {
            let conf = format!(
                r#"{{"cniVersion":"1.1.0","name":"b","type":"wiremesh-cni","args":{{"cni":{{"labels":{labels}}}}}}}"#
            );
            let e = parse_str(&conf).unwrap_err();
            assert_eq!(e.code(), 7, "{e}");
            e.to_string()
        };
        assert!(err(r#"[{"key":"app","value":"-web"}]"#).contains("`labels.app`"));
        assert!(err(r#"[{"key":"a b","value":"x"}]"#).contains("`labels.a b`"));
        assert!(err(r#"[{"key":"app"}]"#).contains("`args.cni.labels[0].value`"));
        assert!(err(r#"{"app":"web"}"#).contains("`args.cni.labels`"));
    }

    #[test]
    fn all_fields() {
        let c = parse_str(
            r#"{"cniVersion":"0.4.0","name":"wm-1.x","type":"wiremesh-cni","mtu":1380,
                "stateDir":"/s","dataDir":"/d","podCidr":"10.42.7.0/24","interface":"wm0",
                "prevResult":{"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.42.7.3/32"},{"version":"6","address":"fd42::3/128"}]},
                "cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}],
                "somethingElse":{"ignored":true}}"#,
        )
        .unwrap();
        assert_eq!(c.mtu, Some(1380));
        assert_eq!(c.state_dir, PathBuf::from("/s"));
        assert_eq!(c.data_dir, PathBuf::from("/d"));
        assert_eq!(c.pod_cidr, Some("10.42.7.0/24".parse().unwrap()));
        assert_eq!(c.interface, "wm0");
        let prev = c.prev_result.as_ref().unwrap();
        assert_eq!(
            prev_result_ips(prev),
            vec![
                IpAddr::from([10, 42, 7, 3]),
                "fd42::3".parse::<IpAddr>().unwrap()
            ]
        );
        assert_eq!(
            c.valid_attachments,
            Some(vec![Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into()
            }])
        );
    }

    /// Each bad input and the code and field (or text) its error must carry.
    #[test]
    fn errors_name_the_field() {
        let cases: &[(&str, u32, &str)] = &[
            ("not json", 6, "network config"),
            ("[]", 6, "not a JSON object"),
            (r#"{"name":"wm","type":"wiremesh-cni"}"#, 7, "`cniVersion`"),
            (
                r#"{"cniVersion":"9.9.9","name":"wm","type":"wiremesh-cni"}"#,
                1,
                "9.9.9",
            ),
            (
                r#"{"cniVersion":"0.2.0","name":"wm","type":"wiremesh-cni"}"#,
                1,
                "0.2.0",
            ),
            (
                r#"{"cniVersion":"1.1.0","type":"wiremesh-cni"}"#,
                7,
                "`name`",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"a/b","type":"wiremesh-cni"}"#,
                7,
                "`name`",
            ),
            (r#"{"cniVersion":"1.1.0","name":"wm"}"#, 7, "`type`"),
            (
                r#"{"cniVersion":"1.1.0","name":"wm","type":"bridge"}"#,
                7,
                "`type`",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"wm","type":"wiremesh-cni","mtu":"1400"}"#,
                7,
                "`mtu`",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"wm","type":"wiremesh-cni","mtu":70000}"#,
                7,
                "`mtu`",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"wm","type":"wiremesh-cni","mtu":-1}"#,
                7,
                "`mtu`",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"wm","type":"wiremesh-cni","vpc":"Blue_1"}"#,
                7,
                "`vpc`",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"wm","type":"wiremesh-cni","vpc":7}"#,
                7,
                "`vpc`",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"wm","type":"wiremesh-cni","vpc":"blue","podCidr":"10.42.1.0/24"}"#,
                7,
                "`podCidr`",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"wm","type":"wiremesh-cni","podCidr":"banana"}"#,
                7,
                "`podCidr`",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"wm","type":"wiremesh-cni","podCidr":"10.42.1.1/24"}"#,
                7,
                "10.42.1.0/24",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"wm","type":"wiremesh-cni","podCidr":"fd00::/64"}"#,
                7,
                "IPv4",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"wm","type":"wiremesh-cni","stateDir":"rel"}"#,
                7,
                "`stateDir`",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"wm","type":"wiremesh-cni","dataDir":7}"#,
                7,
                "`dataDir`",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"wm","type":"wiremesh-cni","interface":"much-too-long-name"}"#,
                7,
                "`interface`",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"wm","type":"wiremesh-cni","prevResult":[]}"#,
                7,
                "`prevResult`",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"wm","type":"wiremesh-cni","ipam":{"type":"host-local"}}"#,
                2,
                "`ipam`",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"wm","type":"wiremesh-cni","cni.dev/valid-attachments":[{"ifname":"eth0"}]}"#,
                7,
                "`cni.dev/valid-attachments[0].containerID`",
            ),
        ];
        for (input, code, needle) in cases {
            let e = parse_str(input).expect_err(input);
            assert_eq!(e.code(), *code, "{input}: {e}");
            assert!(e.to_string().contains(needle), "{input}: {e}");
        }
    }

    #[test]
    fn peek_version_survives_bad_configs() {
        assert_eq!(
            peek_version(br#"{"cniVersion":"0.4.0","mtu":"x"}"#),
            Some(Version(0, 4, 0))
        );
        assert_eq!(peek_version(b"nope"), None);
    }
}
