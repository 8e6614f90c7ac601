//! One module per resource; each has `configure(cfg)`.

pub mod caches;
pub mod health;
pub mod internal;
pub mod tokens;
pub mod usage;
