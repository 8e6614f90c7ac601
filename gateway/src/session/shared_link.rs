//! The session's link to the cache's shared upstream connection ([`crate::mux`]): batches of
//! stateless commands, their replies in one chunk each.

use super::{Pending, Session};
use std::sync::Arc;
use tokio::sync::mpsc;

/// A session's way to the cache's shared upstream connection.
pub(super) struct MuxLink {
    pub(super) handle: crate::mux::Handle,
    pub(super) replies_tx: mpsc::UnboundedSender<crate::mux::Replies>,
    pub(super) replies: mpsc::UnboundedReceiver<crate::mux::Replies>,
    /// The lengths vector of the last replies, for the next batch to fill.
    pub(super) spare_lens: Vec<usize>,
    /// The session's output not yet written to the client, for the mux to pause on.
    pub(super) owed: Arc<std::sync::atomic::AtomicUsize>,
}

pub(super) async fn recv_mux(link: Option<&mut MuxLink>) -> Option<crate::mux::Replies> {
    match link {
        Some(l) => l.replies.recv().await,
        None => std::future::pending().await,
    }
}

impl Session {
    /// Whether the session is in the state every mux connection is in: RESP2, the cache's
    /// first database, no transaction, subscription or tracking, never went dedicated.
    pub(super) fn can_mux(&self) -> bool {
        !self.dedicated
            && self.endpoint == super::Endpoint::Primary
            && self.proto == 2
            && !self.in_multi
            && !self.tracking
            && !self.pubsub.active()
            // Replies the client turned off are dropped on the session's own link.
            && !self.muted
            && self.reply_mode == super::ReplyMode::On
            // A cluster pool's cache: each session has its own link to the shards (a shared
            // one would hold every session's big replies behind one slow reader).
            && self.tenant.as_ref().is_some_and(|t| {
                t.db == 0 && t.upstream_login.is_none() && t.route.cluster_nodes.is_empty()
            })
    }

    /// Adds the request at the front of the input to the batch being gathered.
    pub(super) fn mux_push(&mut self, len: usize) {
        let Some(t) = self.tenant.as_ref() else { return };
        if self.mux.is_none() {
            let (replies_tx, replies) = mpsc::unbounded_channel();
            let handle = self.shared.muxes.get(&t.route, t.route.db);
            let owed = Default::default();
            self.mux = Some(MuxLink { handle, replies_tx, replies, spare_lens: Vec::new(), owed });
        }
        self.mux_out.extend_from_slice(&self.client_in[..len]);
        if self.shared.config.metering {
            let meter = self.meter_next.take();
            self.script_sent(meter.as_ref());
            self.mux_meters.push_back(meter);
        }
        self.mux_inflight += 1;
        self.mux_inflight_bytes += len;
        match self.pending.back_mut() {
            Some(Pending::Mux { count, bytes }) if self.mux_out.len() > len => {
                *count += 1;
                *bytes += len;
            }
            _ => self.pending.push_back(Pending::Mux { count: 1, bytes: len }),
        }
    }

    /// Sends the batch being gathered, if any.
    pub(super) fn mux_flush(&mut self) {
        if self.mux_out.is_empty() {
            return;
        }
        let requests = self.mux_out.split().freeze();
        let (Some(link), Some(&Pending::Mux { count, .. })) = (self.mux.as_mut(), self.pending.back()) else {
            return;
        };
        let lens = std::mem::take(&mut link.spare_lens);
        let owed = link.owed.clone();
        let batch = crate::mux::Batch { requests, count, reply: link.replies_tx.clone(), lens, owed };
        if let Err(refused) = link.handle.send(batch) {
            // The mux is gone (it never leaves while a session holds it; defensive).
            let _ =
                link.replies_tx.send(crate::mux::Replies::errors(crate::mux::LOST, count, refused.0.lens));
        }
    }

    /// Replies to the front batch (all of them, usually): they go out, with the local
    /// replies queued behind the batch once it is answered.
    pub(super) fn on_mux_replies(&mut self, replies: crate::mux::Replies) {
        let crate::mux::Replies { chunk, mut lens, partial, cut } = replies;
        // Anything but a batch at the front means `pending` was dropped (closing).
        if let Some(Pending::Mux { count, bytes }) = self.pending.front_mut() {
            let (answered, whole) = (lens.len(), lens.len() >= *count);
            if whole {
                self.mux_inflight_bytes -= *bytes;
                self.pending.pop_front();
            } else {
                *count -= answered;
            }
            self.mux_inflight -= answered;
            if self.shared.config.metering {
                self.meter_mux_replies(&chunk, &lens, partial);
            }
            self.client_out.extend_from_slice(&chunk);
            if cut {
                // The client has part of a reply whose rest will never come.
                self.close_now();
            } else if whole {
                self.drain_local();
            }
        }
        if let Some(link) = self.mux.as_mut() {
            lens.clear();
            link.spare_lens = lens;
        }
    }

    /// Before the session's first use of its own connection: every batch is answered, so
    /// that replies keep their order, and the mux is left for good.
    pub(super) async fn leave_mux(&mut self) {
        self.mux_flush();
        while self.mux_inflight > 0 {
            match recv_mux(self.mux.as_mut()).await {
                Some(chunk) => self.on_mux_replies(chunk),
                None => break,
            }
        }
        self.mux = None;
        self.dedicated = true;
    }
}
