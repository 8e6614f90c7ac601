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
use tokio::sync::mpsc;

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
/// A reply from the session's own connection goes on to the client in pieces once this much
/// of it has arrived, so that a huge reply (a 100 MB GET, an MGET of many big values) is
/// never held whole: with `HIGH_WATER`, what the session holds stays bounded.
const STREAM_REPLY_FROM: usize = 256 * 1024;
/// Bytes of a reply kept for its metering when the reply goes on in pieces (its header:
/// kind, elements, nil).
const REPLY_HEAD: usize = 64;
/// A request Valkey runs as it is goes upstream in pieces once this much of it has come:
/// a 500 MB SET or a huge MSET is never held whole.
const STREAM_REQUEST_FROM: usize = 1024 * 1024;
/// Largest request of a free command the gateway answers itself (AUTH, HELLO, SUBSCRIBE…).
const MAX_FREE_REQUEST: u64 = 64 * 1024;
/// Largest request the gateway holds whole, for a command it answers or rewrites itself
/// (PUBLISH, …); a bigger one is refused and its rest dropped as it comes.
pub const MAX_HELD_REQUEST: usize = 64 * 1024 * 1024;

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
    /// The session's output not yet written to the client, for the mux to pause on.
    owed: Arc<std::sync::atomic::AtomicUsize>,
}

/// A reply that goes on to the client in pieces: what went already.
#[derive(Default)]
struct PartReply {
    /// Bytes already passed on (0: no reply in pieces).
    taken: u64,
    /// Its first bytes, for metering.
    head: Vec<u8>,
}

impl PartReply {
    fn add(&mut self, piece: &[u8]) {
        if self.head.len() < REPLY_HEAD {
            let n = piece.len().min(REPLY_HEAD - self.head.len());
            self.head.extend_from_slice(&piece[..n]);
        }
        self.taken += piece.len() as u64;
    }
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
    /// The cache's connection slot on this gateway, given back when the tenant is dropped
    /// (a panicking session's included).
    pub _registration: crate::clients::Registration,
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
    unauthenticated: Option<crate::slots::Unauthenticated>,
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
    /// The reply from the own connection, and the one from the mux, going on in pieces.
    up_part: PartReply,
    mux_part: PartReply,
    /// A request going upstream in pieces (or dropped as it comes, when refused).
    streaming: Option<Streaming>,
    /// When the last metered reply arrived (a script's time starts no earlier).
    last_reply_at: Instant,
    /// Scripts sent and not answered (counted in the gateway's `scripts` too).
    scripts_inflight: u32,
}

/// A big request being passed on (or dropped) as it comes.
struct Streaming {
    rest: crate::resp::request::Rest,
    /// Passed on upstream; false: dropped, and `refusal` answers it once it has all come.
    forward: bool,
    refusal: Option<String>,
    /// Bytes of the request so far, and the ECPU estimate the bucket was charged for it.
    bytes: u64,
    charged: u64,
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

/// `unauthenticated`: the connection's unauthenticated slots (see [`crate::slots`]), or the
/// error it gets, over a limit, before it is closed.
pub async fn run(
    shared: Arc<Shared>,
    conn: ClientConn,
    peer: SocketAddr,
    local: SocketAddr,
    unauthenticated: Result<crate::slots::Unauthenticated, &'static str>,
) {
    let permit = match unauthenticated {
        Ok(permit) => permit,
        Err(refusal) => {
            let msg = format!("-{refusal}\r\n");
            let _ = match conn {
                ClientConn::Tcp(mut s) => s.write_all(msg.as_bytes()).await,
                ClientConn::Tls(mut s) => s.write_all(msg.as_bytes()).await.and(s.shutdown().await),
            };
            return;
        }
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
        up_part: PartReply::default(),
        mux_part: PartReply::default(),
        streaming: None,
        last_reply_at: Instant::now(),
        scripts_inflight: 0,
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
    session.scripts_over(session.scripts_inflight);
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
                    self.close_now();
                }
            }
            if self.output_full() {
                // As Valkey's `client-output-buffer-limit`: a client that does not read what
                // it asked for is disconnected rather than held in memory.
                tracing::info!(peer = %self.peer, bytes = self.client_out.len(), "client output limit reached: closing");
                crate::metrics::output_limit_closed();
                return Ok(());
            }
            if let Some(link) = &self.mux {
                link.owed.store(self.client_out.len(), Ordering::Relaxed);
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
                Ok(None) => {
                    if self.client_in.len() >= STREAM_REQUEST_FROM && self.start_streaming().await {
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
    async fn start_streaming(&mut self) -> bool {
        let Some((args, pos, rest)) = self.parser.partial() else { return false };
        if self.tenant.is_none() || args.is_empty() {
            return false;
        }
        let name = &self.client_in[args[0].clone()];
        let sub = args.get(1).map(|r| &self.client_in[r.clone()]);
        let spec = policy::table().lookup(name, sub);
        let passes = spec.is_none_or(|s| s.treatment == Treatment::Pass && !s.container)
            && !matches!(spec.map(|s| s.name.as_str()), Some("multi" | "exec" | "discard"));
        if !passes && self.client_in.len() < MAX_HELD_REQUEST {
            return false;
        }
        let shown = spec.map_or_else(|| String::from_utf8_lossy(name).to_uppercase(), policy::display_name);
        let (pos, rest) = (pos, rest);
        self.parser.abandon();
        let mut streaming = Streaming { rest, forward: false, refusal: None, bytes: pos as u64, charged: 0 };
        if !passes {
            streaming.refusal = Some(too_large(&shown, MAX_HELD_REQUEST as u64));
        } else if spec.is_some_and(|s| s.refused_when_full())
            && self.tenant.as_ref().is_some_and(|t| t.live.storage_full())
        {
            streaming.refusal = Some(STORAGE_FULL.to_string());
        } else {
            let role = if self.in_multi { Role::Queued } else { Role::Plain };
            let started = self.now().0;
            if self.shared.config.metering {
                self.meter_next = Some(Meter { spec, request: pos as u64, role, started });
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
                self.push_pending(Pending::Upstream(OnReply::Forward, meter));
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
    fn stream_request(&mut self) -> bool {
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
            if let Some(Pending::Upstream(_, Some(meter))) = self.pending.back_mut() {
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
    fn must_wait_for_upstream(&self, args: &[Range<usize>]) -> bool {
        let Some(name) = args.first().map(|r| &self.client_in[r.clone()]) else { return false };
        let node_wide = name.eq_ignore_ascii_case(b"INFO") || name.eq_ignore_ascii_case(b"PUBSUB");
        node_wide
            && self.tenant.is_some()
            && (self.has_pending_upstream() || !self.pubsub.inflight.is_empty())
    }

    /// Rewrites the inline command at the front of the input, and every complete request
    /// after it, into RESP in one pass; the next parse handles them like any request.
    fn inline_to_resp(&mut self, _frame: Frame) {
        let limits = self.limits();
        resp::request::inline_to_resp(&mut self.client_in, limits);
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
            Treatment::Virtual
                if frame.len > MAX_HELD_REQUEST
                    || (frame.len as u64 > MAX_FREE_REQUEST && spec.is_some_and(|s| s.weight == 0)) =>
            {
                let name = spec.map_or_else(String::new, policy::display_name);
                let limit =
                    if frame.len > MAX_HELD_REQUEST { MAX_HELD_REQUEST as u64 } else { MAX_FREE_REQUEST };
                self.refuse(&too_large(&name, limit));
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
                if let Some(pause) = spec.filter(|sp| sp.script).and_then(|_| self.scripts_paused()) {
                    return self.refuse(&format!(
                        "ERR scripts of this cache are paused for {} s: one ran past the platform's script time limit",
                        pause.as_secs() + 1
                    ));
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
                self.script_sent(meter.as_ref());
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
    fn mux_flush(&mut self) {
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
    fn on_mux_replies(&mut self, replies: crate::mux::Replies) {
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
                    t.lock().unwrap().success(source, &key);
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
            source: self.peer.ip().to_string(),
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
        let (registration, inbox) = self
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
            // (Dropping the registration gives the slot back.)
            Err(e) => return Err(e),
        };
        let entry = registration.entry().clone();
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
            _registration: registration,
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
        let replies_before = self.pending.iter().filter(|p| matches!(p, Pending::Upstream(..))).count();
        self.pubsub.inflight.push_back(Subscribing { confirmations, replies_before });
    }

    /// Moves every complete upstream reply to the client, with the local replies queued
    /// behind each.
    fn on_upstream_input(&mut self) {
        loop {
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
                Ok(None) => return self.pass_on_part(),
                Err(e) => return self.upstream_lost(&e.to_string()),
            }
        }
    }

    /// Passes on what has come of a big reply the client gets as it is (see
    /// `STREAM_REPLY_FROM`); pub/sub traffic and replies the gateway rewrites wait whole.
    fn pass_on_part(&mut self) {
        let forwarded = matches!(self.pending.front(), Some(Pending::Upstream(OnReply::Forward, _)));
        let push_next = self.up_part.taken == 0 && self.up_in.first() == Some(&b'>');
        if self.up_in.len() < STREAM_REPLY_FROM || !forwarded || push_next || self.pubsub.active() {
            return;
        }
        let n = self.replies.take_partial(&self.up_in);
        let piece = self.up_in.split_to(n);
        self.up_part.add(&piece);
        self.client_out.extend_from_slice(&piece);
    }

    /// The rest of a reply that went on in pieces: delivered and metered as a whole.
    fn finish_part(&mut self, tail: &[u8]) {
        let part = std::mem::take(&mut self.up_part);
        self.client_out.extend_from_slice(tail);
        if let Some(Pending::Upstream(_, meter)) = self.pending.pop_front() {
            let delivered = part.taken + tail.len() as u64;
            match meter {
                Some(m) if m.role == Role::Exec => {
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

    /// Closes the connection at once, dropping what it still owed (its output is broken).
    fn close_now(&mut self) {
        self.closing = true;
        self.pending.clear();
        self.mux_meters.clear();
        self.mux_out.clear();
        self.mux_inflight = 0;
        self.mux_inflight_bytes = 0;
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

    /// Whether an upstream reply is a pub/sub message or confirmation rather than the
    /// answer to a request. RESP3 says so itself (a push). In RESP2 it is an array of a
    /// pub/sub kind, arriving while subscribed (Valkey then refuses every command that
    /// could answer with such an array but PING, whose `pong` is no pub/sub kind) or when
    /// every reply owed before the next (un)subscribe command has arrived.
    fn is_pubsub_reply(&self, bytes: &[u8], push: bool) -> bool {
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
    fn is_pubsub_frame(&self, bytes: &[u8]) -> bool {
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

    /// Meters a mux chunk: replies of the given lengths, one per metered request sent to
    /// the mux, then `partial` bytes of a reply to come.
    fn meter_mux_replies(&mut self, chunk: &[u8], lens: &[usize], partial: usize) {
        let (mut pos, mut billed) = (0, None);
        for &len in lens {
            let meter = self.mux_meters.pop_front().flatten();
            // The mux gives every reply's length (bounded by the chunk all the same).
            let len = len.min(chunk.len() - pos);
            let mut reply = &chunk[pos..pos + len];
            pos += len;
            let part = std::mem::take(&mut self.mux_part);
            let delivered = part.taken + len as u64;
            if part.taken > 0 {
                reply = &part.head;
            }
            // `-ERR cache connection lost`: the gateway's own answer, not billed.
            if meter.is_some_and(|m| m.spec.is_some_and(|s| s.script)) && reply == crate::mux::LOST {
                // Its node went away under it (restarted to end it, or crashed).
                self.script_struck();
                self.scripts_over(1);
            }
            if let Some(m) = meter.filter(|_| reply != crate::mux::LOST) {
                let c = self.measure(m, reply, delivered);
                billed.get_or_insert_with(Counters::default).add(&c);
            }
        }
        if partial > 0 {
            self.mux_part.add(&chunk[chunk.len() - partial..]);
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

    /// Counts a script as in flight when it is sent (with metering on: its meter says so).
    fn script_sent(&mut self, meter: Option<&Meter>) {
        if let (Some(t), true) = (&self.tenant, meter.is_some_and(|m| m.spec.is_some_and(|s| s.script))) {
            self.shared.scripts.started(&t.route.node_addr, &t.cache);
            self.scripts_inflight += 1;
        }
    }

    /// How long the cache's scripts stay paused (one was ended by force), if they are.
    fn scripts_paused(&self) -> Option<Duration> {
        let t = self.tenant.as_ref()?;
        self.shared.scripts.paused(&t.cache, Instant::now())
    }

    /// One of the cache's scripts was ended by force: its scripts pause for a while.
    fn script_struck(&self) {
        if let Some(t) = &self.tenant {
            let pause = self.shared.scripts.strike(&t.cache, Instant::now(), self.shared.config.script_pause);
            tracing::info!(cache = %t.cache, pause_s = pause.as_secs(), "a script was ended by force: the cache's scripts pause");
        }
    }

    /// `n` of the session's scripts in flight are over.
    fn scripts_over(&mut self, n: u32) {
        let n = n.min(self.scripts_inflight);
        if let (Some(t), true) = (&self.tenant, n > 0) {
            self.shared.scripts.ended(&t.route.node_addr, &t.cache, n);
            self.scripts_inflight -= n;
        }
    }

    /// The counters of one command (to tally); charges the bucket and counts the latency.
    fn measure(&mut self, meter: Meter, reply: &[u8], delivered: u64) -> Counters {
        let mut c = Counters::command(meter.spec, meter.request, reply, delivered);
        let now = self.now().0;
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
            // The replies of one event to the requests of one read share their latency.
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
        self.pubsub = PubSub::default();
        self.sync_patterns();
        // Its scripts are over (a node restarted to end a runaway script lands here).
        let scripts = self
            .pending
            .iter()
            .filter(|p| matches!(p, Pending::Upstream(_, Some(m)) if m.spec.is_some_and(|s| s.script)))
            .count();
        if scripts > 0 {
            // Its node went away under it (restarted to end it, or crashed).
            self.script_struck();
        }
        self.scripts_over(scripts as u32);
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

    /// When an unauthenticated connection's time to log in (`auth_timeout`) runs out; None
    /// once it has logged in.
    pub(crate) fn auth_deadline(&self) -> Option<Instant> {
        self.unauthenticated.as_ref().map(|u| u.since + self.shared.config.auth_timeout)
    }

    /// Whether the client's output is at its limit (`max_client_output`): nothing more may
    /// be added to it.
    fn output_full(&self) -> bool {
        self.client_out.len() >= self.shared.config.max_client_output
    }

    /// Ends the connection after what its output holds, with `msg` last (a limit was hit);
    /// the upstream connection and whatever it still owes are dropped.
    fn close_with_error(&mut self, msg: &str) {
        resp::error(&mut self.client_out, msg);
        self.closing = true;
        self.pending.clear();
        self.drop_upstream();
    }

    /// Publishes this session's patterns to the registry (for PUBLISH's receiver count).
    pub fn sync_patterns(&self) {
        if let Some(t) = &self.tenant {
            *t.entry.patterns.lock().unwrap() = self.pubsub.patterns.clone();
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

/// The refusal of a request too big for a command the gateway holds whole.
fn too_large(command: &str, limit: u64) -> String {
    format!("ERR request too large: the gateway holds at most {} KiB of a {command} command", limit >> 10)
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
    // Never more than the gateway's own total (the control plane refuses larger limits too).
    route
        .limits
        .max_connections
        .map_or(config.max_connections_per_cache, |n| n as usize)
        .min(config.max_connections)
}

fn expiry_instant(exp: i64) -> Instant {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs()
        as i64;
    Instant::now() + Duration::from_secs(exp.saturating_sub(now).max(0) as u64)
}

/// Writes a RESP bulk string (the same in RESP2 and RESP3).
fn bulk(out: &mut BytesMut, b: &[u8]) {
    out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
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
