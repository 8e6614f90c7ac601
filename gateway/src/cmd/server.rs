//! What the server tells about itself, about this cache only: INFO, COMMAND.

use super::Ctx;
use crate::resp::value::Value;
use crate::session::OnReply;

/// `INFO [section …]`: server basics, this cache's clients and stats on this gateway, and
/// the keyspace of the cache's databases (renumbered from 0; empty for a key-limited login).
pub(super) async fn info(cx: &mut Ctx<'_>, argv: &[&[u8]]) {
    let t = cx.tenant();
    let wanted: Vec<String> = argv[1..].iter().map(|a| String::from_utf8_lossy(a).to_lowercase()).collect();
    let all =
        wanted.is_empty() || wanted.iter().any(|w| matches!(w.as_str(), "all" | "everything" | "default"));
    let want = |section: &str| all || wanted.iter().any(|w| w == section);
    let route = t.route.clone();
    let cache = t.cache.clone();
    // Key counts only for a login that may count every key (`DBSIZE`): not a key-limited one.
    let sees_keyspace =
        t.access.as_ref().is_none_or(|a| shoal_auth::access::allows_command(a, "dbsize", None));
    let max_clients = crate::session::login::max_connections(&cx.shared().config, &t.live.get());
    let replies = cx.shared().observers.query_each(&route, &[b"INFO", b"server", b"keyspace"]).await;
    let texts: Option<Vec<String>> = replies.ok().and_then(|replies| {
        replies
            .iter()
            .map(|b| {
                let (v, _) = crate::resp::value::decode(b)?;
                Some(String::from_utf8_lossy(v.as_bytes()?).into_owned())
            })
            .collect()
    });
    let Some(texts) = texts.filter(|t| !t.is_empty()) else {
        return cx.reply_error("ERR cache temporarily unavailable, try again");
    };
    let node_info = texts[0].clone();
    let field = |name: &str| {
        node_info.lines().find_map(|l| l.strip_prefix(&format!("{name}:"))).unwrap_or("").trim().to_string()
    };
    let mut out = String::new();
    if want("server") {
        let port = cx.shared().identity.port;
        let uptime = cx.shared().started.elapsed().as_secs();
        out.push_str(&format!(
            "# Server\r\nredis_version:{}\r\nserver_name:valkey\r\nvalkey_version:{}\r\nvalkey_release_stage:ga\r\n\
             redis_mode:standalone\r\nos:Shoal\r\narch_bits:64\r\ntcp_port:{port}\r\nuptime_in_seconds:{uptime}\r\n\
             uptime_in_days:{}\r\n\r\n",
            field("redis_version"),
            field("valkey_version"),
            uptime / 86400
        ));
    }
    let counts = cx.shared().clients.counts(&cache);
    if want("clients") {
        out.push_str(&format!(
            "# Clients\r\nconnected_clients:{}\r\nmaxclients:{}\r\nblocked_clients:0\r\n\r\n",
            counts.connected, max_clients
        ));
    }
    if want("stats") {
        out.push_str(&format!(
            "# Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\n\r\n",
            counts.connections_received, counts.commands
        ));
    }
    if want("keyspace") {
        out.push_str("# Keyspace\r\n");
        if sees_keyspace {
            for (db, line) in keyspace(&texts, route.db..route.db + route.databases) {
                out.push_str(&format!("db{}:{line}\r\n", db - route.db));
            }
        }
        out.push_str("\r\n");
    }
    cx.reply_value(&Value::bulk(out.trim_end_matches("\r\n").to_string() + "\r\n"));
}

/// The keyspace lines of `dbs` summed over nodes (a cluster's shards each hold part of a
/// database): keys and expires added up, `avg_ttl` the largest.
fn keyspace(infos: &[String], dbs: std::ops::Range<u32>) -> Vec<(u32, String)> {
    let mut sums: std::collections::BTreeMap<u32, [u64; 3]> = Default::default();
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
                _ => {}
            }
        }
    }
    sums.into_iter()
        .filter(|(_, s)| s[0] > 0)
        .map(|(db, [keys, expires, ttl])| (db, format!("keys={keys},expires={expires},avg_ttl={ttl}")))
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
