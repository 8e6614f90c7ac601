//! Authentication of data-plane clients: JWTs minted by the control plane ([`jwt`], checked
//! locally), cache users and LDAP users ([`login`], checked by the control plane), failed
//! attempts throttled per source and user, here and with every gateway's ([`throttle`]),
//! and every outcome sent to the audit log ([`audit`]). A session's login puts them together: `session/credentials.rs`.

pub mod audit;
pub mod jwt;
pub mod login;
pub mod throttle;
