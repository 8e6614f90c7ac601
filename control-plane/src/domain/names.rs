//! Names of what operators create. Caches' names are identifiers (they appear in tokens'
//! user names and in URLs); accounts' and keys' names are labels people read, so they may
//! hold spaces.

use crate::error::ApiError;

/// A cache's name: 1–63 letters, digits, `-` and `_`.
pub fn cache(name: &str) -> Result<(), ApiError> {
    let ok = (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::field("name", "name must be 1–63 characters of letters, digits, '-' and '_'"))
    }
}

/// An account's (or a key's) name: 1–63 letters, digits, spaces, `-` and `_`; `what` names
/// it in the error.
pub fn account(name: &str, what: &str) -> Result<(), ApiError> {
    let ok = (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b' ');
    if ok {
        Ok(())
    } else {
        Err(ApiError::field(
            "name",
            format!("{what} name must be 1–63 characters of letters, digits, ' ', '-' and '_'"),
        ))
    }
}
