//! The node key, persisted in the data directory, and the checks that the directory and the
//! key are the agent's own (as OpenSSH's `StrictModes` checks a user's keys).

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
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
    /// The key or its directory could be read or changed by someone else.
    #[error("{path}: {why}; refusing to use it (fix its owner and mode, e.g. chmod {fix})")]
    Unsafe {
        /// The file or directory.
        path: String,
        /// What is wrong.
        why: String,
        /// The mode that would do.
        fix: String,
    },
}

/// Checks that `md` (of `path`) belongs to this process's user and that nobody else may
/// write it, nor read it when `private`.
fn check_owned(path: &Path, md: &std::fs::Metadata, private: bool) -> Result<(), KeyError> {
    let unsafe_ = |why: String, fix: &str| KeyError::Unsafe {
        path: path.display().to_string(),
        why,
        fix: format!("{fix} {}", path.display()),
    };
    let me = rustix::process::geteuid().as_raw();
    let mode = md.permissions().mode() & 0o7777;
    let fix = if md.is_dir() { "0700" } else { "0600" };
    if md.uid() != me {
        return Err(unsafe_(
            format!("owned by uid {}, not by this user ({me})", md.uid()),
            &format!("chown {me}; chmod {fix}"),
        ));
    }
    if mode & 0o022 != 0 {
        return Err(unsafe_(format!("writable by others (mode {mode:o})"), fix));
    }
    if private && mode & 0o077 != 0 {
        return Err(unsafe_(format!("readable by others (mode {mode:o})"), fix));
    }
    Ok(())
}

/// Creates the data directory `dir` if missing (mode `mode`), and checks that it is a
/// directory of this user's that nobody else may write.
pub fn check_data_dir(dir: &Path, mode: u32) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: dir.display().to_string(),
        source,
    };
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(dir)
                .map_err(io)?;
            // Exactly `mode`, whatever the umask took from it.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(io)?;
        }
        Err(e) => return Err(io(e)),
        Ok(_) => {}
    }
    // Follows a link the operator placed (the data directory may be one), then checks the
    // directory itself.
    let md = std::fs::metadata(dir).map_err(io)?;
    if !md.is_dir() {
        return Err(io(std::io::Error::other("not a directory")));
    }
    check_owned(dir, &md, false)
}

/// Loads a key file made as `node.key` is (hex, mode 0600): one that is a symbolic link,
/// belongs to another user, or that others may read or write is refused, as is a missing
/// one. A fleet's coordinators share one such file, the fleet key that signs heads.
pub fn load(path: &Path) -> Result<SecretKey, KeyError> {
    let io = |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    };
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
    {
        Ok(mut f) => {
            check_owned(path, &f.metadata().map_err(io)?, true)?;
            let mut s = String::new();
            f.read_to_string(&mut s)
                .map_err(|_| KeyError::Malformed(path.display().to_string()))?;
            let mut b = [0u8; 32];
            hex::decode_to_slice(s.trim(), &mut b)
                .map_err(|_| KeyError::Malformed(path.display().to_string()))?;
            Ok(SecretKey::from_bytes(&b))
        }
        // O_NOFOLLOW on a symbolic link.
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
            Err(KeyError::Unsafe {
                path: path.display().to_string(),
                why: "a symbolic link".into(),
                fix: format!("0600 on a regular file at {}", path.display()),
            })
        }
        Err(e) => Err(io(e)),
    }
}

/// Loads the key from `dir/node.key`, creating it (mode 0600) if missing. A key file that
/// is a symbolic link, belongs to another user, or that others may read or write is refused.
pub fn load_or_create(dir: &Path) -> Result<SecretKey, KeyError> {
    let path = dir.join(KEY_FILE);
    let io = |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    };
    match load(&path) {
        Err(KeyError::Io { source: e, .. }) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io)?;
            let key = SecretKey::from_bytes(&rand::random::<[u8; 32]>());
            let tmp = dir.join(format!("{KEY_FILE}.tmp"));
            // A leftover of a crash (or anything placed there) goes; the new file is ours
            // alone: never opened through a link, never an existing file.
            match std::fs::remove_file(&tmp) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
                _ => {}
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(&tmp)
                .map_err(io)?;
            f.write_all(hex::encode(key.to_bytes()).as_bytes())
                .map_err(io)?;
            f.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            Ok(key)
        }
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_others_may_read_or_write_or_a_linked_key_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let k = load_or_create(d.path()).unwrap();
        let path = d.path().join(KEY_FILE);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(load_or_create(d.path()).unwrap().public(), k.public());
        for mode in [0o640, 0o604, 0o622] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = load_or_create(d.path()).unwrap_err();
            assert!(matches!(e, KeyError::Unsafe { .. }), "{mode:o}: {e}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let other = d.path().join("elsewhere");
        std::fs::rename(&path, &other).unwrap();
        std::os::unix::fs::symlink(&other, &path).unwrap();
        let e = load_or_create(d.path()).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }

    #[test]
    fn a_data_dir_is_made_private_and_one_others_may_write_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("a/b");
        check_data_dir(&data, 0o700).unwrap();
        assert_eq!(
            std::fs::metadata(&data).unwrap().permissions().mode() & 0o777,
            0o700
        );
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_data_dir(&data, 0o700).unwrap_err();
        assert!(e.to_string().contains("writable by others"), "{e}");
    }
}
