//! Whole-keyspace commands kept inside the cache: FLUSHALL, MOVE and COPY between its databases.

use super::connection::real_db;
use super::Ctx;
use super::{wrong_args, OK};
use crate::session::OnReply;
use bytes::Bytes;

/// `FLUSHALL [ASYNC|SYNC]`: every database of the cache, and nothing else.
pub(super) async fn flushall(cx: &mut Ctx<'_>, argv: &[&[u8]]) {
    let t = cx.tenant();
    let (first, count, current) = (t.route.db, t.route.databases, t.route.db + t.db);
    crate::tracking::invalidate_all(&cx.shared().clients, &t.cache);
    let mode: Vec<&[u8]> = argv[1..].to_vec();
    if count == 1 {
        let mut cmd: Vec<&[u8]> = vec![b"FLUSHDB"];
        cmd.extend(mode);
        return cx.forward_command(&cmd, OnReply::Forward).await;
    }
    if cx.in_multi() {
        return cx.refuse("ERR FLUSHALL of a multi-database cache is not supported inside MULTI");
    }
    if !cx.ensure_upstream().await {
        return;
    }
    for db in first..first + count {
        cx.forward_helper(&[b"SELECT", db.to_string().as_bytes()]);
        let mut cmd: Vec<&[u8]> = vec![b"FLUSHDB"];
        cmd.extend(mode.iter().copied());
        cx.forward_helper(&cmd);
    }
    cx.forward_command(
        &[b"SELECT", current.to_string().as_bytes()],
        OnReply::Replace(Bytes::from_static(OK)),
    )
    .await;
}

pub(super) async fn move_key(cx: &mut Ctx<'_>, argv: &[&[u8]]) {
    if argv.len() != 3 {
        return wrong_args(cx, "move");
    }
    match real_db(cx, argv[2]) {
        Ok(real) => {
            cx.forward_command(&[b"MOVE", argv[1], real.to_string().as_bytes()], OnReply::Forward).await
        }
        Err(e) => cx.refuse(e),
    }
}

/// `COPY src dst [DB n] [REPLACE]` with `n` one of the cache's databases.
pub(super) async fn copy(cx: &mut Ctx<'_>, argv: &[&[u8]]) {
    if argv.len() < 3 {
        return wrong_args(cx, "copy");
    }
    let mut rebuilt: Vec<Vec<u8>> = argv.iter().map(|a| a.to_vec()).collect();
    let mut i = 3;
    while i < rebuilt.len() {
        if rebuilt[i].eq_ignore_ascii_case(b"DB") && i + 1 < rebuilt.len() {
            match real_db(cx, &rebuilt[i + 1]) {
                Ok(real) => rebuilt[i + 1] = real.to_string().into_bytes(),
                Err(e) => return cx.refuse(e),
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    let refs: Vec<&[u8]> = rebuilt.iter().map(Vec::as_slice).collect();
    cx.forward_command(&refs, OnReply::Forward).await;
}
