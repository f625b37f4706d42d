//! The example conflists in `examples/cni/` stay valid: each `wiremesh-cni` entry,
//! with `name` and `cniVersion` filled in from its list as libcni does, parses.

use std::path::{Path, PathBuf};

use serde_json::Value;

fn conflists(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("examples/cni").flatten() {
        let path = entry.path();
        if path.is_dir() {
            conflists(&path, out);
        } else if path.extension().is_some_and(|e| e == "conflist") {
            out.push(path);
        }
    }
}

#[test]
fn example_conflists_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/cni");
    let mut files = Vec::new();
    conflists(&root, &mut files);
    assert!(files.len() >= 3, "examples missing: {files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("reading an example");
        let list: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file:?}: {e}"));
        let plugins = list["plugins"].as_array().expect("plugins");
        let mut ours = 0;
        for plugin in plugins.iter().filter(|p| p["type"] == "wiremesh-cni") {
            let mut conf = plugin.clone();
            conf["name"] = list["name"].clone();
            conf["cniVersion"] = list["cniVersion"].clone();
            wiremesh_cni::config::parse(conf.to_string().as_bytes())
                .unwrap_or_else(|e| panic!("{file:?}: {e}"));
            ours += 1;
        }
        assert_eq!(ours, 1, "{file:?}: wiremesh-cni must be in the list once");
        assert_eq!(plugins[0]["type"], "wiremesh-cni", "{file:?}: put it first");
    }
}
