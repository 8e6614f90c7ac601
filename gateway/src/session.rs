//! One client connection: authenticate, then forward commands to the cache's node.
//!
//! A single task drives both directions without blocking either: it reads the client and
//! the upstream into buffers, forwards complete requests byte for byte, and writes replies
//! back in request order. Replies the gateway makes itself (errors, virtualized commands)
//! wait in `pending` behind the upstream replies that precede them, so pipelines keep
//! their order. Virtualized commands live in [`crate::virtualize`].
//!
//! Until a session needs a connection of its own, its stateless commands go to the cache's
//! shared upstream ([`crate::mux`]) instead, in batches; their replies come back per batch
//! and take their place in `pending` like any other.

use crate::auth::login::{Attempt, LoginNote};
use crate::clients::{ClientEntry, Invalidation};
use crate::listener::Shared;
use crate::metering::{self, Counters, Meter, Role};
use crate::policy::{self, Treatment};
use crate::pubsub::{Namespace, CONFIRMATIONS};
use crate::resp::reply::ReplyScanner;
use crate::resp::request::{Frame, Limits, RequestParser};
use crate::resp::value::{self, Value};
use crate::resp::{self};
use crate::router::Verified;
use crate::upstream::{read_opt, write_opt};
use crate::{upstream, GatewayError};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use shoal_auth::throttle::{FailureOutcome, Verdict};
use shoal_types::VerifyRequest;
use shoal_types::{CacheId, TenantRoute};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

/// Stop reading a side while this much output waits to be written to the other.
const HIGH_WATER: usize = 4 * 1024 * 1024;
/// For subscribers, stop reading upstream this early: a subscriber that does not read then
/// makes Valkey's own pub/sub output-buffer limits (32 MB hard, 8 MB for 60 s) apply upstream
/// instead of the gateway holding the backlog.
const HIGH_WATER_SUBSCRIBED: usize = 64 * 1024;
/// Stop reading the client while this many replies are outstanding.
const MAX_PENDING: usize = 64 * 1024;
/// Stop reading the client while this many of its requests are in the mux.
const MAX_MUX_INFLIGHT: usize = 4096;

pub(crate) const NOAUTH: &str = "NOAUTH Authentication required.";
const TOKEN_EXPIRED: &str = "token expired";
/// Writes while the cache is over its `data_storage_mb` even after evicting keys with a TTL.
const STORAGE_FULL: &str = "OOM cache data storage limit reached";
/// The deadline that flushes the session's counters into the ledger.
const FLUSH: &str = "flush";

/// What to do with the next upstream reply.
pub(crate) enum OnReply {
    Forward,
    /// Drop it (a helper command the client did not send).
    Discard,
    /// Send these bytes instead, unless the reply is an error.
    Replace(Bytes),
    /// Rewrite it (decoded), unless it is an error.
    Transform(Box<dyn FnOnce(Value, u8) -> Value + Send>),
    /// Answer a pattern (un)subscription the gateway handles itself. It rides on a PING so
    /// that it reaches the client after the confirmations of earlier subscriptions.
    Confirm {
        kind: &'static [u8],
        pattern: Option<Vec<u8>>,
        delta: i64,
    },
}

/// An answer the client is owed, in request order.
pub(crate) enum Pending {
    /// A reply from the session's own upstream connection, and how to meter it.
    Upstream(OnReply, Option<Meter>),
    /// A reply the gateway made, sent once everything before it is sent.
    Local(Bytes),
    /// Close the connection once everything before it is sent.
    Close,
    /// One batch sent to the mux: its `count` replies arrive as one chunk.
    Mux { count: usize, bytes: usize },
}

/// A session's way to the cache's shared upstream connection.
struct MuxLink {
    handle: crate::mux::Handle,
    replies_tx: mpsc::UnboundedSender<crate::mux::Replies>,
    replies: mpsc::UnboundedReceiver<crate::mux::Replies>,
    /// The lengths vector of the last replies, for the next batch to fill.
    spare_lens: Vec<usize>,
}

/// Who the client is once authenticated.
pub(crate) struct Tenant {
    pub cache: CacheId,
    pub route: TenantRoute,
    /// The cache's route as the refresh keeps it (limits, storage flag).
    pub live: Arc<crate::router::LiveRoute>,
    pub ns: Namespace,
    /// The cache's database the client has selected (0-based, virtual).
    pub db: u32,
    pub entry: Arc<ClientEntry>,
    /// The upstream ACL user and password of a cache user's, LDAP user's or limited token's
    /// login (which carries its access string); None: the cache's own ACL user.
    pub upstream_login: Option<(String, String)>,
    /// That login's access string, checked before the commands the gateway answers itself.
    pub access: Option<Arc<shoal_auth::AccessString>>,
    /// The cache's `ecpu_per_second` bucket on this gateway.
    pub bucket: Arc<crate::metering::limit::Bucket>,
    pub latency: Arc<crate::metrics::Latency>,
}

/// Pub/sub bookkeeping, so that subscription confirmations and messages (which answer no
/// request one-for-one) are told apart from replies in RESP2.
#[derive(Default)]
pub(crate) struct PubSub {
    /// Subscriptions (channels + patterns, and shard channels) after the last confirmation.
    pub regular: i64,
    pub shard: i64,
    /// Confirmations still expected per in-flight (un)subscribe command; `None` means
    /// "until the count drops to 0" (unsubscribe from everything).
    pub inflight: VecDeque<Option<usize>>,
    /// The client's patterns, matched by the gateway against the catch-all's messages.
    pub patterns: Vec<Vec<u8>>,
    /// Keyspace-notification patterns, subscribed upstream as they are (client names).
    pub direct_patterns: Vec<Vec<u8>>,
    /// The upstream catch-all pattern subscription is requested / confirmed.
    pub catch_all: bool,
    pub catch_all_confirmed: bool,
    /// Client patterns whose confirmation the client has received.
    pub confirmed_patterns: i64,
}

impl PubSub {
    fn active(&self) -> bool {
        self.regular > 0 || self.shard > 0 || !self.inflight.is_empty() || !self.patterns.is_empty()
    }

    /// The subscription count the client sees: upstream's, with the catch-all replaced by
    /// the client's own patterns.
    pub fn visible_count(&self) -> i64 {
        self.regular - self.catch_all_confirmed as i64 + self.confirmed_patterns
    }
}

pub(crate) struct Session {
    pub shared: Arc<Shared>,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    parser: RequestParser,
    replies: ReplyScanner,
    pub client_in: BytesMut,
    client_out: BytesMut,
    up_in: BytesMut,
    pub up_out: BytesMut,
    up_read: Option<OwnedReadHalf>,
    up_write: Option<OwnedWriteHalf>,
    /// Counts the upstream connection in the metrics while it is open.
    up_metric: Option<crate::metrics::Upstream>,
    pending: VecDeque<Pending>,
    pub tenant: Option<Tenant>,
    /// Held until the client authenticates (caps unauthenticated connections).
    unauthenticated: Option<OwnedSemaphorePermit>,
    /// No more requests are read; the session ends once output is flushed.
    closing: bool,
    /// RESP version the client speaks (2 or 3).
    pub proto: u8,
    pub in_multi: bool,
    /// A command inside MULTI was refused by the gateway: EXEC must abort.
    pub multi_dirty: bool,
    pub pubsub: PubSub,
    last_activity: Instant,
    /// Requests wait until every outstanding upstream reply has arrived.
    barrier: bool,
    /// Invalidations for this client (client-side caching), once authenticated.
    inbox: Option<tokio::sync::mpsc::UnboundedReceiver<Invalidation>>,
    /// Completes when the gateway closes this connection (revoked token, shutdown, CLIENT
    /// KILL); made once at login, so the loop does not re-register a waiter per event.
    killed: Option<Pin<Box<OwnedNotified>>>,
    /// The loop's one timer, moved only when its deadline changes (see `deadline`).
    timer: Pin<Box<tokio::time::Sleep>>,
    timer_at: Instant,
    /// The time of the event being handled (monotonic, and its Unix minute), read once
    /// per event: every request and reply of a pipeline shares one clock read.
    clock: Option<(Instant, i64)>,
    /// The latency bucket last computed: (request read at, reply event at, bucket).
    latency_memo: Option<(Instant, Instant, usize)>,
    /// Whether `CLIENT TRACKING` is on (keeps the hot path free of tracking work otherwise).
    pub tracking: bool,
    /// When the token the client logged in with expires; after a grace period without a
    /// fresh `AUTH`, the connection is closed.
    token_expires: Instant,
    /// The shared upstream, while the session still uses it.
    mux: Option<MuxLink>,
    /// The session has used its own upstream connection: it no longer uses the mux.
    dedicated: bool,
    /// Requests of the batch being gathered (its `Pending::Mux` is the last in `pending`).
    mux_out: BytesMut,
    /// Requests sent to the mux and not answered yet (count, bytes), gathered ones included.
    mux_inflight: usize,
    mux_inflight_bytes: usize,
    /// The request being handled, until a forwarded command takes it (`None` = not metered).
    meter_next: Option<Meter>,
    /// Meters of the requests sent to the mux, in order.
    mux_meters: VecDeque<Option<Meter>>,
    /// Commands queued in MULTI and the bytes of their `+QUEUED`: billed at EXEC.
    queued: Vec<(Meter, u64)>,
    /// This session's counters not yet in the gateway's ledger.
    tally: metering::Tally,
    /// How long the requests of the current read waited for the ECPU limit (they share one
    /// `throttle_wait`, so a pipeline is not held back request by request).
    throttle_waited: Duration,
}

enum Event {
    ClientRead(std::io::Result<usize>),
    ClientWrote(std::io::Result<usize>),
    UpstreamRead(std::io::Result<usize>),
    UpstreamWrote(std::io::Result<usize>),
    Killed,
    TimedOut(&'static str),
    Invalidate(Option<Invalidation>),
    MuxReplies(Option<crate::mux::Replies>),
}

/// Serves one client until it leaves, breaks the protocol, or is closed.
/// A client connection: plain TCP (split without a lock) or TLS.
pub enum ClientConn {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

pub async fn run(shared: Arc<Shared>, conn: ClientConn, peer: SocketAddr, local: SocketAddr) {
    let Ok(permit) = shared.unauthenticated.clone().try_acquire_owned() else {
        let msg = b"-ERR max number of unauthenticated clients reached\r\n";
        let _ = match conn {
            ClientConn::Tcp(mut s) => s.write_all(msg).await,
            ClientConn::Tls(mut s) => s.write_all(msg).await,
        };
        return;
    };
    crate::metrics::session_started();
    let mut session = Session {
        shared,
        peer,
        local,
        parser: RequestParser::new(),
        replies: ReplyScanner::new(),
        client_in: BytesMut::with_capacity(16 * 1024),
        client_out: BytesMut::with_capacity(16 * 1024),
        up_in: BytesMut::with_capacity(16 * 1024),
        up_out: BytesMut::with_capacity(16 * 1024),
        up_read: None,
        up_write: None,
        up_metric: None,
        pending: VecDeque::new(),
        tenant: None,
        unauthenticated: Some(permit),
        closing: false,
        proto: 2,
        in_multi: false,
        multi_dirty: false,
        pubsub: PubSub::default(),
        last_activity: Instant::now(),
        barrier: false,
        inbox: None,
        killed: None,
        timer: Box::pin(tokio::time::sleep_until(Instant::now().into())),
        timer_at: Instant::now(),
        clock: None,
        latency_memo: None,
        tracking: false,
        token_expires: Instant::now(),
        mux: None,
        dedicated: false,
        mux_out: BytesMut::new(),
        mux_inflight: 0,
        mux_inflight_bytes: 0,
        meter_next: None,
        mux_meters: VecDeque::new(),
        queued: Vec::new(),
        tally: Default::default(),
        throttle_waited: Duration::ZERO,
    };
    let served = match conn {
        ClientConn::Tcp(mut stream) => {
            let (read, write) = stream.split();
            session.serve(read, write).await
        }
        ClientConn::Tls(stream) => {
            let (read, write) = tokio::io::split(stream);
            session.serve(read, write).await
        }
    };
    if let Err(e) = served {
        tracing::debug!(peer = %session.peer, error = %e, "session ended");
    }
    session.bill_queued();
    session.flush_tally();
    crate::metrics::session_ended();
    if let Some(t) = session.tenant.take() {
        session.shared.clients.unregister(&t.cache, &t.entry);
    }
}

impl Session {
    async fn serve<R, W>(&mut self, mut client_read: R, mut client_write: W) -> std::io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let started = Instant::now();
        loop {
            if self.closing && self.client_out.is_empty() && !self.waiting_on_upstream() {
                client_write.shutdown().await.ok();
                return Ok(());
            }
            let held_back = self.barrier && self.client_in.len() >= HIGH_WATER;
            let read_client = !self.closing
                && !held_back
                && self.up_out.len() < HIGH_WATER
                && self.client_out.len() < HIGH_WATER
                && self.pending.len() < MAX_PENDING
                && self.mux_inflight < MAX_MUX_INFLIGHT
                && self.mux_inflight_bytes < HIGH_WATER;
            let out_limit = if self.pubsub.active() { HIGH_WATER_SUBSCRIBED } else { HIGH_WATER };
            let read_upstream = self.up_read.is_some() && self.client_out.len() < out_limit;
            let deadline = self.deadline(started);
            if deadline.1.is_some() && deadline.0 != self.timer_at {
                self.timer_at = deadline.0;
                self.timer.as_mut().reset(deadline.0.into());
            }
            let event = tokio::select! {
                r = client_read.read_buf(&mut self.client_in), if read_client => Event::ClientRead(r),
                r = read_opt(self.up_read.as_mut(), &mut self.up_in), if read_upstream => Event::UpstreamRead(r),
                r = client_write.write(&self.client_out), if !self.client_out.is_empty() => Event::ClientWrote(r),
                r = write_opt(self.up_write.as_mut(), &self.up_out), if !self.up_out.is_empty() && self.up_write.is_some() => Event::UpstreamWrote(r),
                _ = killed(self.killed.as_mut()), if self.killed.is_some() => Event::Killed,
                msg = recv_opt(self.inbox.as_mut()), if self.inbox.is_some() => Event::Invalidate(msg),
                r = recv_mux(self.mux.as_mut()), if self.mux_inflight > 0 => Event::MuxReplies(r),
                _ = &mut self.timer, if deadline.1.is_some() => Event::TimedOut(deadline.1.unwrap_or("")),
            };
            self.clock = None;
            match event {
                Event::ClientRead(r) => {
                    if r? == 0 {
                        return Ok(());
                    }
                    self.last_activity = self.now().0;
                    self.on_client_input().await;
                    self.write_upstream_now();
                    write_now(&mut client_write, &mut self.client_out);
                }
                Event::ClientWrote(r) => self.client_out.advance(r?),
                Event::UpstreamRead(r) => {
                    match r {
                        Ok(n) if n > 0 => self.on_upstream_input(),
                        Ok(_) => self.upstream_lost("closed"),
                        Err(e) => self.upstream_lost(&e.to_string()),
                    }
                    write_now(&mut client_write, &mut self.client_out);
                    self.lift_barrier().await;
                }
                Event::MuxReplies(chunk) => {
                    if let Some(chunk) = chunk {
                        self.on_mux_replies(chunk);
                    }
                    while let Some(chunk) = self.mux.as_mut().and_then(|m| m.replies.try_recv().ok()) {
                        self.on_mux_replies(chunk);
                    }
                    write_now(&mut client_write, &mut self.client_out);
                    self.lift_barrier().await;
                    self.write_upstream_now();
                    write_now(&mut client_write, &mut self.client_out);
                }
                Event::UpstreamWrote(r) => match r {
                    Ok(n) => self.up_out.advance(n),
                    Err(e) => self.upstream_lost(&e.to_string()),
                },
                Event::Killed => return Ok(()),
                Event::Invalidate(Some(msg)) => {
                    // RESP2 clients get invalidations only as subscribers of __redis__:invalidate.
                    if self.proto >= 3 || self.pubsub.active() {
                        crate::tracking::encode(&msg, self.proto, &mut self.client_out);
                        write_now(&mut client_write, &mut self.client_out);
                    }
                }
                Event::Invalidate(None) => self.inbox = None,
                Event::TimedOut(FLUSH) => self.flush_tally(),
                Event::TimedOut(why) => {
                    tracing::debug!(peer = %self.peer, why, "closing connection");
                    if self.tenant.is_none() {
                        resp::error(&mut self.client_out, "ERR authentication timed out");
                    } else if why == TOKEN_EXPIRED && !self.has_pending_upstream() {
                        resp::error(
                            &mut self.client_out,
                            "ERR token expired: AUTH with a fresh token to stay connected",
                        );
                    }
                    self.closing = true;
                    self.pending.clear();
                    self.mux_meters.clear();
                    self.mux_out.clear();
                    self.mux_inflight = 0;
                    self.mux_inflight_bytes = 0;
                }
            }
        }
    }

    /// Requests held back by a barrier run once every reply they wait for has arrived.
    async fn lift_barrier(&mut self) {
        if self.barrier && !self.has_pending_upstream() && self.pubsub.inflight.is_empty() {
            self.barrier = false;
            self.on_client_input().await;
        }
    }

    /// When the connection times out, and why: unauthenticated too long, or idle.
    fn deadline(&self, started: Instant) -> (Instant, Option<&'static str>) {
        let (at, why) = self.close_deadline(started);
        match self.tally.flush_at {
            Some(flush) if why.is_none() || flush < at => (flush, Some(FLUSH)),
            _ => (at, why),
        }
    }

    fn close_deadline(&self, started: Instant) -> (Instant, Option<&'static str>) {
        let config = &self.shared.config;
        if self.closing {
            return (started, None);
        }
        if self.tenant.is_none() {
            return (started + config.auth_timeout, Some("authentication timeout"));
        }
        let expiry = self.token_expires + config.token_grace;
        let subscribed = self.pubsub.regular > 0 || self.pubsub.shard > 0;
        if config.idle_timeout > Duration::ZERO && self.pending.is_empty() && !subscribed {
            let idle = self.last_activity + config.idle_timeout;
            if idle < expiry {
                return (idle, Some("idle timeout"));
            }
        }
        // (Compared with the session's start: no clock read on every pass of the loop.)
        if self.token_expires > started + NO_EXPIRY / 2 {
            // A login without a token: nothing expires.
            return (started, None);
        }
        (expiry, Some(TOKEN_EXPIRED))
    }

    /// Writes pending upstream bytes right away if the socket takes them (saves a trip
    /// through the event loop per request); whatever is left waits for writability.
    fn write_upstream_now(&mut self) {
        if let (Some(w), false) = (self.up_write.as_ref(), self.up_out.is_empty()) {
            match w.try_write(&self.up_out) {
                Ok(n) => self.up_out.advance(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => self.upstream_lost(&e.to_string()),
            }
        }
    }

    fn waiting_on_upstream(&self) -> bool {
        self.mux_inflight > 0
            || (self.up_read.is_some() && self.pending.iter().any(|p| matches!(p, Pending::Upstream(..))))
    }

    fn limits(&self) -> Limits {
        match self.tenant {
            Some(_) => Limits::authenticated(self.shared.config.max_args, self.shared.config.max_bulk_bytes),
            None => Limits::UNAUTHENTICATED,
        }
    }

    /// Handles every complete request in the client buffer.
    async fn on_client_input(&mut self) {
        let mut handled = 0u64;
        self.throttle_waited = Duration::ZERO;
        while !self.closing {
            match self.parser.next(&self.client_in, self.limits()) {
                Ok(Some(frame)) if frame.inline => self.inline_to_resp(frame),
                Ok(Some(frame)) => {
                    let args = self.parser.take_args();
                    if self.must_wait_for_upstream(&args) {
                        // Answered from a node-wide view: let the commands before it run first.
                        self.parser.give_back(args);
                        self.barrier = true;
                        break;
                    }
                    if !args.is_empty() {
                        self.on_request(frame, &args).await;
                        handled += 1;
                    }
                    self.parser.give_back(args);
                    self.client_in.advance(frame.len);
                }
                Ok(None) => break,
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

    /// Whether this request reads a node-wide view (INFO, PUBSUB …) while replies to earlier
    /// requests are still outstanding: then it waits, so that it sees their effects.
    fn must_wait_for_upstream(&self, args: &[Range<usize>]) -> bool {
        let Some(name) = args.first().map(|r| &self.client_in[r.clone()]) else { return false };
        let node_wide = name.eq_ignore_ascii_case(b"INFO") || name.eq_ignore_ascii_case(b"PUBSUB");
        node_wide
            && self.tenant.is_some()
            && (self.has_pending_upstream() || !self.pubsub.inflight.is_empty())
    }

    /// Replaces an inline command at the front of the input with its RESP form, which the
    /// next parse then handles like any request (inline commands are rare: the copy is fine).
    fn inline_to_resp(&mut self, frame: Frame) {
        let args: Vec<&[u8]> = self.parser.inline_args().iter().map(Vec::as_slice).collect();
        let rest = self.client_in.split_off(frame.len);
        self.client_in.clear();
        if !args.is_empty() {
            resp::command(&mut self.client_in, &args);
        }
        self.client_in.extend_from_slice(&rest);
    }

    /// The bytes of argument `i`.
    pub fn arg(&self, args: &[Range<usize>], i: usize) -> &[u8] {
        &self.client_in[args[i].clone()]
    }

    /// Decides what one request becomes: forwarded bytes, a rewrite, or a local answer.
    async fn on_request(&mut self, frame: Frame, args: &[Range<usize>]) {
        let name = self.arg(args, 0);
        let sub = args.get(1).map(|r| &self.client_in[r.clone()]);
        let spec = policy::table().lookup(name, sub);
        if self.tenant.is_none() {
            let allowed = spec.is_some_and(|s| matches!(s.name.as_str(), "auth" | "hello" | "quit"));
            if !allowed {
                return self.reply_error(NOAUTH);
            }
        }
        if let (Some(t), Some(spec)) = (&self.tenant, spec) {
            if spec.refused_when_full() && t.live.refuses_write(frame.len as u64) {
                return self.refuse(STORAGE_FULL);
            }
        }
        if self.tenant.is_some() && self.shared.config.metering {
            let role = match spec.map(|s| s.name.as_str()) {
                Some("exec") => Role::Exec,
                Some("discard") => Role::Discard,
                _ if self.in_multi => Role::Queued,
                _ => Role::Plain,
            };
            let started = self.now().0;
            self.meter_next = Some(Meter { spec, request: frame.len as u64, role, started });
            if !self.admit().await {
                return;
            }
        }
        self.handle_request(frame, args, spec).await;
        // Answered by the gateway itself: not billed, so the bucket gets its estimate back.
        if let (Some(m), Some(t)) = (self.meter_next.take(), self.tenant.as_ref()) {
            t.bucket.refund(m.estimate());
        }
    }

    async fn handle_request(
        &mut self,
        frame: Frame,
        args: &[Range<usize>],
        spec: Option<&'static policy::CommandSpec>,
    ) {
        let name = self.arg(args, 0);
        let treatment = spec.map_or(Treatment::Pass, |s| s.treatment);
        match treatment {
            Treatment::Deny => {
                let name = policy::display_name(spec.expect("denied commands are in the table"));
                self.refuse(&format!("NOPERM the {name} command is not allowed on Shoal caches"));
            }
            Treatment::Virtual => {
                let spec_name = spec.map(|s| s.name.clone()).unwrap_or_default();
                if let Some(refusal) = self.refused_by_access(&spec_name) {
                    return self.refuse(&refusal);
                }
                crate::virtualize::run(self, &spec_name, args).await;
            }
            Treatment::Pass => {
                if name.eq_ignore_ascii_case(b"MULTI") {
                    self.in_multi = true;
                } else if name.eq_ignore_ascii_case(b"EXEC") || name.eq_ignore_ascii_case(b"DISCARD") {
                    let abort = self.multi_dirty && name.eq_ignore_ascii_case(b"EXEC");
                    self.in_multi = false;
                    self.multi_dirty = false;
                    if abort {
                        let err = Bytes::from_static(
                            b"-EXECABORT Transaction discarded because of previous errors.\r\n",
                        );
                        return self.forward_command(&[b"DISCARD"], OnReply::Replace(err)).await;
                    }
                }
                let mux = spec.is_some_and(|sp| sp.mux) && self.can_mux();
                if !mux && !self.ensure_upstream().await {
                    return;
                }
                if let Some(spec) = spec.filter(|sp| self.tracking || sp.name == "flushdb") {
                    self.note_tracking(spec, args);
                }
                if mux {
                    return self.mux_push(frame.len);
                }
                self.up_out.extend_from_slice(&self.client_in[..frame.len]);
                let meter = self.meter_next.take();
                self.push_pending(Pending::Upstream(OnReply::Forward, meter));
            }
        }
    }

    /// A cache user's access string also holds for the commands the gateway answers
    /// itself (logging in, choosing a database and resetting excepted, as upstream).
    fn refused_by_access(&self, spec_name: &str) -> Option<String> {
        let access = self.tenant.as_ref()?.access.as_ref()?;
        let (name, sub) = match spec_name.split_once('|') {
            Some((n, s)) => (n, Some(s)),
            None => (spec_name, None),
        };
        if matches!(name, "auth" | "hello" | "quit" | "reset" | "select")
            || shoal_auth::access::allows_command(access, name, sub)
        {
            return None;
        }
        let shown = sub.map_or(name.to_string(), |s| format!("{name}|{s}"));
        Some(format!("NOPERM this user has no permissions to run the '{shown}' command"))
    }

    /// Whether the session is in the state every mux connection is in: RESP2, the cache's
    /// first database, no transaction, subscription or tracking, never went dedicated.
    fn can_mux(&self) -> bool {
        !self.dedicated
            && self.proto == 2
            && !self.in_multi
            && !self.tracking
            && !self.pubsub.active()
            && self.tenant.as_ref().is_some_and(|t| t.db == 0 && t.upstream_login.is_none())
    }

    /// Adds the request at the front of the input to the batch being gathered.
    fn mux_push(&mut self, len: usize) {
        let Some(t) = self.tenant.as_ref() else { return };
        if self.mux.is_none() {
            let (replies_tx, replies) = mpsc::unbounded_channel();
            let handle = self.shared.muxes.get(&t.route, t.route.db);
            self.mux = Some(MuxLink { handle, replies_tx, replies, spare_lens: Vec::new() });
        }
        self.mux_out.extend_from_slice(&self.client_in[..len]);
        if self.shared.config.metering {
            self.mux_meters.push_back(self.meter_next.take());
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
    fn mux_flush(&mut self) {
        if self.mux_out.is_empty() {
            return;
        }
        let requests = self.mux_out.split().freeze();
        let (Some(link), Some(&Pending::Mux { count, .. })) = (self.mux.as_mut(), self.pending.back()) else {
            return;
        };
        let lens = std::mem::take(&mut link.spare_lens);
        let batch = crate::mux::Batch { requests, count, reply: link.replies_tx.clone(), lens };
        if let Err(refused) = link.handle.send(batch) {
            // The mux is gone (it never leaves while a session holds it; defensive).
            let _ =
                link.replies_tx.send(crate::mux::Replies::errors(crate::mux::LOST, count, refused.0.lens));
        }
    }

    /// One batch's replies: they go out, with the local replies queued behind them.
    fn on_mux_replies(&mut self, replies: crate::mux::Replies) {
        let crate::mux::Replies { chunk, mut lens } = replies;
        // Anything but a batch at the front means `pending` was dropped (closing).
        if let Some(&Pending::Mux { count, bytes }) = self.pending.front() {
            self.pending.pop_front();
            self.mux_inflight -= count;
            self.mux_inflight_bytes -= bytes;
            if self.shared.config.metering {
                self.meter_mux_replies(&chunk, &lens, count);
            }
            self.client_out.extend_from_slice(&chunk);
            self.drain_local();
        }
        if let Some(link) = self.mux.as_mut() {
            lens.clear();
            link.spare_lens = lens;
        }
    }

    /// Before the session's first use of its own connection: every batch is answered, so
    /// that replies keep their order, and the mux is left for good.
    async fn leave_mux(&mut self) {
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

    /// Client-side caching bookkeeping for a forwarded command (only while tracking is on).
    fn note_tracking(&self, spec: &crate::policy::CommandSpec, args: &[Range<usize>]) {
        let Some(t) = &self.tenant else { return };
        if spec.name == "flushdb" {
            crate::tracking::invalidate_all(&self.shared.clients, &t.cache);
        }
        if !self.tracking {
            return;
        }
        let argv: Vec<&[u8]> = args.iter().map(|r| &self.client_in[r.clone()]).collect();
        let keys = crate::tracking::command_keys(spec, &argv);
        if let Some(tracking) = t.entry.tracking.lock().unwrap().as_mut() {
            crate::tracking::note_command(tracking, spec, &keys);
        }
    }

    /// A refusal by the gateway; inside MULTI it also dooms the transaction, as Valkey does.
    pub fn refuse(&mut self, msg: &str) {
        if self.in_multi {
            self.multi_dirty = true;
        }
        self.reply_error(msg);
    }

    /// Checks credentials (throttled, audited) and binds the session to a cache: a token
    /// (`AUTH <token>`, `AUTH <user> <token>`), or a cache or LDAP user
    /// (`AUTH <user>@<cache id> <password>`). On an authenticated connection, a login to the
    /// same cache switches the user; another cache's is refused.
    pub async fn authenticate(&mut self, user: Option<&[u8]>, password: &[u8]) -> Result<(), GatewayError> {
        let attempt = Attempt::parse(user, password);
        let mut note = LoginNote::for_attempt(&attempt, user);
        let source = self.peer.ip();
        let key = attempt.throttle_key(source);
        let shared = self.shared.clone();
        // Attempts that could never succeed (neither a token nor `<user>@<cache>`) guess
        // nothing: they are refused and audited, not counted.
        let throttle = match attempt {
            Attempt::User { .. } => Some(&shared.throttle),
            Attempt::Token { .. } => Some(&shared.token_throttle),
            Attempt::Invalid => None,
        };
        let verdict =
            throttle.map_or(Verdict::Allow, |t| t.lock().unwrap().check(Instant::now(), source, &key));
        match verdict {
            Verdict::Allow => {}
            Verdict::Delay(wait) => tokio::time::sleep(wait).await,
            Verdict::Locked { scope, .. } => {
                note.reason = format!("locked out ({scope:?} has too many failed attempts)").to_lowercase();
                crate::metrics::auth_attempt(&note.mechanism, "lockout");
                self.shared.audit.push(note.event(&self.shared.gateway_id, source, "lockout"));
                return Err(GatewayError::LockedOut);
            }
        }
        let result = match attempt {
            Attempt::Token { user } => self.login_token(user.as_deref(), password, &mut note).await,
            Attempt::User { name, cache } => self.login_user(&name, &cache, password, &mut note).await,
            Attempt::Invalid => Err(GatewayError::Auth("not a token and no <user>@<cache id>".into())),
        };
        let gateway_id = &self.shared.gateway_id;
        match &result {
            Ok(()) => {
                if let Some(t) = throttle {
                    t.lock().unwrap().success(&key);
                }
                crate::metrics::auth_attempt(&note.mechanism, "success");
                self.shared.audit.push(note.event(gateway_id, source, "success"));
            }
            Err(e) => {
                if note.reason.is_empty() {
                    note.reason = e.to_string().chars().take(200).collect();
                }
                let mut outcome = "failure";
                if let Some(t) = throttle.filter(|_| e.is_credential_failure()) {
                    let counted = t.lock().unwrap().failure(Instant::now(), source, &key);
                    if matches!(counted, FailureOutcome::LockedOut(_)) {
                        outcome = "lockout";
                    }
                }
                crate::metrics::auth_attempt(&note.mechanism, outcome);
                self.shared.audit.push(note.event(gateway_id, source, outcome));
            }
        }
        result
    }

    /// A data-plane JWT. The user name may be `default` or name the token's cache (its id or
    /// name); a token for one cache never opens another.
    async fn login_token(
        &mut self,
        user: Option<&str>,
        password: &[u8],
        note: &mut LoginNote,
    ) -> Result<(), GatewayError> {
        let token = std::str::from_utf8(password).map_err(|_| GatewayError::Auth("not utf-8".into()))?;
        let claims = self.shared.jwt.verify(token).await?;
        note.cache = Some(claims.cache.clone());
        note.jti = Some(claims.jti.clone());
        note.username = format!("token:{}", claims.sub.chars().take(128).collect::<String>());
        let names_token_cache = |route: &TenantRoute, user: &str| {
            user == "default" || user == route.cache_id.as_str() || user == route.cache_name
        };
        let live = self.shared.router.live(&claims.cache).await?;
        let route = live.get();
        if let Some(user) = user.filter(|u| !names_token_cache(&route, u)) {
            let shown = user.chars().take(64).collect::<String>();
            return Err(GatewayError::Auth(format!(
                "token for cache {} presented as user {shown:?}",
                claims.cache
            )));
        }
        let (upstream, access) = crate::auth::jwt::upstream_login(&claims, &route)?;
        self.bind(live, route, upstream, access, &claims.jti, expiry_instant(claims.exp)).await
    }

    /// A cache user or LDAP user: the control plane checks the password and names the
    /// upstream ACL user that carries the user's access.
    async fn login_user(
        &mut self,
        name: &str,
        cache: &CacheId,
        password: &[u8],
        note: &mut LoginNote,
    ) -> Result<(), GatewayError> {
        let request = VerifyRequest {
            username: name.to_string(),
            password: String::from_utf8(password.to_vec())
                .map_err(|_| GatewayError::Auth("password is not utf-8".into()))?,
        };
        let login = match self.shared.control_plane.verify_user(cache, &request).await? {
            Verified::Login(login) => login,
            Verified::Refused(r) => {
                note.mechanism = r.mechanism;
                note.reason = r.reason.clone();
                return Err(GatewayError::Auth(r.reason));
            }
            Verified::Unavailable(r) => {
                note.mechanism = r.mechanism;
                note.reason = r.reason.clone();
                return Err(GatewayError::DirectoryUnavailable(r.reason));
            }
        };
        note.mechanism = login.mechanism.clone();
        note.account = Some(login.account_id.clone());
        let live = self.shared.router.live(cache).await?;
        let route = live.get();
        let upstream = Some((login.upstream_user, login.upstream_password));
        let access = login.access_string.as_deref().map(shoal_auth::AccessString::parse).transpose();
        let access = access.map_err(|e| GatewayError::ControlPlane(e.to_string()))?.map(Arc::new);
        // No token: the login lasts as long as the connection.
        self.bind(live, route, upstream, access, "", Instant::now() + NO_EXPIRY).await
    }

    /// Binds the session to the cache of `route`, logged in upstream as the cache's own ACL
    /// user or as `upstream` (a cache user's). A second login on the connection must be to
    /// the same cache; it switches the upstream user in place.
    async fn bind(
        &mut self,
        live: Arc<crate::router::LiveRoute>,
        route: TenantRoute,
        upstream: Option<(String, String)>,
        access: Option<Arc<shoal_auth::AccessString>>,
        jti: &str,
        expires: Instant,
    ) -> Result<(), GatewayError> {
        if let Some(tenant) = &mut self.tenant {
            if tenant.cache != route.cache_id {
                return Err(GatewayError::Auth("re-authentication to another cache".into()));
            }
            *tenant.entry.jti.lock().unwrap() = jti.to_string();
            self.token_expires = expires;
            tenant.access = access;
            if tenant.upstream_login != upstream {
                tenant.upstream_login = upstream;
                tenant.route = with_login(route, &tenant.upstream_login);
                let (user, password) = (tenant.route.acl_user.clone(), tenant.route.acl_password.clone());
                if self.up_write.is_some() {
                    self.forward_helper(&[b"AUTH", user.as_bytes(), password.as_bytes()]);
                }
            }
            return Ok(());
        }
        let cache = route.cache_id.clone();
        let (entry, inbox) = self
            .shared
            .clients
            .register(
                &cache,
                max_connections(&self.shared.config, &route),
                self.peer.to_string(),
                self.local.to_string(),
            )
            .ok_or(GatewayError::TooManyConnections)?;
        let ns = Namespace::new(&route.acl_user, route.db, route.databases, &route.keyspace_events);
        let route = with_login(route, &upstream);
        let stream = match upstream::connect(&route, route.db).await {
            Ok(x) => x,
            Err(e) => {
                self.shared.clients.unregister(&cache, &entry);
                return Err(e);
            }
        };
        entry.proto.store(self.proto, Ordering::Relaxed);
        let (read, write) = stream.into_split();
        self.up_read = Some(read);
        self.up_metric = Some(crate::metrics::Upstream::opened());
        self.up_write = Some(write);
        tracing::info!(cache = %cache, jti, upstream_user = %route.acl_user, peer = %self.peer, "authenticated");
        *entry.jti.lock().unwrap() = jti.to_string();
        self.token_expires = expires;
        self.unauthenticated = None;
        self.inbox = Some(inbox);
        self.killed = Some(Box::pin(entry.kill.clone().notified_owned()));
        let bucket = self.shared.buckets.get(&cache, route.limits.ecpu_per_second);
        let latency = crate::metrics::latency(&cache);
        self.tenant = Some(Tenant {
            bucket,
            latency,
            ns,
            cache,
            route,
            live,
            db: 0,
            entry,
            upstream_login: upstream,
            access,
        });
        Ok(())
    }

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
        // `CLIENT SETINFO` answered while on the mux (see `virtualize::client_set`).
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

    /// Re-opens the upstream connection after it was lost (node restart, network).
    async fn connect_upstream(&mut self) -> bool {
        if self.up_write.is_some() {
            return true;
        }
        let Some(tenant) = self.tenant.as_ref() else { return false };
        let result = async {
            let route = with_login(self.shared.router.route(&tenant.cache).await?, &tenant.upstream_login);
            let stream = upstream::connect(&route, route.db + tenant.db).await?;
            Ok::<_, GatewayError>((route, stream))
        }
        .await;
        match result {
            Ok((route, stream)) => {
                let (read, write) = stream.into_split();
                self.up_read = Some(read);
                self.up_metric = Some(crate::metrics::Upstream::opened());
                self.up_write = Some(write);
                self.up_in.clear();
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
        self.push_pending(Pending::Upstream(on_reply, meter));
    }

    /// Sends a command whose reply the client never sees (upstream must be connected).
    pub fn forward_helper(&mut self, args: &[&[u8]]) {
        resp::command(&mut self.up_out, args);
        self.push_pending(Pending::Upstream(OnReply::Discard, None));
    }

    /// Sends a (un)subscribe command: its confirmations arrive out of band.
    pub async fn forward_subscription(&mut self, args: &[&[u8]], confirmations: Option<usize>) {
        if !self.ensure_upstream().await {
            return;
        }
        resp::command(&mut self.up_out, args);
        self.pubsub.inflight.push_back(confirmations);
    }

    /// Moves every complete upstream reply to the client, with the local replies queued
    /// behind each.
    fn on_upstream_input(&mut self) {
        loop {
            match self.replies.next(&self.up_in) {
                Ok(Some(reply)) => {
                    let bytes = self.up_in.split_to(reply.len);
                    if reply.push || (self.pubsub.active() && self.is_pubsub_frame(&bytes)) {
                        self.on_pubsub_frame(&bytes);
                        continue;
                    }
                    match self.pending.pop_front() {
                        Some(Pending::Upstream(on_reply, meter)) => {
                            let before = self.client_out.len();
                            self.deliver(&bytes, reply.error, on_reply);
                            if let Some(meter) = meter {
                                self.meter_reply(meter, &bytes, (self.client_out.len() - before) as u64);
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
                Ok(None) => return,
                Err(e) => return self.upstream_lost(&e.to_string()),
            }
        }
    }

    fn deliver(&mut self, bytes: &[u8], error: bool, on_reply: OnReply) {
        match on_reply {
            OnReply::Forward => self.client_out.extend_from_slice(bytes),
            OnReply::Discard => {}
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

    /// Whether a RESP2 array is a pub/sub message or confirmation (only asked while the
    /// session is subscribed or subscribing, when Valkey sends nothing else as arrays).
    fn is_pubsub_frame(&self, bytes: &[u8]) -> bool {
        if !bytes.starts_with(b"*") {
            return false;
        }
        // The kind is the first element: `*N\r\n$len\r\n<kind>\r\n`.
        let Some((Value::Array(items), _)) = value::decode(bytes) else { return false };
        let kind =
            items.first().and_then(Value::as_bytes).map(<[u8]>::to_ascii_lowercase).unwrap_or_default();
        CONFIRMATIONS.contains(&kind.as_slice()) || crate::pubsub::MESSAGES.contains(&kind.as_slice())
    }

    /// Rewrites channel names in a pub/sub frame for the client and tracks subscriptions.
    fn on_pubsub_frame(&mut self, bytes: &[u8]) {
        let before = self.client_out.len();
        let delivered = self.deliver_pubsub_frame(bytes);
        if delivered && self.tenant.is_some() && self.shared.config.metering {
            self.tally(Counters::delivery((self.client_out.len() - before) as u64));
        }
    }

    /// Writes a pub/sub frame for the client; whether it was a message (metered by bytes).
    fn deliver_pubsub_frame(&mut self, bytes: &[u8]) -> bool {
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
            let (Some(channel), Some(payload)) = (items.get(2).and_then(Value::as_bytes), items.get(3))
            else {
                return false;
            };
            let channel = ns.from_upstream(channel);
            for pattern in self.pubsub.patterns.iter().filter(|p| crate::pubsub::glob_match(p, &channel)) {
                let items = vec![
                    Value::bulk("pmessage"),
                    Value::bulk(pattern),
                    Value::bulk(&channel),
                    payload.clone(),
                ];
                let v = if push { Value::Push(items) } else { Value::Array(items) };
                value::encode(&v, self.proto, &mut self.client_out);
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
            if let Some(front) = self.pubsub.inflight.front_mut() {
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
            if is_catch_all {
                // The gateway's own subscription: the client already had its confirmations.
                self.pubsub.catch_all_confirmed = kind == b"psubscribe";
                return false;
            }
            if !kind.starts_with(b"s") || kind == b"subscribe" || kind == b"unsubscribe" {
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

    /// Meters one reply from the session's own connection (`delivered`: bytes the client got).
    fn meter_reply(&mut self, meter: Meter, reply: &[u8], delivered: u64) {
        match meter.role {
            Role::Plain => self.bill(meter, reply, delivered),
            Role::Queued if !reply.starts_with(b"-") => self.queued.push((meter, delivered)),
            Role::Queued => self.bill(meter, reply, delivered),
            Role::Exec => {
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
            Role::Discard => self.bill_queued(),
        }
    }

    /// Queued commands that never ran (DISCARD, aborted EXEC, lost connection) are billed
    /// on the bytes they moved.
    fn bill_queued(&mut self) {
        for (m, queued_bytes) in std::mem::take(&mut self.queued) {
            self.bill(m, b"", queued_bytes);
        }
    }

    /// Meters a mux chunk: `count` replies of the given lengths, one per metered request
    /// sent to the mux.
    fn meter_mux_replies(&mut self, chunk: &[u8], lens: &[usize], count: usize) {
        let (mut pos, mut billed) = (0, None);
        for i in 0..count {
            let meter = self.mux_meters.pop_front().flatten();
            let rest = &chunk[pos..];
            // The mux gives every reply's length (bounded by the chunk all the same).
            let len = lens.get(i).map_or(rest.len(), |&len| len.min(rest.len()));
            let reply = &chunk[pos..pos + len];
            pos += len;
            // `-ERR cache connection lost`: the gateway's own answer, not billed.
            if let Some(m) = meter.filter(|_| reply != crate::mux::LOST) {
                let c = self.measure(m, reply, len as u64);
                billed.get_or_insert_with(Counters::default).add(&c);
            }
        }
        // One tally for the batch: its replies arrived in one event.
        if let Some(c) = billed {
            self.tally(c);
        }
    }

    /// Meters one command and charges the cache's bucket what it cost beyond its estimate.
    fn bill(&mut self, meter: Meter, reply: &[u8], delivered: u64) {
        let c = self.measure(meter, reply, delivered);
        self.tally(c);
    }

    /// The counters of one command (to tally); charges the bucket and counts the latency.
    fn measure(&mut self, meter: Meter, reply: &[u8], delivered: u64) -> Counters {
        let c = Counters::command(meter.spec, meter.request, reply, delivered);
        if let Some(t) = self.tenant.as_ref().filter(|t| t.bucket.limited()) {
            t.bucket.debit(c.ecpu_milli.saturating_sub(meter.estimate()));
        }
        if c.commands > 0 {
            // The replies of one event to the requests of one read share their latency.
            let now = self.now().0;
            let slot = match self.latency_memo {
                Some((started, at, slot)) if started == meter.started && at == now => slot,
                _ => {
                    let slot = metering::latency_slot(now.saturating_duration_since(meter.started));
                    self.latency_memo = Some((meter.started, now, slot));
                    slot
                }
            };
            self.tally.latency[slot] += 1;
        }
        c
    }

    /// Before a metered command runs: the cache's ECPU limit lets it through, possibly after
    /// a short wait (`throttle_wait`, shared by the requests of one read), or it is refused
    /// with `-THROTTLED` (not forwarded, not billed).
    async fn admit(&mut self) -> bool {
        let (Some(t), Some(meter)) = (self.tenant.as_ref(), self.meter_next.as_ref()) else { return true };
        if !t.bucket.limited() || meter.free() {
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
        self.meter_next = None;
        let name = self.tenant.as_ref().map(|t| t.route.cache_name.clone()).unwrap_or_default();
        self.tally(Counters { throttled: 1, ..Default::default() });
        self.refuse(&format!("THROTTLED ECPU limit of cache {name} exceeded"));
        false
    }

    /// The time of the event being handled, read on first use.
    fn now(&mut self) -> (Instant, i64) {
        *self.clock.get_or_insert_with(|| (Instant::now(), metering::current_minute()))
    }

    /// Adds to the session's counters (of the current minute).
    pub(crate) fn tally(&mut self, c: Counters) {
        let minute = self.now().1;
        if minute != self.tally.minute {
            self.flush_tally();
            self.tally.minute = minute;
        }
        self.tally.counters.add(&c);
        if self.tally.flush_at.is_none() {
            self.tally.flush_at = Some(Instant::now() + metering::FLUSH_EVERY);
        }
    }

    /// Hands the session's counters to the gateway's ledger.
    fn flush_tally(&mut self) {
        if let Some(t) = &self.tenant {
            self.shared.ledger.add(&t.cache, self.tally.minute, &self.tally.counters);
            crate::metrics::record_latencies(&t.latency, &self.tally.latency);
        }
        self.tally.latency = Default::default();
        self.tally.counters = Counters::default();
        self.tally.flush_at = None;
    }

    /// Sends the local replies now at the front of the queue.
    fn drain_local(&mut self) {
        loop {
            match self.pending.front() {
                Some(Pending::Local(_)) => {
                    if let Some(Pending::Local(bytes)) = self.pending.pop_front() {
                        self.client_out.extend_from_slice(&bytes);
                    }
                }
                Some(Pending::Close) => {
                    self.pending.pop_front();
                    self.closing = true;
                }
                _ => return,
            }
        }
    }

    /// The upstream connection broke: every reply it owed becomes an error, and the next
    /// command reconnects.
    fn upstream_lost(&mut self, why: &str) {
        tracing::warn!(peer = %self.peer, reason = why, "upstream connection lost");
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
        self.pubsub = PubSub::default();
        self.sync_patterns();
        // Replies owed by this connection become errors, in place (mux batches stay).
        let lost = Bytes::from_static(crate::mux::LOST);
        self.pending = std::mem::take(&mut self.pending)
            .into_iter()
            .filter_map(|p| match p {
                Pending::Upstream(OnReply::Discard, _) => None,
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

    /// Publishes this session's patterns to the registry (for PUBLISH's receiver count).
    pub fn sync_patterns(&self) {
        if let Some(t) = &self.tenant {
            *t.entry.patterns.lock().unwrap() = self.pubsub.patterns.clone();
        }
    }

    /// Drops the upstream connection on purpose (RESET): the next command opens a fresh one.
    pub fn drop_upstream(&mut self) {
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

    /// Queues an answer behind the others (a batch being gathered is sent first: the mux
    /// answers whole batches).
    fn push_pending(&mut self, p: Pending) {
        self.mux_flush();
        self.pending.push_back(p);
    }

    pub fn reply(&mut self, bytes: Bytes) {
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
        let mut out = BytesMut::with_capacity(msg.len() + 3);
        resp::error(&mut out, msg);
        self.reply(out.freeze());
    }

    pub fn reply_auth_error(&mut self, e: GatewayError) {
        crate::metrics::auth_failure(self.tenant.as_ref().map(|t| &t.cache));
        tracing::info!(peer = %self.peer, reason = %e, kind = e.kind(), "authentication refused");
        self.reply_error(e.client_message());
    }

    pub fn close_after_replies(&mut self) {
        if self.pending.is_empty() {
            self.closing = true;
        } else {
            self.push_pending(Pending::Close);
        }
    }
}

/// Logins without a token do not expire (a connection's deadline is this far away).
const NO_EXPIRY: Duration = Duration::from_secs(100 * 365 * 86_400);

/// The route with a cache user's upstream login in place of the cache's own ACL user.
fn with_login(mut route: TenantRoute, login: &Option<(String, String)>) -> TenantRoute {
    if let Some((user, password)) = login {
        route.acl_user = user.clone();
        route.acl_password = password.clone();
    }
    route
}

/// The monotonic instant of a token's `exp` (seconds since the epoch).
/// Most connections a cache may hold on this gateway: its own limit if it has one, else the
/// gateway's `max_connections_per_cache`.
pub(crate) fn max_connections(config: &crate::GatewayConfig, route: &TenantRoute) -> usize {
    route.limits.max_connections.map_or(config.max_connections_per_cache, |n| n as usize)
}

fn expiry_instant(exp: i64) -> Instant {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs()
        as i64;
    Instant::now() + Duration::from_secs(exp.saturating_sub(now).max(0) as u64)
}

/// Writes to the client right away if it can take the bytes without waiting.
fn write_now<W: AsyncWrite + Unpin>(w: &mut W, out: &mut BytesMut) {
    if out.is_empty() {
        return;
    }
    if let Some(Ok(n)) = w.write(out).now_or_never() {
        out.advance(n);
    }
}

async fn recv_opt(
    rx: Option<&mut tokio::sync::mpsc::UnboundedReceiver<Invalidation>>,
) -> Option<Invalidation> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn recv_mux(link: Option<&mut MuxLink>) -> Option<crate::mux::Replies> {
    match link {
        Some(l) => l.replies.recv().await,
        None => std::future::pending().await,
    }
}

async fn killed(notified: Option<&mut Pin<Box<OwnedNotified>>>) {
    match notified {
        Some(n) => n.await,
        None => std::future::pending().await,
    }
}
