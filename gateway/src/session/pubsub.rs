//! Pub/sub inside a session: telling subscription confirmations and messages apart from
//! replies, and rewriting channel names out of the cache's namespace.

use super::{bulk, Session};
use crate::pubsub::{CONFIRMATIONS, MAX_CACHE_CHANNELS, MAX_CHANNELS};
use crate::resp::value::{self, Value};
use bytes::BytesMut;
use std::collections::VecDeque;
use std::sync::Arc;

/// Pub/sub bookkeeping, so that subscription confirmations and messages (which answer no
/// request one-for-one) are told apart from replies in RESP2.
#[derive(Default)]
pub(crate) struct PubSub {
    /// Subscriptions (channels + patterns, and shard channels) after the last confirmation.
    pub regular: i64,
    pub shard: i64,
    /// The (un)subscribe commands whose confirmations have not all arrived, in order.
    pub inflight: VecDeque<Subscribing>,
    /// The client's patterns, matched by the gateway against the catch-all's messages.
    pub patterns: Vec<Arc<crate::pubsub::Glob>>,
    /// Keyspace-notification patterns, subscribed upstream as they are (client names).
    pub direct_patterns: Vec<Vec<u8>>,
    /// The upstream catch-all pattern subscription is requested / confirmed.
    pub catch_all: bool,
    pub catch_all_confirmed: bool,
    /// Client patterns whose confirmation the client has received.
    pub confirmed_patterns: i64,
}

/// One (un)subscribe command sent upstream.
pub(crate) struct Subscribing {
    /// Confirmations still expected; `None` means "until the count drops to 0"
    /// (unsubscribe from everything).
    pub confirmations: Option<usize>,
    /// Replies to commands sent before it that have not arrived: until they have, what
    /// arrives is one of them, whatever it looks like.
    pub replies_before: usize,
}

impl PubSub {
    pub(super) fn active(&self) -> bool {
        self.regular > 0 || self.shard > 0 || !self.inflight.is_empty() || !self.patterns.is_empty()
    }

    /// Upstream subscriptions once every (un)subscribe in flight is confirmed, at most: what
    /// the session counts in its cache's total ([`crate::pubsub::ChannelShare`]).
    fn bound(&self) -> i64 {
        let inflight: usize = self.inflight.iter().map(|s| s.confirmations.unwrap_or(0)).sum();
        self.regular + self.shard + inflight as i64
    }

    /// The subscription count the client sees: upstream's, with the catch-all replaced by
    /// the client's own patterns.
    pub fn visible_count(&self) -> i64 {
        self.regular - self.catch_all_confirmed as i64 + self.confirmed_patterns
    }
}

impl Session {
    /// Makes room for `adding` more channel subscriptions, within [`MAX_CHANNELS`] for the
    /// connection and [`MAX_CACHE_CHANNELS`] for its cache on this gateway; else the error.
    pub(crate) fn reserve_channels(&mut self, adding: i64) -> Result<(), String> {
        let bound = self.pubsub.bound();
        if bound + adding > MAX_CHANNELS {
            return Err(format!("ERR too many channel subscriptions on one connection (max {MAX_CHANNELS})"));
        }
        let Some(tenant) = self.tenant.as_mut() else { return Ok(()) };
        if tenant.channels.set(bound + adding) > MAX_CACHE_CHANNELS {
            tenant.channels.set(bound);
            return Err(format!(
                "ERR too many channel subscriptions for this cache (max {MAX_CACHE_CHANNELS} per gateway)"
            ));
        }
        Ok(())
    }

    /// Counts the session's subscriptions, as confirmed and in flight, in its cache's total.
    pub(crate) fn count_channels(&mut self) {
        let bound = self.pubsub.bound();
        if let Some(tenant) = self.tenant.as_mut() {
            tenant.channels.set(bound);
        }
    }

    /// Whether an upstream reply is a pub/sub message or confirmation rather than the
    /// answer to a request. RESP3 says so itself (a push). In RESP2 it is an array of a
    /// pub/sub kind, arriving while subscribed (Valkey then refuses every command that
    /// could answer with such an array but PING, whose `pong` is no pub/sub kind) or when
    /// every reply owed before the next (un)subscribe command has arrived.
    pub(super) fn is_pubsub_reply(&self, bytes: &[u8], push: bool) -> bool {
        if push {
            return true;
        }
        if self.proto >= 3 || !bytes.starts_with(b"*") {
            return false;
        }
        let subscribed = self.pubsub.regular > 0 || self.pubsub.shard > 0;
        let confirming = self.pubsub.inflight.front().is_some_and(|s| s.replies_before == 0);
        (subscribed || confirming) && self.is_pubsub_frame(bytes)
    }

    /// Whether a RESP2 array has a pub/sub message's or confirmation's shape.
    pub(super) fn is_pubsub_frame(&self, bytes: &[u8]) -> bool {
        if !bytes.starts_with(b"*") {
            return false;
        }
        // The kind is the first element: `*N\r\n$len\r\n<kind>\r\n`.
        let Some((Value::Array(items), _)) = value::decode(bytes) else { return false };
        let kind =
            items.first().and_then(Value::as_bytes).map(<[u8]>::to_ascii_lowercase).unwrap_or_default();
        let shaped = if CONFIRMATIONS.contains(&kind.as_slice()) {
            items.len() == 3
        } else if kind == b"pmessage" {
            items.len() == 4
        } else {
            crate::pubsub::MESSAGES.contains(&kind.as_slice()) && items.len() == 3
        };
        shaped
    }

    /// Rewrites channel names in a pub/sub frame for the client and tracks subscriptions.
    pub(super) fn on_pubsub_frame(&mut self, bytes: &[u8]) {
        let before = self.client_out.len();
        let delivered = self.deliver_pubsub_frame(bytes);
        if delivered && self.tenant.is_some() && self.shared.config.metering {
            self.tally(crate::metering::delivery((self.client_out.len() - before) as u64));
        }
    }

    /// Writes a pub/sub frame for the client; whether it was a message (metered by bytes).
    pub(super) fn deliver_pubsub_frame(&mut self, bytes: &[u8]) -> bool {
        let Some((decoded, _)) = value::decode(bytes) else {
            self.client_out.extend_from_slice(bytes);
            return false;
        };
        let (mut items, push) = match decoded {
            Value::Push(items) => (items, true),
            Value::Array(items) => (items, false),
            _ => {
                self.client_out.extend_from_slice(bytes);
                return false;
            }
        };
        let kind =
            items.first().and_then(Value::as_bytes).map(<[u8]>::to_ascii_lowercase).unwrap_or_default();
        let Some(ns) = self.tenant.as_ref().map(|t| t.ns.clone()) else { return false };
        let is_catch_all = items.get(1).and_then(Value::as_bytes) == Some(ns.catch_all().as_slice());
        if kind == b"pmessage" && is_catch_all {
            // One upstream message for the catch-all: one pmessage per matching client pattern.
            // The channel and payload are encoded once and copied per pattern, each copy only
            // while the output has room; matching has a budget per message.
            let (Some(channel), Some(payload)) = (items.get(2).and_then(Value::as_bytes), items.get(3))
            else {
                return false;
            };
            let channel = ns.from_upstream(channel);
            let mut shared = BytesMut::new();
            bulk(&mut shared, &channel);
            value::encode(payload, self.proto, &mut shared);
            let header: &[u8] = if push && self.proto >= 3 {
                b">4\r\n$8\r\npmessage\r\n"
            } else {
                b"*4\r\n$8\r\npmessage\r\n"
            };
            let mut budget = crate::pubsub::MATCH_BUDGET;
            let mut limit = None;
            for pattern in &self.pubsub.patterns {
                match pattern.matches_within(&channel, &mut budget) {
                    Some(true) => {}
                    Some(false) => continue,
                    None => {
                        limit = Some("ERR pattern matching limit reached for one message (too many or too costly patterns); closing the connection");
                        break;
                    }
                }
                if self.output_full() {
                    limit =
                        Some("ERR output buffer limit reached by pattern messages; closing the connection");
                    break;
                }
                self.client_out.extend_from_slice(header);
                bulk(&mut self.client_out, pattern.raw());
                self.client_out.extend_from_slice(&shared);
            }
            if let Some(msg) = limit {
                self.close_with_error(msg);
            }
            return true;
        }
        if CONFIRMATIONS.contains(&kind.as_slice()) {
            let count = match items.get(2) {
                Some(Value::Int(n)) => *n,
                _ => 0,
            };
            if kind.starts_with(b"s") && kind != b"subscribe" {
                self.pubsub.shard = count;
            } else {
                self.pubsub.regular = count;
            }
            if let Some(front) = self.pubsub.inflight.front_mut().map(|s| &mut s.confirmations) {
                let done = match front {
                    Some(n) => {
                        *n = n.saturating_sub(1);
                        *n == 0
                    }
                    None => count == 0,
                };
                if done {
                    self.pubsub.inflight.pop_front();
                }
            }
            self.count_channels();
            if is_catch_all {
                // The gateway's own subscription: the client already had its confirmations.
                self.pubsub.catch_all_confirmed = kind == b"psubscribe";
                return false;
            }
            if (!kind.starts_with(b"s") || kind == b"subscribe" || kind == b"unsubscribe") && items.len() > 2
            {
                items[2] = Value::Int(self.pubsub.visible_count());
            }
        }
        if kind == b"message" || kind == b"pmessage" {
            let at = if kind == b"pmessage" { 2 } else { 1 };
            let channel = items.get(at).and_then(Value::as_bytes).unwrap_or_default();
            let payload = items.get(at + 1).and_then(Value::as_bytes).unwrap_or_default();
            if !ns.wants_message(channel, payload) {
                return false;
            }
        }
        ns.rewrite_message(&mut items);
        let v = if push { Value::Push(items) } else { Value::Array(items) };
        value::encode(&v, self.proto, &mut self.client_out);
        crate::pubsub::MESSAGES.contains(&kind.as_slice())
    }

    /// Forgets every subscription (the upstream connection went, or `RESET`), in the registry
    /// and the cache's count too.
    pub(crate) fn clear_pubsub(&mut self) {
        self.pubsub = PubSub::default();
        self.sync_patterns();
        self.count_channels();
    }

    /// Publishes this session's patterns to the registry (for PUBLISH's receiver count).
    pub fn sync_patterns(&self) {
        if let Some(t) = &self.tenant {
            *t.entry.patterns.lock().unwrap() = self.pubsub.patterns.clone();
        }
    }
}
