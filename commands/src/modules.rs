//! Commands of Valkey modules (JSON, Bloom, Search …) in the command table. Their facts
//! (arity, flags, key positions, ACL categories) come from the nodes' own `COMMAND` reply,
//! installed once at start by the control plane and each gateway; what Shoal does with
//! them (treatment, ECPU weight, ACL category, a refusal's reason) from `data/modules.tsv`.
//! Once installed they are rows like the built-ins': routing, cluster slots, tracking,
//! metering, storage limits and access strings treat them alike.

use crate::{parse, CommandSpec, Treatment};
use rustc_hash::FxHashMap as HashMap;
use std::sync::{OnceLock, RwLock};

/// A module command as a node describes it in `COMMAND` (the facts of a table row).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModuleCommand {
    /// Lowercase (`json.set`).
    pub name: String,
    pub arity: i32,
    /// Valkey's flags (`write`, `readonly`, `denyoom`, `module` …).
    pub flags: Vec<String>,
    pub first_key: i32,
    pub last_key: i32,
    pub step: i32,
    /// The module's ACL categories, if it registered any (without `@`).
    pub acl_categories: Vec<String>,
}

/// A row of `data/modules.tsv`.
struct Policy {
    /// A command's name, or a prefix ending in `*`.
    pattern: String,
    treatment: &'static str,
    weight: u32,
    category: String,
    reason: Option<String>,
}

const POLICIES_TSV: &str = include_str!("../data/modules.tsv");

fn policies() -> &'static [Policy] {
    static POLICIES: OnceLock<Vec<Policy>> = OnceLock::new();
    POLICIES.get_or_init(|| parse_policies(POLICIES_TSV).expect("commands/data/modules.tsv is valid"))
}

fn parse_policies(tsv: &str) -> Result<Vec<Policy>, String> {
    let mut lines = tsv.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty());
    let header = lines.next().ok_or("no header row")?;
    if header.split('\t').collect::<Vec<_>>() != ["name", "treatment", "weight", "category", "reason"] {
        return Err(format!("unexpected header {header:?}"));
    }
    lines
        .map(|line| {
            let cells: Vec<&str> = line.split('\t').collect();
            let [pattern, treatment, weight, category, reason] = cells[..] else {
                return Err(format!("not 5 cells: {line:?}"));
            };
            Ok(Policy {
                pattern: pattern.to_string(),
                treatment: match treatment {
                    "pass" => "pass",
                    "deny" => "deny",
                    "dedicated" => "dedicated",
                    _ => return Err(format!("bad treatment: {line:?}")),
                },
                weight: weight.parse().map_err(|_| format!("bad weight: {line:?}"))?,
                category: category.to_string(),
                reason: (reason != "-").then(|| reason.to_string()),
            })
        })
        .collect()
}

/// The row that decides for `name`: an exact one, else the longest matching prefix.
fn policy_of(name: &str) -> Option<&'static Policy> {
    let all = policies();
    all.iter().find(|p| p.pattern == name).or_else(|| {
        all.iter()
            .filter(|p| p.pattern.strip_suffix('*').is_some_and(|prefix| name.starts_with(prefix)))
            .max_by_key(|p| p.pattern.len())
    })
}

/// The table row of a module command: its node's facts, Shoal's policy.
fn spec_of(c: &ModuleCommand, index: usize) -> Result<CommandSpec, &'static str> {
    let policy = policy_of(&c.name);
    let mut categories = c.acl_categories.clone();
    if let Some(p) = policy.filter(|p| !categories.contains(&p.category)) {
        categories.push(p.category.clone());
    }
    let list = |items: &[String]| if items.is_empty() { "-".to_string() } else { items.join(",") };
    let (flags, categories) = (list(&c.flags), list(&categories));
    let (arity, first, last, step) =
        (c.arity.to_string(), c.first_key.to_string(), c.last_key.to_string(), c.step.to_string());
    let weight = policy.map_or(1000, |p| p.weight).to_string();
    // `dedicated`: refused on shared nodes, run by dedicated caches.
    let (treatment, shoal) = match policy.map_or("pass", |p| p.treatment) {
        "dedicated" => ("deny", "dedicated"),
        t => (t, "-"),
    };
    let cells: [&str; 12] =
        [&c.name, &arity, &flags, &first, &last, &step, &categories, treatment, &weight, "0", "-", shoal];
    debug_assert_eq!(parse::COLUMNS.len(), cells.len());
    let mut spec = parse::row(|i| cells[i])?;
    spec.mux = parse::muxable(&spec);
    spec.index = index;
    spec.refusal_reason = policy.and_then(|p| p.reason.clone()).filter(|_| spec.treatment == Treatment::Deny);
    Ok(spec)
}

#[derive(Default)]
struct Installed {
    by_name: HashMap<Box<[u8]>, &'static CommandSpec>,
    rows: Vec<ModuleCommand>,
}

fn installed() -> &'static RwLock<Installed> {
    static INSTALLED: OnceLock<RwLock<Installed>> = OnceLock::new();
    INSTALLED.get_or_init(Default::default)
}

/// Adds module commands to the table (those it does not have yet; built-ins win); how many
/// were added. Their indices follow the built-ins', so per-command counters sized by
/// [`crate::CommandTable::len`] after this cover them.
pub fn install_module_commands(commands: &[ModuleCommand]) -> usize {
    let table = crate::table();
    let mut inst = installed().write().unwrap_or_else(|p| p.into_inner());
    let mut added = 0;
    for c in commands {
        let c = ModuleCommand { name: c.name.to_ascii_lowercase(), ..c.clone() };
        if table.builtin(c.name.as_bytes()).is_some() || inst.by_name.contains_key(c.name.as_bytes()) {
            continue;
        }
        let Ok(spec) = spec_of(&c, table.builtins() + inst.rows.len()) else { continue };
        // Leaked once per module command for the life of the process, as the built-ins are
        // (a few hundred rows at most).
        let spec: &'static CommandSpec = Box::leak(Box::new(spec));
        inst.by_name.insert(c.name.as_bytes().into(), spec);
        inst.rows.push(c);
        added += 1;
    }
    added
}

/// The module commands installed, as their nodes described them (what the control plane
/// hands its gateways).
pub fn module_commands() -> Vec<ModuleCommand> {
    installed().read().unwrap_or_else(|p| p.into_inner()).rows.clone()
}

/// A module command's row by its lowercase name.
pub(crate) fn find(name: &[u8]) -> Option<&'static CommandSpec> {
    installed().read().unwrap_or_else(|p| p.into_inner()).by_name.get(name).copied()
}

/// How many module commands are installed.
pub(crate) fn count() -> usize {
    installed().read().unwrap_or_else(|p| p.into_inner()).rows.len()
}

/// Every module command's row.
pub(crate) fn all() -> Vec<&'static CommandSpec> {
    installed().read().unwrap_or_else(|p| p.into_inner()).by_name.values().copied().collect()
}

/// A node's `COMMAND` reply entry (`[name, arity, flags, first, last, step, categories, …]`,
/// decoded) as a module command, if it is one (flag `module`).
pub fn from_command_entry(
    name: &str,
    arity: i64,
    flags: Vec<String>,
    keys: (i64, i64, i64),
    acl_categories: Vec<String>,
) -> Option<ModuleCommand> {
    if !flags.iter().any(|f| f == "module") {
        return None;
    }
    Some(ModuleCommand {
        name: name.to_ascii_lowercase(),
        arity: arity as i32,
        flags,
        first_key: keys.0 as i32,
        last_key: keys.1 as i32,
        step: keys.2 as i32,
        acl_categories: acl_categories.into_iter().map(|c| c.trim_start_matches('@').to_string()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_set() -> ModuleCommand {
        ModuleCommand {
            name: "JSON.SET".into(),
            arity: -1,
            flags: vec!["write".into(), "denyoom".into(), "module".into()],
            first_key: 1,
            last_key: 1,
            step: 1,
            acl_categories: vec![],
        }
    }

    #[test]
    fn policies_parse_and_the_longest_match_wins() {
        assert!(!policies().is_empty());
        assert_eq!(policy_of("json.set").unwrap().pattern, "json.set");
        assert_eq!(policy_of("json.del").unwrap().pattern, "json.*");
        assert_eq!(policy_of("ft.search").unwrap().treatment, "dedicated");
        assert_eq!(policy_of("ft.config").unwrap().treatment, "deny");
        assert!(policy_of("timeseries.add").is_none());
    }

    #[test]
    fn installed_module_commands_are_rows_like_the_builtins() {
        let ft = ModuleCommand {
            name: "FT.SEARCH".into(),
            flags: vec!["readonly".into(), "module".into()],
            ..json_set()
        };
        let get = ModuleCommand { name: "get".into(), ..json_set() };
        install_module_commands(&[json_set(), ft, get]);
        let t = crate::table();
        let spec = t.lookup(b"Json.Set", None).expect("installed");
        assert_eq!((spec.first_key, spec.last_key, spec.step), (1, 1, 1));
        assert!(spec.write && spec.refused_when_full && spec.in_category("json"));
        assert_eq!((spec.treatment, spec.weight), (Treatment::Pass, 4200));
        assert!(spec.index >= t.builtins() && spec.index < t.len());
        assert_eq!(spec.keys(&[b"JSON.SET", b"k", b"$", b"{}"]), vec![&b"k"[..]]);
        let ft = t.lookup(b"ft.search", None).unwrap();
        assert_eq!(ft.treatment, Treatment::Deny);
        assert!(ft.refusal_reason.as_deref().unwrap().contains("database 0"));
        assert!(!ft.refused_on(crate::Placement::Dedicated));
        // A built-in keeps its row.
        assert_eq!(t.lookup(b"get", None).unwrap().weight, 1000);
        assert!(module_commands().iter().all(|c| c.name != "get"));
        assert!(t.iter().any(|s| s.name == "json.set"));
    }
}
