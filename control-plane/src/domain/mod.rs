//! What more than one route needs: the rules about caches, logins, keys and names. Routes
//! call the domain, the domain calls the store and the engine; routes do not call each other.

pub mod caches;
pub mod keys;
pub mod logins;
pub mod names;
