//! What each request becomes: forwarded bytes, a rewrite, a local answer or a refusal,
//! decided from the command table; big requests passed on as they come.

use super::decide::{self, Action};
use super::{OnReply, Pending, Session, MAX_HELD_REQUEST, STORAGE_FULL, STREAM_REQUEST_FROM};
use crate::metering::{Meter, TxPosition};
use crate::resp::request::Frame;
use crate::resp::{self};
use bytes::{Buf, Bytes};
use shoal_commands::{self as commands, CommandSpec, Treatment};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// A big request being passed on (or dropped) as it comes.
pub(super) struct Streaming {
    pub(super) rest: crate::resp::request::Rest,
    /// Passed on upstream; false: dropped, and `refusal` answers it once it has all come.
    pub(super) forward: bool,
    pub(super) refusal: Option<String>,
    /// Bytes of the request so far, and the ECPU estimate the bucket was charged for it.
    pub(super) bytes: u64,
    pub(super) charged: u64,
}

/// The refusal of a request too big for a command the gateway holds whole.
pub(super) fn too_large(command: &str, limit: u64) -> String {
    format!("ERR request too large: the gateway holds at most {} KiB of a {command} command", limit >> 10)
}

impl Session {
    /// Handles every complete request in the client buffer.
    pub(super) async fn on_client_input(&mut self) {
        let mut handled = 0u64;
        self.throttle_waited = Duration::ZERO;
        while !self.closing {
            if self.streaming.is_some() {
                if !self.stream_request() {
                    break;
                }
                continue;
            }
            match self.parser.next(&self.client_in, self.limits()) {
                Ok(Some(frame)) if frame.inline => self.inline_to_resp(frame),
                Ok(Some(frame)) => {
                    let args = self.parser.take_args();
                    let spec = self.spec_of(&args);
                    if self.must_wait_for_upstream(spec) {
                        // Answered from a node-wide view: let the commands before it run first.
                        self.parser.give_back(args);
                        self.barrier = true;
                        break;
                    }
                    if !args.is_empty() {
                        self.on_request(frame, spec, &args).await;
                        handled += 1;
                    }
                    self.parser.give_back(args);
                    self.client_in.advance(frame.len);
                }
                Ok(None) => {
                    if self.client_in.len() >= STREAM_REQUEST_FROM && Box::pin(self.start_streaming()).await {
                        continue;
                    }
                    break;
                }
                Err(e) => {
                    self.reply_error(&format!("ERR {e}"));
                    self.close_after_replies();
                }
            }
        }
        self.mux_flush();
        if let Some(t) = &self.tenant {
            t.entry.commands.fetch_add(handled, Ordering::Relaxed);
            t.entry.last_active.store(t.entry.created.elapsed().as_secs(), Ordering::Relaxed);
        }
    }

    /// A big incomplete request at the front of the input: passed on upstream as it comes
    /// if Valkey runs it as it is, else held until `MAX_HELD_REQUEST` and then refused.
    /// Whether the session now streams it.
    pub(super) async fn start_streaming(&mut self) -> bool {
        let Some((args, pos, rest)) = self.parser.partial() else { return false };
        if self.tenant.is_none() || args.is_empty() {
            return false;
        }
        let name = &self.client_in[args[0].clone()];
        let sub = args.get(1).map(|r| &self.client_in[r.clone()]);
        let spec = commands::table().lookup(name, sub);
        let passes =
            spec.is_none_or(|s| s.treatment == Treatment::Pass && !s.container && !s.shoal.transaction);
        if !passes && self.client_in.len() < MAX_HELD_REQUEST {
            return false;
        }
        let shown =
            spec.map_or_else(|| String::from_utf8_lossy(name).to_uppercase(), CommandSpec::display_name);
        let (pos, rest) = (pos, rest);
        self.parser.abandon();
        self.begin_request();
        let mut streaming = Streaming { rest, forward: false, refusal: None, bytes: pos as u64, charged: 0 };
        if !passes {
            streaming.refusal = Some(too_large(&shown, MAX_HELD_REQUEST as u64));
        } else if spec.is_some_and(|s| s.refused_when_full)
            && self.tenant.as_ref().is_some_and(|t| t.live.storage_full())
        {
            streaming.refusal = Some(STORAGE_FULL.to_string());
        } else {
            let tx = if self.in_multi { TxPosition::Queued } else { TxPosition::Plain };
            let started = self.now();
            if self.shared.config.metering {
                self.meter_next = Some(Meter { spec, request: pos as u64, tx, started });
                if !self.admit().await {
                    // Refused (THROTTLED, already answered): the rest is dropped as it comes.
                    self.client_in.advance(pos);
                    self.streaming = Some(streaming);
                    return true;
                }
                streaming.charged = self.meter_next.as_ref().map_or(0, Meter::estimate);
            }
            if self.ensure_upstream().await {
                streaming.forward = true;
                self.up_out.extend_from_slice(&self.client_in[..pos]);
                let meter = self.meter_next.take();
                self.script_sent(meter.as_ref());
                // (Its arguments are not all here: a stream read counts as blocking.)
                let blocked = self.blocked(spec.is_some_and(|s| s.blocking));
                self.push_pending(Pending::Upstream(OnReply::Forward, meter, blocked));
            } else {
                // Unavailable (already answered): the rest is dropped as it comes.
                self.meter_next = None;
            }
        }
        self.client_in.advance(pos);
        self.streaming = Some(streaming);
        true
    }

    /// Passes on (or drops) what has come of the request being streamed; whether all of it
    /// has come.
    pub(super) fn stream_request(&mut self) -> bool {
        let limits = self.limits();
        let Some(st) = self.streaming.as_mut() else { return true };
        let n = match st.rest.advance(&self.client_in, limits) {
            Ok(n) => n,
            Err(e) => {
                // The client broke the protocol mid-request: nothing after it can be framed.
                self.streaming = None;
                self.reply_error(&format!("ERR {e}"));
                self.close_now();
                return false;
            }
        };
        if st.forward {
            self.up_out.extend_from_slice(&self.client_in[..n]);
        }
        self.client_in.advance(n);
        st.bytes += n as u64;
        if !st.rest.done() {
            return false;
        }
        let Some(st) = self.streaming.take() else { return true };
        if let Some(refusal) = st.refusal {
            self.refuse(&refusal);
        } else if st.forward {
            // The request's real size, for its metering and its cache's ECPU bucket.
            if let Some(Pending::Upstream(_, Some(meter), _)) = self.pending.back_mut() {
                meter.request = st.bytes;
                let more = meter.estimate().saturating_sub(st.charged);
                if let Some(t) = self.tenant.as_ref().filter(|t| t.bucket.limited()) {
                    t.bucket.debit(more);
                }
            }
        }
        true
    }

    /// Whether this request reads a node-wide view (INFO, PUBSUB …) while replies to earlier
    /// requests are still outstanding: then it waits, so that it sees their effects.
    pub(super) fn must_wait_for_upstream(&self, spec: Option<&CommandSpec>) -> bool {
        spec.is_some_and(|s| s.shoal.barrier)
            && self.tenant.is_some()
            && (self.has_pending_upstream() || !self.pubsub.inflight.is_empty())
    }

    /// Rewrites the inline command at the front of the input, and every complete request
    /// after it, into RESP in one pass; the next parse handles them like any request.
    pub(super) fn inline_to_resp(&mut self, _frame: Frame) {
        let limits = self.limits();
        resp::request::inline_to_resp(&mut self.client_in, limits);
    }

    /// The bytes of argument `i`.
    pub fn arg(&self, args: &[Range<usize>], i: usize) -> &[u8] {
        &self.client_in[args[i].clone()]
    }

    /// The table's row for a request (by its name and maybe subcommand); None for an
    /// unknown command (forwarded: Valkey answers it).
    pub(super) fn spec_of(&self, args: &[Range<usize>]) -> Option<&'static CommandSpec> {
        let name = &self.client_in[args.first()?.clone()];
        let sub = args.get(1).map(|r| &self.client_in[r.clone()]);
        commands::table().lookup(name, sub)
    }

    /// Decides what one request becomes ([`super::decide`]) and carries it out: forwarded
    /// bytes, a rewrite, a local answer or a refusal.
    pub(super) async fn on_request(
        &mut self,
        frame: Frame,
        spec: Option<&'static CommandSpec>,
        args: &[Range<usize>],
    ) {
        self.begin_request();
        if let Some(msg) = decide::reject(spec, frame.len, self) {
            self.refuse(msg);
            let now = self.now();
            return self.count_local_call(spec, now, 0, true);
        }
        if self.tenant.is_some() && self.shared.config.metering {
            let tx = match spec.filter(|s| s.shoal.transaction).map(|s| s.name.as_str()) {
                Some("exec") => TxPosition::Exec,
                Some("discard") => TxPosition::Discard,
                _ if self.in_multi => TxPosition::Queued,
                _ => TxPosition::Plain,
            };
            let started = self.now();
            self.meter_next = Some(Meter { spec, request: frame.len as u64, tx, started });
            if self.must_wait_for_bucket() && !Box::pin(self.admit()).await {
                return;
            }
        }
        let errors_before = self.local_errors.0;
        let action = match spec.filter(|s| s.shoal.repeats).and_then(|s| {
            let argv: Vec<&[u8]> = args.iter().map(|r| &self.client_in[r.clone()]).collect();
            decide::refuse_arguments(s, &argv)
        }) {
            Some(refusal) => Action::Refuse(refusal),
            None => decide::decide(spec, frame.len, self),
        };
        let refused = match action {
            Action::Refuse(msg) => {
                self.refuse(&msg);
                true
            }
            Action::Virtual => {
                // Boxed, as every rarely taken path with awaits: a session's task is as big
                // as its largest await, and stays that big while the client idles.
                Box::pin(crate::cmd::run(self, spec.expect("virtual commands are in the table"), args)).await;
                false
            }
            Action::Forward { mux } => {
                self.forward_request(frame, args, spec, mux).await;
                false
            }
        };
        // Answered by the gateway itself: not billed, so the bucket gets its estimate back.
        if let Some(m) = self.meter_next.take() {
            if let Some(t) = self.tenant.as_ref() {
                t.bucket.refund(m.estimate());
            }
            self.count_local_call(spec, m.started, errors_before, refused);
        }
    }

    /// Forwards the request at the front of the input as it is, keeping MULTI's state.
    async fn forward_request(
        &mut self,
        frame: Frame,
        args: &[Range<usize>],
        spec: Option<&'static CommandSpec>,
        mux: bool,
    ) {
        if let Some(transaction) = spec.filter(|s| s.shoal.transaction) {
            if transaction.name == "multi" {
                self.in_multi = true;
            } else {
                // EXEC or DISCARD; an EXEC after a refused command aborts.
                let abort = self.multi_dirty && transaction.name == "exec";
                self.in_multi = false;
                self.multi_dirty = false;
                if abort {
                    let err = Bytes::from_static(
                        b"-EXECABORT Transaction discarded because of previous errors.\r\n",
                    );
                    return Box::pin(self.forward_command(&[b"DISCARD"], OnReply::Replace(err))).await;
                }
            }
        }
        if !(mux || self.upstream_ready() || Box::pin(self.ensure_upstream()).await) {
            return;
        }
        let tracked_keys = spec
            .filter(|sp| self.tracking || sp.name == "flushdb")
            .map(|spec| self.note_tracking(spec, args));
        if mux {
            return self.mux_push(frame.len);
        }
        self.up_out.extend_from_slice(&self.client_in[..frame.len]);
        let meter = self.meter_next.take();
        self.script_sent(meter.as_ref());
        let blocks = spec.filter(|s| s.blocking).is_some_and(|spec| {
            let argv: Vec<&[u8]> = args.iter().map(|r| &self.client_in[r.clone()]).collect();
            spec.blocks(&argv)
        });
        let blocked = self.blocked(blocks);
        self.push_pending(Pending::Upstream(OnReply::Forward, meter, blocked));
        if let (Some(spec), Some(keys), true) = (spec, tracked_keys, self.tracking) {
            self.after_tracked_command(spec, keys);
        }
    }

    /// For a blocking command about to go upstream: the client counted among its cache's
    /// blocked clients until the command's reply (none inside MULTI, where nothing blocks).
    fn blocked(&self, blocks: bool) -> Option<crate::cache_stats::Blocked> {
        let t = self.tenant.as_ref().filter(|_| blocks && !self.in_multi)?;
        Some(t.stats.block())
    }

    /// Client-side caching bookkeeping for a forwarded command (only while tracking is on):
    /// the command's keys, for [`Session::after_tracked_command`] too.
    pub(super) fn note_tracking(&self, spec: &CommandSpec, args: &[Range<usize>]) -> Vec<Vec<u8>> {
        let Some(t) = &self.tenant else { return Vec::new() };
        if spec.name == "flushdb" {
            crate::tracking::invalidate_all(&self.shared.clients, &t.cache);
        }
        if !self.tracking {
            return Vec::new();
        }
        let argv: Vec<&[u8]> = args.iter().map(|r| &self.client_in[r.clone()]).collect();
        let keys: Vec<Vec<u8>> = spec.keys(&argv).iter().map(|k| k.to_vec()).collect();
        if let Some(tracking) = t.entry.tracking.lock().unwrap().as_mut() {
            crate::tracking::note_command(tracking, spec, &keys);
        }
        keys
    }

    /// A refusal by the gateway; inside MULTI it also dooms the transaction, as Valkey does.
    pub fn refuse(&mut self, msg: &str) {
        if self.in_multi {
            self.multi_dirty = true;
        }
        self.reply_error(msg);
    }
}
