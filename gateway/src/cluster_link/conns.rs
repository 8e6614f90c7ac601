//! The link's connections to nodes: opened on first need (logged in, `SELECT`ed, the
//! session's connection state replayed), written in batches, read by a task each that
//! hands whole replies — or pieces of a big one — to the link.

use super::{Hold, Link, Request, PIECE, UNAVAILABLE};
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
    /// The (un)subscribe commands sent on it, in order, to send again on another node's
    /// connection if this one's node goes away ([`Link::resubscribe`]); `None` once there
    /// were more than [`MAX_SUBSCRIPTION_HISTORY`].
    pub(super) history: Option<Vec<Bytes>>,
    /// Replies still to come before confirmations reach the session again: those of the
    /// history sent again (the session had them already).
    pub(super) muted_replies: usize,
    /// A slot of the shard whose primary a subscriber connection is on: where its
    /// subscriptions go when that node stops being the primary.
    pub(super) shard_slot: Option<u16>,
    pub(super) reader: JoinHandle<()>,
}

/// Most (un)subscribe commands kept per connection to send again elsewhere; a session that
/// sent more loses its connection with the node, as before, rather than grow without bound.
pub(super) const MAX_SUBSCRIPTION_HISTORY: usize = 1_000;
/// How long subscriptions whose node went away wait for their shard's primary to answer
/// again (longer than a failover after Valkey's default 5 s node timeout).
pub(super) const RESUBSCRIBE_WITHIN: std::time::Duration = std::time::Duration::from_secs(15);

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
    /// The slot it was routed by: sent again to the slot's owner if its node turns out
    /// to have been removed from the cluster.
    pub(super) slot: Option<u16>,
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
    Sent { to: Some((seq, part)), request, redirects: 0, in_tx: false, slot: None }
}

pub(super) fn unwanted(request: Bytes, in_tx: bool) -> Sent {
    Sent { to: None, request, redirects: 0, in_tx, slot: None }
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
            history: Some(Vec::new()),
            muted_replies: 0,
            shard_slot: self
                .map
                .shards
                .iter()
                .position(|s| s.primary == addr)
                .and_then(|i| self.map.first_slot(i)),
            reader,
        };
        for (_, bytes) in &self.setup {
            conn.out.extend_from_slice(bytes);
            conn.inflight.push_back(unwanted(bytes.clone(), false));
        }
        self.conns.insert((addr.to_string(), kind), conn);
        Ok(())
    }

    /// Queues a request on a connection (opened if needed); written at the next flush. A
    /// node that cannot be reached may have been removed: the request goes to its slot's
    /// owner in a map read now, if that is another node.
    pub(super) async fn send(&mut self, addr: &str, kind: Kind, sent: Sent) {
        let mut key = (addr.to_string(), kind);
        if !self.conns.contains_key(&key) {
            if let Err(e) = self.open_conn(&key.0, kind).await {
                tracing::warn!(error = %e, node = addr, "cluster node unavailable");
                self.map_stale = true;
                let elsewhere = match sent.slot.filter(|_| !sent.in_tx) {
                    Some(slot) => self.reread_map().await.then(|| self.node_for(slot)).filter(|a| a != addr),
                    None => None,
                };
                let opened = match elsewhere {
                    Some(other) => {
                        key.0 = other;
                        self.conns.contains_key(&key) || self.open_conn(&key.0, kind).await.is_ok()
                    }
                    None => false,
                };
                if !opened {
                    if let Some((seq, part)) = sent.to {
                        self.fill(seq, part, Bytes::from_static(UNAVAILABLE));
                    }
                    return;
                }
            }
        }
        let conn = self.conns.get_mut(&key).expect("opened above");
        conn.out.extend_from_slice(&sent.request);
        conn.inflight.push_back(sent);
    }

    /// Reads the slot map now (not a shared young one); whether it could.
    pub(super) async fn reread_map(&mut self) -> bool {
        match self.seeds.reread().await {
            Ok(map) => {
                self.map = map;
                self.map_stale = false;
                true
            }
            Err(_) => false,
        }
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

    /// A subscriber connection whose node went away (a failover, a restart, a drain) moves to
    /// the node that serves its shard now: its (un)subscribe commands are sent there again,
    /// their confirmations kept from the session, which had them already, so the session's
    /// subscriptions carry on (messages published in between are lost, as pub/sub's are on
    /// any reconnection). Where that cannot be done within [`RESUBSCRIBE_WITHIN`], the link
    /// closes, as before.
    pub(super) async fn resubscribe(&mut self, key: (String, Kind)) {
        let old = self.conns.remove(&key).expect("a connection that closed");
        let history = old.history.clone().unwrap_or_default();
        let slot = old.shard_slot;
        drop(old);
        let Some(slot) = slot else {
            self.closed = true;
            return;
        };
        // The shard's primary may be gone for a while yet (a crashed one until its replica
        // is promoted, after the cluster's node timeout; one restarted in place until it is
        // back): the subscriptions wait for it, bounded.
        let deadline = std::time::Instant::now() + RESUBSCRIBE_WITHIN;
        let new_key = loop {
            if self.reread_map().await {
                let new_key = (self.map.primary(slot).to_string(), key.1);
                if self.conns.contains_key(&new_key) {
                    self.closed = true;
                    return;
                }
                if self.open_conn(&new_key.0, new_key.1).await.is_ok() {
                    break new_key;
                }
            }
            if std::time::Instant::now() > deadline {
                self.closed = true;
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        tracing::info!(from = %key.0, to = %new_key.0, "cluster node gone: subscriptions moved");
        self.seeds.invalidate();
        let conn = self.conns.get_mut(&new_key).expect("opened above");
        conn.subscribed = true;
        for request in &history {
            conn.out.extend_from_slice(request);
        }
        let ping = Request::built(&[b"PING"]);
        conn.out.extend_from_slice(&ping);
        conn.inflight.push_back(unwanted(ping, false));
        conn.muted_replies = conn.inflight.len();
        conn.history = Some(history);
        conn.shard_slot = Some(slot);
        if self.sub_home.as_ref() == Some(&key.0) {
            self.sub_home = Some(new_key.0.clone());
        }
        if self.hold == Hold::Confirming(key) {
            self.hold = Hold::Confirming(new_key);
        }
        self.map_stale = true;
    }

    /// A connection that owed nothing (a node drained and removed, an idle one restarted) is
    /// just dropped. So is one whose node owns no slot any more, as the cluster says now: it
    /// was drained before it was removed, or became a replica before it was restarted (a
    /// graceful failover), so no write it owed was run (a replica refuses them), and what it
    /// owed goes to the slots' owners now. Any other that owed replies or held subscriptions closes the
    /// link: the session turns what it owed into errors, as when a standalone node goes
    /// away (a primary that crashed may have run them).
    pub(super) async fn conn_closed(&mut self, id: u64) {
        let Some(key) = self.conns.iter().find(|(_, c)| c.id == id).map(|(k, _)| k.clone()) else { return };
        let conn = &self.conns[&key];
        let owed = conn.inflight.iter().any(|s| s.to.is_some() || s.in_tx);
        let watched = self.watched.as_ref().is_some_and(|w| w.1 == key.0);
        if conn.kind != Kind::Data && !owed && conn.history.is_some() {
            return self.resubscribe(key).await;
        }
        if conn.kind != Kind::Data || watched {
            self.closed = true;
            return;
        }
        let resendable = conn.partial.is_none()
            && conn.inflight.iter().all(|s| s.to.is_none() || (s.slot.is_some() && !s.in_tx));
        if owed && !(resendable && self.reread_map().await && !self.map.serves(&key.0)) {
            self.closed = true;
            return;
        }
        let mut conn = self.conns.remove(&key).expect("found above");
        // The node went away (restarted, failed over, removed): keyless requests, which no
        // MOVED corrects, must not go to it by a map read before.
        self.seeds.invalidate();
        self.map_stale = true;
        // Sent again before any later request is looked at, so they keep their order.
        for sent in std::mem::take(&mut conn.inflight).into_iter().filter(|s| s.to.is_some()) {
            let addr = self.node_for(sent.slot.expect("resendable"));
            self.send(&addr, Kind::Data, sent).await;
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
