//! Volume names.

/// Longest volume name (Modal's rule).
pub const MAX_NAME_LEN: usize = 64;

/// Why a volume name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// Empty name.
    #[error("volume name is empty")]
    Empty,
    /// Longer than 64 characters.
    #[error("volume name {0:?} is longer than 64 characters")]
    TooLong(String),
    /// A character outside `[A-Za-z0-9-_.]`.
    #[error("volume name {0:?} may only contain letters, digits, '-', '_' and '.'")]
    BadChar(String),
}

/// Checks a volume name: 1 to 64 of `[A-Za-z0-9-_.]`.
pub fn check_volume_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(name.to_string()));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(NameError::BadChar(name.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_volume_name("model-weights_v1.2").is_ok());
        assert!(check_volume_name(&"a".repeat(64)).is_ok());
        assert!(check_volume_name(&"a".repeat(65)).is_err());
        for bad in ["", "a b", "a/b", "é", "x:y"] {
            assert!(check_volume_name(bad).is_err(), "{bad:?}");
        }
    }
}
