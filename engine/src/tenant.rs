//! The ACL user that fences one cache into its databases and channels.
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
    /// A dedicated cache, alone on its node, may also run what is node-wide (functions,
    /// the script cache, Search indexes).
    pub placement: crate::Placement,
}

/// Valkey's `notify-keyspace-events` flag letters.
const KEYSPACE_FLAGS: &str = "KEg$lshzxetmdnA";

/// Checks a cache's keyspace-notification flags; returns them normalized (no duplicates).
pub fn parse_keyspace_events(flags: &str) -> Result<String, String> {
    if let Some(bad) = flags.chars().find(|c| !KEYSPACE_FLAGS.contains(*c)) {
        return Err(format!("unknown keyspace event flag {bad:?} (allowed: {KEYSPACE_FLAGS})"));
    }
    if !flags.is_empty() && !flags.contains('K') && !flags.contains('E') {
        return Err("keyspace events need K (keyspace) or E (keyevent) to be delivered".into());
    }
    Ok(KEYSPACE_FLAGS.chars().filter(|c| flags.contains(*c)).collect())
}

/// The node-wide flags for a set of caches' flags: their union.
pub fn union_keyspace_events<'a>(flags: impl IntoIterator<Item = &'a str>) -> String {
    let all: String = flags.into_iter().collect();
    KEYSPACE_FLAGS.chars().filter(|c| all.contains(*c)).collect()
}

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
        ];
        // What the command table refuses: admin, dangerous and node-wide commands (functions
        // and the script cache are node-wide), and what would reveal other tenants.
        rules.extend(shoal_commands::table().node_acl_rules(self.placement));
        // Keyspace notifications of its own databases only.
        for db in self.db..self.db + self.databases.max(1) {
            rules.push(format!("&__keyspace@{db}__:*"));
            rules.push(format!("&__keyevent@{db}__:*"));
        }
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
    fn keyspace_flags_are_checked_and_merged() {
        assert_eq!(parse_keyspace_events("AK").unwrap(), "KA");
        assert!(parse_keyspace_events("Kq").is_err());
        assert!(parse_keyspace_events("A").is_err());
        assert_eq!(parse_keyspace_events("").unwrap(), "");
        assert_eq!(union_keyspace_events(["Kg", "E$", ""]), "KEg$");
    }

    #[test]
    fn rules_confine_databases_and_channels() {
        let acl = TenantAcl {
            user: "tc1".into(),
            password: "pw".into(),
            db: 4,
            databases: 2,
            placement: Default::default(),
        };
        let rules = acl.setuser_rules();
        assert!(rules.contains(&"&tc1:*".to_string()));
        assert!(rules.contains(&"-@dangerous".to_string()));
        let dbs: Vec<_> = rules.iter().skip_while(|r| *r != "resetdbs").collect();
        assert_eq!(dbs, ["resetdbs", "db=4,5"]);
    }
}
