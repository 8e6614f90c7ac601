//! Access strings of cache users (ElastiCache RBAC; Valkey ACL rule syntax such as
//! `on ~app:* +@read`): checked with errors that point at the bad rule, then turned into the
//! rules of an upstream Valkey ACL user that can do no more than the access string allows
//! AND no more than the cache's own ACL user (its databases, its channels, no dangerous
//! commands). Valkey enforces the result itself, also inside Lua scripts.
//!
//! Commands are resolved against Valkey's command table (the `shoal-commands` crate), so
//! the produced rules name exactly the commands and subcommands both sides allow.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::RwLock;

/// Longest access string and most rules accepted.
pub const MAX_LEN: usize = 4096;
pub const MAX_RULES: usize = 256;

/// Why an access string is refused: which rule (1-based), its text, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("access string: rule {index} `{rule}`: {reason}")]
    Rule { index: usize, rule: String, reason: String },
    #[error("access string: {0}")]
    Whole(String),
    /// The cache's own rules are not of the shape this module can intersect with (a bug or a
    /// newer engine, not the user's fault).
    #[error("the cache's ACL rules: {0}")]
    Tenant(String),
}

/// Key permissions of a `~` / `%R~` / `%W~` / `%RW~` rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyPerm {
    ReadWrite,
    Read,
    Write,
}

/// What a `+` / `-` rule names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandTarget {
    /// `@all`, `allcommands`, `nocommands`.
    All,
    Category(String),
    /// A command and, for a container command (`client`, `config`…), all its subcommands.
    Command(String),
    /// `container|subcommand`.
    Subcommand(String, String),
}

/// One checked rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    On,
    Off,
    Key(KeyPerm, String),
    ResetKeys,
    Channel(String),
    ResetChannels,
    Command { allow: bool, target: CommandTarget },
    SanitizePayload,
}

/// A checked access string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessString {
    text: String,
    rules: Vec<Rule>,
}

/// Commands every cache user gets (if the cache has them): logging in, and choosing one of
/// the cache's databases (`db=` still confines `SELECT`; the gateway virtualizes it).
const CONNECTION_ESSENTIALS: &[&str] = &["auth", "hello", "select"];

/// Keyless commands that read every key name of a database (or count them), whatever the
/// user's key patterns: only a user that may read all keys (`~*` or `%R~*`) gets them, so a
/// user limited to some keys cannot list, sample or count the others. Refused, not
/// filtered: a filter in the gateway would not hold inside Lua scripts.
pub const WHOLE_KEYSPACE_READS: &[&str] = &["dbsize", "keys", "randomkey", "scan"];
/// Keyless commands that write every key of a database: only a user that may write all
/// keys (`~*` or `%W~*`) gets them, so a user limited to some keys cannot delete the others.
pub const WHOLE_KEYSPACE_WRITES: &[&str] = &["flushall", "flushdb", "swapdb"];

/// `CLIENT` subcommands that see or act on the cache's other connections (the gateway
/// answers them, confined to the cache; Valkey files them under `@connection` too): they
/// reach past the user's own connection and keys, so only a user that may also run
/// `FLUSHDB` (all keys, writes) gets them. A read-only or key-limited login keeps
/// `CLIENT ID/INFO/SETNAME…` of its own connection.
pub const OTHER_CONNECTIONS: &[&str] = &["kill", "list", "no-evict", "pause", "unblock", "unpause"];

/// Valkey's ACL categories (modules' come with their commands: `json`, `bloom`…).
const CATEGORIES: &[&str] = &[
    "keyspace",
    "read",
    "write",
    "set",
    "sortedset",
    "list",
    "hash",
    "string",
    "bitmap",
    "hyperloglog",
    "geo",
    "stream",
    "pubsub",
    "admin",
    "fast",
    "slow",
    "blocking",
    "dangerous",
    "connection",
    "transaction",
    "scripting",
    "all",
];

/// One command of the table: its categories and, for a container, its subcommands'.
struct Command {
    /// Valkey's arity: negative is "at least"; a container with arity ±1 also runs alone.
    arity: i32,
    categories: Vec<String>,
    subcommands: BTreeMap<String, Vec<String>>,
}

/// Valkey's commands by name (lowercase), from the command table, module commands
/// included: rebuilt when more are installed (once or twice per process, at start; each
/// build is kept for the life of the process, as the table's rows are).
fn commands() -> &'static BTreeMap<String, Command> {
    type Built = (usize, &'static BTreeMap<String, Command>);
    static TABLE: RwLock<Option<Built>> = RwLock::new(None);
    let rows = shoal_commands::table().len();
    if let Some((n, table)) = *TABLE.read().unwrap_or_else(|p| p.into_inner()) {
        if n == rows {
            return table;
        }
    }
    let table: &'static BTreeMap<String, Command> = Box::leak(Box::new(build_commands()));
    *TABLE.write().unwrap_or_else(|p| p.into_inner()) = Some((rows, table));
    table
}

fn build_commands() -> BTreeMap<String, Command> {
    let rows = shoal_commands::table();
    let mut table: BTreeMap<String, Command> = rows
        .iter()
        .filter(|spec| !spec.name.contains('|'))
        .map(|spec| {
            let command = Command {
                arity: spec.arity,
                categories: spec.acl_categories.clone(),
                subcommands: BTreeMap::new(),
            };
            (spec.name.clone(), command)
        })
        .collect();
    for spec in rows.iter() {
        if let Some((parent, sub)) = spec.name.split_once('|') {
            let command = table.get_mut(parent).expect("every subcommand's container is in the table");
            command.subcommands.insert(sub.to_string(), spec.acl_categories.clone());
        }
    }
    table
}

/// Whether `category` is an ACL category: Valkey's, or one of an installed module's.
fn known_category(category: &str) -> bool {
    CATEGORIES.contains(&category) || commands().values().any(|c| c.categories.iter().any(|k| k == category))
}

/// Why a rule is refused or what it is.
fn parse_rule(text: &str, tenant: bool) -> Result<Option<Rule>, String> {
    if text.is_empty() {
        return Err("empty rule".into());
    }
    let lower = text.to_ascii_lowercase();
    let rule = match lower.as_str() {
        "on" => Rule::On,
        "off" => Rule::Off,
        "allkeys" => Rule::Key(KeyPerm::ReadWrite, "*".into()),
        "resetkeys" => Rule::ResetKeys,
        "allchannels" => Rule::Channel("*".into()),
        "resetchannels" => Rule::ResetChannels,
        "allcommands" => Rule::Command { allow: true, target: CommandTarget::All },
        "nocommands" => Rule::Command { allow: false, target: CommandTarget::All },
        "sanitize-payload" => Rule::SanitizePayload,
        // The cache's own rules carry these; they are the engine's business.
        "reset" | "resetpass" | "resetdbs" | "alldbs" | "nopass" if tenant => return Ok(None),
        _ if tenant && (lower.starts_with('>') || lower.starts_with('#') || lower.starts_with("db=")) => {
            return Ok(None)
        }
        "nopass" => {
            return Err(
                "a cache user always needs a password (use the cache's default user for trusted networks)"
                    .into(),
            )
        }
        "resetpass" => return Err("passwords are set with `passwords`, not in the access string".into()),
        "reset" => {
            return Err(
                "`reset` is not allowed: an access string starts from nothing (off, no keys, no commands)"
                    .into(),
            )
        }
        "resetdbs" | "alldbs" => {
            return Err("databases belong to the cache and cannot be chosen by an access string".into())
        }
        "skip-sanitize-payload" => return Err("RESTORE payloads are always sanitized".into()),
        "clearselectors" => return Err("selectors are not supported".into()),
        _ => match lower.as_bytes()[0] {
            b'>' | b'<' | b'#' | b'!' => {
                return Err("passwords are set with `passwords`, not in the access string".into())
            }
            b'(' => return Err("selectors `(...)` are not supported".into()),
            b'~' => Rule::Key(KeyPerm::ReadWrite, pattern(&text[1..])?),
            b'%' => {
                let (perm, pat) = text[1..].split_once('~').ok_or("a `%` rule looks like `%R~pattern`")?;
                let perm = match perm.to_ascii_uppercase().as_str() {
                    "R" => KeyPerm::Read,
                    "W" => KeyPerm::Write,
                    "RW" | "WR" => KeyPerm::ReadWrite,
                    _ => return Err("key permissions are R, W or RW".into()),
                };
                Rule::Key(perm, pattern(pat)?)
            }
            b'&' => Rule::Channel(pattern(&text[1..])?),
            b'+' | b'-' => {
                Rule::Command { allow: lower.starts_with('+'), target: command_target(&lower[1..])? }
            }
            _ if lower.starts_with("db=") => {
                return Err("databases belong to the cache and cannot be chosen by an access string".into())
            }
            _ => return Err("unknown rule".into()),
        },
    };
    Ok(Some(rule))
}

fn pattern(p: &str) -> Result<String, String> {
    if p.is_empty() {
        return Err("empty pattern".into());
    }
    if p.chars().any(|c| c.is_control()) {
        return Err("control characters in the pattern".into());
    }
    Ok(p.to_string())
}

fn command_target(name: &str) -> Result<CommandTarget, String> {
    if let Some(category) = name.strip_prefix('@') {
        if !known_category(category) {
            let mut known: Vec<&str> = CATEGORIES.to_vec();
            for c in commands().values().flat_map(|c| &c.categories) {
                if !known.contains(&c.as_str()) {
                    known.push(c);
                }
            }
            return Err(format!("unknown category @{category} (known: {})", known.join(", ")));
        }
        return Ok(if category == "all" {
            CommandTarget::All
        } else {
            CommandTarget::Category(category.into())
        });
    }
    match name.split_once('|') {
        None => match commands().get(name) {
            Some(_) => Ok(CommandTarget::Command(name.into())),
            None => Err(format!("unknown command {name:?}")),
        },
        Some((parent, sub)) => match commands().get(parent) {
            None => Err(format!("unknown command {parent:?}")),
            Some(c) if c.subcommands.is_empty() => {
                Err(format!("{parent:?} has no subcommands (first-argument rules are not supported)"))
            }
            Some(c) if !c.subcommands.contains_key(sub) => Err(format!("unknown subcommand {parent}|{sub}")),
            Some(_) => Ok(CommandTarget::Subcommand(parent.into(), sub.into())),
        },
    }
}

impl AccessString {
    /// Checks an access string.
    pub fn parse(text: &str) -> Result<AccessString, AccessError> {
        if text.len() > MAX_LEN {
            return Err(AccessError::Whole(format!("longer than {MAX_LEN} bytes")));
        }
        let words: Vec<&str> = text.split_ascii_whitespace().collect();
        if words.is_empty() {
            return Err(AccessError::Whole("empty (try `on ~* +@all` or `on ~app:* +@read`)".into()));
        }
        if words.len() > MAX_RULES {
            return Err(AccessError::Whole(format!("more than {MAX_RULES} rules")));
        }
        let mut rules = Vec::with_capacity(words.len());
        for (i, word) in words.iter().enumerate() {
            match parse_rule(word, false) {
                Ok(Some(rule)) => rules.push(rule),
                Ok(None) => unreachable!("only the cache's own rules are skipped"),
                Err(reason) => {
                    return Err(AccessError::Rule { index: i + 1, rule: word.to_string(), reason })
                }
            }
        }
        Ok(AccessString { text: words.join(" "), rules })
    }

    /// The access string, whitespace normalized.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The key rules in force at the end (after the last `resetkeys`).
    pub fn key_rules(&self) -> Vec<(KeyPerm, String)> {
        let mut keys = Vec::new();
        for rule in &self.rules {
            match rule {
                Rule::Key(perm, p) => keys.push((*perm, p.clone())),
                Rule::ResetKeys => keys.clear(),
                _ => {}
            }
        }
        keys
    }

    /// Whether the user may read (`read`) or write (`!read`) every key: a `*` pattern with
    /// that permission. Only then does it get the whole-keyspace commands.
    pub fn all_keys(&self, read: bool) -> bool {
        self.key_rules().iter().any(|(perm, p)| {
            p == "*"
                && match perm {
                    KeyPerm::ReadWrite => true,
                    KeyPerm::Read => read,
                    KeyPerm::Write => !read,
                }
        })
    }

    /// Whether the user is `on` (the last of `on`/`off` wins; off if neither).
    pub fn enabled(&self) -> bool {
        self.rules.iter().rev().find_map(|r| match r {
            Rule::On => Some(true),
            Rule::Off => Some(false),
            _ => None,
        }) == Some(true)
    }
}

impl fmt::Display for AccessString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Which commands and subcommands a sequence of rules allows, evaluated the way Valkey does.
/// Keyed by `(command, None)` for a command itself and `(command, Some(sub))` for a subcommand.
struct Allowed(BTreeMap<(&'static str, Option<&'static str>), bool>);

impl Allowed {
    fn evaluate<'r>(rules: impl IntoIterator<Item = &'r Rule>) -> Allowed {
        let table = commands();
        let mut state = BTreeMap::new();
        for (name, command) in table {
            state.insert((name.as_str(), None), false);
            for sub in command.subcommands.keys() {
                state.insert((name.as_str(), Some(sub.as_str())), false);
            }
        }
        for rule in rules {
            let Rule::Command { allow, target } = rule else { continue };
            for ((name, sub), value) in state.iter_mut() {
                let command = &table[*name];
                let applies = match target {
                    CommandTarget::All => true,
                    CommandTarget::Category(cat) => {
                        let cats = match sub {
                            None => &command.categories,
                            Some(s) => &command.subcommands[*s],
                        };
                        cats.iter().any(|c| c == cat)
                    }
                    CommandTarget::Command(c) => c == name,
                    CommandTarget::Subcommand(c, s) => c == name && Some(s.as_str()) == *sub,
                };
                if applies {
                    *value = *allow;
                }
            }
        }
        Allowed(state)
    }

    /// What an access string allows (with `extra` rules after its own): its command rules,
    /// less the whole-keyspace commands its key patterns do not cover.
    fn of_access(access: &AccessString, extra: impl IntoIterator<Item = Rule>) -> Allowed {
        let rules: Vec<Rule> = access.rules.iter().cloned().chain(extra).collect();
        let mut allowed = Allowed::evaluate(&rules);
        let mut take_back: Vec<(&str, Option<&str>)> = Vec::new();
        if !access.all_keys(true) {
            take_back.extend(WHOLE_KEYSPACE_READS.iter().map(|c| (*c, None)));
        }
        if !access.all_keys(false) {
            take_back.extend(WHOLE_KEYSPACE_WRITES.iter().map(|c| (*c, None)));
        }
        allowed.deny(&take_back);
        // Other connections: only for whoever may empty the whole database.
        if !allowed.get("flushdb", None) {
            let others: Vec<_> = OTHER_CONNECTIONS.iter().map(|s| ("client", Some(*s))).collect();
            allowed.deny(&others);
        }
        allowed
    }

    fn deny(&mut self, commands: &[(&str, Option<&str>)]) {
        for (key, value) in self.0.iter_mut() {
            if commands.iter().any(|(n, s)| *n == key.0 && *s == key.1) {
                *value = false;
            }
        }
    }

    fn get(&self, name: &str, sub: Option<&str>) -> bool {
        self.0.iter().any(|((n, s), v)| *n == name && *s == sub && *v)
    }

    /// Rules after `-@all` that allow exactly these commands.
    fn to_rules(&self) -> Vec<String> {
        let mut rules = vec!["-@all".to_string()];
        // A command installed after this was evaluated stays denied.
        let allowed = |key: (&str, Option<&str>)| self.0.get(&key).copied().unwrap_or(false);
        for (name, command) in commands() {
            let own = allowed((name.as_str(), None));
            if command.subcommands.is_empty() {
                if own {
                    rules.push(format!("+{name}"));
                }
                continue;
            }
            let subs: Vec<(&String, bool)> =
                command.subcommands.keys().map(|s| (s, allowed((name.as_str(), Some(s.as_str()))))).collect();
            if own && subs.iter().all(|(_, ok)| *ok) {
                rules.push(format!("+{name}"));
            } else if own && command.arity.abs() == 1 {
                // A container that also runs without a subcommand (`COMMAND`): `+container`
                // is the only way to allow that; take back the subcommands not allowed.
                rules.push(format!("+{name}"));
                rules.extend(subs.iter().filter(|(_, ok)| !ok).map(|(s, _)| format!("-{name}|{s}")));
            } else {
                // Named one by one, so a subcommand unknown to this table stays denied.
                rules.extend(subs.iter().filter(|(_, ok)| *ok).map(|(s, _)| format!("+{name}|{s}")));
            }
        }
        rules
    }
}

/// What the cache's own ACL user allows, read from its `ACL SETUSER` rules
/// (`shoal_engine::TenantAcl::setuser_rules`).
struct Tenant {
    rules: Vec<Rule>,
    /// `t<id>:` from `&t<id>:*`.
    channel_prefix: String,
    /// The `db=` list, in order: the client's database `i` is `dbs[i]`.
    dbs: Vec<u32>,
    /// Keyspace-notification channel patterns the cache may use (`__keyspace@4__:*`).
    keyspace_channels: Vec<String>,
}

impl Tenant {
    fn parse(tenant_rules: &[String]) -> Result<Tenant, AccessError> {
        let mut rules = Vec::new();
        let mut dbs = Vec::new();
        for word in tenant_rules {
            if let Some(list) = word.to_ascii_lowercase().strip_prefix("db=") {
                dbs = list
                    .split(',')
                    .map(|d| d.parse::<u32>().map_err(|_| AccessError::Tenant(format!("bad rule {word:?}"))))
                    .collect::<Result<_, _>>()?;
                continue;
            }
            match parse_rule(word, true) {
                Ok(Some(rule)) => rules.push(rule),
                Ok(None) => {}
                Err(reason) => return Err(AccessError::Tenant(format!("rule {word:?}: {reason}"))),
            }
        }
        if dbs.is_empty() {
            return Err(AccessError::Tenant("no db= rule: the cache's databases are unknown".into()));
        }
        let mut keys = Vec::new();
        let mut channels = Vec::new();
        for rule in &rules {
            match rule {
                Rule::Key(perm, p) => keys.push((*perm, p.clone())),
                Rule::ResetKeys => keys.clear(),
                Rule::Channel(p) => channels.push(p.clone()),
                Rule::ResetChannels => channels.clear(),
                _ => {}
            }
        }
        // The cache is fenced by its databases, not by key patterns; intersecting glob
        // patterns is not something this module attempts.
        if keys != [(KeyPerm::ReadWrite, "*".to_string())] {
            return Err(AccessError::Tenant(format!(
                "expected all keys (~*) within its databases, got {keys:?}"
            )));
        }
        let keyspace_channels: Vec<String> = channels
            .iter()
            .filter(|c| c.starts_with("__keyspace@") || c.starts_with("__keyevent@"))
            .cloned()
            .collect();
        let prefixes: Vec<&String> = channels.iter().filter(|c| !keyspace_channels.contains(c)).collect();
        let channel_prefix = match prefixes.as_slice() {
            [one] if one.ends_with(":*") && !one[..one.len() - 1].contains(['*', '?', '[', '\\']) => {
                one[..one.len() - 1].to_string()
            }
            _ => {
                return Err(AccessError::Tenant(format!(
                    "expected one channel namespace `&t<id>:*`, got {channels:?}"
                )))
            }
        };
        Ok(Tenant { rules, channel_prefix, dbs, keyspace_channels })
    }

    /// The upstream channel patterns for one of the access string's patterns, as the gateway
    /// maps names (`gateway/src/pubsub.rs`): `t<id>:<name>`, and a keyspace channel of the
    /// client's database `i` also as that of the cache's `i`-th database.
    fn channels_for(&self, pattern: &str) -> Vec<String> {
        let mut out = vec![format!("{}{pattern}", self.channel_prefix)];
        if pattern == "*" {
            out.extend(self.keyspace_channels.iter().cloned());
            return out;
        }
        for kind in ["__keyspace@", "__keyevent@"] {
            let Some(rest) = pattern.strip_prefix(kind) else { continue };
            let Some((db, tail)) = rest.split_once("__:") else { continue };
            let Ok(i) = db.parse::<usize>() else { continue };
            let Some(real) = self.dbs.get(i) else { continue };
            let upstream_all = format!("{kind}{real}__:*");
            if self.keyspace_channels.contains(&upstream_all) {
                out.push(format!("{kind}{real}__:{tail}"));
            }
        }
        out
    }
}

/// The `ACL SETUSER <name> …` rules for a cache user: what `access` allows within what the
/// cache's own ACL user (`tenant_rules`, as `TenantAcl::setuser_rules` makes them) allows.
///
/// Starts with `reset`, so the user has no password: the caller appends the upstream
/// password (`>…`) the gateway will log in with. The cache's database rules are kept as
/// they are; channel patterns get the cache's `t<id>:` prefix; commands are those both
/// sides allow, listed one by one after `-@all`, plus `AUTH`, `HELLO` and `SELECT`, which
/// the gateway needs to log in and pick the cache's database.
pub fn intersect_with_tenant(
    access: &AccessString,
    tenant_rules: &[String],
) -> Result<Vec<String>, AccessError> {
    let tenant = Tenant::parse(tenant_rules)?;
    let mut out = vec!["reset".to_string(), if access.enabled() { "on" } else { "off" }.to_string()];
    if access.rules.contains(&Rule::SanitizePayload) {
        out.push("sanitize-payload".into());
    }

    let mut keys: Vec<String> = Vec::new();
    let mut channels: Vec<String> = Vec::new();
    for rule in &access.rules {
        match rule {
            Rule::Key(perm, p) => keys.push(match perm {
                KeyPerm::ReadWrite => format!("~{p}"),
                KeyPerm::Read => format!("%R~{p}"),
                KeyPerm::Write => format!("%W~{p}"),
            }),
            Rule::ResetKeys => keys.clear(),
            Rule::Channel(p) => channels.extend(tenant.channels_for(p)),
            Rule::ResetChannels => channels.clear(),
            _ => {}
        }
    }
    out.push("resetkeys".into());
    out.extend(keys);
    out.push("resetchannels".into());
    channels.dedup();
    out.extend(channels.into_iter().map(|c| format!("&{c}")));

    let essentials = CONNECTION_ESSENTIALS
        .iter()
        .map(|c| Rule::Command { allow: true, target: CommandTarget::Command(c.to_string()) });
    let mine = Allowed::of_access(access, essentials);
    let cache = Allowed::evaluate(&tenant.rules);
    let both =
        Allowed(mine.0.iter().map(|(k, v)| (*k, *v && cache.0.get(k).copied().unwrap_or(false))).collect());
    out.extend(both.to_rules());

    out.push("resetdbs".into());
    out.push(format!("db={}", tenant.dbs.iter().map(u32::to_string).collect::<Vec<_>>().join(",")));
    Ok(out)
}

/// Whether `access` allows a command (and subcommand) at all, before the cache's rules: the
/// gateway's check of the commands it answers itself. Whole-keyspace commands
/// ([`WHOLE_KEYSPACE_READS`], [`WHOLE_KEYSPACE_WRITES`]) need all keys, as upstream.
pub fn allows_command(access: &AccessString, command: &str, subcommand: Option<&str>) -> bool {
    Allowed::of_access(access, []).get(&command.to_ascii_lowercase(), subcommand)
}

/// Whether the upstream ACL user made from `access` on a cache with `tenant_rules` may run a
/// command (and subcommand): both allow it (what [`intersect_with_tenant`] lists).
pub fn upstream_allows(
    access: &AccessString,
    tenant_rules: &[String],
    command: &str,
    subcommand: Option<&str>,
) -> Result<bool, AccessError> {
    let tenant = Tenant::parse(tenant_rules)?;
    let essentials = CONNECTION_ESSENTIALS
        .iter()
        .map(|c| Rule::Command { allow: true, target: CommandTarget::Command(c.to_string()) });
    let command = command.to_ascii_lowercase();
    Ok(Allowed::of_access(access, essentials).get(&command, subcommand)
        && Allowed::evaluate(&tenant.rules).get(&command, subcommand))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant_rules() -> Vec<String> {
        // The shape of shoal_engine::TenantAcl::setuser_rules for `tc000000000001`, dbs 4 and 5.
        "reset on >secret resetkeys ~* resetchannels &tc000000000001:* +@all -@admin -@dangerous \
         &__keyspace@4__:* &__keyevent@4__:* &__keyspace@5__:* &__keyevent@5__:* \
         +flushdb +keys +sort +sort_ro -function -fcall -script|flush -pubsub -client|no-evict resetdbs db=4,5"
            .split(' ')
            .map(str::to_string)
            .collect()
    }

    fn refused(s: &str) -> (usize, String, String) {
        match AccessString::parse(s) {
            Err(AccessError::Rule { index, rule, reason }) => (index, rule, reason),
            other => panic!("{s:?}: {other:?}"),
        }
    }

    #[test]
    fn good_access_strings_parse() {
        for s in [
            "on ~* +@all",
            "on ~app:* +@read",
            "ON %R~cache:* %W~queue:* %RW~x +get -@dangerous",
            "off allkeys allchannels allcommands",
            "on ~a* resetkeys ~b* &news.* resetchannels nocommands +client|id -client +config|get sanitize-payload",
            "  on\t~a:*  +GET ",
        ] {
            AccessString::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        }
        assert_eq!(AccessString::parse("  on\t~a:*  +GET ").unwrap().as_str(), "on ~a:* +GET");
    }

    #[test]
    fn bad_rules_are_pointed_at() {
        let (index, rule, reason) = refused("on ~app:* nopass +@read");
        assert_eq!((index, rule.as_str()), (3, "nopass"));
        assert!(reason.contains("password"));
        for (s, index, why) in [
            ("on >secret", 2, "passwords"),
            ("on <secret", 2, "passwords"),
            ("on #5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8", 2, "passwords"),
            ("on resetpass", 2, "passwords"),
            ("on ~* +@all db=3", 4, "databases"),
            ("on alldbs", 2, "databases"),
            ("reset on", 1, "starts from nothing"),
            ("on ~* +@nosuch", 3, "unknown category"),
            ("on ~* +frobnicate", 3, "unknown command"),
            ("on ~* +client|frob", 3, "unknown subcommand"),
            ("on ~* +get|x", 3, "no subcommands"),
            ("on ~", 2, "empty pattern"),
            ("on &", 2, "empty pattern"),
            ("on %X~a", 2, "R, W or RW"),
            ("on %Ra", 2, "%R~pattern"),
            ("on (~x +get)", 2, "selectors"),
            ("on skip-sanitize-payload", 2, "sanitized"),
            ("on whatever", 2, "unknown rule"),
        ] {
            let (i, _, reason) = refused(s);
            assert_eq!(i, index, "{s:?}: {reason}");
            assert!(reason.contains(why), "{s:?}: {reason}");
        }
        let msg = AccessString::parse("on ~* +@all db=3").unwrap_err().to_string();
        assert!(msg.contains("rule 4 `db=3`"), "{msg}");
        assert!(matches!(AccessString::parse("   "), Err(AccessError::Whole(_))));
        assert!(matches!(AccessString::parse(&"+get ".repeat(300)), Err(AccessError::Whole(_))));
    }

    #[test]
    fn on_and_off_last_one_wins() {
        assert!(AccessString::parse("on ~* +@all").unwrap().enabled());
        assert!(!AccessString::parse("~* +@all").unwrap().enabled());
        assert!(!AccessString::parse("on off").unwrap().enabled());
        assert!(AccessString::parse("off on").unwrap().enabled());
    }

    #[test]
    fn commands_evaluate_like_valkey() {
        let a = AccessString::parse("on +@read -@all +get +client -client|kill +config|get").unwrap();
        assert!(allows_command(&a, "get", None));
        assert!(!allows_command(&a, "mget", None));
        assert!(allows_command(&a, "client", Some("id")));
        assert!(!allows_command(&a, "client", Some("kill")));
        assert!(allows_command(&a, "config", Some("get")));
        assert!(!allows_command(&a, "config", Some("set")));
        let r = AccessString::parse("on +@read").unwrap();
        assert!(allows_command(&r, "GET", None) && !allows_command(&r, "set", None));
    }

    #[test]
    fn the_cache_s_fences_hold_whatever_the_access_string_says() {
        let all = AccessString::parse("on ~* &* +@all").unwrap();
        let rules = intersect_with_tenant(&all, &tenant_rules()).unwrap();
        assert_eq!(rules[..2], ["reset", "on"]);
        assert!(!rules.iter().any(|r| r.starts_with('>') || r == "nopass"), "no password: {rules:?}");
        assert_eq!(rules[rules.len() - 2..], ["resetdbs", "db=4,5"]);
        for channel in ["&tc000000000001:*", "&__keyspace@4__:*", "&__keyevent@5__:*"] {
            assert!(rules.contains(&channel.to_string()), "{channel} in {rules:?}");
        }
        assert!(!rules.contains(&"&*".to_string()));
        // Dangerous and admin commands stay out; the ones the cache gets back are in.
        for denied in ["+config", "+flushall", "+debug", "+function", "+fcall", "+pubsub", "+acl", "+@all"] {
            assert!(!rules.contains(&denied.to_string()), "{denied} in {rules:?}");
        }
        for allowed in ["+get", "+set", "+flushdb", "+keys", "+eval", "+publish"] {
            assert!(rules.contains(&allowed.to_string()), "{allowed} missing from {rules:?}");
        }
        // Containers the cache only partly allows are opened subcommand by subcommand.
        for allowed in ["+script|load", "+client|id", "+config|get"] {
            let present = rules.contains(&allowed.to_string());
            assert_eq!(present, allowed != "+config|get", "{allowed} in {rules:?}");
        }
        for denied in ["+script", "+script|flush", "+client", "+client|no-evict", "+client|kill"] {
            assert!(!rules.contains(&denied.to_string()), "{denied} in {rules:?}");
        }
    }

    #[test]
    fn channels_are_namespaced_and_keyspace_channels_mapped() {
        let a = AccessString::parse("on &news.* &__keyspace@1__:user:* &__keyevent@7__:*").unwrap();
        let rules = intersect_with_tenant(&a, &tenant_rules()).unwrap();
        let channels: Vec<&String> = rules.iter().filter(|r| r.starts_with('&')).collect();
        assert_eq!(
            channels,
            [
                "&tc000000000001:news.*",
                "&tc000000000001:__keyspace@1__:user:*",
                "&__keyspace@5__:user:*",
                // Database 7 is not the cache's: only the namespaced (inert) name.
                "&tc000000000001:__keyevent@7__:*",
            ]
        );
    }

    #[test]
    fn read_only_keys_and_commands_intersect() {
        let a = AccessString::parse("on %R~app:* +@read -@all +get +hget +eval").unwrap();
        let rules = intersect_with_tenant(&a, &tenant_rules()).unwrap();
        let cmds: Vec<&str> =
            rules.iter().filter(|r| r.starts_with(['+', '-'])).map(String::as_str).collect();
        assert_eq!(cmds, ["-@all", "+auth", "+eval", "+get", "+hello", "+hget", "+select"]);
        assert!(rules.contains(&"%R~app:*".to_string()));
    }

    #[test]
    fn unexpected_cache_rules_are_refused() {
        let a = AccessString::parse("on ~* +get").unwrap();
        let mut no_db = tenant_rules();
        no_db.retain(|r| !r.starts_with("db="));
        assert!(matches!(intersect_with_tenant(&a, &no_db), Err(AccessError::Tenant(_))));
        let mut keys = tenant_rules();
        keys.push("~only:*".into());
        assert!(matches!(intersect_with_tenant(&a, &keys), Err(AccessError::Tenant(_))));
    }
}
