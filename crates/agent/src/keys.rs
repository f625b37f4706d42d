//! The node's WireGuard key pair. The private key is made on the node, stored in its
//! state directory with mode 0600, and never leaves it: only the public key is published.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use wiremesh_model::PrivateKey;

const KEY_FILE: &str = "private.key";

/// Load the node's private key, or make and store one on first start.
pub fn load_or_create(state_dir: &Path) -> std::io::Result<PrivateKey> {
    fs::create_dir_all(state_dir)?;
    fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700))?;
    let path = state_dir.join(KEY_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let mode = fs::metadata(&path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(std::io::Error::other(format!(
                    "{} is readable by others (mode {mode:o}); chmod 600 it",
                    path.display()
                )));
            }
            PrivateKey::from_base64(text.trim())
                .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = PrivateKey::generate();
            let tmp = state_dir.join(format!("{KEY_FILE}.tmp"));
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            writeln!(file, "{}", key.to_base64())?;
            file.sync_all()?;
            fs::rename(&tmp, &path)?;
            Ok(key)
        }
        Err(e) => Err(e),
    }
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
        fs::set_permissions(dir.join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            load_or_create(&dir).is_err(),
            "a world-readable key is refused"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
