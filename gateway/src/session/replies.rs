//! Replies in request order: upstream, local and mux answers queue in `pending` and go to
//! the client as the ones before them are delivered.

use super::{OnReply, Pending, ReplyMode, Session};
use crate::resp::value::{self, Value};
use crate::resp::{self};
use crate::GatewayError;
use bytes::{Bytes, BytesMut};

/// Writes a RESP bulk string (the same in RESP2 and RESP3).
pub(super) fn bulk(out: &mut BytesMut, b: &[u8]) {
    out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
}

impl Session {
    /// Requests held back by a barrier run once every reply they wait for has arrived.
    pub(super) async fn lift_barrier(&mut self) {
        if self.barrier && !self.has_pending_upstream() && self.pubsub.inflight.is_empty() {
            self.barrier = false;
            self.on_client_input().await;
        }
    }

    pub(super) fn deliver(&mut self, bytes: &[u8], error: bool, on_reply: OnReply) {
        match on_reply {
            OnReply::Forward => self.client_out.extend_from_slice(bytes),
            OnReply::Discard | OnReply::Muted => {}
            OnReply::Replace(_) | OnReply::Transform(_) if error => self.client_out.extend_from_slice(bytes),
            OnReply::Replace(with) => self.client_out.extend_from_slice(&with),
            OnReply::Transform(f) => match value::decode(bytes) {
                Some((v, _)) => value::encode(&f(v, self.proto), self.proto, &mut self.client_out),
                None => self.client_out.extend_from_slice(bytes),
            },
            OnReply::Confirm { kind, pattern, delta } => {
                self.pubsub.confirmed_patterns += delta;
                let name = pattern.map_or(Value::Null, Value::Bulk);
                let items = vec![Value::bulk(kind), name, Value::Int(self.pubsub.visible_count())];
                let v = if self.proto >= 3 { Value::Push(items) } else { Value::Array(items) };
                value::encode(&v, self.proto, &mut self.client_out);
            }
        }
    }

    /// Sends the local replies now at the front of the queue (and carries out the
    /// client-side caching entries there).
    pub(super) fn drain_local(&mut self) {
        while self.syncing.is_none() {
            match self.pending.front() {
                Some(
                    Pending::Local(_)
                    | Pending::Close
                    | Pending::Sync(_)
                    | Pending::ReadDone(_)
                    | Pending::Pushes(_),
                ) => {}
                _ => return,
            }
            match self.pending.pop_front() {
                Some(Pending::Local(bytes)) => self.client_out.extend_from_slice(&bytes),
                Some(Pending::Pushes(bytes)) => self.client_out.extend_from_slice(&bytes),
                Some(Pending::Close) => self.closing = true,
                Some(Pending::ReadDone(keys)) => self.read_done(&keys),
                Some(Pending::Sync(keys)) => {
                    if let Some(t) = self.tenant.as_ref() {
                        self.syncing = Some((self.shared.tracker.sync(&t.cache), keys));
                    }
                }
                _ => return,
            }
        }
    }

    /// Queues an answer behind the others (a batch being gathered is sent first: the mux
    /// answers whole batches).
    pub(super) fn push_pending(&mut self, p: Pending) {
        self.mux_flush();
        let p = match p {
            Pending::Local(_) if self.muted => return,
            Pending::Upstream(on_reply, meter, blocked) if self.muted && !on_reply.is_push() => {
                Pending::Upstream(OnReply::Muted, meter, blocked)
            }
            p => p,
        };
        self.pending.push_back(p);
    }

    /// Starts a request's answer: dropped while the client has its replies off.
    pub(super) fn begin_request(&mut self) {
        self.muted = match self.reply_mode {
            ReplyMode::On => false,
            ReplyMode::Off => true,
            ReplyMode::SkipNext => {
                self.reply_mode = ReplyMode::On;
                true
            }
        };
    }

    pub fn reply(&mut self, bytes: Bytes) {
        if self.muted {
            return;
        }
        if self.pending.is_empty() {
            self.client_out.extend_from_slice(&bytes);
        } else {
            self.push_pending(Pending::Local(bytes));
        }
    }

    /// Replies with a value encoded for the client's protocol.
    pub fn reply_value(&mut self, v: &Value) {
        let mut out = BytesMut::new();
        value::encode(v, self.proto, &mut out);
        self.reply(out.freeze());
    }

    pub fn reply_error(&mut self, msg: &str) {
        self.count_local_error(msg);
        let mut out = BytesMut::with_capacity(msg.len() + 3);
        resp::error(&mut out, msg);
        self.reply(out.freeze());
    }

    pub fn reply_auth_error(&mut self, e: GatewayError) {
        crate::metrics::auth_failure(self.tenant.as_ref().map(|t| &t.cache));
        tracing::info!(peer = %self.peer, reason = %e, kind = e.kind(), "authentication refused");
        self.reply_error(e.client_message());
    }
}
