//! The command table: every Valkey command's facts and what Shoal does with it.
//!
//! The table is data (`data/commands.tsv`): Valkey's own facts about each command (arity,
//! flags, key positions, ACL categories, refreshed by `scripts/command-table.py`) plus
//! Shoal's columns — the treatment (pass, deny, virtual), the metering weights, how a reply
//! counts as hits, and Shoal's flags. Everything that needs a command's facts asks this
//! crate: the gateway's dispatch and metering, the access strings of `shoal-auth`, the
//! engine's tenant ACL rules, and the tests. Columns are found by their header, so a new
//! column breaks nobody.
//!
//! Lookups are case-insensitive and allocation-free.

pub mod ecpu;
mod keys;
mod modules;
mod parse;
mod slot;

pub use modules::{from_command_entry, install_module_commands, module_commands, ModuleCommand};
pub use slot::{key_slot, SLOTS};

use rustc_hash::FxHashMap as HashMap;
use std::sync::OnceLock;

/// What the gateway does with a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Treatment {
    /// Forward the original bytes.
    Pass,
    /// Refuse with `-NOPERM`; never forwarded, and the node's tenant ACL refuses it too.
    Deny,
    /// The gateway answers it or rewrites it.
    Virtual,
}

/// How a command's reply counts as read hits and misses (column `hits`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hits {
    /// Not a read that hits or misses.
    None,
    /// One value (GET, HGET, GETEX, GETDEL, LINDEX…): a nil reply is a miss, else a hit.
    Value,
    /// Several values (MGET, HMGET, HGETEX…): each nil element is a miss, each other a hit.
    Elements,
}

/// One row of the table, with the facts derived from it.
#[derive(Clone, Debug)]
pub struct CommandSpec {
    /// Lowercase; `container|sub` for subcommands.
    pub name: String,
    /// Valkey's arity: negative is "at least".
    pub arity: i32,
    /// Valkey's flags (`readonly`, `denyoom`, `no_auth`…).
    pub flags: Vec<String>,
    pub first_key: i32,
    pub last_key: i32,
    pub step: i32,
    /// Valkey's ACL categories, without the `@`.
    pub acl_categories: Vec<String>,
    pub treatment: Treatment,
    /// ECPU weight in milli-ECPU (1000 = a small GET/SET); 0 = free (not metered).
    pub weight: u32,
    /// Extra milli-ECPU per element of an aggregate reply (range and multi-key commands).
    pub per_element: u32,
    pub hits: Hits,
    /// Shoal's flags (column `shoal`), typed.
    pub shoal: ShoalFlags,
    /// Valkey's `readonly` flag: reads keys (tracked by client-side caching).
    pub readonly: bool,
    /// Valkey's `write` flag.
    pub write: bool,
    /// Valkey's `no_auth` flag: runs before the client has logged in.
    pub no_auth: bool,
    /// Safe on a connection shared with other clients of the cache (the gateway's mux).
    pub mux: bool,
    /// Has subcommands (`client`, `config`, …), which have rows of their own.
    pub container: bool,
    /// Runs a script (EVAL, EVALSHA, FCALL and their `_RO` forms: commands of the
    /// `scripting` category that are not subcommands): metered for its time too.
    pub script: bool,
    /// Refused while the cache is over its storage limit: what Valkey refuses when out of
    /// memory (`denyoom`: SET, LPUSH, COPY… but not DEL, UNLINK, EXPIRE), plus scripts that
    /// may write (the gateway cannot look inside; `EVAL_RO`/`EVALSHA_RO` still run).
    pub refused_when_full: bool,
    /// Valkey's `blocking` flag: may wait for data or replicas (BLPOP, BZPOPMIN, WAIT, XREAD
    /// … the stream reads only with `BLOCK`, see [`CommandSpec::blocks`]).
    pub blocking: bool,
    /// The row's place in the table, 0..[`CommandTable::len`] (built-ins by name, then
    /// module commands as installed): per-command counters can be a plain array.
    pub index: usize,
    /// Why a refused module command is refused (`data/modules.tsv`), said in the refusal.
    pub refusal_reason: Option<String>,
}

/// Shoal's own facts about a command (column `shoal`, comma-separated).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShoalFlags {
    /// Answered from a node-wide view (INFO, PUBSUB …): runs once the replies of the
    /// commands before it have arrived.
    pub barrier: bool,
    /// MULTI, EXEC, DISCARD: transaction control, never queued or streamed.
    pub transaction: bool,
    /// A script that may write, though Valkey does not flag it `denyoom`.
    pub may_write: bool,
    /// Allowed whatever the user's access string says (like the `no_auth` commands).
    pub acl_exempt: bool,
    /// Safe on a shared connection although its category says otherwise (PING, ECHO).
    pub mux: bool,
    /// Never on a shared connection although its category would allow it.
    pub no_mux: bool,
    /// Answered by the gateway, and refused by the node's tenant ACL if sent directly.
    pub node_deny: bool,
    /// `@dangerous`, yet safe once confined to the tenant's own databases: the node's
    /// tenant ACL allows it back.
    pub node_allow: bool,
    /// Answered or rewritten by the gateway, and still allowed inside MULTI (it is
    /// forwarded, rewritten, to be queued; the others are answered at once, so refused).
    pub multi_ok: bool,
    /// Refused (`deny`) on shared nodes, yet a dedicated cache, alone on its node, runs it
    /// (functions, the script cache, Search): see [`CommandSpec::refused_on`].
    pub dedicated: bool,
    /// A negative count (the third argument) asks for that many random members, repeats
    /// allowed, however few the key holds: see [`CommandSpec::repeats_asked`].
    pub repeats: bool,
}

impl CommandSpec {
    /// Whether `flag` is one of Valkey's flags of the command.
    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// Whether the command is in Valkey's ACL category `category` (without `@`).
    pub fn in_category(&self, category: &str) -> bool {
        self.acl_categories.iter().any(|c| c == category)
    }

    /// The client-facing name for error messages: `CONFIG GET`, `FLUSHALL`.
    pub fn display_name(&self) -> String {
        self.name.replace('|', " ").to_uppercase()
    }

    /// Whether a user's access string has no say over it: the `no_auth` commands (logging
    /// in, `QUIT`, `RESET`) and the ones flagged `acl_exempt` (`SELECT`, confined by the
    /// gateway to the cache's databases).
    /// May write: Valkey's `write` flag, and scripts but their `_RO` forms (what a replica,
    /// and the reader endpoint, refuse).
    pub fn writes(&self) -> bool {
        self.write || (self.script && !self.readonly)
    }

    pub fn acl_exempt(&self) -> bool {
        self.no_auth || self.shoal.acl_exempt
    }

    /// Whether this call may block the client: a `blocking` command, XREAD and XREADGROUP
    /// only with a `BLOCK` option (before `STREAMS`, where the keys and ids start).
    pub fn blocks(&self, argv: &[&[u8]]) -> bool {
        if !self.blocking {
            return false;
        }
        if self.name != "xread" && self.name != "xreadgroup" {
            return true;
        }
        argv.iter()
            .skip(1)
            .take_while(|a| !a.eq_ignore_ascii_case(b"streams"))
            .any(|a| a.eq_ignore_ascii_case(b"block"))
    }

    /// How many members with repeats the command asks for (`SRANDMEMBER key -N`): a reply of
    /// that many elements from a key of any size; None if it asks for none.
    pub fn repeats_asked(&self, argv: &[&[u8]]) -> Option<u64> {
        if !self.shoal.repeats {
            return None;
        }
        let count: i64 = std::str::from_utf8(argv.get(2)?).ok()?.parse().ok()?;
        (count < 0).then(|| count.unsigned_abs())
    }

    /// Whether a cache of this placement is refused the command (`deny` rows; those
    /// flagged `dedicated` only on shared nodes).
    pub fn refused_on(&self, placement: Placement) -> bool {
        self.treatment == Treatment::Deny && !(self.shoal.dedicated && placement == Placement::Dedicated)
    }

    /// The container's name for a subcommand (`client` for `client|list`), else the name.
    pub fn container_name(&self) -> &str {
        self.name.split_once('|').map_or(&self.name, |(c, _)| c)
    }
}

/// Where a cache lives: a numbered database of a node it shares with other caches, or a
/// node of its own (database 0 on), where node-wide features (functions, Search indexes)
/// are its alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    #[default]
    Shared,
    Dedicated,
}

impl Placement {
    pub fn as_str(self) -> &'static str {
        match self {
            Placement::Shared => "shared",
            Placement::Dedicated => "dedicated",
        }
    }

    pub fn parse(s: &str) -> Option<Placement> {
        [Placement::Shared, Placement::Dedicated].into_iter().find(|p| p.as_str() == s)
    }
}

/// The parsed table.
#[derive(Debug)]
pub struct CommandTable {
    /// Keyed by the name's bytes: a lookup needs no UTF-8 check of what the client sent.
    by_name: HashMap<Box<[u8]>, CommandSpec>,
}

const TABLE_TSV: &str = include_str!("../data/commands.tsv");

/// The table, parsed once.
pub fn table() -> &'static CommandTable {
    static TABLE: OnceLock<CommandTable> = OnceLock::new();
    TABLE.get_or_init(|| CommandTable::parse(TABLE_TSV).expect("commands/data/commands.tsv is valid"))
}

impl CommandTable {
    /// The spec for a command given its first two arguments (name, maybe subcommand).
    /// Unknown subcommands fall back to their container.
    pub fn lookup(&self, name: &[u8], sub: Option<&[u8]>) -> Option<&CommandSpec> {
        let mut key = [0u8; 64];
        let name_len = lower_into(name, &mut key)?;
        let Some(spec) = self.by_name.get(&key[..name_len]) else {
            // Not a built-in: maybe a module's (only unknown commands pay this lookup).
            return modules::find(&key[..name_len]);
        };
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

    /// A row by its lowercase name (`get`, `client|list`, `json.set`).
    pub fn get(&self, name: &str) -> Option<&CommandSpec> {
        self.by_name.get(name.as_bytes()).or_else(|| modules::find(name.as_bytes()))
    }

    /// A built-in row (of `data/commands.tsv`) by its lowercase name.
    pub(crate) fn builtin(&self, name: &[u8]) -> Option<&CommandSpec> {
        self.by_name.get(name)
    }

    /// Built-in rows: module commands' indices start here.
    pub(crate) fn builtins(&self) -> usize {
        self.by_name.len()
    }

    /// Every row: the built-ins, then the module commands installed so far.
    pub fn iter(&self) -> impl Iterator<Item = &CommandSpec> {
        self.by_name.values().chain(modules::all())
    }

    /// Rows in the table, module commands included (every [`CommandSpec::index`] is below it).
    pub fn len(&self) -> usize {
        self.by_name.len() + modules::count()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Whether the command exists and is not denied (what `COMMAND` may show).
    pub fn visible(&self, name: &str) -> bool {
        self.get(name).is_some_and(|s| s.treatment != Treatment::Deny)
    }

    /// The rules of a node's tenant ACL user that follow from the table, after `+@all`:
    /// `-@admin -@dangerous`, the dangerous commands a confined tenant may run back, then
    /// every denied or gateway-only command the categories left allowed (a container
    /// rather than each of its subcommands). The gateway refuses these too; the node's
    /// refusal holds if the gateway had a hole, inside Lua scripts included.
    pub fn node_acl_rules(&self, placement: Placement) -> Vec<String> {
        let mut rules = vec!["-@admin".to_string(), "-@dangerous".to_string()];
        let mut allowed: Vec<&str> =
            self.iter().filter(|s| s.shoal.node_allow).map(|s| s.name.as_str()).collect();
        allowed.sort_unstable();
        rules.extend(allowed.iter().map(|n| format!("+{n}")));
        let covered = |s: &CommandSpec| s.in_category("admin") || s.in_category("dangerous");
        let refused = |s: &CommandSpec| (s.refused_on(placement) || s.shoal.node_deny) && !covered(s);
        // A refused container is refused whole unless one of its subcommands passes.
        let whole = |container: &CommandSpec| {
            refused(container)
                && !self.iter().any(|s| {
                    s.name.split_once('|').is_some_and(|(c, _)| c == container.name)
                        && s.treatment == Treatment::Pass
                })
        };
        let mut denied: Vec<&str> = self
            .iter()
            .filter(|s| match s.name.split_once('|') {
                Some((container, _)) => refused(s) && !self.get(container).is_some_and(whole),
                None => {
                    if s.container {
                        whole(s)
                    } else {
                        refused(s)
                    }
                }
            })
            .map(|s| s.name.as_str())
            .collect();
        denied.sort_unstable();
        rules.extend(denied.iter().map(|n| format!("-{n}")));
        rules
    }
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

#[cfg(test)]
mod tests;
