//! Reading `data/commands.tsv`: columns by their header name, every cell checked.

use crate::{CommandSpec, CommandTable, Hits, ShoalFlags, Treatment};
use rustc_hash::FxHashMap as HashMap;

pub(crate) const COLUMNS: [&str; 12] = [
    "name",
    "arity",
    "flags",
    "first_key",
    "last_key",
    "step",
    "acl_categories",
    "treatment",
    "weight",
    "per_element",
    "hits",
    "shoal",
];

impl CommandTable {
    pub fn parse(tsv: &str) -> Result<CommandTable, String> {
        let mut lines = tsv.lines().enumerate().filter(|(_, l)| !l.starts_with('#') && !l.trim().is_empty());
        let (_, header) = lines.next().ok_or("no header row")?;
        let header: Vec<&str> = header.split('\t').collect();
        let mut at = [0usize; COLUMNS.len()];
        for (slot, column) in at.iter_mut().zip(COLUMNS) {
            *slot = header.iter().position(|h| *h == column).ok_or(format!("no column {column:?}"))?;
        }
        let mut by_name = HashMap::default();
        for (n, line) in lines {
            let cells: Vec<&str> = line.split('\t').collect();
            if cells.len() != header.len() {
                return Err(format!("line {}: {} cells, not {}", n + 1, cells.len(), header.len()));
            }
            let spec =
                row(|i| cells[at[i]]).map_err(|what| format!("line {}: bad {what}: {line:?}", n + 1))?;
            by_name.insert(spec.name.as_bytes().into(), spec);
        }
        derive(&mut by_name)?;
        Ok(CommandTable { by_name })
    }
}

/// One row; `cell(i)` is the cell of `COLUMNS[i]`.
pub(crate) fn row<'a>(cell: impl Fn(usize) -> &'a str) -> Result<CommandSpec, &'static str> {
    let list = |s: &str| if s == "-" { vec![] } else { s.split(',').map(str::to_string).collect() };
    let flags = list(cell(2));
    let has = |f: &str| flags.iter().any(|x| x == f);
    let (readonly, write, no_auth, denyoom) = (has("readonly"), has("write"), has("no_auth"), has("denyoom"));
    let blocking = has("blocking");
    let shoal = shoal_flags(cell(11)).ok_or("shoal")?;
    Ok(CommandSpec {
        name: cell(0).to_string(),
        arity: cell(1).parse().map_err(|_| "arity")?,
        first_key: cell(3).parse().map_err(|_| "first_key")?,
        last_key: cell(4).parse().map_err(|_| "last_key")?,
        step: cell(5).parse().map_err(|_| "step")?,
        acl_categories: list(cell(6)),
        treatment: match cell(7) {
            "pass" => Treatment::Pass,
            "deny" => Treatment::Deny,
            "virtual" => Treatment::Virtual,
            _ => return Err("treatment"),
        },
        weight: cell(8).parse().map_err(|_| "weight")?,
        per_element: cell(9).parse().map_err(|_| "per_element")?,
        hits: match cell(10) {
            "-" => Hits::None,
            "value" => Hits::Value,
            "elements" => Hits::Elements,
            _ => return Err("hits"),
        },
        refused_when_full: denyoom || shoal.may_write,
        shoal,
        flags,
        readonly,
        write,
        no_auth,
        blocking,
        mux: false,
        container: false,
        script: false,
        index: 0,
        refusal_reason: None,
    })
}

fn shoal_flags(cell: &str) -> Option<ShoalFlags> {
    let mut f = ShoalFlags::default();
    for flag in cell.split(',').filter(|f| *f != "-") {
        match flag {
            "barrier" => f.barrier = true,
            "transaction" => f.transaction = true,
            "may_write" => f.may_write = true,
            "acl_exempt" => f.acl_exempt = true,
            "mux" => f.mux = true,
            "no_mux" => f.no_mux = true,
            "node_deny" => f.node_deny = true,
            "node_allow" => f.node_allow = true,
            "multi_ok" => f.multi_ok = true,
            "dedicated" => f.dedicated = true,
            "repeats" => f.repeats = true,
            _ => return None,
        }
    }
    Some(f)
}

/// The facts that follow from the rows: containers, scripts, what may share a connection.
fn derive(by_name: &mut HashMap<Box<[u8]>, CommandSpec>) -> Result<(), String> {
    let containers: Vec<String> =
        by_name.values().filter_map(|s| s.name.split_once('|')).map(|(c, _)| c.to_string()).collect();
    for name in containers {
        match by_name.get_mut(name.as_bytes()) {
            Some(spec) => spec.container = true,
            None => return Err(format!("subcommands of {name}, which has no row")),
        }
    }
    let mut names: Vec<Box<[u8]>> = by_name.keys().cloned().collect();
    names.sort_unstable();
    for (index, name) in names.iter().enumerate() {
        if let Some(spec) = by_name.get_mut(name) {
            spec.index = index;
        }
    }
    for spec in by_name.values_mut() {
        spec.script = !spec.container && !spec.name.contains('|') && spec.in_category("scripting");
        spec.mux = muxable(spec);
    }
    Ok(())
}

/// Whether a forwarded command means the same on any connection of the cache: no blocking,
/// no transaction or pub/sub state, nothing about the connection itself (`CLIENT …`, `WAIT`,
/// `SELECT`, `HELLO` …). Scripts qualify: a script's `SELECT` does not outlive the script.
pub(crate) fn muxable(spec: &CommandSpec) -> bool {
    const BOUND: [&str; 4] = ["connection", "transaction", "blocking", "pubsub"];
    if spec.treatment != Treatment::Pass || spec.shoal.no_mux {
        return false;
    }
    spec.shoal.mux || (!spec.has_flag("blocking") && !BOUND.iter().any(|c| spec.in_category(c)))
}
