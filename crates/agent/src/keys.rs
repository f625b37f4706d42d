//! The node's WireGuard key pair. The private key is made on the node, stored in its
//! state directory with mode 0600, and never leaves it: only the public key is published.
//! Rotation: a new key waits beside the current one until the agent swaps it in.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use wiremesh_model::{PrivateKey, PublicKey};

const KEY_FILE: &str = "private.key";
/// A key waiting to replace the current one (written by `wiremesh rotate-key`).
const NEXT_KEY_FILE: &str = "private.key.next";

fn read_key(path: &Path) -> std::io::Result<PrivateKey> {
    let mode = fs::metadata(path)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(std::io::Error::other(format!(
            "{} is readable by others (mode {mode:o}); chmod 600 it",
            path.display()
        )));
    }
    let text = fs::read_to_string(path)?;
    PrivateKey::from_base64(text.trim())
        .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))
}

/// Write a key file atomically with mode 0600 (never readable by others, even briefly).
fn write_key(path: &Path, key: &PrivateKey) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    writeln!(file, "{}", key.to_base64())?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

/// Load the node's private key, or make and store one on first start.
pub fn load_or_create(state_dir: &Path) -> std::io::Result<PrivateKey> {
    fs::create_dir_all(state_dir)?;
    fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700))?;
    let path = state_dir.join(KEY_FILE);
    match read_key(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = PrivateKey::generate();
            write_key(&path, &key)?;
            Ok(key)
        }
        other => other,
    }
}

/// Ask the node's agent to rotate its key: a new key waits in the state directory
/// until the agent takes it (on its next tick). Returns the new public key.
pub fn request_rotation(state_dir: &Path) -> std::io::Result<PublicKey> {
    let key = PrivateKey::generate();
    write_key(&state_dir.join(NEXT_KEY_FILE), &key)?;
    Ok(key.public_key())
}

/// The waiting key, if a rotation was requested or `every` has passed since the
/// current key was made; the caller applies it, then calls [`commit_rotation`].
pub fn pending_rotation(
    state_dir: &Path,
    every: Option<Duration>,
) -> std::io::Result<Option<PrivateKey>> {
    let next = state_dir.join(NEXT_KEY_FILE);
    match read_key(&next) {
        Ok(key) => return Ok(Some(key)),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        Err(_) => {}
    }
    let Some(every) = every else { return Ok(None) };
    let age = fs::metadata(state_dir.join(KEY_FILE))?
        .modified()?
        .elapsed()
        .unwrap_or_default();
    if age < every {
        return Ok(None);
    }
    let key = PrivateKey::generate();
    write_key(&next, &key)?;
    Ok(Some(key))
}

/// Make the waiting key the node's key.
pub fn commit_rotation(state_dir: &Path) -> std::io::Result<()> {
    fs::rename(state_dir.join(NEXT_KEY_FILE), state_dir.join(KEY_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_private_and_reloaded() {
        let dir = std::env::temp_dir().join(format!("wm-keys-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let first = load_or_create(&dir).unwrap();
        let mode = fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let again = load_or_create(&dir).unwrap();
        assert_eq!(first.public_key(), again.public_key());

        assert!(pending_rotation(&dir, None).unwrap().is_none());
        let next = request_rotation(&dir).unwrap();
        let pending = pending_rotation(&dir, None)
            .unwrap()
            .expect("a rotation is waiting");
        assert_eq!(pending.public_key(), next);
        commit_rotation(&dir).unwrap();
        assert_eq!(load_or_create(&dir).unwrap().public_key(), next);
        assert!(pending_rotation(&dir, Some(Duration::from_secs(3600)))
            .unwrap()
            .is_none());
        assert!(
            pending_rotation(&dir, Some(Duration::ZERO))
                .unwrap()
                .is_some(),
            "the period has passed"
        );

        fs::set_permissions(dir.join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            load_or_create(&dir).is_err(),
            "a world-readable key is refused"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
