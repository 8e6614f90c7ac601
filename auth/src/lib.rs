//! # Auth: the pieces of authentication shared by the gateway and the control plane
//!
//! Pure or library code only; the gateway's `AUTH` path and the REST API wire them up
//! (docs/architecture.md, "Who may do what").
//!
//! ## Layout
//! - [`aggregate`]: per-source counting of failed attempts for the audit log.
//! - [`throttle`]: failed-attempt rate limiting per source address and per user name.
//! - [`ldap`]: logins against an LDAP directory (bind or search+bind), groups → [`role`]s.
//! - [`password`]: argon2id hashes of cache users' passwords (one or two, for rotation).
//! - [`access`]: ElastiCache-style access strings, checked and turned into Valkey ACL rules
//!   that keep the cache's isolation.
//! - [`role`]: what a login may do, and the group→role configuration.
//! - [`token`]: the upstream ACL user (name, password, access string) of a data-plane token
//!   that grants less than the cache's own user; derived alike by both sides.
//! - [`grants`]: what each kind of credential may do, as the README's table.
//! - `testing` (feature `testing`): a real `slapd` for tests.

pub mod access;
pub mod aggregate;
pub mod grants;
pub mod ldap;
pub mod password;
pub mod role;
#[cfg(feature = "testing")]
pub mod testing;
pub mod throttle;
pub mod token;

pub use access::{intersect_with_tenant, AccessError, AccessString};
pub use ldap::{BindMode, Directory, GroupLookup, LdapConfig, LdapError, LdapIdentity};
pub use password::{PasswordError, UserPasswords};
pub use role::{Role, RoleMapping};
pub use throttle::{Throttle, ThrottlePolicy};
