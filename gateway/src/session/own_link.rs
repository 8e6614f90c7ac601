//! The session's own upstream connection: opened on first need, replies read and passed on
//! (in pieces when big), closed and reset when lost.

use super::{OnReply, Pending, Session, Subscribing, REPLY_HEAD, STREAM_REPLY_FROM};
use crate::metering::TxPosition;
use crate::resp::reply::ReplyScanner;
use crate::resp::{self};
use crate::{upstream, GatewayError};
use bytes::Bytes;

/// A reply that goes on to the client in pieces: what went already.
#[derive(Default)]
pub(super) struct PartReply {
    /// Bytes already passed on (0: no reply in pieces).
    pub(super) taken: u64,
    /// Its first bytes, for metering.
    pub(super) head: Vec<u8>,
}

impl PartReply {
    pub(super) fn add(&mut self, piece: &[u8]) {
        if self.head.len() < REPLY_HEAD {
            let n = piece.len().min(REPLY_HEAD - self.head.len());
            self.head.extend_from_slice(&piece[..n]);
        }
        self.taken += piece.len() as u64;
    }
}

/// What the session reads its upstream replies into, reserved when its connection opens.
const UP_IN_CAPACITY: usize = 16 * 1024;

impl Session {
    /// Whether the session still sends stateless commands to the mux.
    pub fn uses_mux(&self) -> bool {
        !self.dedicated
    }

    /// Readies the session's own upstream connection for a command; the first time, the
    /// session leaves the mux and labels its connection with what was deferred meanwhile.
    pub async fn ensure_upstream(&mut self) -> bool {
        if self.dedicated || self.tenant.is_none() {
            return self.connect_upstream().await;
        }
        self.leave_mux().await;
        if !self.connect_upstream().await {
            return false;
        }
        // `CLIENT SETINFO` answered while on the mux (see `cmd::client::set`).
        let lib = self.tenant.as_ref().map(|t| t.entry.lib.lock().unwrap().clone());
        if let Some((name, version)) = lib {
            for (attr, value) in [(&b"LIB-NAME"[..], name), (b"LIB-VER", version)] {
                if !value.is_empty() {
                    self.forward_helper(&[b"CLIENT", b"SETINFO", attr, &value]);
                }
            }
        }
        true
    }

    /// Takes `stream` as the session's own upstream connection, with room to read its replies.
    pub(super) fn attach_upstream(&mut self, stream: upstream::Upstream) {
        let (read, write) = stream.into_split();
        self.up_read = Some(read);
        self.up_metric = Some(crate::metrics::Upstream::opened());
        self.up_write = Some(write);
        self.up_in.clear();
        self.up_in.reserve(UP_IN_CAPACITY);
    }

    /// Re-opens the upstream connection after it was lost (node restart, network).
    /// Whether [`Session::ensure_upstream`] would find the session's own connection ready
    /// (checked without an await).
    pub(super) fn upstream_ready(&self) -> bool {
        self.up_write.is_some() && (self.dedicated || self.tenant.is_none())
    }

    pub(super) async fn connect_upstream(&mut self) -> bool {
        if self.up_write.is_some() {
            return true;
        }
        let Some(tenant) = self.tenant.as_ref() else { return false };
        let result = async {
            let route = super::login::with_login(
                self.shared.router.route(&tenant.cache).await?,
                &tenant.upstream_login,
            );
            let stream =
                upstream::connect(&route, route.db + tenant.db, self.endpoint == super::Endpoint::Reader)
                    .await?;
            Ok::<_, GatewayError>((route, stream))
        }
        .await;
        match result {
            Ok((route, stream)) => {
                self.attach_upstream(stream);
                self.replies = ReplyScanner::new();
                if let Some(t) = self.tenant.as_mut() {
                    t.route = route;
                }
                if self.proto == 3 {
                    self.forward_helper(&[b"HELLO", b"3"]);
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, kind = e.kind(), "upstream unavailable");
                self.reply_error(e.client_message());
                if matches!(e, GatewayError::UnknownCache | GatewayError::UpstreamAuth) {
                    self.close_after_replies();
                }
                false
            }
        }
    }

    /// Sends a command the gateway built; `on_reply` says what becomes of its reply.
    pub async fn forward_command(&mut self, args: &[&[u8]], on_reply: OnReply) {
        if !self.ensure_upstream().await {
            return;
        }
        resp::command(&mut self.up_out, args);
        let meter = self.meter_next.take();
        self.push_pending(Pending::Upstream(on_reply, meter, None));
    }

    /// Sends a command whose reply the client never sees (upstream must be connected).
    pub fn forward_helper(&mut self, args: &[&[u8]]) {
        resp::command(&mut self.up_out, args);
        self.push_pending(Pending::Upstream(OnReply::Discard, None, None));
    }

    /// Sends a (un)subscribe command: its confirmations arrive out of band.
    pub async fn forward_subscription(&mut self, args: &[&[u8]], confirmations: Option<usize>) {
        if !self.ensure_upstream().await {
            return;
        }
        resp::command(&mut self.up_out, args);
        let replies_before = self.pending.iter().filter(|p| matches!(p, Pending::Upstream(..))).count();
        self.pubsub.inflight.push_back(Subscribing { confirmations, replies_before });
    }

    /// Moves every complete upstream reply to the client, with the local replies queued
    /// behind each.
    pub(super) fn on_upstream_input(&mut self) {
        loop {
            if self.syncing.is_some() {
                // Held until a write's invalidations are out (see `Pending::Sync`).
                return;
            }
            match self.replies.next(&self.up_in) {
                Ok(Some(reply)) => {
                    let bytes = self.up_in.split_to(reply.len);
                    if self.up_part.taken > 0 {
                        self.finish_part(&bytes);
                        continue;
                    }
                    if self.is_pubsub_reply(&bytes, reply.push) {
                        self.on_pubsub_frame(&bytes);
                        continue;
                    }
                    if self.pubsub.inflight.front().is_some_and(|s| s.replies_before == 0) {
                        // The (un)subscribe command itself was refused (NOPERM …).
                        self.pubsub.inflight.pop_front();
                        self.client_out.extend_from_slice(&bytes);
                        continue;
                    }
                    for s in self.pubsub.inflight.iter_mut() {
                        s.replies_before = s.replies_before.saturating_sub(1);
                    }
                    match self.pending.pop_front() {
                        Some(Pending::Upstream(on_reply, meter, _blocked)) => {
                            let before = self.client_out.len();
                            let muted = matches!(on_reply, OnReply::Muted);
                            self.deliver(&bytes, reply.error, on_reply);
                            if let Some(meter) = meter {
                                let sent = match muted {
                                    true => bytes.len(),
                                    false => self.client_out.len() - before,
                                };
                                self.meter_reply(meter, &bytes, sent as u64);
                            }
                            self.drain_local();
                        }
                        other => {
                            // A reply nobody asked for: pass it on rather than lose it.
                            if let Some(p) = other {
                                self.pending.push_front(p);
                            }
                            self.client_out.extend_from_slice(&bytes);
                        }
                    }
                }
                Ok(None) => return self.pass_on_part(),
                Err(e) => return self.upstream_lost(&e.to_string()),
            }
        }
    }

    /// Passes on what has come of a big reply the client gets as it is (see
    /// `STREAM_REPLY_FROM`); pub/sub traffic and replies the gateway rewrites wait whole.
    pub(super) fn pass_on_part(&mut self) {
        let (forwarded, muted) = match self.pending.front() {
            Some(Pending::Upstream(OnReply::Forward, ..)) => (true, false),
            Some(Pending::Upstream(OnReply::Muted, ..)) => (true, true),
            _ => (false, false),
        };
        let push_next = self.up_part.taken == 0 && self.up_in.first() == Some(&b'>');
        if self.up_in.len() < STREAM_REPLY_FROM || !forwarded || push_next || self.pubsub.active() {
            return;
        }
        let n = self.replies.take_partial(&self.up_in);
        let piece = self.up_in.split_to(n);
        self.up_part.add(&piece);
        if !muted {
            self.client_out.extend_from_slice(&piece);
        }
    }

    /// The rest of a reply that went on in pieces: delivered and metered as a whole.
    pub(super) fn finish_part(&mut self, tail: &[u8]) {
        let part = std::mem::take(&mut self.up_part);
        if !matches!(self.pending.front(), Some(Pending::Upstream(OnReply::Muted, ..))) {
            self.client_out.extend_from_slice(tail);
        }
        if let Some(Pending::Upstream(_, meter, _)) = self.pending.pop_front() {
            let delivered = part.taken + tail.len() as u64;
            match meter {
                Some(m) if m.tx == TxPosition::Exec => {
                    // Too big to split among the queued commands: they are billed on what
                    // they moved, EXEC on the rest.
                    self.bill_queued();
                    self.bill(m, &part.head, delivered);
                }
                Some(m) => self.meter_reply(m, &part.head, delivered),
                None => {}
            }
        }
        self.drain_local();
    }

    /// The upstream connection broke: every reply it owed becomes an error, and the next
    /// command reconnects.
    pub(super) fn upstream_lost(&mut self, why: &str) {
        tracing::warn!(peer = %self.peer, reason = why, "upstream connection lost");
        if let Some(st) = self.streaming.as_mut().filter(|st| st.forward) {
            // The rest of the request has nowhere to go; its reply becomes the error below.
            st.forward = false;
        }
        if std::mem::take(&mut self.up_part).taken > 0 {
            // The client has part of a reply whose rest will never come.
            self.close_now();
        }
        self.up_read = None;
        self.up_metric = None;
        self.up_write = None;
        self.up_out.clear();
        self.up_in.clear();
        self.replies = ReplyScanner::new();
        self.in_multi = false;
        self.multi_dirty = false;
        self.bill_queued();
        let was_subscribed = self.pubsub.active();
        self.clear_pubsub();
        // Its scripts are over (a node restarted to end a runaway script lands here).
        let scripts: Vec<std::time::Instant> = self
            .pending
            .iter()
            .filter_map(|p| match p {
                Pending::Upstream(_, Some(m), _) if m.spec.is_some_and(|s| s.script) => Some(m.started),
                _ => None,
            })
            .collect();
        if let Some(&oldest) = scripts.iter().min() {
            self.script_lost(oldest);
        }
        let scripts = scripts.len();
        self.scripts_over(scripts as u32);
        // Replies owed by this connection become errors, in place (mux batches stay).
        let lost = Bytes::from_static(crate::mux::LOST);
        self.pending = std::mem::take(&mut self.pending)
            .into_iter()
            .filter_map(|p| match p {
                Pending::Upstream(OnReply::Discard | OnReply::Muted, ..) => None,
                Pending::Upstream(..) => Some(Pending::Local(lost.clone())),
                other => Some(other),
            })
            .collect();
        self.drain_local();
        if was_subscribed {
            // Subscriptions cannot be silently restored: let the client reconnect.
            self.closing = true;
        }
    }

    /// Drops the upstream connection on purpose (RESET): the next command opens a fresh one.
    pub fn drop_upstream(&mut self) {
        self.up_part = PartReply::default();
        self.up_read = None;
        self.up_metric = None;
        self.up_write = None;
        self.up_out.clear();
        self.up_in.clear();
        self.replies = ReplyScanner::new();
    }

    pub fn has_pending_upstream(&self) -> bool {
        self.mux_inflight > 0 || self.pending.iter().any(|p| matches!(p, Pending::Upstream(..)))
    }
}
