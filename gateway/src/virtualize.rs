//! Virtualized commands: what the gateway answers or rewrites so that a cache behaves like a
//! whole Valkey of its own — its own databases numbered from 0, its own channels, its own
//! clients and stats, a one-node "cluster" at the gateway's address — without seeing
//! anything of other caches.

use crate::pubsub::Namespace;
use crate::resp::value::Value;
use crate::session::{OnReply, Session};
use bytes::Bytes;
use std::ops::Range;
use std::sync::atomic::Ordering;

const OK: &[u8] = b"+OK\r\n";
const HELLO_NOAUTH: &str = "NOAUTH HELLO must be called with the client already authenticated, \
     otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client \
     and select the RESP protocol version at the same time";

/// Runs virtualized command `name` (a table name such as `client|list`).
pub(crate) async fn run(s: &mut Session, name: &str, args: &[Range<usize>]) {
    let owned: Vec<Vec<u8>> = (0..args.len()).map(|i| s.arg(args, i).to_vec()).collect();
    let argv: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
    let local_answer = !matches!(
        name,
        "select"
            | "flushall"
            | "move"
            | "copy"
            | "publish"
            | "spublish"
            | "auth"
            | "quit"
            | "command"
            | "command|info"
            | "command|list"
            | "command|docs"
    );
    if s.in_multi && local_answer {
        let shown = name.replace('|', " ").to_uppercase();
        return s.refuse(&format!("ERR {shown} is not supported inside MULTI on Shoal caches"));
    }
    match name {
        "auth" => auth(s, &argv).await,
        "hello" => hello(s, &argv).await,
        "quit" => {
            s.reply(Bytes::from_static(OK));
            s.close_after_replies();
        }
        "reset" => reset(s).await,
        "script|kill" => script_kill(s).await,
        "select" => select(s, &argv).await,
        "flushall" => flushall(s, &argv).await,
        "move" => move_key(s, &argv).await,
        "copy" => copy(s, &argv).await,
        "info" => info(s, &argv).await,
        "readonly" | "readwrite" => s.reply(Bytes::from_static(OK)),
        "acl|whoami" => s.reply_value(&Value::bulk("default")),
        "client|list" => client_list(s),
        "client|info" => client_info(s).await,
        "client|id" => {
            let id = s.tenant.as_ref().expect("after AUTH").entry.id.load(Ordering::Relaxed);
            s.reply_value(&Value::Int(id))
        }
        "client|setname" | "client|setinfo" => client_set(s, name, &argv).await,
        "client|kill" => client_kill(s, &argv),
        "client|no-evict" => s.reply(Bytes::from_static(OK)),
        "client|tracking" => client_tracking(s, &argv).await,
        "client|caching" => client_caching(s, &argv),
        "client|getredir" => client_getredir(s),
        "client|trackinginfo" => client_trackinginfo(s),
        n if n.starts_with("cluster|") => cluster(s, n, &argv),
        n if n == "command" || n.starts_with("command|") => command(s, n, &argv).await,
        "subscribe" | "psubscribe" | "ssubscribe" | "unsubscribe" | "punsubscribe" | "sunsubscribe" => {
            subscribe(s, name, &argv).await
        }
        "publish" | "spublish" => publish(s, &argv).await,
        n if n.starts_with("pubsub|") => pubsub(s, n, &argv).await,
        _ => s.refuse(&format!("ERR unknown command '{name}'")),
    }
}

fn wrong_args(s: &mut Session, name: &str) {
    s.refuse(&format!("ERR wrong number of arguments for '{name}' command"));
}

fn ns(s: &Session) -> Namespace {
    s.tenant.as_ref().map(|t| t.ns.clone()).expect("virtualized commands run after AUTH")
}

async fn auth(s: &mut Session, argv: &[&[u8]]) {
    let (user, password) = match argv.len() {
        2 => (None, argv[1]),
        3 => (Some(argv[1]), argv[2]),
        _ => return wrong_args(s, "auth"),
    };
    match authenticate_in_time(s, user, password).await {
        Some(Ok(())) => s.reply(Bytes::from_static(OK)),
        Some(Err(e)) => s.reply_auth_error(e),
        None => {}
    }
}

/// Logs in, but not past the connection's `auth_timeout` (a login waiting on a throttle
/// delay, the control plane or the node holds an unauthenticated slot no longer than an idle
/// connection does): then the client gets `-ERR authentication timed out` and the connection
/// closes (None).
async fn authenticate_in_time(
    s: &mut Session,
    user: Option<&[u8]>,
    password: &[u8],
) -> Option<Result<(), crate::GatewayError>> {
    let Some(deadline) = s.auth_deadline() else { return Some(s.authenticate(user, password).await) };
    match tokio::time::timeout_at(deadline.into(), s.authenticate(user, password)).await {
        Ok(result) => Some(result),
        Err(_) => {
            tracing::debug!(peer = %s.peer, "authentication timed out while logging in");
            s.reply_error("ERR authentication timed out");
            s.close_after_replies();
            None
        }
    }
}

/// `HELLO [protover [AUTH user pass] [SETNAME name]]`: authenticates if asked, then lets the
/// upstream switch protocol so replies come in the version the client chose.
async fn hello(s: &mut Session, argv: &[&[u8]]) {
    let mut forward: Vec<&[u8]> = vec![b"HELLO"];
    let mut version = None;
    let mut i = 1;
    if let Some(v) = argv.get(1) {
        match *v {
            b"2" => version = Some(2),
            b"3" => version = Some(3),
            _ => return s.refuse("NOPROTO unsupported protocol version"),
        }
        forward.push(v);
        i = 2;
    }
    let mut credentials = None;
    let mut name = None;
    while i < argv.len() {
        if argv[i].eq_ignore_ascii_case(b"AUTH") && i + 2 < argv.len() {
            credentials = Some((argv[i + 1], argv[i + 2]));
            i += 3;
        } else if argv[i].eq_ignore_ascii_case(b"SETNAME") && i + 1 < argv.len() {
            forward.extend_from_slice(&[b"SETNAME", argv[i + 1]]);
            name = Some(argv[i + 1]);
            i += 2;
        } else {
            let opt = String::from_utf8_lossy(argv[i]).chars().take(64).collect::<String>();
            return s.refuse(&format!("ERR Syntax error in HELLO option '{opt}'"));
        }
    }
    if let Some((user, password)) = credentials {
        match authenticate_in_time(s, Some(user), password).await {
            Some(Ok(())) => {}
            Some(Err(e)) => return s.reply_auth_error(e),
            None => return,
        }
    }
    let Some(tenant) = s.tenant.as_ref() else { return s.reply_error(HELLO_NOAUTH) };
    if let Some(v) = version {
        s.proto = v;
        tenant.entry.proto.store(v, Ordering::Relaxed);
    }
    if let Some(n) = name {
        *tenant.entry.name.lock().unwrap() = n.to_vec();
    }
    // Valkey's answer, with the connection id the cache sees.
    let id = tenant.entry.id.load(Ordering::Relaxed);
    let with_own_id = OnReply::Transform(Box::new(move |v, _| match v {
        Value::Map(pairs) => Value::Map(
            pairs
                .into_iter()
                .map(|(k, v)| if k.as_bytes() == Some(b"id") { (k, Value::Int(id)) } else { (k, v) })
                .collect(),
        ),
        Value::Array(items) => {
            let mut items = items;
            if let Some(i) = items.iter().position(|k| k.as_bytes() == Some(b"id")) {
                if i + 1 < items.len() {
                    items[i + 1] = Value::Int(id);
                }
            }
            Value::Array(items)
        }
        other => other,
    }));
    s.forward_command(&forward, with_own_id).await;
}

/// `RESET`: a fresh upstream connection is the cleanest reset; the client stays
/// authenticated to its cache.
/// `SCRIPT KILL`: ends the cache's own running script, never another cache's. The gateway
/// knows which caches have scripts in flight on the node ([`crate::scripts`]); only when the
/// asking cache is the only one does it ask the node (as the observer user) to kill.
async fn script_kill(s: &mut Session) {
    let Some(t) = s.tenant.as_ref() else { return };
    let route = t.route.clone();
    match s.shared.scripts.owner(&route.node_addr, &t.cache) {
        crate::scripts::Owner::Nobody => s.reply_error("NOTBUSY No scripts in execution right now."),
        crate::scripts::Owner::Another => s.reply_error(
            "ERR the running script may be another cache's: the platform ends it at the script time limit",
        ),
        crate::scripts::Owner::Asker => match crate::observer::kill_script(&route).await {
            Ok(reply) => s.reply(reply.freeze()),
            Err(e) => {
                tracing::warn!(error = %e, "SCRIPT KILL on the node failed");
                s.reply_error("ERR the cache's node did not answer SCRIPT KILL, try again")
            }
        },
    }
}

async fn reset(s: &mut Session) {
    if s.has_pending_upstream() {
        // Let earlier replies arrive first: reset in place instead.
        if let Some(t) = s.tenant.as_ref() {
            let (user, password, db) = (t.route.acl_user.clone(), t.route.acl_password.clone(), t.route.db);
            s.forward_command(&[b"RESET"], OnReply::Replace(Bytes::from_static(b"+RESET\r\n"))).await;
            s.forward_helper(&[b"AUTH", user.as_bytes(), password.as_bytes()]);
            s.forward_helper(&[b"SELECT", db.to_string().as_bytes()]);
        }
    } else {
        s.drop_upstream();
        s.reply(Bytes::from_static(b"+RESET\r\n"));
    }
    s.proto = 2;
    s.in_multi = false;
    s.multi_dirty = false;
    s.pubsub = Default::default();
    s.sync_patterns();
    s.tracking = false;
    if let Some(t) = s.tenant.as_mut() {
        t.db = 0;
        *t.entry.tracking.lock().unwrap() = None;
        t.entry.db.store(0, Ordering::Relaxed);
        t.entry.proto.store(2, Ordering::Relaxed);
        t.entry.name.lock().unwrap().clear();
    }
}

/// Maps a client's database index to the node's; `None` if the cache has no such database.
fn real_db(s: &Session, index: &[u8]) -> Result<u32, &'static str> {
    let t = s.tenant.as_ref().expect("after AUTH");
    let n: u32 = std::str::from_utf8(index)
        .ok()
        .and_then(|x| x.parse().ok())
        .ok_or("ERR value is not an integer or out of range")?;
    if n < t.route.databases {
        Ok(t.route.db + n)
    } else {
        Err("ERR DB index is out of range")
    }
}

async fn select(s: &mut Session, argv: &[&[u8]]) {
    if argv.len() != 2 {
        return wrong_args(s, "select");
    }
    match real_db(s, argv[1]) {
        Ok(real) => {
            if let Some(t) = s.tenant.as_mut() {
                t.db = real - t.route.db;
                t.entry.db.store(t.db, Ordering::Relaxed);
            }
            s.forward_command(&[b"SELECT", real.to_string().as_bytes()], OnReply::Forward).await;
        }
        Err(e) => s.refuse(e),
    }
}

/// `FLUSHALL [ASYNC|SYNC]`: every database of the cache, and nothing else.
async fn flushall(s: &mut Session, argv: &[&[u8]]) {
    let t = s.tenant.as_ref().expect("after AUTH");
    let (first, count, current) = (t.route.db, t.route.databases, t.route.db + t.db);
    crate::tracking::invalidate_all(&s.shared.clients, &t.cache);
    let mode: Vec<&[u8]> = argv[1..].to_vec();
    if count == 1 {
        let mut cmd: Vec<&[u8]> = vec![b"FLUSHDB"];
        cmd.extend(mode);
        return s.forward_command(&cmd, OnReply::Forward).await;
    }
    if s.in_multi {
        return s.refuse("ERR FLUSHALL of a multi-database cache is not supported inside MULTI");
    }
    if !s.ensure_upstream().await {
        return;
    }
    for db in first..first + count {
        s.forward_helper(&[b"SELECT", db.to_string().as_bytes()]);
        let mut cmd: Vec<&[u8]> = vec![b"FLUSHDB"];
        cmd.extend(mode.iter().copied());
        s.forward_helper(&cmd);
    }
    s.forward_command(&[b"SELECT", current.to_string().as_bytes()], OnReply::Replace(Bytes::from_static(OK)))
        .await;
}

async fn move_key(s: &mut Session, argv: &[&[u8]]) {
    if argv.len() != 3 {
        return wrong_args(s, "move");
    }
    match real_db(s, argv[2]) {
        Ok(real) => {
            s.forward_command(&[b"MOVE", argv[1], real.to_string().as_bytes()], OnReply::Forward).await
        }
        Err(e) => s.refuse(e),
    }
}

/// `COPY src dst [DB n] [REPLACE]` with `n` one of the cache's databases.
async fn copy(s: &mut Session, argv: &[&[u8]]) {
    if argv.len() < 3 {
        return wrong_args(s, "copy");
    }
    let mut rebuilt: Vec<Vec<u8>> = argv.iter().map(|a| a.to_vec()).collect();
    let mut i = 3;
    while i < rebuilt.len() {
        if rebuilt[i].eq_ignore_ascii_case(b"DB") && i + 1 < rebuilt.len() {
            match real_db(s, &rebuilt[i + 1]) {
                Ok(real) => rebuilt[i + 1] = real.to_string().into_bytes(),
                Err(e) => return s.refuse(e),
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    let refs: Vec<&[u8]> = rebuilt.iter().map(Vec::as_slice).collect();
    s.forward_command(&refs, OnReply::Forward).await;
}

/// `INFO [section …]`: server basics, this cache's clients and stats on this gateway, and
/// the keyspace of the cache's databases (renumbered from 0; empty for a key-limited login).
async fn info(s: &mut Session, argv: &[&[u8]]) {
    let t = s.tenant.as_ref().expect("after AUTH");
    let wanted: Vec<String> = argv[1..].iter().map(|a| String::from_utf8_lossy(a).to_lowercase()).collect();
    let all =
        wanted.is_empty() || wanted.iter().any(|w| matches!(w.as_str(), "all" | "everything" | "default"));
    let want = |section: &str| all || wanted.iter().any(|w| w == section);
    let route = t.route.clone();
    let cache = t.cache.clone();
    // Key counts only for a login that may count every key (`DBSIZE`): not a key-limited one.
    let sees_keyspace =
        t.access.as_ref().is_none_or(|a| shoal_auth::access::allows_command(a, "dbsize", None));
    let max_clients = crate::auth::session::max_connections(&s.shared.config, &t.live.get());
    let node_info = s.shared.observers.query(&route, &[b"INFO", b"server", b"keyspace"]).await;
    let node_info = match node_info.ok().and_then(|b| crate::resp::value::decode(&b).map(|(v, _)| v)) {
        Some(v) => String::from_utf8_lossy(v.as_bytes().unwrap_or_default()).into_owned(),
        None => return s.reply_error("ERR cache temporarily unavailable, try again"),
    };
    let field = |name: &str| {
        node_info.lines().find_map(|l| l.strip_prefix(&format!("{name}:"))).unwrap_or("").trim().to_string()
    };
    let mut out = String::new();
    if want("server") {
        let port = s.shared.identity.port;
        let uptime = s.shared.started.elapsed().as_secs();
        out.push_str(&format!(
            "# Server\r\nredis_version:{}\r\nserver_name:valkey\r\nvalkey_version:{}\r\nvalkey_release_stage:ga\r\n\
             redis_mode:standalone\r\nos:Shoal\r\narch_bits:64\r\ntcp_port:{port}\r\nuptime_in_seconds:{uptime}\r\n\
             uptime_in_days:{}\r\n\r\n",
            field("redis_version"),
            field("valkey_version"),
            uptime / 86400
        ));
    }
    let counts = s.shared.clients.counts(&cache);
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
        for line in node_info.lines().filter(|_| sees_keyspace) {
            let Some((db, rest)) = line.strip_prefix("db").and_then(|l| l.split_once(':')) else { continue };
            let Ok(db) = db.parse::<u32>() else { continue };
            if (route.db..route.db + route.databases).contains(&db) {
                out.push_str(&format!("db{}:{}\r\n", db - route.db, rest.trim()));
            }
        }
        out.push_str("\r\n");
    }
    s.reply_value(&Value::bulk(out.trim_end_matches("\r\n").to_string() + "\r\n"));
}

fn client_list(s: &mut Session) {
    let cache = s.tenant.as_ref().expect("after AUTH").cache.clone();
    let lines: String = s.shared.clients.list(&cache).iter().map(|e| e.list_line()).collect();
    s.reply_value(&Value::bulk(lines));
}

/// `CLIENT INFO` from Valkey (so every counter is real), with the fields that describe the
/// gateway's side of the connection replaced by the client's.
async fn client_info(s: &mut Session) {
    let t = s.tenant.as_ref().expect("after AUTH");
    let (addr, laddr, db) = (t.entry.addr.clone(), t.entry.laddr.clone(), t.db);
    let id = t.entry.id.load(Ordering::Relaxed);
    let rewrite = OnReply::Transform(Box::new(move |v, _| {
        let text = match &v {
            Value::Bulk(b) => String::from_utf8_lossy(b).into_owned(),
            // RESP3 verbatim string: `=<len>\r\ntxt:<text>\r\n`.
            Value::Raw(raw) => {
                String::from_utf8_lossy(raw).split_once("txt:").map_or("", |x| x.1).trim_end().to_string()
                    + "\n"
            }
            _ => return v,
        };
        let fields: Vec<String> = text
            .trim_end()
            .split(' ')
            .map(|field| match field.split_once('=') {
                Some(("id", _)) => format!("id={id}"),
                Some(("addr", _)) => format!("addr={addr}"),
                Some(("laddr", _)) => format!("laddr={laddr}"),
                Some(("fd", _)) => "fd=-1".to_string(),
                Some(("db", _)) => format!("db={db}"),
                Some(("user", _)) => "user=default".to_string(),
                _ => field.to_string(),
            })
            .collect();
        Value::Bulk((fields.join(" ") + "\n").into_bytes())
    }));
    s.forward_command(&[b"CLIENT", b"INFO"], rewrite).await;
}

/// `CLIENT SETNAME` / `CLIENT SETINFO`: forwarded, and remembered for `CLIENT LIST`.
async fn client_set(s: &mut Session, name: &str, argv: &[&[u8]]) {
    let t = s.tenant.as_ref().expect("after AUTH");
    match (name, argv.len()) {
        ("client|setname", 3) => *t.entry.name.lock().unwrap() = argv[2].to_vec(),
        ("client|setinfo", 4) if argv[2].eq_ignore_ascii_case(b"LIB-NAME") => {
            t.entry.lib.lock().unwrap().0 = argv[3].to_vec()
        }
        ("client|setinfo", 4) if argv[2].eq_ignore_ascii_case(b"LIB-VER") => {
            t.entry.lib.lock().unwrap().1 = argv[3].to_vec()
        }
        _ => {}
    }
    // A library name or version only labels the connection: while the session is on the
    // mux, it is answered here and sent when the session gets its own connection (clients
    // send it on connect). Anything Valkey would refuse goes to Valkey for its error.
    let label = |v: &[u8]| v.iter().all(|c| (b'!'..=b'~').contains(c));
    let lib = |a: &[u8]| a.eq_ignore_ascii_case(b"LIB-NAME") || a.eq_ignore_ascii_case(b"LIB-VER");
    if name == "client|setinfo" && argv.len() == 4 && lib(argv[2]) && label(argv[3]) && s.uses_mux() {
        return s.reply(Bytes::from_static(OK));
    }
    s.forward_command(argv, OnReply::Forward).await;
}

/// `CLIENT KILL` for the cache's own connections only (others simply do not match).
fn client_kill(s: &mut Session, argv: &[&[u8]]) {
    let t = s.tenant.as_ref().expect("after AUTH");
    let me = t.entry.key;
    let clients = s.shared.clients.list(&t.cache);
    if argv.len() == 3 {
        // Old form: CLIENT KILL addr:port.
        let addr = String::from_utf8_lossy(argv[2]);
        return match clients.iter().find(|c| c.addr == addr) {
            Some(c) => {
                c.kill.notify_one();
                s.reply(Bytes::from_static(OK))
            }
            None => s.refuse("ERR No such client"),
        };
    }
    if argv.len() < 4 || !argv.len().is_multiple_of(2) {
        return s.refuse("ERR syntax error");
    }
    let mut skip_me = true;
    let mut filters: Vec<(String, String)> = Vec::new();
    for pair in argv[2..].chunks(2) {
        let (k, v) =
            (String::from_utf8_lossy(pair[0]).to_lowercase(), String::from_utf8_lossy(pair[1]).to_string());
        match k.as_str() {
            "skipme" => skip_me = !v.eq_ignore_ascii_case("no"),
            "id" | "addr" | "laddr" | "user" | "maxage" | "type" => filters.push((k, v)),
            _ => return s.refuse("ERR syntax error"),
        }
    }
    let mut killed = 0;
    for c in &clients {
        if skip_me && c.key == me {
            continue;
        }
        let matches = filters.iter().all(|(k, v)| match k.as_str() {
            "id" => c.id.load(Ordering::Relaxed).to_string() == *v,
            "addr" => c.addr == *v,
            "laddr" => c.laddr == *v,
            "user" => v == "default",
            "maxage" => v.parse::<u64>().is_ok_and(|age| c.created.elapsed().as_secs() >= age),
            "type" => v.eq_ignore_ascii_case("normal"),
            _ => false,
        });
        if matches {
            c.kill.notify_one();
            killed += 1;
        }
    }
    s.reply_value(&Value::Int(killed));
}

fn cluster(s: &mut Session, name: &str, argv: &[&[u8]]) {
    let id = &s.shared.identity;
    let v = match name {
        "cluster|slots" => id.slots(),
        "cluster|shards" => id.shards(),
        "cluster|nodes" => id.nodes(),
        "cluster|info" => id.info(),
        "cluster|myid" | "cluster|myshardid" => Value::bulk(&id.node_id),
        "cluster|keyslot" if argv.len() == 3 => Value::Int(crate::cluster::key_slot(argv[2]) as i64),
        "cluster|keyslot" => return wrong_args(s, "cluster|keyslot"),
        _ => return s.refuse("ERR unknown subcommand"),
    };
    s.reply_value(&v);
}

/// `COMMAND …` without the commands a cache may not run.
async fn command(s: &mut Session, name: &str, argv: &[&[u8]]) {
    let table = shoal_commands::table();
    let forward: Vec<&[u8]> = argv.to_vec();
    match name {
        "command|count" => {
            let n = table.iter().filter(|c| !c.name.contains('|') && table.visible(&c.name)).count();
            s.reply_value(&Value::Int(n as i64));
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
            s.forward_command(&forward, filter).await;
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
            s.forward_command(&forward, filter).await;
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
            s.forward_command(&forward, filter).await;
        }
        _ => s.forward_command(&forward, OnReply::Forward).await,
    }
}

fn entry_name(entry: &Value) -> Option<String> {
    match entry {
        Value::Array(fields) => fields.first()?.as_bytes().map(|b| String::from_utf8_lossy(b).to_lowercase()),
        _ => None,
    }
}

/// `(P|S)(UN)SUBSCRIBE`: channel names go upstream in the cache's namespace. Patterns are
/// matched by the gateway (Valkey's channel ACL matches patterns literally): upstream holds
/// one catch-all pattern subscription per session, `t<id>:*`.
async fn subscribe(s: &mut Session, name: &str, argv: &[&[u8]]) {
    let ns = ns(s);
    let unsubscribe = name.contains("unsubscribe");
    if argv.len() < 2 && !unsubscribe {
        return wrong_args(s, name);
    }
    if name == "psubscribe" || name == "punsubscribe" {
        return patterns(s, &ns, name == "psubscribe", &argv[1..]).await;
    }
    let names: Vec<Vec<u8>> = argv[1..].iter().map(|c| ns.to_upstream(c)).collect();
    let mut cmd: Vec<&[u8]> = vec![argv[0]];
    cmd.extend(names.iter().map(Vec::as_slice));
    let confirmations = if names.is_empty() { None } else { Some(names.len()) };
    s.forward_subscription(&cmd, confirmations).await;
}

async fn patterns(s: &mut Session, ns: &Namespace, subscribe: bool, patterns: &[&[u8]]) {
    use crate::pubsub::{pattern_hash, Glob, MAX_PATTERNS, MAX_PATTERN_LEN};
    let kind: &'static [u8] = if subscribe { b"psubscribe" } else { b"punsubscribe" };
    if subscribe {
        if patterns.iter().any(|p| p.len() > MAX_PATTERN_LEN) {
            return s.refuse(&format!("ERR pattern longer than {MAX_PATTERN_LEN} bytes"));
        }
        let held: rustc_hash::FxHashSet<&[u8]> = s
            .pubsub
            .patterns
            .iter()
            .map(|g| g.raw())
            .chain(s.pubsub.direct_patterns.iter().map(Vec::as_slice))
            .collect();
        let added: rustc_hash::FxHashSet<&[u8]> =
            patterns.iter().copied().filter(|p| !held.contains(p)).collect();
        if held.len() + added.len() > MAX_PATTERNS {
            return s.refuse(&format!(
                "ERR too many pattern subscriptions on one connection (max {MAX_PATTERNS})"
            ));
        }
    }
    let mut direct: Vec<Vec<u8>> = Vec::new();
    let targets: Vec<Vec<u8>> = if patterns.is_empty() {
        // PUNSUBSCRIBE with no arguments: every pattern.
        s.pubsub
            .patterns
            .iter()
            .map(|g| g.raw().to_vec())
            .chain(s.pubsub.direct_patterns.iter().cloned())
            .collect()
    } else {
        patterns.iter().map(|p| p.to_vec()).collect()
    };
    let mut confirmations = Vec::new();
    for pattern in &targets {
        if ns.is_direct_pattern(pattern) {
            let list = &mut s.pubsub.direct_patterns;
            list.retain(|p| p != pattern);
            if subscribe {
                list.push(pattern.clone());
            }
            direct.push(ns.to_upstream(pattern));
            continue;
        }
        let hash = pattern_hash(pattern);
        let had = s.pubsub.patterns.iter().position(|p| p.is(pattern, hash));
        match (had, subscribe) {
            (Some(i), false) => {
                s.pubsub.patterns.remove(i);
            }
            (None, true) => s.pubsub.patterns.push(std::sync::Arc::new(Glob::new(pattern))),
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
        s.forward_command(&[b"PING"], OnReply::Confirm { kind, pattern, delta }).await;
    }
    if !direct.is_empty() {
        let mut cmd: Vec<&[u8]> = vec![kind];
        cmd.extend(direct.iter().map(Vec::as_slice));
        s.forward_subscription(&cmd, Some(direct.len())).await;
    }
    s.sync_patterns();
    let want_catch_all = !s.pubsub.patterns.is_empty();
    if want_catch_all != s.pubsub.catch_all {
        s.pubsub.catch_all = want_catch_all;
        let verb: &[u8] = if want_catch_all { b"PSUBSCRIBE" } else { b"PUNSUBSCRIBE" };
        s.forward_subscription(&[verb, &ns.catch_all()], Some(1)).await;
    }
}

async fn publish(s: &mut Session, argv: &[&[u8]]) {
    if argv.len() != 3 {
        return wrong_args(s, &String::from_utf8_lossy(argv[0]).to_lowercase());
    }
    let channel = ns(s).to_upstream(argv[1]);
    if argv[0].eq_ignore_ascii_case(b"SPUBLISH") {
        return s.forward_command(&[argv[0], &channel, argv[2]], OnReply::Forward).await;
    }
    let shared = s.shared.clone();
    let cache = s.tenant.as_ref().expect("after AUTH").cache.clone();
    let client_channel = argv[1].to_vec();
    let count = OnReply::Transform(Box::new(move |v, _| match v {
        Value::Int(n) => Value::Int(n + shared.clients.pattern_receivers_correction(&cache, &client_channel)),
        other => other,
    }));
    s.forward_command(&[argv[0], &channel, argv[2]], count).await;
}

/// `PUBSUB CHANNELS|SHARDCHANNELS [pattern]`, `PUBSUB NUMSUB|SHARDNUMSUB [channel …]`,
/// asked of the node by the observer and filtered to this cache's namespace.
async fn pubsub(s: &mut Session, name: &str, argv: &[&[u8]]) {
    let ns = ns(s);
    let route = s.tenant.as_ref().expect("after AUTH").route.clone();
    let mut cmd: Vec<Vec<u8>> = vec![argv[0].to_vec(), argv[1].to_vec()];
    let listing = matches!(name, "pubsub|channels" | "pubsub|shardchannels");
    if listing {
        if argv.len() > 3 {
            return wrong_args(s, name);
        }
        cmd.push(ns.to_upstream(argv.get(2).copied().unwrap_or(b"*")));
    } else {
        cmd.extend(argv[2..].iter().map(|c| ns.to_upstream(c)));
    }
    let refs: Vec<&[u8]> = cmd.iter().map(Vec::as_slice).collect();
    let reply = s.shared.observers.query(&route, &refs).await;
    let Some((Value::Array(items), _)) = reply.ok().and_then(|b| crate::resp::value::decode(&b)) else {
        return s.reply_error("ERR cache temporarily unavailable, try again");
    };
    let strip = |v: Value| match v {
        Value::Bulk(b) => Value::Bulk(ns.from_upstream(&b)),
        other => other,
    };
    if listing {
        s.reply_value(&Value::Array(items.into_iter().map(strip).collect()));
    } else {
        let mut pairs = Vec::new();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            pairs.push((strip(k), v));
        }
        s.reply_value(&Value::Map(pairs));
    }
}

/// `CLIENT TRACKING ON|OFF [REDIRECT id] [PREFIX p …] [BCAST] [OPTIN] [OPTOUT] [NOLOOP]`.
async fn client_tracking(s: &mut Session, argv: &[&[u8]]) {
    if argv.len() < 3 {
        return wrong_args(s, "client|tracking");
    }
    let on = if argv[2].eq_ignore_ascii_case(b"ON") {
        true
    } else if argv[2].eq_ignore_ascii_case(b"OFF") {
        false
    } else {
        return s.refuse("ERR syntax error");
    };
    let t = s.tenant.as_ref().expect("after AUTH");
    if !on {
        *t.entry.tracking.lock().unwrap() = None;
        s.tracking = false;
        return s.reply(Bytes::from_static(OK));
    }
    let mut tracking = crate::clients::Tracking::default();
    let mut i = 3;
    while i < argv.len() {
        let opt = argv[i].to_ascii_uppercase();
        match opt.as_slice() {
            b"BCAST" => tracking.bcast = true,
            b"OPTIN" => tracking.optin = true,
            b"OPTOUT" => tracking.optout = true,
            b"NOLOOP" => tracking.noloop = true,
            b"PREFIX" if i + 1 < argv.len() => {
                tracking.prefixes.push(argv[i + 1].to_vec());
                i += 1;
            }
            b"REDIRECT" if i + 1 < argv.len() => {
                let id: Option<i64> = std::str::from_utf8(argv[i + 1]).ok().and_then(|v| v.parse().ok());
                let target = id.and_then(|id| {
                    s.shared.clients.list(&t.cache).into_iter().find(|c| c.id.load(Ordering::Relaxed) == id)
                });
                match target {
                    Some(c) if c.key != t.entry.key => tracking.redirect = Some(c.key),
                    Some(_) => {}
                    None => return s.refuse("ERR The client ID you want redirect to does not exist"),
                }
                i += 1;
            }
            _ => return s.refuse("ERR syntax error"),
        }
        i += 1;
    }
    if !tracking.prefixes.is_empty() && !tracking.bcast {
        return s.refuse("ERR PREFIX option requires BCAST mode to be enabled");
    }
    if tracking.optin && tracking.optout {
        return s.refuse("ERR You can't use both OPTIN and OPTOUT");
    }
    if tracking.bcast && (tracking.optin || tracking.optout) {
        return s.refuse("ERR OPTIN and OPTOUT are not compatible with BCAST");
    }
    let route = t.route.clone();
    let shared = s.shared.clone();
    if let Err(e) = shared.tracker.watch(&shared, &route).await {
        tracing::warn!(error = %e, "client tracking unavailable");
        return s.reply_error("ERR client tracking is unavailable right now, try again");
    }
    let t = s.tenant.as_ref().expect("after AUTH");
    *t.entry.tracking.lock().unwrap() = Some(tracking);
    s.tracking = true;
    s.reply(Bytes::from_static(OK));
}

/// `CLIENT CACHING YES|NO`: whether the next command's keys are tracked (OPTIN/OPTOUT).
fn client_caching(s: &mut Session, argv: &[&[u8]]) {
    if argv.len() != 3 {
        return wrong_args(s, "client|caching");
    }
    let t = s.tenant.as_ref().expect("after AUTH");
    let mut tracking = t.entry.tracking.lock().unwrap();
    let answer = match tracking.as_mut() {
        Some(tr) if tr.optin || tr.optout => {
            if argv[2].eq_ignore_ascii_case(b"YES") && tr.optin {
                tr.caching = Some(true);
                Ok(())
            } else if argv[2].eq_ignore_ascii_case(b"NO") && tr.optout {
                tr.caching = Some(false);
                Ok(())
            } else if argv[2].eq_ignore_ascii_case(b"YES") || argv[2].eq_ignore_ascii_case(b"NO") {
                Err("ERR CLIENT CACHING YES is only valid when tracking is enabled in OPTIN mode.")
            } else {
                Err("ERR syntax error")
            }
        }
        _ => Err("ERR CLIENT CACHING can be called only when the client is in tracking mode with OPTIN or OPTOUT mode enabled"),
    };
    drop(tracking);
    match answer {
        Ok(()) => s.reply(Bytes::from_static(OK)),
        Err(e) => s.refuse(e),
    }
}

fn client_getredir(s: &mut Session) {
    let t = s.tenant.as_ref().expect("after AUTH");
    let redirect = t.entry.tracking.lock().unwrap().as_ref().map(|tr| tr.redirect);
    let id = match redirect {
        None => -1,
        Some(None) => 0,
        Some(Some(key)) => s
            .shared
            .clients
            .list(&t.cache)
            .iter()
            .find(|c| c.key == key)
            .map_or(-1, |c| c.id.load(Ordering::Relaxed)),
    };
    s.reply_value(&Value::Int(id));
}

fn client_trackinginfo(s: &mut Session) {
    let t = s.tenant.as_ref().expect("after AUTH");
    let tracking = t.entry.tracking.lock().unwrap();
    let (flags, prefixes) = match tracking.as_ref() {
        None => (vec![Value::bulk("off")], vec![]),
        Some(tr) => {
            let mut flags = vec![Value::bulk("on")];
            for (set, name) in
                [(tr.bcast, "bcast"), (tr.optin, "optin"), (tr.optout, "optout"), (tr.noloop, "noloop")]
            {
                if set {
                    flags.push(Value::bulk(name));
                }
            }
            (flags, tr.prefixes.iter().map(Value::bulk).collect())
        }
    };
    let redirect = tracking.as_ref().map_or(-1, |tr| if tr.redirect.is_some() { 1 } else { 0 });
    drop(tracking);
    s.reply_value(&Value::Map(vec![
        (Value::bulk("flags"), Value::Set(flags)),
        (Value::bulk("redirect"), Value::Int(redirect)),
        (Value::bulk("prefixes"), Value::Array(prefixes)),
    ]));
}
