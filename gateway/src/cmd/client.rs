//! CLIENT LIST, INFO, SETNAME/SETINFO and KILL over the cache's own connections; CLIENT
//! REPLY for the connection itself.

use super::Ctx;
use super::OK;
use crate::resp::value::Value;
use crate::session::{OnReply, ReplyMode};
use bytes::Bytes;
use std::sync::atomic::Ordering;

pub(super) fn list(cx: &mut Ctx<'_>) {
    let cache = cx.tenant().cache.clone();
    let lines: String = cx.shared().clients.list(&cache).iter().map(|e| e.list_line()).collect();
    cx.reply_value(&Value::bulk(lines));
}

/// `CLIENT INFO` from Valkey (so every counter is real), with the fields that describe the
/// gateway's side of the connection replaced by the client's.
pub(super) async fn info(cx: &mut Ctx<'_>) {
    let t = cx.tenant();
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
    cx.forward_command(&[b"CLIENT", b"INFO"], rewrite).await;
}

/// `CLIENT SETNAME` / `CLIENT SETINFO`: forwarded, and remembered for `CLIENT LIST`.
pub(super) async fn set(cx: &mut Ctx<'_>, name: &str, argv: &[&[u8]]) {
    let t = cx.tenant();
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
    if name == "client|setinfo" && argv.len() == 4 && lib(argv[2]) && label(argv[3]) && cx.uses_mux() {
        return cx.reply(Bytes::from_static(OK));
    }
    cx.forward_command(argv, OnReply::Forward).await;
}

/// `CLIENT KILL` for the cache's own connections only (others simply do not match).
pub(super) fn kill(cx: &mut Ctx<'_>, argv: &[&[u8]]) {
    let t = cx.tenant();
    let me = t.entry.key;
    let clients = cx.shared().clients.list(&t.cache);
    if argv.len() == 3 {
        // Old form: CLIENT KILL addr:port.
        let addr = String::from_utf8_lossy(argv[2]);
        return match clients.iter().find(|c| c.addr == addr) {
            Some(c) => {
                c.kill.notify_one();
                cx.reply(Bytes::from_static(OK))
            }
            None => cx.refuse("ERR No such client"),
        };
    }
    if argv.len() < 4 || !argv.len().is_multiple_of(2) {
        return cx.refuse("ERR syntax error");
    }
    let mut skip_me = true;
    let mut filters: Vec<(String, String)> = Vec::new();
    for pair in argv[2..].chunks(2) {
        let (k, v) =
            (String::from_utf8_lossy(pair[0]).to_lowercase(), String::from_utf8_lossy(pair[1]).to_string());
        match k.as_str() {
            "skipme" => skip_me = !v.eq_ignore_ascii_case("no"),
            "id" | "addr" | "laddr" | "user" | "maxage" | "type" => filters.push((k, v)),
            _ => return cx.refuse("ERR syntax error"),
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
    cx.reply_value(&Value::Int(killed));
}

/// `CLIENT REPLY ON|OFF|SKIP`: the client's own replies from now on (fire-and-forget
/// writes); the commands still run and are metered as if their replies were sent. OFF and
/// SKIP are not answered; SKIP while OFF changes nothing, as in Valkey.
pub(super) fn reply(cx: &mut Ctx<'_>, argv: &[&[u8]]) {
    if argv.len() != 3 {
        return super::wrong_args(cx, "client|reply");
    }
    let mode = argv[2].to_ascii_lowercase();
    match mode.as_slice() {
        b"on" => {
            cx.set_reply_mode(ReplyMode::On, false);
            cx.reply(Bytes::from_static(b"+OK\r\n"));
        }
        b"off" => cx.set_reply_mode(ReplyMode::Off, true),
        b"skip" if cx.reply_mode() == ReplyMode::Off => cx.set_reply_mode(ReplyMode::Off, true),
        b"skip" => cx.set_reply_mode(ReplyMode::SkipNext, true),
        _ => cx.refuse("ERR syntax error"),
    }
}
