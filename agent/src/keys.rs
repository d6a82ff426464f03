//! The node key, persisted in the data directory.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use iroh::SecretKey;

/// File name of the node key inside a data directory.
pub const KEY_FILE: &str = "node.key";

/// Failure to load or create a key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Reading or writing the file failed.
    #[error("node key {path}: {source}")]
    Io {
        /// The key file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The file does not hold a key.
    #[error("node key {0} is not 64 hex digits")]
    Malformed(String),
}

/// Loads the key from `dir/node.key`, creating it (mode 0600) if missing.
pub fn load_or_create(dir: &Path) -> Result<SecretKey, KeyError> {
    let path = dir.join(KEY_FILE);
    let io = |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let mut b = [0u8; 32];
            hex::decode_to_slice(s.trim(), &mut b)
                .map_err(|_| KeyError::Malformed(path.display().to_string()))?;
            Ok(SecretKey::from_bytes(&b))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io)?;
            let key = SecretKey::from_bytes(&rand::random::<[u8; 32]>());
            let tmp = dir.join(format!("{KEY_FILE}.tmp"));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            f.write_all(hex::encode(key.to_bytes()).as_bytes())
                .map_err(io)?;
            f.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}
