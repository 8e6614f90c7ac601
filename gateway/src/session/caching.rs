//! Client-side caching in the session: invalidations placed among the replies as Valkey
//! places them on a connection that tracks itself.
//!
//! - After a write's reply, the session waits for the node's events to be followed up to
//!   then ([`Pending::Sync`]): the write's invalidations go out next, before the reply of
//!   the next command, as Valkey sends them.
//! - An invalidation of a key whose read is still unanswered goes out after that read's
//!   reply: the read may have run before the write, and its value must not outlive the
//!   invalidation in the client's cache.
//! - An invalidation of a key a later write of the pipeline names goes out after that
//!   write's reply; otherwise it goes out as it comes (behind the first write still waiting
//!   for its reply, if any: a write's own invalidations never come before its reply).

use super::{Pending, Session};
use crate::clients::Invalidation;
use bytes::BytesMut;
use shoal_commands::CommandSpec;

impl Session {
    /// After a command went upstream while tracking is on: its reads' keys are noted until
    /// their reply; a write (a script, a transaction) waits for its invalidations.
    pub(super) fn after_tracked_command(&mut self, spec: &CommandSpec, keys: Vec<Vec<u8>>) {
        if self.in_multi {
            // Queued: EXEC is the write.
            return;
        }
        if spec.readonly && !keys.is_empty() {
            for k in &keys {
                *self.reading.entry(k.clone()).or_default() += 1;
            }
            self.pending.push_back(Pending::ReadDone(keys));
        } else if spec.write || spec.shoal.may_write || spec.name == "exec" {
            let to_self = self
                .tenant
                .as_ref()
                .and_then(|t| t.entry.tracking.lock().unwrap().as_ref().map(|t| t.redirect.is_none()));
            if to_self == Some(true) {
                self.pending.push_back(Pending::Sync(keys));
            }
        }
    }

    pub(super) fn read_done(&mut self, keys: &[Vec<u8>]) {
        for k in keys {
            if let Some(n) = self.reading.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    self.reading.remove(k);
                }
            }
        }
    }

    /// An invalidation for this client: sent now, or queued where it belongs. `synced`:
    /// it came before the end of a sync (the write just answered is its cause, or an
    /// earlier one), not while a write's reply may still be on its way.
    pub(super) fn on_invalidation(&mut self, msg: Invalidation, synced: bool) {
        // RESP2 clients get invalidations only as subscribers of __redis__:invalidate.
        if self.proto < 3 && !self.pubsub.active() {
            return;
        }
        let names = |keys: &[Vec<u8>]| match &msg {
            Invalidation::Keys(ks) => ks.iter().any(|k| keys.contains(k)),
            Invalidation::All => true,
        };
        // After the replies of the reads of its keys still unanswered (never before a value
        // it could make stale).
        let unanswered = match &msg {
            Invalidation::Keys(ks) => ks.iter().any(|k| self.reading.contains_key(k)),
            Invalidation::All => !self.reading.is_empty(),
        };
        let after_read = match unanswered {
            true => self.pending.iter().rposition(|p| matches!(p, Pending::ReadDone(keys) if names(keys))),
            false => None,
        };
        // After the reply of the write that may have caused it: the first unanswered write
        // of its keys, else (while a write's reply may be on its way) the first one.
        let after_write = self
            .pending
            .iter()
            .position(|p| matches!(p, Pending::Sync(keys) if !keys.is_empty() && names(keys)))
            .or_else(|| match synced {
                true => None,
                false => self.pending.iter().position(|p| matches!(p, Pending::Sync(_))),
            });
        // Never ahead of an invalidation still queued (two prefixes' messages of one EXEC
        // arrive one by one, the second maybe after the write's sync is done).
        let queued = self.pending.iter().rposition(|p| matches!(p, Pending::Pushes(_)));
        let mut out = BytesMut::new();
        crate::tracking::encode(&msg, self.proto, &mut out);
        if let Some(j) = queued.filter(|j| after_read.max(after_write).is_none_or(|i| i < *j)) {
            if let Some(Pending::Pushes(pushes)) = self.pending.get_mut(j) {
                return pushes.extend_from_slice(&out);
            }
        }
        match after_read.max(after_write) {
            Some(i) => match self.pending.get_mut(i + 1) {
                Some(Pending::Pushes(pushes)) => pushes.extend_from_slice(&out),
                _ => self.pending.insert(i + 1, Pending::Pushes(out)),
            },
            None => self.client_out.extend_from_slice(&out),
        }
    }

    /// A write's sync is done: its invalidations (all that came meanwhile) go out, then the
    /// replies held behind it.
    pub(super) fn synced(&mut self) {
        let Some((_, keys)) = self.syncing.take() else { return };
        if let Some(t) = self.tenant.as_ref() {
            if let Some(tracking) = t.entry.tracking.lock().unwrap().as_mut() {
                crate::tracking::own_writes_seen(tracking, &keys);
            }
        }
        while let Some(msg) = self.inbox.as_mut().and_then(|rx| rx.try_recv().ok()) {
            self.on_invalidation(msg, true);
        }
        self.drain_local();
        self.on_upstream_input();
    }
}
