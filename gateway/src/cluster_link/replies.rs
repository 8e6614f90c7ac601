//! Replies back in request order: each request owes the session one [`Entry`], filled by
//! one reply or merged from several; redirects are followed here.

use super::conns::unwanted;
use super::conns::{Incoming, Kind, Sent};
use super::merge;
use super::plan::Merge;
use super::pubsub::{is_message, is_pubsub_message};
use super::{Hold, Link, Request, MAX_REDIRECTS, REBALANCING};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;

/// One reply owed to the session, in request order.
pub(super) struct Entry {
    pub(super) parts: Vec<Option<Bytes>>,
    pub(super) missing: usize,
    pub(super) merge: Merge,
    pub(super) reply: Option<Bytes>,
}

impl Link {
    pub(super) async fn incoming(&mut self, incoming: Incoming) {
        let (id, frame, push) = match incoming {
            Incoming::Reply { conn, frame, push } => (conn, frame, push),
            Incoming::Piece { conn, bytes, end } => match self.piece(conn, bytes, end) {
                Some(frame) => {
                    let push = frame.first() == Some(&b'>');
                    (conn, frame, push)
                }
                None => return,
            },
            Incoming::Closed { conn } => return self.conn_closed(conn).await,
        };
        let Some((key, conn)) = self.conns.iter_mut().find(|(_, c)| c.id == id) else { return };
        let addr = key.0.clone();
        if push || (conn.subscribed && !self.resp3 && is_pubsub_message(&frame)) {
            let echo = !matches!(conn.kind, Kind::Subscriber { echo: false }) && conn.muted_replies == 0;
            if echo || is_message(&frame) {
                let out = if self.streaming.is_some() { &mut self.held_out } else { &mut self.out };
                out.extend_from_slice(&frame);
            }
            return;
        }
        let Some(sent) = conn.inflight.pop_front() else { return };
        conn.muted_replies = conn.muted_replies.saturating_sub(1);
        let Some((seq, part)) = sent.to else { return };
        if let Some(redirect) = Redirect::parse(&frame) {
            if !sent.in_tx && sent.redirects < MAX_REDIRECTS {
                return self.redirect(addr, redirect, sent).await;
            }
            // Queued in a transaction, streamed, or redirected too often: the client is told
            // to try again, never shown where the slot went.
            self.map_stale = true;
            if !matches!(redirect, Redirect::TryAgain) {
                return self.fill(seq, part, Bytes::from_static(REBALANCING));
            }
        }
        if !self.reader && frame.starts_with(b"-READONLY") {
            // A primary became a replica (a failover) and no MOVED said so (a keyless write):
            // refused, not run, so it goes to its slot's primary in a map read now.
            self.seeds.invalidate();
            self.map_stale = true;
            if let (Some(slot), false, true) = (sent.slot, sent.in_tx, sent.redirects < MAX_REDIRECTS) {
                if self.reread_map().await && self.map.primary(slot) != addr {
                    let to = self.map.primary(slot).to_string();
                    let sent = super::conns::Sent { redirects: sent.redirects + 1, ..sent };
                    self.redirected.push((to, sent));
                    self.hold = Hold::Drain(addr);
                    return;
                }
            }
        }
        self.fill(seq, part, frame);
    }

    /// Part of a big reply. The next reply owed, whole from one node, goes straight on to
    /// the session; any other is gathered and returned whole with its last part.
    pub(super) fn piece(&mut self, id: u64, bytes: Bytes, end: bool) -> Option<Bytes> {
        let conn = self.conns.values_mut().find(|c| c.id == id)?;
        if conn.partial.is_none() {
            let next_owed =
                conn.inflight.front().and_then(|s| s.to).is_some_and(|(seq, _)| seq == self.first_seq)
                    && self.pending.front().is_some_and(|e| e.parts.len() == 1 && e.merge == Merge::First);
            let direct = next_owed
                && self.streaming.is_none()
                && conn.kind == Kind::Data
                && !matches!(bytes.first(), Some(b'-' | b'>'));
            conn.partial = Some((direct, BytesMut::new()));
            if direct {
                self.streaming = Some(id);
            }
        }
        let (direct, gathered) = conn.partial.as_mut().expect("set above");
        if !*direct {
            gathered.extend_from_slice(&bytes);
            return end.then(|| conn.partial.take().expect("set above").1.freeze());
        }
        self.out.extend_from_slice(&bytes);
        if end {
            conn.partial = None;
            conn.inflight.pop_front();
            self.pending.pop_front();
            self.first_seq += 1;
            self.streaming = None;
            let held = self.held_out.split();
            self.out.extend_from_slice(&held);
            self.deliver();
        }
        None
    }

    pub(super) async fn redirect(&mut self, from: String, redirect: Redirect, mut sent: Sent) {
        sent.redirects += 1;
        match redirect {
            Redirect::Moved { slot, addr } => {
                self.map = Arc::new(self.map.moved(slot, &addr));
                let seeds = self.seeds.clone();
                let seen = self.map.clone();
                tokio::spawn(async move { seeds.refresh(Some(&seen)).await });
                self.redirected.push((addr, sent));
                self.hold = Hold::Drain(from);
            }
            Redirect::Ask { addr } => {
                self.send(&addr, Kind::Data, unwanted(Request::built(&[b"ASKING"]), false)).await;
                self.send(&addr, Kind::Data, sent).await;
            }
            Redirect::TryAgain => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                self.redirected.push((from.clone(), sent));
                self.hold = Hold::Drain(from);
            }
        }
    }

    pub(super) fn fill(&mut self, seq: u64, part: usize, reply: Bytes) {
        if let Hold::Multi { seq: multi, refused, .. } = &mut self.hold {
            if *multi == seq {
                *refused = !reply.starts_with(b"+");
            }
        }
        let Some(entry) = seq.checked_sub(self.first_seq).and_then(|i| self.pending.get_mut(i as usize))
        else {
            return;
        };
        if entry.parts[part].replace(reply).is_none() {
            entry.missing -= 1;
        }
        if entry.missing == 0 {
            let parts = entry.parts.iter_mut().map(|p| p.take().unwrap_or_default()).collect();
            entry.reply = Some(merge::merge(&entry.merge, parts));
        }
        self.deliver();
    }

    /// Passes on every reply at the front that is complete.
    pub(super) fn deliver(&mut self) {
        if self.streaming.is_some() {
            return;
        }
        while let Some(reply) = self.pending.front().and_then(|e| e.reply.as_ref()) {
            self.out.extend_from_slice(reply);
            self.pending.pop_front();
            self.first_seq += 1;
        }
    }
}

pub(super) enum Redirect {
    Moved { slot: u16, addr: String },
    Ask { addr: String },
    TryAgain,
}

impl Redirect {
    pub(super) fn parse(frame: &[u8]) -> Option<Redirect> {
        if frame.starts_with(b"-TRYAGAIN") {
            return Some(Redirect::TryAgain);
        }
        let moved = frame.starts_with(b"-MOVED ");
        if !moved && !frame.starts_with(b"-ASK ") {
            return None;
        }
        let text = std::str::from_utf8(frame).ok()?.trim_end();
        let mut words = text.split(' ').skip(1);
        let slot: u16 = words.next()?.parse().ok()?;
        let addr = words.next()?.to_string();
        Some(if moved { Redirect::Moved { slot, addr } } else { Redirect::Ask { addr } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn redirects_are_read_from_errors() {
        assert!(matches!(
            Redirect::parse(b"-MOVED 3999 127.0.0.1:7001\r\n"),
            Some(Redirect::Moved { slot: 3999, addr }) if addr == "127.0.0.1:7001"
        ));
        assert!(
            matches!(Redirect::parse(b"-ASK 1 127.0.0.1:7002\r\n"), Some(Redirect::Ask { addr }) if addr == "127.0.0.1:7002")
        );
        assert!(matches!(
            Redirect::parse(b"-TRYAGAIN Multiple keys request during rehashing\r\n"),
            Some(Redirect::TryAgain)
        ));
        assert!(Redirect::parse(b"-ERR MOVED\r\n").is_none());
    }
}
