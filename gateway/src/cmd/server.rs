//! What the server tells about itself, about this cache only: INFO, COMMAND.

use super::Ctx;
use crate::resp::value::Value;
use crate::session::OnReply;

/// The sections of Shoal's `INFO`, in Valkey's order, and whether `INFO` without a section
/// (or `INFO default`) shows them, as Valkey does: `commandstats` only with `all`,
/// `everything` or by name. Valkey's other sections are left out (see `docs/info.md`).
const SECTIONS: [(&str, bool); 8] = [
    ("server", true),
    ("clients", true),
    ("memory", true),
    ("stats", true),
    ("cpu", true),
    ("commandstats", false),
    ("errorstats", true),
    ("keyspace", true),
];

/// Nanoseconds of CPU one ECPU stands for in `used_cpu_user`: a small GET, as the metering
/// calibration measured it on Valkey 9.1 (`usec_per_call` 0.564 in
/// `commands/data/calibration.tsv`; an ECPU is defined as one GET's work, see
/// `gateway/src/metering/ecpu.rs`).
pub(crate) const NANOS_PER_ECPU: u64 = 564;

/// The sections an `INFO` call asks for (arguments after `INFO`), as Valkey picks them:
/// none or `default` the default ones, `all` and `everything` every one, names (any case)
/// their section; unknown names add nothing.
pub(crate) fn sections(args: &[&[u8]]) -> Vec<&'static str> {
    let mut wanted = [false; SECTIONS.len()];
    let defaults = |wanted: &mut [bool; SECTIONS.len()]| {
        for (w, (_, default)) in wanted.iter_mut().zip(SECTIONS) {
            *w |= default;
        }
    };
    if args.is_empty() {
        defaults(&mut wanted);
    }
    for arg in args {
        let arg = String::from_utf8_lossy(arg).to_lowercase();
        match arg.as_str() {
            "default" => defaults(&mut wanted),
            "all" | "everything" => wanted = [true; SECTIONS.len()],
            name => {
                if let Some(i) = SECTIONS.iter().position(|(s, _)| *s == name) {
                    wanted[i] = true;
                }
            }
        }
    }
    SECTIONS.iter().zip(wanted).filter(|(_, w)| *w).map(|((s, _), _)| *s).collect()
}

/// Bytes as Valkey's `bytesToHuman` writes them (`used_memory_human`: 1024-based, two
/// decimals, `B` below 1 KiB).
pub(crate) fn bytes_to_human(n: u64) -> String {
    if n < 1 << 10 {
        return format!("{n}B");
    }
    let mut unit_size = 1u64 << 10;
    for unit in ["K", "M", "G", "T", "P"] {
        if n < unit_size << 10 {
            return format!("{:.2}{unit}", n as f64 / unit_size as f64);
        }
        unit_size <<= 10;
    }
    format!("{n}B")
}

/// Seconds as Valkey writes CPU times (`used_cpu_user:1.234567`).
fn cpu_seconds(nanos: u64) -> String {
    let micros = nanos / 1000;
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

/// `INFO [section …]`, about this cache only, in Valkey 9.1's sections and field formats:
/// server basics (the node's version and build, the gateway's port and uptime, no host
/// paths), this cache's clients, memory, stats, CPU, commandstats and errorstats on this
/// gateway, and the keyspace of its databases (renumbered from 0; empty for a key-limited
/// login). What differs from a plain Valkey, and why: `docs/info.md`.
pub(super) async fn info(cx: &mut Ctx<'_>, argv: &[&[u8]]) {
    // This session's own counters first: its commands show at once.
    cx.flush_stats();
    let sections = sections(&argv[1..]);
    let want = |section: &str| sections.contains(&section);
    let t = cx.tenant();
    let route = t.route.clone();
    let live = t.live.get();
    let cache = t.cache.clone();
    let stats = t.stats.clone();
    // Key counts only for a login that may count every key (`DBSIZE`): not a key-limited one.
    let sees_keyspace =
        t.access.as_ref().is_none_or(|a| shoal_auth::access::allows_command(a, "dbsize", None));
    let max_clients = crate::session::login::max_connections(&cx.shared().config, &live);
    // The node's INFO only for the sections that need it.
    let texts = |replies: Result<Vec<bytes::BytesMut>, crate::GatewayError>| -> Option<Vec<String>> {
        let texts: Option<Vec<String>> = replies
            .ok()?
            .iter()
            .map(|b| {
                let (v, _) = crate::resp::value::decode(b)?;
                Some(String::from_utf8_lossy(v.as_bytes()?).into_owned())
            })
            .collect();
        texts.filter(|t| !t.is_empty())
    };
    let mut node_info = String::new();
    if want("server") {
        let replies = cx.shared().observers.query(&route, &[b"INFO", b"server"]).await.map(|r| vec![r]);
        match texts(replies) {
            Some(mut got) => node_info = got.swap_remove(0),
            None => return cx.reply_error("ERR cache temporarily unavailable, try again"),
        }
    }
    let mut keyspaces = Vec::new();
    if want("keyspace") && sees_keyspace {
        match texts(cx.shared().observers.keyspace_each(&route).await) {
            Some(got) => keyspaces = got,
            None => return cx.reply_error("ERR cache temporarily unavailable, try again"),
        }
    }
    let field = |name: &str, or: &str| {
        let value = node_info.lines().find_map(|l| l.strip_prefix(&format!("{name}:"))).unwrap_or("").trim();
        if value.is_empty() { or } else { value }.to_string()
    };
    let mut out = String::new();
    if want("server") {
        let port = cx.shared().identity.port;
        let uptime = cx.shared().started.elapsed().as_secs();
        out.push_str(&format!(
            "# Server\r\nredis_version:{}\r\nserver_name:valkey\r\nvalkey_version:{}\r\n\
             valkey_release_stage:{}\r\nredis_git_sha1:{}\r\nredis_git_dirty:{}\r\nredis_build_id:{}\r\n\
             server_mode:standalone\r\nos:Shoal\r\narch_bits:64\r\ntcp_port:{port}\r\n\
             uptime_in_seconds:{uptime}\r\nuptime_in_days:{}\r\n\r\n",
            field("redis_version", ""),
            field("valkey_version", ""),
            field("valkey_release_stage", "ga"),
            field("redis_git_sha1", "00000000"),
            field("redis_git_dirty", "0"),
            field("redis_build_id", "0"),
            uptime / 86400
        ));
    }
    let counts = cx.shared().clients.counts(&cache);
    if want("clients") {
        out.push_str(&format!(
            "# Clients\r\nconnected_clients:{}\r\nmaxclients:{}\r\nblocked_clients:{}\r\n\r\n",
            counts.connected, max_clients, counts.blocked
        ));
    }
    if want("memory") {
        out.push_str(&memory_section(&live));
    }
    if want("stats") {
        out.push_str(&format!(
            "# Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\n\r\n",
            counts.connections_received, counts.commands
        ));
    }
    if want("cpu") {
        let nanos = stats.ecpu_milli().saturating_mul(NANOS_PER_ECPU) / 1000;
        out.push_str(&format!(
            "# CPU\r\nused_cpu_sys:0.000000\r\nused_cpu_user:{}\r\nused_cpu_sys_children:0.000000\r\n\
             used_cpu_user_children:0.000000\r\n\r\n",
            cpu_seconds(nanos)
        ));
    }
    if want("commandstats") {
        out.push_str("# Commandstats\r\n");
        for (name, c) in stats.commands() {
            let per_call = if c.calls == 0 { 0.0 } else { c.usec as f64 / c.calls as f64 };
            out.push_str(&format!(
                "cmdstat_{name}:calls={},usec={},usec_per_call={per_call:.2},rejected_calls={},failed_calls={}\r\n",
                c.calls, c.usec, c.rejected, c.failed
            ));
        }
        out.push_str("\r\n");
    }
    if want("errorstats") {
        out.push_str("# Errorstats\r\n");
        for (code, count) in stats.errors() {
            out.push_str(&format!("errorstat_{code}:count={count}\r\n"));
        }
        out.push_str("\r\n");
    }
    if want("keyspace") {
        out.push_str("# Keyspace\r\n");
        if sees_keyspace {
            for (db, line) in keyspace(&keyspaces, route.db..route.db + route.databases) {
                out.push_str(&format!("db{}:{line}\r\n", db - route.db));
            }
        }
        out.push_str("\r\n");
    }
    let out = match out.trim_end_matches("\r\n") {
        "" => String::new(),
        text => format!("{text}\r\n"),
    };
    cx.reply_value(&Value::bulk(out));
}

/// `INFO memory`: only what is true of a cache of its own — its stored bytes as the
/// control plane last measured them (the storage sample every route carries; what its
/// storage limit and bill count), its limit (`data_storage_mb` × 10^6; 0 = none, as
/// Valkey's `maxmemory`) and what happens at it (its eviction policy). Valkey's other
/// memory fields describe the node process (RSS, allocator, fragmentation, Lua, client
/// buffers …), which every cache on the node shares: none of them has a per-cache value.
fn memory_section(route: &shoal_types::TenantRoute) -> String {
    let used = route.storage_bytes;
    let (max, policy) = maxmemory(route);
    format!(
        "# Memory\r\nused_memory:{used}\r\nused_memory_human:{}\r\nmaxmemory:{max}\r\n\
         maxmemory_human:{}\r\nmaxmemory_policy:{policy}\r\n\r\n",
        bytes_to_human(used),
        bytes_to_human(max)
    )
}

/// The keyspace lines of `dbs` summed over nodes (a cluster's shards each hold part of a
/// database): keys, expires and keys with volatile hash fields added up, `avg_ttl` the
/// largest.
fn keyspace(infos: &[String], dbs: std::ops::Range<u32>) -> Vec<(u32, String)> {
    let mut sums: std::collections::BTreeMap<u32, [u64; 4]> = Default::default();
    for line in infos.iter().flat_map(|i| i.lines()) {
        let Some((db, rest)) = line.strip_prefix("db").and_then(|l| l.split_once(':')) else { continue };
        let Ok(db) = db.parse::<u32>() else { continue };
        if !dbs.contains(&db) {
            continue;
        }
        let sum = sums.entry(db).or_default();
        for field in rest.trim().split(',') {
            let Some((name, value)) = field.split_once('=') else { continue };
            let value: u64 = value.parse().unwrap_or(0);
            match name {
                "keys" => sum[0] += value,
                "expires" => sum[1] += value,
                "avg_ttl" => sum[2] = sum[2].max(value),
                "keys_with_volatile_items" => sum[3] += value,
                _ => {}
            }
        }
    }
    sums.into_iter()
        .filter(|(_, s)| s[0] > 0)
        .map(|(db, [keys, expires, ttl, volatile])| {
            (db, format!("keys={keys},expires={expires},avg_ttl={ttl},keys_with_volatile_items={volatile}"))
        })
        .collect()
}

/// `COMMAND …` without the commands a cache may not run.
pub(super) async fn command(cx: &mut Ctx<'_>, name: &str, argv: &[&[u8]]) {
    let table = shoal_commands::table();
    let forward: Vec<&[u8]> = argv.to_vec();
    match name {
        "command|count" => {
            let n = table.iter().filter(|c| !c.name.contains('|') && table.visible(&c.name)).count();
            cx.reply_value(&Value::Int(n as i64));
        }
        "command" | "command|info" => {
            let keep_nulls = name == "command|info";
            let filter = OnReply::Transform(Box::new(move |v, _| match v {
                Value::Array(items) => Value::Array(
                    items
                        .into_iter()
                        .map(|entry| match entry_name(&entry) {
                            Some(n) if table.visible(&n) => entry,
                            _ => Value::Null,
                        })
                        .filter(|e| keep_nulls || *e != Value::Null)
                        .collect(),
                ),
                other => other,
            }));
            cx.forward_command(&forward, filter).await;
        }
        "command|list" => {
            let filter = OnReply::Transform(Box::new(move |v, _| match v {
                Value::Array(items) => Value::Array(
                    items
                        .into_iter()
                        .filter(|n| {
                            n.as_bytes()
                                .is_some_and(|b| table.visible(&String::from_utf8_lossy(b).to_lowercase()))
                        })
                        .collect(),
                ),
                other => other,
            }));
            cx.forward_command(&forward, filter).await;
        }
        "command|docs" => {
            let filter = OnReply::Transform(Box::new(move |v, _| {
                let keep = |k: &Value| {
                    k.as_bytes().is_some_and(|b| table.visible(&String::from_utf8_lossy(b).to_lowercase()))
                };
                match v {
                    Value::Map(pairs) => Value::Map(pairs.into_iter().filter(|(k, _)| keep(k)).collect()),
                    Value::Array(items) => {
                        let mut out = Vec::new();
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            if keep(&k) {
                                out.push((k, v));
                            }
                        }
                        Value::Map(out)
                    }
                    other => other,
                }
            }));
            cx.forward_command(&forward, filter).await;
        }
        _ => cx.forward_command(&forward, OnReply::Forward).await,
    }
}

pub(super) fn entry_name(entry: &Value) -> Option<String> {
    match entry {
        Value::Array(fields) => fields.first()?.as_bytes().map(|b| String::from_utf8_lossy(b).to_lowercase()),
        _ => None,
    }
}

/// The cache's `maxmemory` (its `data_storage_mb` in bytes; 0 = none) and policy.
fn maxmemory(route: &shoal_types::TenantRoute) -> (u64, &str) {
    let max = route.limits.data_storage_mb.map_or(0, |mb| mb.saturating_mul(1_000_000));
    let policy = if route.eviction_policy.is_empty() { "noeviction" } else { &route.eviction_policy };
    (max, policy)
}

/// `CONFIG GET pattern …` for the settings a cache has of its own (`databases`,
/// `maxmemory`, `maxmemory-policy`, `notify-keyspace-events`): tools read them to size
/// themselves. The node's other settings are the platform's and match nothing, as an
/// unknown parameter matches nothing in Valkey.
pub(super) fn config_get(cx: &mut Ctx<'_>, argv: &[&[u8]]) {
    let route = &cx.tenant().route;
    let (max, policy) = maxmemory(route);
    let settings = [
        ("databases", route.databases.to_string()),
        ("maxmemory", max.to_string()),
        ("maxmemory-policy", policy.to_string()),
        ("notify-keyspace-events", route.keyspace_events.clone()),
    ];
    let patterns: Vec<Vec<u8>> = argv[2..].iter().map(|p| p.to_ascii_lowercase()).collect();
    let pairs = settings
        .into_iter()
        .filter(|(name, _)| patterns.iter().any(|p| crate::pubsub::glob_match(p, name.as_bytes())))
        .map(|(name, value)| (Value::bulk(name), Value::bulk(value)))
        .collect();
    cx.reply_value(&Value::Map(pairs));
}

/// `ROLE`: a cache is a primary of its own, without replicas the client could reach (the
/// reader endpoint is Shoal's way to replicas).
pub(super) fn role(cx: &mut Ctx<'_>) {
    cx.reply_value(&Value::Array(vec![Value::bulk("master"), Value::Int(0), Value::Array(vec![])]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_picked_as_valkey_picks_them() {
        let defaults = vec!["server", "clients", "memory", "stats", "cpu", "errorstats", "keyspace"];
        assert_eq!(sections(&[]), defaults);
        assert_eq!(sections(&[b"default"]), defaults);
        assert_eq!(sections(&[b"DEFAULT", b"commandstats"]).len(), 8);
        assert_eq!(sections(&[b"all"]).len(), 8);
        assert_eq!(sections(&[b"everything"]).len(), 8);
        assert_eq!(sections(&[b"CPU", b"memory"]), vec!["memory", "cpu"]);
        assert_eq!(sections(&[b"persistence"]), Vec::<&str>::new());
    }

    #[test]
    fn bytes_read_as_valkey_writes_them() {
        assert_eq!(bytes_to_human(0), "0B");
        assert_eq!(bytes_to_human(1023), "1023B");
        assert_eq!(bytes_to_human(1024), "1.00K");
        assert_eq!(bytes_to_human(1_200_984), "1.15M");
        assert_eq!(bytes_to_human(104_857_600), "100.00M");
        assert_eq!(bytes_to_human(100_000_000), "95.37M");
        assert_eq!(bytes_to_human(25_276_203_008), "23.54G");
        assert_eq!(bytes_to_human(1 << 50), "1.00P");
        assert_eq!(bytes_to_human(u64::MAX), format!("{}B", u64::MAX));
        assert_eq!(cpu_seconds(1_234_567_891), "1.234567");
        assert_eq!(cpu_seconds(0), "0.000000");
    }
}
