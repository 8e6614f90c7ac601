//! Connection commands: AUTH, HELLO, RESET, SELECT (databases numbered from 0 per cache).
//! AUTH, HELLO and RESET run before login too, so they take the session itself.

use super::{wrong_args, Ctx, OK};
use crate::resp::value::Value;
use crate::session::{OnReply, Session};
use bytes::Bytes;
use std::sync::atomic::Ordering;

pub(super) const HELLO_NOAUTH: &str = "NOAUTH HELLO must be called with the client already authenticated, \
     otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client \
     and select the RESP protocol version at the same time";

pub(super) async fn auth(s: &mut Session, argv: &[&[u8]]) {
    let (user, password) = match argv.len() {
        2 => (None, argv[1]),
        3 => (Some(argv[1]), argv[2]),
        _ => return s.refuse("ERR wrong number of arguments for 'auth' command"),
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
pub(super) async fn authenticate_in_time(
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
pub(super) async fn hello(s: &mut Session, argv: &[&[u8]]) {
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

pub(super) async fn reset(s: &mut Session) {
    // Replies come back on first, as in Valkey: RESET itself is answered.
    s.reply_mode = crate::session::ReplyMode::On;
    s.muted = false;
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
    s.clear_pubsub();
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
pub(super) fn real_db(cx: &Ctx<'_>, index: &[u8]) -> Result<u32, &'static str> {
    let route = &cx.tenant().route;
    let n: u32 = std::str::from_utf8(index)
        .ok()
        .and_then(|x| x.parse().ok())
        .ok_or("ERR value is not an integer or out of range")?;
    if n < route.databases {
        Ok(route.db + n)
    } else {
        Err("ERR DB index is out of range")
    }
}

pub(super) async fn select(cx: &mut Ctx<'_>, argv: &[&[u8]]) {
    if argv.len() != 2 {
        return wrong_args(cx, "select");
    }
    match real_db(cx, argv[1]) {
        Ok(real) => {
            let t = cx.tenant_mut();
            t.db = real - t.route.db;
            t.entry.db.store(t.db, Ordering::Relaxed);
            cx.forward_command(&[b"SELECT", real.to_string().as_bytes()], OnReply::Forward).await;
        }
        Err(e) => cx.refuse(e),
    }
}
