//! What a virtualized command may touch: the logged-in session's tenant (never missing), its
//! replies, the upstream commands it sends, and the few session fields commands change
//! (pub/sub state, tracking). Made once per command by [`super::run`], only after login;
//! AUTH, HELLO, QUIT and RESET, which run before login too, take the session itself.

use crate::pubsub::Namespace;
use crate::resp::value::Value;
use crate::session::{OnReply, PubSub, ReplyMode, Session, Tenant};
use crate::state::Shared;
use bytes::Bytes;
use std::sync::Arc;

/// A logged-in session, as virtualized commands see it.
pub(crate) struct Ctx<'a> {
    /// Has a tenant: [`Ctx::new`] checks, and nothing a command calls logs the session out
    /// (only the end of the session takes the tenant).
    s: &'a mut Session,
}

impl<'a> Ctx<'a> {
    /// The context of a logged-in session; None before login.
    pub(crate) fn new(s: &'a mut Session) -> Option<Ctx<'a>> {
        s.tenant.is_some().then_some(Ctx { s })
    }

    pub(crate) fn tenant(&self) -> &Tenant {
        match &self.s.tenant {
            Some(t) => t,
            None => unreachable!("a Ctx is made only for a logged-in session"),
        }
    }

    pub(crate) fn tenant_mut(&mut self) -> &mut Tenant {
        match &mut self.s.tenant {
            Some(t) => t,
            None => unreachable!("a Ctx is made only for a logged-in session"),
        }
    }

    /// The cache's channel namespace.
    pub(crate) fn ns(&self) -> Namespace {
        self.tenant().ns.clone()
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.s.shared
    }

    pub(crate) fn in_multi(&self) -> bool {
        self.s.in_multi
    }

    pub(crate) fn pubsub(&self) -> &PubSub {
        &self.s.pubsub
    }

    pub(crate) fn pubsub_mut(&mut self) -> &mut PubSub {
        &mut self.s.pubsub
    }

    /// Publishes the session's patterns (for PUBLISH's receiver count).
    pub(crate) fn sync_patterns(&self) {
        self.s.sync_patterns()
    }

    /// Turns the session's client-side caching bookkeeping on or off.
    pub(crate) fn set_tracking(&mut self, on: bool) {
        self.s.tracking = on;
    }

    /// `CLIENT REPLY`: the session's reply mode from now on; whether this command's own
    /// reply is dropped.
    pub(crate) fn set_reply_mode(&mut self, mode: ReplyMode, muted: bool) {
        self.s.reply_mode = mode;
        self.s.muted = muted;
    }

    pub(crate) fn reply_mode(&self) -> ReplyMode {
        self.s.reply_mode
    }

    pub(crate) fn uses_mux(&self) -> bool {
        self.s.uses_mux()
    }

    /// Hands the session's `INFO` counters to its cache's now (its own commands show at once).
    pub(crate) fn flush_stats(&mut self) {
        self.s.flush_info()
    }

    pub(crate) fn reply(&mut self, bytes: Bytes) {
        self.s.reply(bytes)
    }

    pub(crate) fn reply_value(&mut self, v: &Value) {
        self.s.reply_value(v)
    }

    pub(crate) fn reply_error(&mut self, msg: &str) {
        self.s.reply_error(msg)
    }

    /// A refusal; inside MULTI it also dooms the transaction.
    pub(crate) fn refuse(&mut self, msg: &str) {
        self.s.refuse(msg)
    }

    pub(crate) async fn ensure_upstream(&mut self) -> bool {
        self.s.ensure_upstream().await
    }

    pub(crate) async fn forward_command(&mut self, args: &[&[u8]], on_reply: OnReply) {
        self.s.forward_command(args, on_reply).await
    }

    pub(crate) fn forward_helper(&mut self, args: &[&[u8]]) {
        self.s.forward_helper(args)
    }

    pub(crate) fn reserve_channels(&mut self, adding: i64) -> Result<(), String> {
        self.s.reserve_channels(adding)
    }

    pub(crate) async fn forward_subscription(&mut self, args: &[&[u8]], confirmations: Option<usize>) {
        self.s.forward_subscription(args, confirmations).await
    }
}
