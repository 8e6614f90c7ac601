//! Cache users' passwords (ElastiCache RBAC users): one or two per user, so a client can
//! move to a new password before the old one is removed; stored only as argon2id hashes
//! (PHC strings).
//!
//! Hashing and verifying cost tens of milliseconds of CPU by design: call them from
//! `tokio::task::spawn_blocking`.

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// Like ElastiCache's user passwords.
pub const MIN_LEN: usize = 16;
pub const MAX_LEN: usize = 128;
/// A user has one password, or two while rotating.
pub const MAX_PASSWORDS: usize = 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PasswordError {
    #[error("passwords: give one or two (two while rotating), got {0}")]
    Count(usize),
    #[error("password {index}: must be {MIN_LEN} to {MAX_LEN} characters, got {len}")]
    Length { index: usize, len: usize },
    #[error("password {index}: only printable ASCII without spaces is allowed")]
    Characters { index: usize },
    #[error("passwords: the two passwords are the same")]
    Duplicate,
    #[error("stored password hash {index} is not an argon2id hash")]
    BadHash { index: usize },
    #[error("hashing failed: {0}")]
    Hashing(String),
}

/// The argon2id hashes of a cache user's passwords. Never holds a password itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserPasswords {
    hashes: Vec<String>,
}

fn argon2() -> Argon2<'static> {
    // argon2id v19 with the crate's defaults (19 MiB, 2 passes, 1 lane: OWASP's minimum).
    Argon2::default()
}

/// Checks one password against the rules (for errors that name which one is wrong).
fn check(index: usize, password: &str) -> Result<(), PasswordError> {
    let len = password.chars().count();
    if !(MIN_LEN..=MAX_LEN).contains(&len) {
        return Err(PasswordError::Length { index, len });
    }
    if !password.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(PasswordError::Characters { index });
    }
    Ok(())
}

impl UserPasswords {
    /// Hashes one or two new passwords (replacing whatever the user had).
    pub fn hash(passwords: &[impl AsRef<str>]) -> Result<UserPasswords, PasswordError> {
        if passwords.is_empty() || passwords.len() > MAX_PASSWORDS {
            return Err(PasswordError::Count(passwords.len()));
        }
        for (index, password) in passwords.iter().enumerate() {
            check(index, password.as_ref())?;
        }
        if passwords.len() == 2 && passwords[0].as_ref() == passwords[1].as_ref() {
            return Err(PasswordError::Duplicate);
        }
        let hashes = passwords
            .iter()
            .map(|password| {
                let salt = SaltString::generate(&mut OsRng);
                argon2()
                    .hash_password(password.as_ref().as_bytes(), &salt)
                    .map(|h| h.to_string())
                    .map_err(|e| PasswordError::Hashing(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(UserPasswords { hashes })
    }

    /// Hashes as stored (PHC strings); refuses anything but one or two argon2id hashes.
    pub fn from_hashes(hashes: Vec<String>) -> Result<UserPasswords, PasswordError> {
        if hashes.is_empty() || hashes.len() > MAX_PASSWORDS {
            return Err(PasswordError::Count(hashes.len()));
        }
        for (index, hash) in hashes.iter().enumerate() {
            match PasswordHash::new(hash) {
                Ok(parsed) if parsed.algorithm == argon2::ARGON2ID_IDENT && parsed.hash.is_some() => {}
                _ => return Err(PasswordError::BadHash { index }),
            }
        }
        Ok(UserPasswords { hashes })
    }

    /// The PHC strings to store.
    pub fn hashes(&self) -> &[String] {
        &self.hashes
    }

    /// Whether `password` is one of the user's passwords. Every hash is tried, so the time
    /// taken does not say which one matched.
    pub fn verify(&self, password: &str) -> bool {
        if password.is_empty() || password.len() > MAX_LEN * 4 {
            return false;
        }
        let mut matched = false;
        for hash in &self.hashes {
            if let Ok(parsed) = PasswordHash::new(hash) {
                matched |= argon2().verify_password(password.as_bytes(), &parsed).is_ok();
            }
        }
        matched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "correct-horse-battery-1";
    const NEW: &str = "correct-horse-battery-2";

    #[test]
    fn one_password_verifies_and_others_do_not() {
        let p = UserPasswords::hash(&[OLD]).unwrap();
        assert!(p.verify(OLD));
        assert!(!p.verify(NEW));
        assert!(!p.verify(""));
        assert!(!p.verify(&OLD.to_uppercase()));
        let hash = &p.hashes()[0];
        assert!(hash.starts_with("$argon2id$v=19$"), "{hash}");
        assert!(!hash.contains(OLD));
    }

    #[test]
    fn two_passwords_for_rotation_and_the_old_one_dropped_after() {
        let both = UserPasswords::hash(&[OLD, NEW]).unwrap();
        assert!(both.verify(OLD) && both.verify(NEW));
        // The stored form round-trips.
        let stored = UserPasswords::from_hashes(both.hashes().to_vec()).unwrap();
        assert!(stored.verify(OLD) && stored.verify(NEW));
        let rotated = UserPasswords::hash(&[NEW]).unwrap();
        assert!(!rotated.verify(OLD) && rotated.verify(NEW));
    }

    #[test]
    fn the_same_password_hashes_differently_each_time() {
        let a = UserPasswords::hash(&[OLD]).unwrap();
        let b = UserPasswords::hash(&[OLD]).unwrap();
        assert_ne!(a.hashes(), b.hashes());
    }

    #[test]
    fn bad_passwords_are_refused_with_which_one() {
        let none: [&str; 0] = [];
        assert_eq!(UserPasswords::hash(&none), Err(PasswordError::Count(0)));
        assert_eq!(UserPasswords::hash(&[OLD, NEW, "third-password-xyz"]), Err(PasswordError::Count(3)));
        assert_eq!(UserPasswords::hash(&[OLD, "short"]), Err(PasswordError::Length { index: 1, len: 5 }));
        assert_eq!(
            UserPasswords::hash(&["x".repeat(129)]),
            Err(PasswordError::Length { index: 0, len: 129 })
        );
        assert_eq!(
            UserPasswords::hash(&["with a space in it!!"]),
            Err(PasswordError::Characters { index: 0 })
        );
        assert_eq!(
            UserPasswords::hash(&["nul\0-in-the-password"]),
            Err(PasswordError::Characters { index: 0 })
        );
        assert_eq!(
            UserPasswords::hash(&["ünïcödé-pässwörd-xx"]),
            Err(PasswordError::Characters { index: 0 })
        );
        assert_eq!(UserPasswords::hash(&[OLD, OLD]), Err(PasswordError::Duplicate));
        let msg = UserPasswords::hash(&[OLD, "short"]).unwrap_err().to_string();
        assert!(msg.contains("password 1") && msg.contains("16"), "{msg}");
    }

    #[test]
    fn only_argon2id_hashes_are_accepted_from_storage() {
        let good = UserPasswords::hash(&[OLD]).unwrap().hashes()[0].clone();
        let argon2i = good.replacen("argon2id", "argon2i", 1);
        assert_eq!(
            UserPasswords::from_hashes(vec![good.clone(), argon2i]),
            Err(PasswordError::BadHash { index: 1 })
        );
        assert_eq!(
            UserPasswords::from_hashes(vec!["plaintext".into()]),
            Err(PasswordError::BadHash { index: 0 })
        );
        assert_eq!(UserPasswords::from_hashes(vec![]), Err(PasswordError::Count(0)));
    }
}
