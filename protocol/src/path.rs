//! Paths inside a volume.
//!
//! A [`VolPath`] is relative to the volume root, normalised (no empty, `.` or `..`
//! components, no leading, trailing or doubled `/`), at most [`MAX_PATH_LEN`] bytes with
//! components of at most [`MAX_COMPONENT_LEN`] bytes, and free of NUL and backslash-free
//! concerns aside: `\` is an ordinary byte on the Unix hosts voltool runs on.
//! It can therefore never name anything outside the volume.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest path, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest path component, in bytes (Linux `NAME_MAX`).
pub const MAX_COMPONENT_LEN: usize = 255;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// The path is empty (the volume root is not an entry).
    #[error("empty path")]
    Empty,
    /// The path starts with `/`.
    #[error("absolute path {0:?}: paths are relative to the volume root")]
    Absolute(String),
    /// A `..` component.
    #[error("path {0:?} contains '..'")]
    ParentDir(String),
    /// A `.` or empty component (`a/./b`, `a//b`, trailing `/`).
    #[error("path {0:?} is not normalised")]
    NotNormalised(String),
    /// A NUL byte.
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    /// Too long overall or in one component.
    #[error("path is too long ({0} bytes)")]
    TooLong(usize),
    /// A symlink whose target leaves the volume.
    #[error("symlink {link:?} -> {target:?} points outside the volume")]
    SymlinkEscapes {
        /// The link.
        link: String,
        /// Its target.
        target: String,
    },
}

/// A validated, normalised path relative to a volume's root.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolPath(String);

impl VolPath {
    /// Validates `s` as it is, without normalising it.
    pub fn new(s: &str) -> Result<Self, PathError> {
        if s.is_empty() {
            return Err(PathError::Empty);
        }
        if s.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong(s.len()));
        }
        if s.contains('\0') {
            return Err(PathError::Nul(s.to_string()));
        }
        if s.starts_with('/') {
            return Err(PathError::Absolute(s.to_string()));
        }
        for c in s.split('/') {
            match c {
                ".." => return Err(PathError::ParentDir(s.to_string())),
                "" | "." => return Err(PathError::NotNormalised(s.to_string())),
                c if c.len() > MAX_COMPONENT_LEN => return Err(PathError::TooLong(c.len())),
                _ => {}
            }
        }
        Ok(VolPath(s.to_string()))
    }

    /// Normalises a user-given path (`./a//b/`, `/a/b` as volume-absolute) and validates it.
    /// `..` is refused, never resolved: a user who writes it means something we cannot know.
    pub fn parse_user(s: &str) -> Result<Self, PathError> {
        if s.contains('\0') {
            return Err(PathError::Nul(s.to_string()));
        }
        let parts: Vec<&str> = s
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        if parts.contains(&"..") {
            return Err(PathError::ParentDir(s.to_string()));
        }
        VolPath::new(&parts.join("/"))
    }

    /// The path as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The components.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The parent directory, `None` for a top-level entry.
    pub fn parent(&self) -> Option<VolPath> {
        self.0.rfind('/').map(|i| VolPath(self.0[..i].to_string()))
    }

    /// All ancestors, nearest first.
    pub fn ancestors(&self) -> impl Iterator<Item = VolPath> {
        std::iter::successors(self.parent(), |p| p.parent())
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// `self/name`.
    pub fn join(&self, rel: &VolPath) -> VolPath {
        VolPath(format!("{}/{}", self.0, rel.0))
    }

    /// Whether `self` lies strictly below `dir`.
    pub fn is_under(&self, dir: &VolPath) -> bool {
        self.0.len() > dir.0.len()
            && self.0.starts_with(&dir.0)
            && self.0.as_bytes()[dir.0.len()] == b'/'
    }

    /// `self` with the prefix `from` replaced by `to` (for `cp -r` and directory moves).
    pub fn rebase(&self, from: &VolPath, to: &VolPath) -> Option<VolPath> {
        if self == from {
            Some(to.clone())
        } else if self.is_under(from) {
            Some(VolPath(format!("{}{}", to.0, &self.0[from.0.len()..])))
        } else {
            None
        }
    }
}

/// Checks that a symlink at `link` with target `target` stays inside the volume: the target
/// is relative, and resolving it lexically from the link's directory never climbs above the
/// root. (Targets that pass through other symlinks are checked when those are checked.)
pub fn check_symlink_target(link: &VolPath, target: &str) -> Result<(), PathError> {
    let escapes = || PathError::SymlinkEscapes {
        link: link.0.clone(),
        target: target.to_string(),
    };
    if target.is_empty() || target.starts_with('/') || target.contains('\0') {
        return Err(escapes());
    }
    if target.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong(target.len()));
    }
    let mut depth: i64 = link.components().count() as i64 - 1;
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return Err(escapes());
                }
            }
            _ => depth += 1,
        }
    }
    Ok(())
}

/// Paths order as their strings do, so maps keyed by path can be searched by `&str` bounds.
impl std::borrow::Borrow<str> for VolPath {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for VolPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for VolPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl Serialize for VolPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for VolPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        VolPath::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_paths_are_refused() {
        for bad in [
            "",
            "/etc/x",
            "../x",
            "a/../../b",
            "a/..",
            "a//b",
            "./a",
            "a/",
            "a\0b",
            ".",
        ] {
            assert!(VolPath::new(bad).is_err(), "{bad:?} accepted");
        }
        for bad in ["../x", "/../x", "a/../../b", "x/.."] {
            assert!(VolPath::parse_user(bad).is_err(), "{bad:?} accepted");
        }
        assert!(VolPath::new(&"a".repeat(256)).is_err());
    }

    #[test]
    fn user_paths_are_normalised() {
        assert_eq!(VolPath::parse_user("/a//b/./c/").unwrap().as_str(), "a/b/c");
        assert!(VolPath::parse_user("/").is_err());
    }

    #[test]
    fn relations() {
        let p = VolPath::new("a/b/c").unwrap();
        let a = VolPath::new("a").unwrap();
        assert!(p.is_under(&a));
        assert!(!VolPath::new("ab").unwrap().is_under(&a));
        assert_eq!(p.parent().unwrap().as_str(), "a/b");
        assert_eq!(p.ancestors().count(), 2);
        assert_eq!(p.file_name(), "c");
        let x = VolPath::new("x").unwrap();
        assert_eq!(p.rebase(&a, &x).unwrap().as_str(), "x/b/c");
    }

    #[test]
    fn symlink_targets() {
        let l = VolPath::new("a/b/link").unwrap();
        assert!(check_symlink_target(&l, "../c").is_ok());
        assert!(check_symlink_target(&l, "../../c").is_ok());
        assert!(check_symlink_target(&l, "../../../c").is_err());
        assert!(check_symlink_target(&l, "/etc/passwd").is_err());
        assert!(check_symlink_target(&VolPath::new("l").unwrap(), "..").is_err());
        assert!(check_symlink_target(&VolPath::new("l").unwrap(), "x/../..").is_err());
    }
}
