//! The command table and what the gateway does with each command.
//!
//! The table is data (`gateway/data/commands.tsv`): Valkey's own facts about each command
//! (arity, flags, key positions, ACL categories, refreshed by `scripts/command-table.py`)
//! plus Shoal's treatment and metering columns (ECPU weight, per-element term, hits). Lookups are case-insensitive and allocation-free.

use rustc_hash::FxHashMap as HashMap;
use std::sync::OnceLock;

/// What the gateway does with a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Treatment {
    /// Forward the original bytes.
    Pass,
    /// Refuse with `-NOPERM`, never forwarded.
    Deny,
    /// The gateway answers it or rewrites it (see `session`).
    Virtual,
}

/// One row of the table.
#[derive(Clone, Debug)]
pub struct CommandSpec {
    /// Lowercase; `container|sub` for subcommands.
    pub name: String,
    pub arity: i32,
    pub flags: Vec<String>,
    pub first_key: i32,
    pub last_key: i32,
    pub step: i32,
    pub acl_categories: Vec<String>,
    pub treatment: Treatment,
    /// ECPU weight in milli-ECPU (1000 = a small GET/SET); 0 = free (not metered).
    pub weight: u32,
    /// Extra milli-ECPU per element of an aggregate reply (range and multi-key commands).
    pub per_element: u32,
    /// How the reply counts as read hits and misses.
    pub hits: crate::metering::ecpu::Hits,
    /// Safe on a connection shared with other clients of the cache (see [`crate::mux`]).
    pub mux: bool,
    /// Has subcommands (`client`, `config`, …), which have rows of their own.
    pub container: bool,
    /// Runs a script (EVAL, EVALSHA, FCALL and their `_RO` forms: commands of the
    /// `scripting` category that are not subcommands): metered for its time too.
    pub script: bool,
}

impl CommandSpec {
    /// Refused while the cache is over its storage limit: what Valkey refuses when out of
    /// memory (`denyoom`: SET, LPUSH, COPY… but not DEL, UNLINK, EXPIRE), plus scripts that
    /// may write (the gateway cannot look inside; `EVAL_RO`/`EVALSHA_RO` still run).
    pub fn refused_when_full(&self) -> bool {
        self.flags.iter().any(|f| f == "denyoom")
            || matches!(self.name.as_str(), "eval" | "evalsha" | "fcall")
    }
}

/// The parsed table.
pub struct CommandTable {
    /// Keyed by the name's bytes: a lookup needs no UTF-8 check of what the client sent.
    by_name: HashMap<Box<[u8]>, CommandSpec>,
}

const TABLE_TSV: &str = include_str!("../data/commands.tsv");

/// The table, parsed once.
pub fn table() -> &'static CommandTable {
    static TABLE: OnceLock<CommandTable> = OnceLock::new();
    TABLE.get_or_init(|| CommandTable::parse(TABLE_TSV).expect("gateway/data/commands.tsv is valid"))
}

impl CommandTable {
    pub fn parse(tsv: &str) -> Result<CommandTable, String> {
        let mut by_name = HashMap::default();
        let mut containers = Vec::new();
        for (n, line) in tsv.lines().enumerate() {
            if line.starts_with('#') || line.starts_with("name\t") || line.trim().is_empty() {
                continue;
            }
            let c: Vec<&str> = line.split('\t').collect();
            let bad = |what: &str| format!("line {}: bad {what}: {line:?}", n + 1);
            if c.len() != 11 {
                return Err(bad("column count"));
            }
            let list = |s: &str| if s == "-" { vec![] } else { s.split(',').map(str::to_string).collect() };
            let spec = CommandSpec {
                name: c[0].to_string(),
                arity: c[1].parse().map_err(|_| bad("arity"))?,
                flags: list(c[2]),
                first_key: c[3].parse().map_err(|_| bad("first_key"))?,
                last_key: c[4].parse().map_err(|_| bad("last_key"))?,
                step: c[5].parse().map_err(|_| bad("step"))?,
                acl_categories: list(c[6]),
                treatment: match c[7] {
                    "pass" => Treatment::Pass,
                    "deny" => Treatment::Deny,
                    "virtual" => Treatment::Virtual,
                    _ => return Err(bad("treatment")),
                },
                weight: c[8].parse().map_err(|_| bad("weight"))?,
                per_element: c[9].parse().map_err(|_| bad("per_element"))?,
                hits: c[10].parse().map_err(|_| bad("hits"))?,
                mux: false,
                container: false,
                script: false,
            };
            let spec = CommandSpec { mux: muxable(&spec), ..spec };
            if let Some((container, _)) = spec.name.split_once('|') {
                containers.push(container.to_string());
            }
            by_name.insert(spec.name.as_bytes().into(), spec);
        }
        for name in containers {
            match by_name.get_mut(name.as_bytes()) {
                Some(spec) => spec.container = true,
                None => return Err(format!("subcommands of {name}, which has no row")),
            }
        }
        for spec in by_name.values_mut() {
            spec.script = !spec.container
                && !spec.name.contains('|')
                && spec.acl_categories.iter().any(|c| c == "scripting");
        }
        Ok(CommandTable { by_name })
    }

    /// The spec for a command given its first two arguments (name, maybe subcommand).
    /// Unknown subcommands fall back to their container.
    pub fn lookup(&self, name: &[u8], sub: Option<&[u8]>) -> Option<&CommandSpec> {
        let mut key = [0u8; 64];
        let name_len = lower_into(name, &mut key)?;
        let spec = self.by_name.get(&key[..name_len])?;
        if let (true, Some(sub)) = (spec.container, sub) {
            key[name_len] = b'|';
            if let Some(sub_len) = lower_into(sub, &mut key[name_len + 1..]) {
                if let Some(sub_spec) = self.by_name.get(&key[..name_len + 1 + sub_len]) {
                    return Some(sub_spec);
                }
            }
        }
        Some(spec)
    }

    pub fn get(&self, name: &str) -> Option<&CommandSpec> {
        self.by_name.get(name.as_bytes())
    }

    pub fn iter(&self) -> impl Iterator<Item = &CommandSpec> {
        self.by_name.values()
    }

    /// Whether the command exists and is not denied (what `COMMAND` may show).
    pub fn visible(&self, name: &str) -> bool {
        self.by_name.get(name.as_bytes()).is_some_and(|s| s.treatment != Treatment::Deny)
    }
}

/// Whether a forwarded command means the same on any connection of the cache: no blocking,
/// no transaction or pub/sub state, nothing about the connection itself (`CLIENT …`, `WAIT`,
/// `SELECT`, `HELLO` …). Scripts qualify: a script's `SELECT` does not outlive the script.
fn muxable(spec: &CommandSpec) -> bool {
    const BOUND: [&str; 4] = ["connection", "transaction", "blocking", "pubsub"];
    if spec.treatment != Treatment::Pass || spec.name == "script|debug" {
        return false;
    }
    if matches!(spec.name.as_str(), "ping" | "echo") {
        return true;
    }
    !spec.flags.iter().any(|f| f == "blocking")
        && !spec.acl_categories.iter().any(|c| BOUND.contains(&c.as_str()))
}

/// Lowercases `src` into `dst`; `None` if it does not fit (no command name is that long).
fn lower_into(src: &[u8], dst: &mut [u8]) -> Option<usize> {
    if src.len() > dst.len() {
        return None;
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_ascii_lowercase();
    }
    Some(src.len())
}

/// The client-facing name of a command for error messages: `CONFIG GET`, `FLUSHALL`.
pub fn display_name(spec: &CommandSpec) -> String {
    spec.name.replace('|', " ").to_uppercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_parses_and_knows_valkey_9_commands() {
        let t = table();
        assert_eq!(t.lookup(b"get", None).unwrap().treatment, Treatment::Pass);
        assert_eq!(t.lookup(b"GeT", None).unwrap().first_key, 1);
        assert!(t.lookup(b"hsetex", None).is_some(), "Valkey 9 hash field expiration");
        assert!(t.lookup(b"delifeq", None).is_some());
        assert!(t.lookup(b"nosuchcommand", None).is_none());
    }

    #[test]
    fn dangerous_commands_are_denied_and_subcommands_resolve() {
        let t = table();
        for (name, sub) in [
            ("CONFIG", Some("GET")),
            ("DEBUG", Some("SLEEP")),
            ("SHUTDOWN", None),
            ("MONITOR", None),
            ("SWAPDB", None),
            ("ACL", Some("SETUSER")),
            ("FUNCTION", Some("LOAD")),
            ("SCRIPT", Some("FLUSH")),
            ("CLIENT", Some("PAUSE")),
            ("MEMORY", Some("DOCTOR")),
            ("SLOWLOG", Some("GET")),
            ("MODULE", Some("LOAD")),
            ("REPLICAOF", None),
            ("MIGRATE", None),
        ] {
            let spec = t.lookup(name.as_bytes(), sub.map(str::as_bytes)).unwrap();
            assert_eq!(spec.treatment, Treatment::Deny, "{name} {sub:?}");
        }
        assert_eq!(t.lookup(b"client", Some(b"GETNAME")).unwrap().treatment, Treatment::Pass);
        assert_eq!(t.lookup(b"acl", Some(b"whoami")).unwrap().treatment, Treatment::Virtual);
        assert_eq!(t.lookup(b"memory", Some(b"usage")).unwrap().treatment, Treatment::Pass);
        assert_eq!(t.lookup(b"script", Some(b"load")).unwrap().treatment, Treatment::Pass);
        assert_eq!(t.lookup(b"FLUSHALL", None).unwrap().treatment, Treatment::Virtual);
        assert_eq!(display_name(t.get("config|get").unwrap()), "CONFIG GET");
    }

    #[test]
    fn only_connection_free_commands_are_multiplexed() {
        let t = table();
        for name in
            ["get", "set", "mget", "eval", "evalsha", "flushdb", "ping", "echo", "script|load", "xadd"]
        {
            assert!(t.get(name).unwrap().mux, "{name}");
        }
        for name in [
            "multi",
            "exec",
            "watch",
            "unwatch",
            "discard",
            "blpop",
            "xread",
            "wait",
            "waitaof",
            "client|id",
            "client|setname",
            "select",
            "hello",
            "reset",
            "subscribe",
            "publish",
            "script|debug",
            "auth",
            "client|no-touch",
            "command|getkeys",
            "asking",
        ] {
            assert!(!t.get(name).unwrap().mux, "{name}");
        }
    }
}
