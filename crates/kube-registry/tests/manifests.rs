//! The committed `deploy/` is exactly what `wiremesh-kube-manifests` writes, and
//! holds nothing else: the manifests cannot drift from the code.

use std::collections::BTreeSet;
use std::path::Path;

use wiremesh_kube::manifests::{manifests, Options};

#[test]
fn committed_manifests_equal_the_generated_ones() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    let generated = manifests(&Options::default());
    for (file, text) in &generated {
        let committed = std::fs::read_to_string(deploy.join(file))
            .unwrap_or_else(|e| panic!("deploy/{file}: {e}; run wiremesh-kube-manifests"));
        assert!(
            committed == *text,
            "deploy/{file} differs from the generator's output: run \
             `cargo run -p wiremesh-kube --bin wiremesh-kube-manifests`"
        );
    }
    let expected: BTreeSet<&str> = generated.iter().map(|(f, _)| *f).collect();
    let present: BTreeSet<String> = std::fs::read_dir(&deploy)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml"))
        .collect();
    let present: BTreeSet<&str> = present.iter().map(String::as_str).collect();
    assert_eq!(
        present, expected,
        "deploy/ holds a YAML file nobody generates"
    );
}
