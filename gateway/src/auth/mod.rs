//! Authentication of data-plane clients. Today: JWTs minted by the control plane.

pub mod jwt;
