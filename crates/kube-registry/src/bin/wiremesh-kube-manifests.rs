//! Writes wiremesh's Kubernetes manifests (CRD, RBAC, settings, DaemonSet) into a
//! directory, `deploy/` of the repository by default; `--check` only compares.
//!
//! ```text
//! cargo run -p wiremesh-kube --bin wiremesh-kube-manifests [--check] [--image IMAGE] [DIR]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use wiremesh_kube::manifests::{manifests, Options};

fn main() -> ExitCode {
    let mut options = Options::default();
    let mut check = false;
    let mut dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy"));
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--check" => check = true,
            "--image" => match args.next() {
                Some(image) => options.image = image,
                None => return usage("--image needs a value"),
            },
            "-h" | "--help" => return usage(""),
            flag if flag.starts_with('-') => return usage(&format!("unknown flag {flag}")),
            path => dir = PathBuf::from(path),
        }
    }
    let mut stale = 0;
    for (file, text) in manifests(&options) {
        let path = dir.join(file);
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current == text {
            continue;
        }
        if check {
            eprintln!("{} is not what the generator writes", path.display());
            stale += 1;
        } else if let Err(e) =
            std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, text))
        {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        } else {
            println!("wrote {}", path.display());
        }
    }
    if stale > 0 {
        eprintln!("run `cargo run -p wiremesh-kube --bin wiremesh-kube-manifests` to update");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn usage(error: &str) -> ExitCode {
    if !error.is_empty() {
        eprintln!("wiremesh-kube-manifests: {error}");
    }
    eprintln!("usage: wiremesh-kube-manifests [--check] [--image IMAGE] [DIR]");
    if error.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}
