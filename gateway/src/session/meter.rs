//! Metering inside a session: ECPU per command and reply, the cache's ECPU limit, script time.

use super::Session;
use crate::cache_stats::{self, Outcome};
use crate::metering::{self, Meter, TxPosition};
use crate::resp::reply::ReplyScanner;
use shoal_commands::{CommandSpec, Hits};
use shoal_types::UsageCounters;
use std::time::{Duration, Instant};

impl Session {
    /// Meters one reply from the session's own connection (`delivered`: bytes the client got).
    pub(super) fn meter_reply(&mut self, meter: Meter, reply: &[u8], delivered: u64) {
        match meter.tx {
            TxPosition::Plain => self.bill(meter, reply, delivered),
            TxPosition::Queued if !reply.starts_with(b"-") => self.queued.push((meter, delivered)),
            TxPosition::Queued => self.bill(meter, reply, delivered),
            TxPosition::Exec => {
                let now = self.now();
                self.count_call(&meter, now, reply);
                let elements = metering::ecpu::reply_elements(reply);
                if reply.starts_with(b"*") && elements == self.queued.len() as u64 {
                    // Each result belongs to the command queued in its place.
                    let mut pos = reply.iter().position(|&b| b == b'\n').map_or(reply.len(), |i| i + 1);
                    for (m, queued_bytes) in std::mem::take(&mut self.queued) {
                        let element = &reply[pos..];
                        let len = match ReplyScanner::new().next(element) {
                            Ok(Some(r)) => r.len,
                            _ => element.len(),
                        };
                        let result = &element[..len];
                        pos += len;
                        self.bill(m, result, queued_bytes + len as u64);
                    }
                } else {
                    self.bill_queued();
                }
            }
            TxPosition::Discard => {
                let now = self.now();
                self.count_call(&meter, now, reply);
                self.bill_queued()
            }
        }
    }

    /// Queued commands that never ran (DISCARD, aborted EXEC, lost connection) are billed
    /// on the bytes they moved.
    pub(super) fn bill_queued(&mut self) {
        for (m, queued_bytes) in std::mem::take(&mut self.queued) {
            self.bill(m, b"", queued_bytes);
        }
    }

    /// Meters a mux chunk: replies of the given lengths, one per metered request sent to
    /// the mux, then `partial` bytes of a reply to come.
    pub(super) fn meter_mux_replies(&mut self, chunk: &[u8], lens: &[usize], partial: usize) {
        let (mut pos, mut billed, mut run) = (0, None, None);
        for &len in lens {
            let meter = self.mux_meters.pop_front().flatten();
            // The mux gives every reply's length (bounded by the chunk all the same).
            let len = len.min(chunk.len() - pos);
            let mut reply = &chunk[pos..pos + len];
            pos += len;
            // The rest of a reply whose start came in an earlier chunk.
            let part = match self.mux_part.taken {
                0 => None,
                _ => Some(std::mem::take(&mut self.mux_part)),
            };
            let delivered = part.as_ref().map_or(0, |p| p.taken) + len as u64;
            if let Some(p) = &part {
                reply = &p.head;
            }
            let Some(m) = meter else { continue };
            if reply == crate::mux::LOST {
                // `-ERR cache connection lost`: the gateway's own answer, not billed.
                if m.spec.is_some_and(|s| s.script) {
                    self.script_lost(m.started);
                    self.scripts_over(1);
                }
                continue;
            }
            let counters = billed.get_or_insert_with(UsageCounters::default);
            if !self.count_alike(&mut run, &m, reply, delivered, counters) {
                let c = self.measure(m, reply, delivered);
                counters.add(&c);
            }
        }
        if let Some(done) = run {
            self.count_run(done);
        }
        if partial > 0 {
            self.mux_part.add(&chunk[chunk.len() - partial..]);
        }
        // One tally for the batch: its replies arrived in one event.
        if let Some(c) = billed {
            self.tally(c);
        }
    }

    /// Counts a reply in a run of like ones if it is one (see [`Run`]): a plain command that
    /// costs its weight and no more (so the bucket is owed nothing), not a script, not
    /// blocking, answered without an error. False: it has to be measured on its own.
    #[inline]
    fn count_alike(
        &mut self,
        run: &mut Option<Run>,
        m: &Meter,
        reply: &[u8],
        delivered: u64,
        billed: &mut UsageCounters,
    ) -> bool {
        let Some(spec) = m.spec else { return false };
        let weight = spec.weight as u64;
        let plain = m.tx == TxPosition::Plain;
        let in_run =
            run.as_ref().is_some_and(|r| plain && std::ptr::eq(r.spec, spec) && r.started == m.started);
        // The command's kind is checked once per run; its reply's size and kind every time.
        if !in_run
            && (!plain
                || spec.script
                || spec.blocking
                || spec.per_element > 0
                || spec.hits == Hits::Elements
                || weight == 0
                || self.tenant.is_none())
        {
            return false;
        }
        if metering::ecpu::transfer_milli(m.request + delivered) > weight {
            return false;
        }
        let miss = match reply.first() {
            None | Some(b'-' | b'!') => return false,
            Some(_) => metering::ecpu::is_nil(reply),
        };
        match run {
            Some(r) if in_run => r.calls += 1,
            _ => {
                if let Some(done) = run.take() {
                    self.count_run(done);
                }
                // As `count_call` and `measure` time it: the replies after the first of one
                // event took no time of their own, and share its latency bucket.
                let now = self.now();
                let since = m.started.max(self.last_reply_at);
                let usec = if since >= now { 0 } else { (now - since).as_micros() as u64 };
                self.last_reply_at = now;
                let slot = self.latency_slot(m.started, now);
                *run = Some(Run { spec, calls: 1, started: m.started, usec, slot });
            }
        }
        billed.commands += 1;
        billed.ecpu_milli += weight;
        billed.bytes_in += m.request;
        billed.bytes_out += delivered;
        if spec.hits == Hits::Value {
            billed.hits += !miss as u64;
            billed.misses += miss as u64;
        }
        true
    }

    /// Counts a run's calls in `commandstats` and its latencies.
    fn count_run(&mut self, run: Run) {
        let full = self.tally.info.command(run.spec.index, run.calls, run.usec, Outcome::Ok);
        self.info_counted(full);
        self.count_latency(run.slot, run.calls);
    }

    /// Meters one command and charges the cache's bucket what it cost beyond its estimate.
    pub(super) fn bill(&mut self, meter: Meter, reply: &[u8], delivered: u64) {
        let c = self.measure(meter, reply, delivered);
        self.tally(c);
    }

    /// Counts a script as in flight when it is sent (with metering on: its meter says so).
    pub(super) fn script_sent(&mut self, meter: Option<&Meter>) {
        if let (Some(t), true) = (&self.tenant, meter.is_some_and(|m| m.spec.is_some_and(|s| s.script))) {
            self.shared.scripts.started(&t.route.node_addr, &t.cache);
            self.scripts_inflight += 1;
        }
    }

    /// How long the cache's scripts stay paused (one was ended by force), if they are.
    pub(super) fn scripts_paused(&self) -> Option<Duration> {
        let t = self.tenant.as_ref()?;
        self.shared.scripts.paused(&t.cache, Instant::now())
    }

    /// A script's node went away under it: ended by force (restarted to end it, or crashed)
    /// if it ran long enough to have been past its time limit; a younger one was not (its
    /// node failed over or restarted for another reason), and pauses nothing.
    pub(super) fn script_lost(&self, started: Instant) {
        if started.elapsed() >= shoal_types::MIN_SCRIPT_TIME_LIMIT {
            self.script_struck();
        }
    }

    /// One of the cache's scripts was ended by force: its scripts pause for a while.
    pub(super) fn script_struck(&self) {
        if let Some(t) = &self.tenant {
            let pause = self.shared.scripts.strike(&t.cache, Instant::now(), self.shared.config.script_pause);
            tracing::info!(cache = %t.cache, pause_s = pause.as_secs(), "a script was ended by force: the cache's scripts pause");
        }
    }

    /// `n` of the session's scripts in flight are over.
    pub(super) fn scripts_over(&mut self, n: u32) {
        let n = n.min(self.scripts_inflight);
        if let (Some(t), true) = (&self.tenant, n > 0) {
            self.shared.scripts.ended(&t.route.node_addr, &t.cache, n);
            self.scripts_inflight -= n;
        }
    }

    /// The counters of one command (to tally); charges the bucket and counts the latency.
    #[inline]
    pub(super) fn measure(&mut self, meter: Meter, reply: &[u8], delivered: u64) -> UsageCounters {
        let mut c = metering::command(meter.spec, meter.request, reply, delivered);
        let now = self.now();
        self.count_call(&meter, now, reply);
        if meter.spec.is_some_and(|s| s.script) {
            // Its time on the node: from when it was sent, or the reply before it arrived,
            // whichever is later, to its reply (none: it never ran, as in a DISCARDed MULTI).
            if !reply.is_empty() {
                let ran = now.saturating_duration_since(meter.started.max(self.last_reply_at));
                c.ecpu_milli += metering::ecpu::script_time_milli(ran);
            }
            if reply.starts_with(b"-ERR Script killed") {
                self.script_struck();
            }
            self.scripts_over(1);
        }
        self.last_reply_at = now;
        if let Some(t) = self.tenant.as_ref().filter(|t| t.bucket.limited()) {
            t.bucket.debit(c.ecpu_milli.saturating_sub(meter.estimate()));
        }
        if c.commands > 0 {
            let slot = self.latency_slot(meter.started, now);
            self.count_latency(slot, 1);
        }
        c
    }

    /// The latency bucket of a command read at `started` and answered `now`: the replies of
    /// one event to the requests of one read share it.
    #[inline]
    fn latency_slot(&mut self, started: Instant, now: Instant) -> usize {
        match self.latency_memo {
            Some((read, at, slot)) if read == started && at == now => slot,
            _ => {
                let slot = metering::latency_slot(now.saturating_duration_since(started));
                self.latency_memo = Some((started, now, slot));
                slot
            }
        }
    }

    /// Counts a command whose reply came from the node in `commandstats` and `errorstats`.
    /// Its time is the gateway's view of it: from when it was sent, or the reply before it
    /// arrived, whichever is later, to its reply; none for a command queued in MULTI (EXEC's
    /// time has it) or a blocking one (its time blocked cannot be told from its time run).
    #[inline]
    fn count_call(&mut self, meter: &Meter, now: Instant, reply: &[u8]) {
        // (No reply: a queued command that never ran.)
        if self.tenant.is_none() || reply.is_empty() {
            return;
        }
        let mut full = false;
        let error = cache_stats::error_message(reply);
        if let Some(spec) = meter.spec {
            let usec = match meter.tx == TxPosition::Queued || spec.blocking {
                true => 0,
                false => {
                    // (The replies after the first of one event took no time of their own.)
                    let since = meter.started.max(self.last_reply_at);
                    if since >= now {
                        0
                    } else {
                        (now - since).as_micros() as u64
                    }
                }
            };
            let outcome = match error {
                None => Outcome::Ok,
                Some(message) if cache_stats::rejected(message) => Outcome::Rejected,
                Some(_) => Outcome::Failed,
            };
            full = self.tally.info.command(spec.index, 1, usec, outcome);
        }
        if let Some(message) = error {
            full |= self.tally.info.error(cache_stats::code_of(message));
        }
        self.info_counted(full);
    }

    /// Counts a command the gateway answered itself, or refused (`rejected`), in
    /// `commandstats`; its error reply, if any, was counted in `errorstats` as it was made
    /// (`errors_before`: the session's error replies before the command).
    pub(super) fn count_local_call(
        &mut self,
        spec: Option<&CommandSpec>,
        started: Instant,
        errors_before: u64,
        rejected: bool,
    ) {
        let (Some(spec), true) = (spec, self.tenant.is_some()) else { return };
        let outcome = match (rejected, self.local_errors.0 > errors_before) {
            (true, _) => Outcome::Rejected,
            (false, false) => Outcome::Ok,
            (false, true) if self.local_errors.1 => Outcome::Rejected,
            (false, true) => Outcome::Failed,
        };
        let usec = started.elapsed().as_micros() as u64;
        let full = self.tally.info.command(spec.index, 1, usec, outcome);
        self.info_counted(full);
    }

    /// Counts an error reply the gateway made, in `errorstats`.
    pub(super) fn count_local_error(&mut self, message: &str) {
        if self.tenant.is_none() {
            return;
        }
        self.local_errors = (self.local_errors.0 + 1, cache_stats::rejected(message.as_bytes()));
        let reply = format!("-{message}");
        let full = cache_stats::error_code(reply.as_bytes()).is_some_and(|code| self.tally.info.error(code));
        self.info_counted(full);
    }

    /// After the session's `INFO` counters grew: handed to the cache's at once when `full`,
    /// else within [`metering::FLUSH_EVERY`].
    fn info_counted(&mut self, full: bool) {
        if full {
            self.flush_info();
        } else if self.tally.flush_at.is_none() {
            self.tally.flush_at = Some(Instant::now() + metering::FLUSH_EVERY);
        }
    }

    /// Hands the session's `INFO` counters to its cache's.
    pub(crate) fn flush_info(&mut self) {
        if let Some(t) = &self.tenant {
            t.stats.add(&mut self.tally.info);
        }
    }

    /// Before a metered command runs: the cache's ECPU limit lets it through, possibly after
    /// a short wait (`throttle_wait`, shared by the requests of one read), or it is refused
    /// with `-THROTTLED` (not forwarded, not billed).
    pub(super) async fn admit(&mut self) -> bool {
        let (Some(t), Some(meter)) = (self.tenant.as_ref(), self.meter_next.as_ref()) else { return true };
        if !self.must_wait_for_bucket() {
            return true;
        }
        let (bucket, cost) = (t.bucket.clone(), meter.estimate());
        loop {
            match bucket.try_take(cost) {
                Ok(()) => return true,
                Err(wait) if self.throttle_waited + wait <= self.shared.config.throttle_wait => {
                    let started = Instant::now();
                    tokio::time::sleep(wait).await;
                    self.throttle_waited += started.elapsed();
                }
                Err(_) => break,
            }
        }
        let refused = self.meter_next.take();
        let name = self.tenant.as_ref().map(|t| t.route.cache_name.clone()).unwrap_or_default();
        self.tally(UsageCounters { throttled: 1, ..Default::default() });
        self.refuse(&format!("THROTTLED ECPU limit of cache {name} exceeded"));
        if let Some(m) = refused {
            self.count_local_call(m.spec, m.started, 0, true);
        }
        false
    }

    /// Whether the next metered command has to pass [`Session::admit`]: its cache has an
    /// ECPU limit and the command is not free (checked first, without an await).
    pub(super) fn must_wait_for_bucket(&self) -> bool {
        let (Some(t), Some(meter)) = (self.tenant.as_ref(), self.meter_next.as_ref()) else { return false };
        t.bucket.limited() && !meter.free()
    }

    /// The time of the event being handled, read on first use.
    pub(super) fn now(&mut self) -> Instant {
        *self.clock.get_or_insert_with(Instant::now)
    }

    /// The Unix minute of the event being handled (the wall clock is read when the last
    /// one read has ended: a clock step shows within a minute).
    fn minute(&mut self) -> i64 {
        let now = self.now();
        if now >= self.minute.1 {
            let (minute, left) = metering::current_minute_and_rest();
            self.minute = (minute, now + left);
        }
        self.minute.0
    }

    /// Adds to the session's counters (of the current minute), in its journal slot.
    pub(super) fn tally(&mut self, c: UsageCounters) {
        let minute = self.minute();
        let Some(t) = &self.tenant else { return };
        if self.tally.slot.is_none() || minute != self.tally.minute {
            // The old minute's slot is sealed as it drops.
            self.tally.slot = Some(self.shared.ledger.slot(&t.cache, minute));
            self.tally.minute = minute;
        }
        if let Some(slot) = &self.tally.slot {
            slot.add(&c);
        }
        if c.ecpu_milli > 0 {
            self.tally.info.ecpu_milli += c.ecpu_milli;
            self.info_counted(false);
        }
    }

    /// Counts `n` commands' latency (handed to the histogram within [`metering::FLUSH_EVERY`]).
    pub(super) fn count_latency(&mut self, slot: usize, n: u64) {
        self.tally.latency[slot] += n;
        if self.tally.flush_at.is_none() {
            self.tally.flush_at = Some(Instant::now() + metering::FLUSH_EVERY);
        }
    }

    /// Hands the session's latencies to the cache's histogram.
    pub(super) fn flush_tally(&mut self) {
        if let Some(t) = &self.tenant {
            crate::metrics::record_latencies(&t.latency, &self.tally.latency);
            t.stats.add(&mut self.tally.info);
        }
        self.tally.latency = Default::default();
        self.tally.flush_at = None;
    }
}

/// Like replies of one event (the same command, read together, each costing just its
/// weight and answered without an error) are counted together: one `commandstats` update
/// and one latency count for the run, the totals measuring each would have given.
struct Run {
    spec: &'static CommandSpec,
    calls: u64,
    /// When its requests were read.
    started: Instant,
    /// The first call's time (the others took none of their own).
    usec: u64,
    slot: usize,
}
