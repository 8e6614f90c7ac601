//! The ACL user that fences one cache into its databases and channels (ARCHITECTURE §4).
//!
//! Valkey enforces these rules itself, also inside Lua scripts, so they hold even if the
//! gateway's own policy had a hole.

/// What the engine needs to create or remove a cache's ACL user.
#[derive(Clone, Debug)]
pub struct TenantAcl {
    /// `t<cache id>`; also the channel prefix.
    pub user: String,
    pub password: String,
    /// First database and how many.
    pub db: u32,
    pub databases: u32,
}

/// Commands and subcommands a tenant may not run even inside its own database: they act on
/// the whole node (functions and the script cache are node-wide) or reveal other tenants.
const NODE_WIDE_DENIED: &[&str] = &[
    "-function",
    "-fcall",
    "-fcall_ro",
    "-script|flush",
    "-script|kill",
    "-pubsub",
    "-memory|stats",
    "-memory|doctor",
    "-memory|purge",
    "-memory|malloc-stats",
    "-client|no-evict",
    "-client|tracking",
    "-client|trackinginfo",
    "-client|caching",
    "-client|getredir",
    "-cluster",
    "-readonly",
    "-readwrite",
];

/// `@dangerous` commands that are safe once confined to the tenant's own databases.
const ALLOWED_BACK: &[&str] = &["+flushdb", "+keys", "+sort", "+sort_ro"];

impl TenantAcl {
    /// The arguments of `ACL SETUSER` for this tenant, after the user name.
    pub fn setuser_rules(&self) -> Vec<String> {
        let mut rules = vec![
            "reset".to_string(),
            "on".to_string(),
            format!(">{}", self.password),
            "resetkeys".to_string(),
            "~*".to_string(),
            "resetchannels".to_string(),
            format!("&{}:*", self.user),
            "+@all".to_string(),
            "-@admin".to_string(),
            "-@dangerous".to_string(),
        ];
        // Keyspace notifications of its own databases only.
        for db in self.db..self.db + self.databases.max(1) {
            rules.push(format!("&__keyspace@{db}__:*"));
            rules.push(format!("&__keyevent@{db}__:*"));
        }
        rules.extend(ALLOWED_BACK.iter().map(|s| s.to_string()));
        rules.extend(NODE_WIDE_DENIED.iter().map(|s| s.to_string()));
        // One `db=` rule with every database: a second `db=` rule would replace the first.
        let dbs: Vec<String> = (self.db..self.db + self.databases.max(1)).map(|db| db.to_string()).collect();
        rules.push("resetdbs".to_string());
        rules.push(format!("db={}", dbs.join(",")));
        rules
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_confine_databases_and_channels() {
        let acl = TenantAcl { user: "tc1".into(), password: "pw".into(), db: 4, databases: 2 };
        let rules = acl.setuser_rules();
        assert!(rules.contains(&"&tc1:*".to_string()));
        assert!(rules.contains(&"-@dangerous".to_string()));
        let dbs: Vec<_> = rules.iter().skip_while(|r| *r != "resetdbs").collect();
        assert_eq!(dbs, ["resetdbs", "db=4,5"]);
    }
}
