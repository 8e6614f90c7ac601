//! One client connection: authenticate, then forward commands to the cache's node.
//!
//! A single task drives both directions without blocking either: it reads the client and
//! the upstream into buffers, forwards complete requests byte for byte, and writes replies
//! back in request order. Replies the gateway makes itself (errors, virtualized commands)
//! wait in `pending` behind the upstream replies that precede them, so pipelines keep
//! their order. Virtualized commands live in [`crate::cmd`].
//!
//! Until a session needs a connection of its own, its stateless commands go to the cache's
//! shared upstream ([`crate::mux`]) instead, in batches; their replies come back per batch
//! and take their place in `pending` like any other.
//!
//! This file holds the session's state and its event loop (reads, writes, backpressure,
//! timers). The parts, in the order a request meets them:
//! - [`dispatch`]: what a request becomes (forward, rewrite, local answer, refusal), from
//!   the command table; big requests passed on as they come.
//! - [`credentials`]: a login's credentials checked (throttled, audited); [`login`]: the
//!   session bound to the cache they open.
//! - [`shared_link`]: batches of stateless commands on the cache's shared connection.
//! - [`own_link`]: the session's own upstream connection, its replies (in pieces when big).
//! - [`pubsub`]: telling subscription messages apart from replies.
//! - [`replies`]: replies to the client in request order.
//! - [`caching`]: client-side caching's invalidations placed among the replies.
//! - [`meter`]: ECPU per command, the cache's ECPU limit, script time.

use crate::clients::{ClientEntry, Invalidation};
use crate::metering::{self, Meter};
use crate::pubsub::Namespace;
use crate::resp::reply::ReplyScanner;
use crate::resp::request::{Limits, RequestParser};
use crate::resp::value::Value;
use crate::resp::{self};
use crate::state::Shared;
use crate::upstream::{read_opt, write_opt};
use crate::upstream::{ReadHalf, WriteHalf};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use shoal_types::{CacheId, TenantRoute};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::futures::OwnedNotified;

mod caching;
mod credentials;
mod decide;
mod dispatch;
pub(crate) mod login;
use dispatch::Streaming;
use own_link::PartReply;
pub(crate) use pubsub::PubSub;
pub(crate) use pubsub::Subscribing;
use replies::bulk;
use shared_link::{recv_mux, MuxLink};
mod meter;
mod own_link;
mod pubsub;
mod replies;
mod shared_link;

/// Stop reading a side while this much output waits to be written to the other.
const HIGH_WATER: usize = 4 * 1024 * 1024;
/// Room a client read gets (more when a request needs it): small, so an idle client's
/// buffer stays small.
const CLIENT_READ_ROOM: usize = 4 * 1024;

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

pub(crate) const TOKEN_EXPIRED: &str = "token expired";
/// Logins without a token do not expire (a connection's deadline is this far away).
pub(crate) const NOAUTH: &str = "NOAUTH Authentication required.";

/// Writes while the cache is over its `data_storage_mb` even after evicting keys with a TTL.
const STORAGE_FULL: &str = "OOM cache data storage limit reached";
/// A write on the reader endpoint (Valkey's words on a replica).
const READONLY: &str = "READONLY You can't write against a read only replica.";

/// The deadline that flushes the session's counters into the ledger.
const FLUSH: &str = "flush";

/// What to do with the next upstream reply.
pub(crate) enum OnReply {
    Forward,
    /// Drop it (a helper command the client did not send).
    Discard,
    /// Drop it, metered as if sent: the client turned its replies off (`CLIENT REPLY`).
    Muted,
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

impl OnReply {
    /// A (un)subscription's confirmation: delivered whatever `CLIENT REPLY` says, as Valkey
    /// delivers its pushes.
    fn is_push(&self) -> bool {
        matches!(self, OnReply::Confirm { .. })
    }
}

/// What `CLIENT REPLY` set: replies on, off, or off for the next request only.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplyMode {
    On,
    Off,
    SkipNext,
}

/// An answer the client is owed, in request order.
pub(crate) enum Pending {
    /// A reply from the session's own upstream connection, how to meter it, and, for a
    /// blocking command, the client's place among the cache's blocked clients (given back
    /// as the entry drops: its reply came, the connection broke or the session ended).
    Upstream(OnReply, Option<Meter>, Option<crate::cache_stats::Blocked>),
    /// A reply the gateway made, sent once everything before it is sent.
    Local(Bytes),
    /// Close the connection once everything before it is sent.
    Close,
    /// One batch sent to the mux: its `count` replies arrive as one chunk.
    Mux { count: usize, bytes: usize },
    /// Client-side caching, on a connection that tracks itself: after the reply of a write,
    /// nothing more goes to the client until the node's events are followed up to now
    /// ([`crate::tracking::Tracker::sync`]), so the write's invalidations come next. The
    /// keys it names (for NOLOOP).
    Sync(Vec<Vec<u8>>),
    /// Client-side caching: the reply of a read of these keys has gone out.
    ReadDone(Vec<Vec<u8>>),
    /// Client-side caching: invalidations, sent in their turn.
    Pushes(BytesMut),
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
    /// The cache's `INFO` counters on this gateway (blocked clients, commandstats …).
    pub stats: Arc<crate::cache_stats::CacheStats>,
    /// This session's part of the cache's channel subscriptions on this gateway.
    pub channels: crate::pubsub::ChannelShare,
}

pub(crate) struct Session {
    pub(crate) shared: Arc<Shared>,
    pub(crate) endpoint: Endpoint,
    pub(crate) peer: SocketAddr,
    pub(crate) local: SocketAddr,
    parser: RequestParser,
    replies: ReplyScanner,
    client_in: BytesMut,
    client_out: BytesMut,
    up_in: BytesMut,
    up_out: BytesMut,
    pub(crate) up_read: Option<ReadHalf>,
    pub(crate) up_write: Option<WriteHalf>,
    /// Counts the upstream connection in the metrics while it is open.
    pub(crate) up_metric: Option<crate::metrics::Upstream>,
    pending: VecDeque<Pending>,
    pub(crate) tenant: Option<Tenant>,
    /// Held until the client authenticates (caps unauthenticated connections).
    pub(crate) unauthenticated: Option<crate::slots::Unauthenticated>,
    /// No more requests are read; the session ends once output is flushed.
    closing: bool,
    /// RESP version the client speaks (2 or 3).
    pub(crate) proto: u8,
    pub(crate) in_multi: bool,
    /// A command inside MULTI was refused by the gateway: EXEC must abort.
    pub(crate) multi_dirty: bool,
    pub(crate) pubsub: PubSub,
    last_activity: Instant,
    /// Requests wait until every outstanding upstream reply has arrived.
    barrier: bool,
    /// Invalidations for this client (client-side caching), once authenticated.
    pub(crate) inbox: Option<tokio::sync::mpsc::UnboundedReceiver<Invalidation>>,
    /// Completes when the gateway closes this connection (revoked token, shutdown, CLIENT
    /// KILL); made once at login, so the loop does not re-register a waiter per event.
    pub(crate) killed: Option<Pin<Box<OwnedNotified>>>,
    /// The loop's one timer, moved only when its deadline changes (see `deadline`).
    timer: Pin<Box<tokio::time::Sleep>>,
    timer_at: Instant,
    /// The time of the event being handled, read once per event: every request and reply
    /// of a pipeline shares one clock read.
    clock: Option<Instant>,
    /// The Unix minute usage is counted in, and the instant it ends: the wall clock is
    /// read once a minute, not on every event.
    minute: (i64, Instant),
    /// The latency bucket last computed: (request read at, reply event at, bucket).
    latency_memo: Option<(Instant, Instant, usize)>,
    /// Whether `CLIENT TRACKING` is on (keeps the hot path free of tracking work otherwise).
    pub(crate) tracking: bool,
    /// `CLIENT REPLY`: whether replies are on, and whether the current request's is dropped.
    pub(crate) reply_mode: ReplyMode,
    pub(crate) muted: bool,
    /// A sync after a write ([`Pending::Sync`]) under way, and the keys the write names.
    syncing: Option<(crate::tracking::Sync, Vec<Vec<u8>>)>,
    /// Keys of the reads sent and not answered yet (while tracking), with their count: an
    /// invalidation of one of them waits for those replies.
    reading: std::collections::HashMap<Vec<u8>, u32>,
    /// When the token the client logged in with expires; after a grace period without a
    /// fresh `AUTH`, the connection is closed.
    pub(crate) token_expires: Instant,
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
    /// Error replies the gateway made itself while logged in, and whether the last was a
    /// refusal before the command ran (for `commandstats`' rejected and failed calls).
    local_errors: (u64, bool),
    /// Its buffers were given back while it idled ([`Session::trim_if_idle`]).
    trimmed: bool,
}

enum Event {
    ClientRead(std::io::Result<usize>),
    ClientWrote(std::io::Result<usize>),
    UpstreamRead(std::io::Result<usize>),
    UpstreamWrote(std::io::Result<usize>),
    Killed,
    TimedOut(&'static str),
    Invalidate(Option<Invalidation>),
    Synced,
    MuxReplies(Option<crate::mux::Replies>),
}

/// A client connection: plain TCP (split without a lock) or TLS.
pub enum ClientConn {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// Which endpoint a client connected to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Primary,
    /// The reader endpoint: writes are refused; on a cluster pool, reads go to replicas.
    Reader,
}

/// Serves one client until it leaves, breaks the protocol, or is closed.
/// `unauthenticated`: the connection's unauthenticated slots (see [`crate::slots`]), or the
/// error it gets, over a limit, before it is closed.
pub async fn run(
    shared: Arc<Shared>,
    conn: ClientConn,
    endpoint: Endpoint,
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
    // Boxed: its task then holds a pointer, not a second copy of it (the async state
    // machine keeps room for both the value being built and the variable).
    let mut session = Box::new(Session {
        shared,
        endpoint,
        peer,
        local,
        parser: RequestParser::new(),
        replies: ReplyScanner::new(),
        // Grown as requests and replies come (see `CLIENT_READ_ROOM`); the upstream ones only
        // with a connection of the session's own (see `own_link`): an idle client holds little.
        client_in: BytesMut::new(),
        client_out: BytesMut::new(),
        up_in: BytesMut::new(),
        up_out: BytesMut::new(),
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
        minute: (0, Instant::now()),
        latency_memo: None,
        tracking: false,
        reply_mode: ReplyMode::On,
        muted: false,
        syncing: None,
        reading: Default::default(),
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
        local_errors: (0, false),
        trimmed: false,
    });
    let served = match conn {
        ClientConn::Tcp(mut stream) => {
            let (read, write) = stream.split();
            session.serve(read, write).await
        }
        ClientConn::Tls(stream) => {
            let (read, write) = tokio::io::split(stream);
            // Boxed: a plain TCP session's task need not have room for a TLS one's.
            Box::pin(session.serve(read, write)).await
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
            if !self.trimmed && self.client_in.capacity() - self.client_in.len() < CLIENT_READ_ROOM / 4 {
                // Reuses the buffer's space once what it held was consumed; doubles it for
                // a request that does not fit.
                self.client_in.reserve(CLIENT_READ_ROOM);
            }
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
                msg = recv_opt(self.inbox.as_mut()), if self.inbox.is_some() && self.syncing.is_none() => Event::Invalidate(msg),
                _ = synced(self.syncing.as_mut()), if self.syncing.is_some() => Event::Synced,
                r = recv_mux(self.mux.as_mut()), if self.mux_inflight > 0 => Event::MuxReplies(r),
                _ = &mut self.timer, if deadline.1.is_some() => Event::TimedOut(deadline.1.unwrap_or("")),
            };
            self.clock = None;
            match event {
                Event::ClientRead(r) => {
                    if r? == 0 {
                        return Ok(());
                    }
                    self.last_activity = self.now();
                    self.trimmed = false;
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
                    self.on_invalidation(msg, false);
                    write_now(&mut client_write, &mut self.client_out);
                }
                Event::Invalidate(None) => self.inbox = None,
                Event::Synced => {
                    self.synced();
                    write_now(&mut client_write, &mut self.client_out);
                    self.lift_barrier().await;
                }
                Event::TimedOut(FLUSH) => {
                    self.flush_tally();
                    self.trim_if_idle();
                }
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

    /// When the connection times out, and why: unauthenticated too long, or idle.
    /// A session with nothing in flight gives its buffers back (a pooled client idles for
    /// minutes between bursts: its memory should be the session's, not its last burst's).
    /// Done when its counters are flushed, half a second after it last did something; its
    /// next read starts small (64 bytes) and the buffers grow again from there.
    fn trim_if_idle(&mut self) {
        let busy = !self.pending.is_empty()
            || self.mux_inflight > 0
            || !self.client_in.is_empty()
            || !self.client_out.is_empty()
            || !self.up_in.is_empty()
            || !self.up_out.is_empty()
            || !self.mux_out.is_empty()
            || self.streaming.is_some();
        if busy {
            return;
        }
        self.client_in = BytesMut::new();
        self.client_out = BytesMut::new();
        self.up_in = BytesMut::new();
        self.up_out = BytesMut::new();
        self.mux_out = BytesMut::new();
        self.pending = VecDeque::new();
        self.mux_meters = VecDeque::new();
        // Its link to the cache's mux (a reply channel) is made again by the next command.
        self.mux = None;
        self.trimmed = true;
    }

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
        if self.token_expires > started + credentials::NO_EXPIRY / 2 {
            // A login without a token: nothing expires.
            return (started, None);
        }
        (expiry, Some(TOKEN_EXPIRED))
    }

    /// Writes pending upstream bytes right away if the socket takes them (saves a trip
    /// through the event loop per request); whatever is left waits for writability.
    fn write_upstream_now(&mut self) {
        if let (Some(w), false) = (self.up_write.as_mut(), self.up_out.is_empty()) {
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

    /// Closes the connection at once, dropping what it still owed (its output is broken).
    fn close_now(&mut self) {
        self.closing = true;
        self.pending.clear();
        self.reading.clear();
        self.mux_meters.clear();
        self.mux_out.clear();
        self.mux_inflight = 0;
        self.mux_inflight_bytes = 0;
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

    pub fn close_after_replies(&mut self) {
        if self.pending.is_empty() {
            self.closing = true;
        } else {
            self.push_pending(Pending::Close);
        }
    }
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

async fn synced(sync: Option<&mut (crate::tracking::Sync, Vec<Vec<u8>>)>) {
    match sync {
        Some((s, _)) => s.as_mut().await,
        None => std::future::pending().await,
    }
}

async fn killed(notified: Option<&mut Pin<Box<OwnedNotified>>>) {
    match notified {
        Some(n) => n.await,
        None => std::future::pending().await,
    }
}

impl decide::Facts for Session {
    fn authenticated(&self) -> bool {
        self.tenant.is_some()
    }

    fn storage_refuses(&self, bytes: u64) -> bool {
        self.tenant.as_ref().is_some_and(|t| t.live.refuses_write(bytes))
    }

    fn reader(&self) -> bool {
        self.endpoint == Endpoint::Reader
    }

    fn access(&self) -> Option<&shoal_auth::AccessString> {
        self.tenant.as_ref()?.access.as_deref()
    }

    fn scripts_paused(&self) -> Option<Duration> {
        Session::scripts_paused(self)
    }

    fn can_mux(&self) -> bool {
        Session::can_mux(self)
    }

    fn placement(&self) -> shoal_commands::Placement {
        match self.tenant.as_ref().is_some_and(|t| t.route.dedicated) {
            true => shoal_commands::Placement::Dedicated,
            false => shoal_commands::Placement::Shared,
        }
    }
}
