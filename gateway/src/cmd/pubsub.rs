//! Pub/sub in the cache's channel namespace: (P|S)(UN)SUBSCRIBE, PUBLISH, PUBSUB.

use super::{wrong_args, Ctx};
use crate::pubsub::Namespace;
use crate::resp::value::Value;
use crate::session::OnReply;

/// `(P|S)(UN)SUBSCRIBE`: channel names go upstream in the cache's namespace. Patterns are
/// matched by the gateway (Valkey's channel ACL matches patterns literally): upstream holds
/// one catch-all pattern subscription per session, `t<id>:*`.
pub(super) async fn subscribe(cx: &mut Ctx<'_>, name: &str, argv: &[&[u8]]) {
    let ns = cx.ns();
    let unsubscribe = name.contains("unsubscribe");
    if argv.len() < 2 && !unsubscribe {
        return wrong_args(cx, name);
    }
    if name == "psubscribe" || name == "punsubscribe" {
        return patterns(cx, &ns, name == "psubscribe", &argv[1..]).await;
    }
    if !unsubscribe {
        if let Err(e) = cx.reserve_channels(argv.len() as i64 - 1) {
            return cx.refuse(&e);
        }
    }
    let names: Vec<Vec<u8>> = argv[1..].iter().map(|c| ns.to_upstream(c)).collect();
    let mut cmd: Vec<&[u8]> = vec![argv[0]];
    cmd.extend(names.iter().map(Vec::as_slice));
    let confirmations = if names.is_empty() { None } else { Some(names.len()) };
    cx.forward_subscription(&cmd, confirmations).await;
}

pub(super) async fn patterns(cx: &mut Ctx<'_>, ns: &Namespace, subscribe: bool, patterns: &[&[u8]]) {
    use crate::pubsub::{pattern_hash, Glob, MAX_PATTERNS, MAX_PATTERN_LEN};
    let kind: &'static [u8] = if subscribe { b"psubscribe" } else { b"punsubscribe" };
    if subscribe {
        if patterns.iter().any(|p| p.len() > MAX_PATTERN_LEN) {
            return cx.refuse(&format!("ERR pattern longer than {MAX_PATTERN_LEN} bytes"));
        }
        let held: rustc_hash::FxHashSet<&[u8]> = cx
            .pubsub()
            .patterns
            .iter()
            .map(|g| g.raw())
            .chain(cx.pubsub().direct_patterns.iter().map(Vec::as_slice))
            .collect();
        let added: rustc_hash::FxHashSet<&[u8]> =
            patterns.iter().copied().filter(|p| !held.contains(p)).collect();
        if held.len() + added.len() > MAX_PATTERNS {
            return cx.refuse(&format!(
                "ERR too many pattern subscriptions on one connection (max {MAX_PATTERNS})"
            ));
        }
    }
    let mut direct: Vec<Vec<u8>> = Vec::new();
    let targets: Vec<Vec<u8>> = if patterns.is_empty() {
        // PUNSUBSCRIBE with no arguments: every pattern.
        cx.pubsub()
            .patterns
            .iter()
            .map(|g| g.raw().to_vec())
            .chain(cx.pubsub().direct_patterns.iter().cloned())
            .collect()
    } else {
        patterns.iter().map(|p| p.to_vec()).collect()
    };
    let mut confirmations = Vec::new();
    for pattern in &targets {
        if ns.is_direct_pattern(pattern) {
            let list = &mut cx.pubsub_mut().direct_patterns;
            list.retain(|p| p != pattern);
            if subscribe {
                list.push(pattern.clone());
            }
            direct.push(ns.to_upstream(pattern));
            continue;
        }
        let hash = pattern_hash(pattern);
        let had = cx.pubsub().patterns.iter().position(|p| p.is(pattern, hash));
        match (had, subscribe) {
            (Some(i), false) => {
                cx.pubsub_mut().patterns.remove(i);
            }
            (None, true) => cx.pubsub_mut().patterns.push(std::sync::Arc::new(Glob::new(pattern))),
            _ => {}
        }
        let delta = match (subscribe, had.is_some()) {
            (true, false) => 1,
            (false, true) => -1,
            _ => 0,
        };
        confirmations.push((Some(pattern.clone()), delta));
    }
    if targets.is_empty() {
        confirmations.push((None, 0));
    }
    for (pattern, delta) in confirmations {
        cx.forward_command(&[b"PING"], OnReply::Confirm { kind, pattern, delta }).await;
    }
    if !direct.is_empty() {
        let mut cmd: Vec<&[u8]> = vec![kind];
        cmd.extend(direct.iter().map(Vec::as_slice));
        cx.forward_subscription(&cmd, Some(direct.len())).await;
    }
    cx.sync_patterns();
    let want_catch_all = !cx.pubsub().patterns.is_empty();
    if want_catch_all != cx.pubsub().catch_all {
        cx.pubsub_mut().catch_all = want_catch_all;
        let verb: &[u8] = if want_catch_all { b"PSUBSCRIBE" } else { b"PUNSUBSCRIBE" };
        cx.forward_subscription(&[verb, &ns.catch_all()], Some(1)).await;
    }
}

pub(super) async fn publish(cx: &mut Ctx<'_>, argv: &[&[u8]]) {
    if argv.len() != 3 {
        return wrong_args(cx, &String::from_utf8_lossy(argv[0]).to_lowercase());
    }
    let channel = cx.ns().to_upstream(argv[1]);
    if argv[0].eq_ignore_ascii_case(b"SPUBLISH") {
        return cx.forward_command(&[argv[0], &channel, argv[2]], OnReply::Forward).await;
    }
    let shared = cx.shared().clone();
    let cache = cx.tenant().cache.clone();
    let client_channel = argv[1].to_vec();
    let count = OnReply::Transform(Box::new(move |v, _| match v {
        Value::Int(n) => Value::Int(n + shared.clients.pattern_receivers_correction(&cache, &client_channel)),
        other => other,
    }));
    cx.forward_command(&[argv[0], &channel, argv[2]], count).await;
}

/// `PUBSUB CHANNELS|SHARDCHANNELS [pattern]`: the channels of each node that holds the
/// cache (a big node's listing reused a moment, see [`crate::observer`]) that the pattern,
/// in the cache's namespace, matches.
pub(super) async fn pubsub(cx: &mut Ctx<'_>, name: &str, argv: &[&[u8]]) {
    if !matches!(name, "pubsub|channels" | "pubsub|shardchannels") {
        return counts(cx, argv).await;
    }
    if argv.len() > 3 {
        return wrong_args(cx, name);
    }
    let ns = cx.ns();
    let route = cx.tenant().route.clone();
    let shard = name == "pubsub|shardchannels";
    let Ok(nodes) = cx.shared().observers.channels_each(&route, shard).await else {
        return cx.reply_error("ERR cache temporarily unavailable, try again");
    };
    let pattern = crate::pubsub::Glob::new(&ns.to_upstream(argv.get(2).copied().unwrap_or(b"*")));
    let mut budget = crate::pubsub::LISTING_BUDGET;
    // A channel subscribed on several nodes of a cluster is listed once.
    let mut listed = rustc_hash::FxHashSet::default();
    let mut items = Vec::new();
    for node in &nodes {
        let Some(matching) = node.matching(&pattern, &mut budget) else {
            return cx.reply_error("ERR pattern too costly to match against this cache's channels");
        };
        for channel in matching {
            if listed.insert(channel) {
                items.push(Value::Bulk(ns.from_upstream(channel)));
            }
        }
    }
    cx.reply_value(&Value::Array(items));
}

/// `PUBSUB NUMSUB|SHARDNUMSUB [channel …]`, asked of each node by the observer: each node
/// knows its own subscribers, so the counts of a channel are added up.
async fn counts(cx: &mut Ctx<'_>, argv: &[&[u8]]) {
    let ns = cx.ns();
    let route = cx.tenant().route.clone();
    let mut cmd: Vec<Vec<u8>> = vec![argv[0].to_vec(), argv[1].to_vec()];
    cmd.extend(argv[2..].iter().map(|c| ns.to_upstream(c)));
    let refs: Vec<&[u8]> = cmd.iter().map(Vec::as_slice).collect();
    let replies = cx.shared().observers.query_each(&route, &refs).await.unwrap_or_default();
    if replies.is_empty() {
        return cx.reply_error("ERR cache temporarily unavailable, try again");
    }
    let mut pairs: Vec<(Value, i64)> = Vec::new();
    let mut at: rustc_hash::FxHashMap<Vec<u8>, usize> = rustc_hash::FxHashMap::default();
    for reply in &replies {
        let Some((Value::Array(items), _)) = crate::resp::value::decode(reply) else {
            return cx.reply_error("ERR cache temporarily unavailable, try again");
        };
        let mut it = items.into_iter();
        while let (Some(Value::Bulk(channel)), Some(Value::Int(n))) = (it.next(), it.next()) {
            match at.get(&channel[..]) {
                Some(&i) => pairs[i].1 += n,
                None => {
                    at.insert(channel.to_vec(), pairs.len());
                    pairs.push((Value::Bulk(ns.from_upstream(&channel)), n));
                }
            }
        }
    }
    cx.reply_value(&Value::Map(pairs.into_iter().map(|(k, n)| (k, Value::Int(n))).collect()));
}
