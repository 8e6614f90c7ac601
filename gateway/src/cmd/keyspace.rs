//! Whole-keyspace commands kept inside the cache: FLUSHALL, MOVE and COPY between its databases.

use super::connection::real_db;
use super::{wrong_args, OK};
use crate::session::{OnReply, Session};
use bytes::Bytes;

/// `FLUSHALL [ASYNC|SYNC]`: every database of the cache, and nothing else.
pub(super) async fn flushall(s: &mut Session, argv: &[&[u8]]) {
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

pub(super) async fn move_key(s: &mut Session, argv: &[&[u8]]) {
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
pub(super) async fn copy(s: &mut Session, argv: &[&[u8]]) {
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
