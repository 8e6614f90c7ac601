//! What each kind of credential may do, as one table: computed from the same code that makes
//! the upstream ACL users ([`crate::access::intersect_with_tenant`]) and the gateway's own
//! check of the commands it answers itself ([`crate::access::allows_command`]), rendered into
//! `docs/clients.md` (between `<!-- grants:begin -->` and `<!-- grants:end -->`; a test fails when it
//! is stale) and checked cell by cell against a real Valkey through the gateway
//! (`tests/scoped.rs`).

use crate::access::{allows_command, upstream_allows, AccessString, KeyPerm, Rule};
use crate::token::{access_string, READ_ONLY, READ_WRITE};
use shoal_types::Permission;

/// How a credential of the table is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A data-plane token minted with this permission and these key patterns.
    Token { perm: Permission, key_patterns: Vec<String> },
    /// A cache user with this access string.
    CacheUser,
}

/// One column of the table.
#[derive(Clone, Debug)]
pub struct Credential {
    /// `A`, `B`…
    pub column: &'static str,
    pub kind: Kind,
    /// What it is, for the legend.
    pub description: String,
    /// Its access string (a token's, an LDAP role's, or the cache user's).
    pub access: String,
}

/// The credentials of the table.
pub fn credentials() -> Vec<Credential> {
    let app = vec!["app:*".to_string()];
    let token = |column, perm, key_patterns: Vec<String>, description: &str| Credential {
        column,
        access: access_string(perm, &key_patterns),
        kind: Kind::Token { perm, key_patterns },
        description: description.to_string(),
    };
    let user = |column, access: &str| Credential {
        column,
        kind: Kind::CacheUser,
        description: "cache user".to_string(),
        access: access.to_string(),
    };
    let a = token(
        "A",
        Permission::ReadWrite,
        vec![],
        "read-write token on all keys; LDAP role `cache-read-write` (the same rules)",
    );
    let b = token(
        "B",
        Permission::ReadOnly,
        vec![],
        "read-only token; LDAP role `cache-read-only` (the same rules)",
    );
    debug_assert_eq!((a.access.as_str(), b.access.as_str()), (READ_WRITE, READ_ONLY));
    vec![
        a,
        b,
        token(
            "C",
            Permission::ReadWrite,
            app.clone(),
            "read-write token with `\"key_patterns\": [\"app:*\"]`",
        ),
        token("D", Permission::ReadOnly, app, "read-only token with `\"key_patterns\": [\"app:*\"]`"),
        user("E", "on ~app:* &* +@read +@write +@connection -@dangerous"),
        user("F", "on ~* +@read +@connection"),
    ]
}

/// One thing a probe needs.
#[derive(Clone, Copy, Debug)]
pub enum Need {
    /// The gateway answers or rewrites the command itself and checks it against the access
    /// string ([`allows_command`]).
    Gateway(&'static str, Option<&'static str>),
    /// The upstream ACL user runs the command ([`upstream_allows`]).
    Upstream(&'static str, Option<&'static str>),
    /// A key, read (false) or written (true).
    Key(&'static str, bool),
    /// A channel (as the client names it).
    Channel(&'static str),
    /// Refused for every credential (the gateway's command table denies it).
    Nobody,
}

/// One row of the table: a command as a client sends it and what it needs.
#[derive(Clone, Debug)]
pub struct Probe {
    pub group: &'static str,
    pub argv: &'static [&'static str],
    pub needs: &'static [Need],
}

use Need::*;

/// The rows of the table. Before each, the cache holds `app:1` and `billing:1`. A probe is
/// granted when its reply is no `NOPERM` (`INFO keyspace`: when it shows the key counts).
pub fn probes() -> Vec<Probe> {
    let p = |group, argv, needs| Probe { group, argv, needs };
    vec![
        p("keys", &["GET", "app:1"], &[Upstream("get", None), Key("app:1", false)]),
        p("keys", &["GET", "billing:1"], &[Upstream("get", None), Key("billing:1", false)]),
        p("keys", &["SET", "app:1", "v"], &[Upstream("set", None), Key("app:1", true)]),
        p("keys", &["SET", "billing:1", "v"], &[Upstream("set", None), Key("billing:1", true)]),
        p(
            "keys",
            &["COPY", "app:1", "app:2", "DB", "0"],
            &[Gateway("copy", None), Upstream("copy", None), Key("app:1", false), Key("app:2", true)],
        ),
        p(
            "keys",
            &["MOVE", "app:1", "0"],
            &[Gateway("move", None), Upstream("move", None), Key("app:1", true)],
        ),
        p("keys", &["MULTI"], &[Upstream("multi", None)]),
        p("whole keyspace", &["FLUSHDB"], &[Upstream("flushdb", None)]),
        p("whole keyspace", &["FLUSHALL"], &[Gateway("flushall", None), Upstream("flushdb", None)]),
        p("whole keyspace", &["SWAPDB", "0", "0"], &[Nobody]),
        p("whole keyspace", &["RANDOMKEY"], &[Upstream("randomkey", None)]),
        p("whole keyspace", &["KEYS", "*"], &[Upstream("keys", None)]),
        p("whole keyspace", &["SCAN", "0"], &[Upstream("scan", None)]),
        p("whole keyspace", &["DBSIZE"], &[Upstream("dbsize", None)]),
        // Granted here means the reply shows the key counts (`db0:keys=…`).
        p("whole keyspace", &["INFO", "keyspace"], &[Gateway("info", None), Gateway("dbsize", None)]),
        p("connections", &["PING"], &[Upstream("ping", None)]),
        p("connections", &["CLIENT", "ID"], &[Gateway("client", Some("id"))]),
        p("connections", &["CLIENT", "INFO"], &[Gateway("client", Some("info"))]),
        p("connections", &["CLIENT", "SETNAME", "me"], &[Gateway("client", Some("setname"))]),
        p("connections", &["CLIENT", "LIST"], &[Gateway("client", Some("list"))]),
        p("connections", &["CLIENT", "KILL", "ID", "0"], &[Gateway("client", Some("kill"))]),
        p("connections", &["CLIENT", "NO-EVICT", "on"], &[Gateway("client", Some("no-evict"))]),
        p("connections", &["CLIENT", "PAUSE", "10"], &[Nobody]),
        p("connections", &["CLIENT", "UNPAUSE"], &[Nobody]),
        p("connections", &["CLIENT", "UNBLOCK", "0"], &[Nobody]),
        p(
            "pub/sub",
            &["PUBLISH", "news", "hi"],
            &[Gateway("publish", None), Upstream("publish", None), Channel("news")],
        ),
        p("pub/sub", &["SUBSCRIBE", "news"], &[Gateway("subscribe", None), Channel("news")]),
        p("scripts", &["EVAL", "return 1", "0"], &[Upstream("eval", None)]),
        p(
            "scripts",
            &["EVAL", "return redis.call('GET', 'billing:1')", "0"],
            &[Upstream("eval", None), Upstream("get", None), Key("billing:1", false)],
        ),
        p(
            "scripts",
            &["EVAL", "return redis.call('FLUSHDB')", "0"],
            &[Upstream("eval", None), Upstream("flushdb", None)],
        ),
        p("scripts", &["SCRIPT", "LOAD", "return 1"], &[Upstream("script", Some("load"))]),
    ]
}

/// Valkey's glob match (`*`, `?`, `[…]` classes without ranges are enough here; `\` escapes).
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|i| glob(rest, &text[i..])),
        Some((b'?', rest)) => !text.is_empty() && glob(rest, &text[1..]),
        Some((b'\\', rest)) if !rest.is_empty() => {
            text.first() == Some(&rest[0]) && glob(&rest[1..], &text[1..])
        }
        Some((b'[', rest)) => match rest.iter().position(|&c| c == b']') {
            Some(end) => {
                !text.is_empty() && rest[..end].contains(&text[0]) && glob(&rest[end + 1..], &text[1..])
            }
            None => text.first() == Some(&b'[') && glob(rest, &text[1..]),
        },
        Some((c, rest)) => text.first() == Some(c) && glob(rest, &text[1..]),
    }
}

/// Whether a credential with `access` on a cache with `tenant_rules` may run the probe.
pub fn granted(access: &AccessString, tenant_rules: &[String], probe: &Probe) -> bool {
    probe.needs.iter().all(|need| match *need {
        Gateway(name, sub) => allows_command(access, name, sub),
        Upstream(name, sub) => {
            upstream_allows(access, tenant_rules, name, sub).expect("the cache's rules parse")
        }
        Key(key, write) => access.key_rules().iter().any(|(perm, p)| {
            let perm_ok = match perm {
                KeyPerm::ReadWrite => true,
                KeyPerm::Read => !write,
                KeyPerm::Write => write,
            };
            perm_ok && glob(p.as_bytes(), key.as_bytes())
        }),
        Channel(channel) => {
            let mut patterns: Vec<&str> = Vec::new();
            for rule in access.rules() {
                match rule {
                    Rule::Channel(p) => patterns.push(p),
                    Rule::ResetChannels => patterns.clear(),
                    _ => {}
                }
            }
            patterns.iter().any(|p| glob(p.as_bytes(), channel.as_bytes()))
        }
        Nobody => false,
    })
}

/// The table in Markdown, for a cache whose own ACL rules are `tenant_rules`.
pub fn markdown(tenant_rules: &[String]) -> String {
    let creds = credentials();
    let parsed: Vec<AccessString> = creds
        .iter()
        .map(|c| AccessString::parse(&c.access).expect("the table's access strings parse"))
        .collect();
    let mut out = String::new();
    out.push_str("Columns:\n\n");
    for c in &creds {
        out.push_str(&format!("- **{}**: {} — `{}`\n", c.column, c.description, c.access));
    }
    out.push_str("\n| | command |");
    for c in &creds {
        out.push_str(&format!(" {} |", c.column));
    }
    out.push_str("\n|---|---|");
    out.push_str(&"---|".repeat(creds.len()));
    out.push('\n');
    let mut last_group = "";
    for probe in probes() {
        let group = if probe.group == last_group { "" } else { probe.group };
        last_group = probe.group;
        let shown: Vec<String> = probe
            .argv
            .iter()
            .map(|a| if a.contains(' ') { format!("\"{a}\"") } else { a.to_string() })
            .collect();
        out.push_str(&format!("| {group} | `{}` |", shown.join(" ")));
        for access in &parsed {
            out.push_str(if granted(access, tenant_rules, &probe) { " ✓ |" } else { " ✗ |" });
        }
        out.push('\n');
    }
    out
}

/// Replaces what is between the markers in `readme` with `table`.
pub fn splice(readme: &str, table: &str) -> Option<String> {
    const BEGIN: &str = "<!-- grants:begin (generated by auth/src/grants.rs; SHOAL_UPDATE_DOCS=1 cargo test -p shoal-auth grants) -->\n";
    const END: &str = "<!-- grants:end -->";
    let start = readme.find(BEGIN)? + BEGIN.len();
    let end = start + readme[start..].find(END)?;
    Some(format!("{}{table}{}", &readme[..start], &readme[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant_rules() -> Vec<String> {
        shoal_engine::TenantAcl {
            user: "tc000000000001".into(),
            password: "pw".into(),
            db: 0,
            databases: 1,
            placement: Default::default(),
        }
        .setuser_rules()
    }

    fn cell(column: &str, argv0: &[&str]) -> bool {
        let cred = credentials().into_iter().find(|c| c.column == column).unwrap();
        let probe = probes().into_iter().find(|p| p.argv.starts_with(argv0)).unwrap();
        granted(&AccessString::parse(&cred.access).unwrap(), &tenant_rules(), &probe)
    }

    #[test]
    fn globs_match_like_valkey() {
        assert!(glob(b"app:*", b"app:1") && !glob(b"app:*", b"billing:1"));
        assert!(glob(b"*", b"") && glob(b"a?c", b"abc") && glob(b"[ab]x", b"bx") && !glob(b"[ab]x", b"cx"));
        assert!(glob(b"a\\*", b"a*") && !glob(b"a\\*", b"ab"));
    }

    #[test]
    fn scoped_credentials_stay_in_scope() {
        // Key patterns: no whole-keyspace command, at the gateway, upstream or in a script.
        for col in ["C", "D", "E"] {
            for argv in [&["FLUSHDB"][..], &["FLUSHALL"], &["RANDOMKEY"], &["KEYS"], &["SCAN"], &["DBSIZE"]] {
                assert!(!cell(col, argv), "{col} {argv:?}");
            }
            assert!(!cell(col, &["EVAL", "return redis.call('FLUSHDB')"]), "{col}");
        }
        assert!(
            cell("A", &["FLUSHALL"])
                && cell("A", &["SCAN"])
                && cell("A", &["EVAL", "return redis.call('FLUSHDB')"])
        );
        assert!(cell("B", &["SCAN"]) && !cell("B", &["FLUSHDB"]));
        // Read-only: its own connection only.
        for col in ["B", "D"] {
            for sub in ["LIST", "KILL", "NO-EVICT", "PAUSE"] {
                assert!(!cell(col, &["CLIENT", sub]), "{col} CLIENT {sub}");
            }
            for sub in ["ID", "INFO", "SETNAME"] {
                assert!(cell(col, &["CLIENT", sub]), "{col} CLIENT {sub}");
            }
        }
        assert!(
            cell("A", &["CLIENT", "KILL"])
                && !cell("C", &["CLIENT", "LIST"])
                && !cell("F", &["CLIENT", "LIST"])
        );
    }

    #[test]
    fn the_docs_table_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/clients.md");
        let readme = std::fs::read_to_string(path).unwrap();
        let fresh =
            splice(&readme, &markdown(&tenant_rules())).expect("docs/clients.md has the grants markers");
        if std::env::var_os("SHOAL_UPDATE_DOCS").is_some() {
            std::fs::write(path, &fresh).unwrap();
            return;
        }
        assert!(
            fresh == readme,
            "the permissions table of docs/clients.md is stale: SHOAL_UPDATE_DOCS=1 cargo test -p shoal-auth grants"
        );
    }
}
