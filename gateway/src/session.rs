//! One client connection: authenticate, then forward commands to the cache's node.
//!
//! A single task drives both directions without blocking either: it reads the client and
//! the upstream into buffers, forwards complete requests byte for byte, and writes replies
//! back in request order. Replies the gateway makes itself (errors, `+OK` to AUTH) wait in
//! `pending` behind the upstream replies that precede them, so pipelines keep their order.

use crate::listener::Shared;
use crate::resp::reply::ReplyScanner;
use crate::resp::request::{Frame, Limits, RequestParser};
use crate::resp::{self};
use crate::{upstream, GatewayError};
use bytes::{Buf, Bytes, BytesMut};
use shoal_types::{CacheId, TenantRoute};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Stop reading a side while this much output waits to be written to the other.
const HIGH_WATER: usize = 4 * 1024 * 1024;
/// Stop reading the client while this many replies are outstanding.
const MAX_PENDING: usize = 64 * 1024;

const NOAUTH: &str = "NOAUTH Authentication required.";
const HELLO_NOAUTH: &str = "NOAUTH HELLO must be called with the client already authenticated, \
     otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client \
     and select the RESP protocol version at the same time";

/// An answer the client is owed, in request order.
enum Pending {
    /// The next reply from upstream.
    Upstream,
    /// A reply the gateway made, sent once everything before it is sent.
    Local(Bytes),
    /// Close the connection once everything before it is sent.
    Close,
}

/// Who the client is once authenticated.
struct Tenant {
    cache: CacheId,
    route: TenantRoute,
    /// The cache's database the client has selected (0-based, virtual).
    db: u32,
}

struct Session {
    shared: Arc<Shared>,
    peer: SocketAddr,
    parser: RequestParser,
    replies: ReplyScanner,
    client_in: BytesMut,
    client_out: BytesMut,
    up_in: BytesMut,
    up_out: BytesMut,
    up_read: Option<OwnedReadHalf>,
    up_write: Option<OwnedWriteHalf>,
    pending: VecDeque<Pending>,
    tenant: Option<Tenant>,
    /// No more requests are read; the session ends once output is flushed.
    closing: bool,
}

enum Event {
    ClientRead(std::io::Result<usize>),
    ClientWrote(std::io::Result<usize>),
    UpstreamRead(std::io::Result<usize>),
    UpstreamWrote(std::io::Result<usize>),
}

/// Serves one client until it leaves, breaks the protocol, or the gateway shuts down.
#[tracing::instrument(skip_all, fields(peer = %peer))]
pub async fn run(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let mut session = Session {
        shared,
        peer,
        parser: RequestParser::new(),
        replies: ReplyScanner::new(),
        client_in: BytesMut::with_capacity(16 * 1024),
        client_out: BytesMut::with_capacity(16 * 1024),
        up_in: BytesMut::with_capacity(16 * 1024),
        up_out: BytesMut::with_capacity(16 * 1024),
        up_read: None,
        up_write: None,
        pending: VecDeque::new(),
        tenant: None,
        closing: false,
    };
    if let Err(e) = session.serve(stream).await {
        tracing::debug!(error = %e, "session ended");
    }
}

/// Answers a connection the gateway will not serve, then closes it.
pub async fn refuse(mut stream: TcpStream, msg: &'static str) {
    let _ = stream.write_all(format!("-{msg}\r\n").as_bytes()).await;
}

impl Session {
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(&mut self, stream: S) -> std::io::Result<()> {
        let (mut client_read, mut client_write) = tokio::io::split(stream);
        loop {
            if self.closing && self.client_out.is_empty() && !self.waiting_on_upstream() {
                return Ok(());
            }
            let read_client = !self.closing
                && self.up_out.len() < HIGH_WATER
                && self.client_out.len() < HIGH_WATER
                && self.pending.len() < MAX_PENDING;
            let read_upstream = self.up_read.is_some() && self.client_out.len() < HIGH_WATER;
            let event = tokio::select! {
                r = client_read.read_buf(&mut self.client_in), if read_client => Event::ClientRead(r),
                r = read_opt(self.up_read.as_mut(), &mut self.up_in), if read_upstream => Event::UpstreamRead(r),
                r = client_write.write(&self.client_out), if !self.client_out.is_empty() => Event::ClientWrote(r),
                r = write_opt(self.up_write.as_mut(), &self.up_out), if !self.up_out.is_empty() && self.up_write.is_some() => Event::UpstreamWrote(r),
                else => return Ok(()),
            };
            match event {
                Event::ClientRead(r) => {
                    if r? == 0 {
                        return Ok(());
                    }
                    self.on_client_input().await;
                }
                Event::ClientWrote(r) => self.client_out.advance(r?),
                Event::UpstreamRead(r) => match r {
                    Ok(n) if n > 0 => self.on_upstream_input(),
                    Ok(_) => self.upstream_lost("closed"),
                    Err(e) => self.upstream_lost(&e.to_string()),
                },
                Event::UpstreamWrote(r) => match r {
                    Ok(n) => self.up_out.advance(n),
                    Err(e) => self.upstream_lost(&e.to_string()),
                },
            }
        }
    }

    fn waiting_on_upstream(&self) -> bool {
        self.up_read.is_some() && self.pending.iter().any(|p| matches!(p, Pending::Upstream))
    }

    fn limits(&self) -> Limits {
        match self.tenant {
            Some(_) => {
                Limits { max_args: self.shared.config.max_args, max_bulk: self.shared.config.max_bulk_bytes }
            }
            None => Limits::UNAUTHENTICATED,
        }
    }

    /// Handles every complete request in the client buffer.
    async fn on_client_input(&mut self) {
        while !self.closing {
            match self.parser.next(&self.client_in, self.limits()) {
                Ok(Some(frame)) => {
                    self.on_request(frame).await;
                    self.client_in.advance(frame.len);
                }
                Ok(None) => break,
                Err(e) => {
                    self.reply_error(&format!("ERR {e}"));
                    self.close_after_replies();
                }
            }
        }
    }

    /// Decides what one request becomes: a local answer or bytes for upstream.
    async fn on_request(&mut self, frame: Frame) {
        let args: Vec<std::ops::Range<usize>> = self.parser.args().to_vec();
        let Some(name) = args.first().map(|r| &self.client_in[r.clone()]) else { return };
        let arg = |i: usize| -> Vec<u8> { self.client_in[args[i].clone()].to_vec() };
        let is = |cmd: &str| name.eq_ignore_ascii_case(cmd.as_bytes());

        if is("QUIT") {
            self.reply(Bytes::from_static(b"+OK\r\n"));
            self.close_after_replies();
        } else if is("AUTH") {
            let (user, password) = match args.len() {
                2 => (None, arg(1)),
                3 => (Some(arg(1)), arg(2)),
                _ => return self.reply_error("ERR wrong number of arguments for 'auth' command"),
            };
            match self.authenticate(user.as_deref(), &password).await {
                Ok(()) => self.reply(Bytes::from_static(b"+OK\r\n")),
                Err(e) => self.reply_auth_error(e),
            }
        } else if is("HELLO") {
            let owned: Vec<Vec<u8>> = (1..args.len()).map(arg).collect();
            self.hello(owned).await;
        } else if self.tenant.is_none() {
            self.reply_error(NOAUTH);
        } else if is("SELECT") && args.len() == 2 {
            self.select(&arg(1)).await;
        } else if is("FLUSHALL") {
            // The cache's databases only. With one database, that is FLUSHDB.
            let databases = self.tenant.as_ref().map_or(1, |t| t.route.databases);
            if databases > 1 {
                return self
                    .reply_error("ERR FLUSHALL on a multi-database cache: use FLUSHDB in each database");
            }
            let mut rebuilt: Vec<Vec<u8>> = vec![b"FLUSHDB".to_vec()];
            rebuilt.extend((1..args.len()).map(arg));
            self.forward_rebuilt(&rebuilt).await;
        } else if frame.inline {
            let rebuilt: Vec<Vec<u8>> = (0..args.len()).map(arg).collect();
            self.forward_rebuilt(&rebuilt).await;
        } else {
            if !self.ensure_upstream().await {
                return;
            }
            self.up_out.extend_from_slice(&self.client_in[..frame.len]);
            self.pending.push_back(Pending::Upstream);
        }
    }

    /// `HELLO [protover [AUTH user pass] [SETNAME name]]`: authenticates if asked, then lets
    /// the upstream switch protocol so replies come in the version the client chose.
    async fn hello(&mut self, args: Vec<Vec<u8>>) {
        let mut forward: Vec<Vec<u8>> = vec![b"HELLO".to_vec()];
        let mut i = 0;
        if let Some(version) = args.first() {
            if !matches!(version.as_slice(), b"2" | b"3") {
                return self.reply_error("NOPROTO unsupported protocol version");
            }
            forward.push(version.clone());
            i = 1;
        }
        let mut credentials = None;
        while i < args.len() {
            let opt = &args[i];
            if opt.eq_ignore_ascii_case(b"AUTH") && i + 2 < args.len() {
                credentials = Some((args[i + 1].clone(), args[i + 2].clone()));
                i += 3;
            } else if opt.eq_ignore_ascii_case(b"SETNAME") && i + 1 < args.len() {
                forward.push(b"SETNAME".to_vec());
                forward.push(args[i + 1].clone());
                i += 2;
            } else {
                let opt = String::from_utf8_lossy(opt).chars().take(64).collect::<String>();
                return self.reply_error(&format!("ERR Syntax error in HELLO option '{opt}'"));
            }
        }
        if let Some((user, password)) = credentials {
            if let Err(e) = self.authenticate(Some(&user), &password).await {
                return self.reply_auth_error(e);
            }
        }
        if self.tenant.is_none() {
            return self.reply_error(HELLO_NOAUTH);
        }
        self.forward_rebuilt(&forward).await;
    }

    /// `SELECT n` within the cache's own databases.
    async fn select(&mut self, index: &[u8]) {
        let Some(tenant) = self.tenant.as_ref() else { return };
        let parsed = std::str::from_utf8(index).ok().and_then(|s| s.parse::<u32>().ok());
        match parsed {
            Some(n) if n < tenant.route.databases => {
                let real = (tenant.route.db + n).to_string().into_bytes();
                if let Some(t) = self.tenant.as_mut() {
                    t.db = n;
                }
                self.forward_rebuilt(&[b"SELECT".to_vec(), real]).await;
            }
            Some(_) => self.reply_error("ERR DB index is out of range"),
            None => self.reply_error("ERR value is not an integer or out of range"),
        }
    }

    /// Verifies credentials and binds the session to the token's cache.
    async fn authenticate(&mut self, _user: Option<&[u8]>, password: &[u8]) -> Result<(), GatewayError> {
        let token = std::str::from_utf8(password).map_err(|_| GatewayError::Auth("not utf-8".into()))?;
        if !crate::auth::jwt::looks_like_jwt(password) {
            return Err(GatewayError::Auth("not a token".into()));
        }
        let claims = self.shared.jwt.verify(token).await?;
        if let Some(tenant) = &self.tenant {
            if tenant.cache != claims.cache {
                return Err(GatewayError::Auth("re-authentication to another cache".into()));
            }
            return Ok(());
        }
        let route = self.shared.router.route(&claims.cache).await?;
        let stream = upstream::connect(&route, route.db).await?;
        let (read, write) = stream.into_split();
        self.up_read = Some(read);
        self.up_write = Some(write);
        tracing::info!(cache = %claims.cache, jti = %claims.jti, "authenticated");
        self.tenant = Some(Tenant { cache: claims.cache, route, db: 0 });
        Ok(())
    }

    /// Re-opens the upstream connection after it was lost (node restart, network).
    async fn ensure_upstream(&mut self) -> bool {
        if self.up_write.is_some() {
            return true;
        }
        let Some(tenant) = self.tenant.as_ref() else { return false };
        let result = async {
            let route = self.shared.router.route(&tenant.cache).await?;
            let stream = upstream::connect(&route, route.db + tenant.db).await?;
            Ok::<_, GatewayError>((route, stream))
        }
        .await;
        match result {
            Ok((route, stream)) => {
                let (read, write) = stream.into_split();
                self.up_read = Some(read);
                self.up_write = Some(write);
                self.up_in.clear();
                self.replies = ReplyScanner::new();
                if let Some(t) = self.tenant.as_mut() {
                    t.route = route;
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

    async fn forward_rebuilt(&mut self, args: &[Vec<u8>]) {
        if !self.ensure_upstream().await {
            return;
        }
        let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
        resp::command(&mut self.up_out, &refs);
        self.pending.push_back(Pending::Upstream);
    }

    /// Moves every complete upstream reply to the client, with the local replies queued
    /// behind each.
    fn on_upstream_input(&mut self) {
        loop {
            match self.replies.next(&self.up_in) {
                Ok(Some(reply)) => {
                    let bytes = self.up_in.split_to(reply.len);
                    self.client_out.extend_from_slice(&bytes);
                    if !reply.push && matches!(self.pending.front(), Some(Pending::Upstream)) {
                        self.pending.pop_front();
                        self.drain_local();
                    }
                }
                Ok(None) => return,
                Err(e) => return self.upstream_lost(&e.to_string()),
            }
        }
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
        tracing::warn!(reason = why, "upstream connection lost");
        self.up_read = None;
        self.up_write = None;
        self.up_out.clear();
        self.up_in.clear();
        self.replies = ReplyScanner::new();
        let owed = std::mem::take(&mut self.pending);
        for p in owed {
            match p {
                Pending::Upstream => {
                    resp::error(&mut self.client_out, "ERR cache connection lost, try again")
                }
                Pending::Local(bytes) => self.client_out.extend_from_slice(&bytes),
                Pending::Close => self.closing = true,
            }
        }
    }

    fn reply(&mut self, bytes: Bytes) {
        if self.pending.is_empty() {
            self.client_out.extend_from_slice(&bytes);
        } else {
            self.pending.push_back(Pending::Local(bytes));
        }
    }

    fn reply_error(&mut self, msg: &str) {
        let mut out = BytesMut::with_capacity(msg.len() + 3);
        resp::error(&mut out, msg);
        self.reply(out.freeze());
    }

    fn reply_auth_error(&mut self, e: GatewayError) {
        tracing::info!(peer = %self.peer, reason = %e, kind = e.kind(), "authentication refused");
        self.reply_error(e.client_message());
    }

    fn close_after_replies(&mut self) {
        if self.pending.is_empty() {
            self.closing = true;
        } else {
            self.pending.push_back(Pending::Close);
        }
    }
}

async fn read_opt(half: Option<&mut OwnedReadHalf>, buf: &mut BytesMut) -> std::io::Result<usize> {
    match half {
        Some(h) => h.read_buf(buf).await,
        None => std::future::pending().await,
    }
}

async fn write_opt(half: Option<&mut OwnedWriteHalf>, buf: &[u8]) -> std::io::Result<usize> {
    match half {
        Some(h) => h.write(buf).await,
        None => std::future::pending().await,
    }
}
