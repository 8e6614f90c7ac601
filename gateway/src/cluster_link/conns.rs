//! The link's connections to nodes: opened on first need (logged in, `SELECT`ed, the
//! session's connection state replayed), written in batches, read by a task each that
//! hands whole replies — or pieces of a big one — to the link.

use super::{Link, PIECE, UNAVAILABLE};
use crate::resp::reply::ReplyScanner;
use crate::GatewayError;
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Kind {
    Data,
    /// Holds subscriptions; `echo`: its confirmations go to the session (one connection's
    /// do; the copies of keyspace-notification patterns on other primaries are quiet).
    Subscriber {
        echo: bool,
    },
}

pub(super) struct Conn {
    pub(super) id: u64,
    pub(super) kind: Kind,
    pub(super) write: OwnedWriteHalf,
    pub(super) out: BytesMut,
    pub(super) inflight: VecDeque<Sent>,
    /// A reply arriving in pieces: passed on as it comes (`direct`), or gathered.
    pub(super) partial: Option<(bool, BytesMut)>,
    /// A subscription was sent on it: RESP2 messages may come.
    pub(super) subscribed: bool,
    pub(super) reader: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A request on a connection, waiting for its reply.
pub(super) struct Sent {
    /// The entry and part its reply fills; `None`: a reply nobody wants.
    pub(super) to: Option<(u64, usize)>,
    pub(super) request: Bytes,
    pub(super) redirects: u8,
    /// Queued in a transaction: a redirect cannot be followed.
    pub(super) in_tx: bool,
}

pub(super) enum Incoming {
    Reply {
        conn: u64,
        frame: Bytes,
        push: bool,
    },
    /// Part of a big reply; `end`: its last part.
    Piece {
        conn: u64,
        bytes: Bytes,
        end: bool,
    },
    Closed {
        conn: u64,
    },
}

pub(super) fn sent(seq: u64, part: usize, request: Bytes) -> Sent {
    Sent { to: Some((seq, part)), request, redirects: 0, in_tx: false }
}

pub(super) fn unwanted(request: Bytes, in_tx: bool) -> Sent {
    Sent { to: None, request, redirects: 0, in_tx }
}

impl Link {
    pub(super) async fn open_conn(&mut self, addr: &str, kind: Kind) -> Result<(), GatewayError> {
        let readonly = self.reader && kind == Kind::Data;
        let stream = crate::upstream::connect_to(addr, &self.user, &self.password, self.db, readonly).await?;
        let (read, write) = stream.into_split();
        let id = self.next_conn;
        self.next_conn += 1;
        let reader = tokio::spawn(read_replies(id, read, self.frames_tx.clone()));
        let mut conn = Conn {
            id,
            kind,
            write,
            out: BytesMut::new(),
            inflight: VecDeque::new(),
            partial: None,
            subscribed: false,
            reader,
        };
        for (_, bytes) in &self.setup {
            conn.out.extend_from_slice(bytes);
            conn.inflight.push_back(unwanted(bytes.clone(), false));
        }
        self.conns.insert((addr.to_string(), kind), conn);
        Ok(())
    }

    /// Queues a request on a connection (opened if needed); written at the next flush.
    pub(super) async fn send(&mut self, addr: &str, kind: Kind, sent: Sent) {
        let key = (addr.to_string(), kind);
        if !self.conns.contains_key(&key) {
            if let Err(e) = self.open_conn(addr, kind).await {
                tracing::warn!(error = %e, node = addr, "cluster node unavailable");
                self.map_stale = true;
                if let Some((seq, part)) = sent.to {
                    self.fill(seq, part, Bytes::from_static(UNAVAILABLE));
                }
                return;
            }
        }
        let conn = self.conns.get_mut(&key).expect("opened above");
        conn.out.extend_from_slice(&sent.request);
        conn.inflight.push_back(sent);
    }

    pub(super) async fn flush_conns(&mut self) {
        let mut broken = false;
        for conn in self.conns.values_mut() {
            if !conn.out.is_empty() {
                if conn.write.write_all(&conn.out).await.is_err() {
                    broken = true;
                }
                conn.out.clear();
            }
        }
        if broken {
            self.closed = true;
        }
    }

    /// A connection that owed nothing (a node drained and removed, an idle one restarted) is
    /// just dropped. One that owed replies or held subscriptions closes the link: the
    /// session turns what it owed into errors, as when a standalone node goes away.
    pub(super) fn conn_closed(&mut self, id: u64) {
        let Some(key) = self.conns.iter().find(|(_, c)| c.id == id).map(|(k, _)| k.clone()) else { return };
        let conn = &self.conns[&key];
        let owed = conn.inflight.iter().any(|s| s.to.is_some() || s.in_tx);
        if owed || conn.kind != Kind::Data || self.watched.as_ref().is_some_and(|w| w.1 == key.0) {
            self.closed = true;
        } else {
            self.conns.remove(&key);
            self.map_stale = true;
        }
    }
}

/// A connection's replies, whole, to the link.
pub(super) async fn read_replies(
    conn: u64,
    mut read: tokio::net::tcp::OwnedReadHalf,
    link: mpsc::Sender<Incoming>,
) {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut scanner = ReplyScanner::new();
    let mut in_piece = false;
    loop {
        loop {
            let incoming = match scanner.next(&buf) {
                Ok(Some(reply)) => {
                    let bytes = buf.split_to(reply.len).freeze();
                    match std::mem::take(&mut in_piece) {
                        true => Incoming::Piece { conn, bytes, end: true },
                        false => Incoming::Reply { conn, frame: bytes, push: reply.push },
                    }
                }
                Ok(None) if buf.len() >= PIECE => match scanner.take_partial(&buf) {
                    0 => break,
                    n => {
                        in_piece = true;
                        Incoming::Piece { conn, bytes: buf.split_to(n).freeze(), end: false }
                    }
                },
                Ok(None) => break,
                Err(_) => {
                    let _ = link.send(Incoming::Closed { conn }).await;
                    return;
                }
            };
            if link.send(incoming).await.is_err() {
                return;
            }
        }
        match read.read_buf(&mut buf).await {
            Ok(n) if n > 0 => {}
            _ => {
                let _ = link.send(Incoming::Closed { conn }).await;
                return;
            }
        }
    }
}
