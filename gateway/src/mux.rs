//! Shared upstream connections for stateless commands (twemproxy-style multiplexing).
//!
//! Most traffic is plain data commands (GET, SET, …) whose meaning does not depend on the
//! connection they run on. With one upstream connection per client, every request costs a
//! read and a write on that connection, in the gateway and in Valkey. Sending the requests
//! of many clients down one connection shares those syscalls among many requests.
//!
//! A mux owns one upstream connection per (node, ACL user, real database, gateway thread),
//! logged in like [`crate::upstream::connect`]: two caches never share a connection, and a
//! session's mux runs on the session's own thread (no cross-thread wake-ups per request). Sessions send it
//! [`Batch`]es — the raw bytes of consecutive requests and where their replies go. The mux
//! writes everything queued in one write, cuts the replies into batches and sends each
//! batch's replies back as one chunk, in order. If the connection breaks, every outstanding
//! request is answered `-ERR cache connection lost, try again`, and the next batch
//! reconnects. A mux no session has held for a while closes and leaves the registry.
//!
//! Only sessions in the default state use it (`Session::can_mux`). A session that needs
//! anything bound to a connection (MULTI, WATCH, SELECT, pub/sub, blocking commands,
//! `CLIENT …`, RESP3) first waits for its outstanding batches, then uses its dedicated
//! connection from then on.

use crate::resp::reply::ReplyScanner;
use crate::upstream;
use crate::upstream::{read_opt, write_opt};
use crate::upstream::{ReadHalf, WriteHalf};
use bytes::{Buf, Bytes, BytesMut};
use shoal_types::TenantRoute;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The answer to each request of a batch the mux could not run.
pub(crate) const LOST: &[u8] = b"-ERR cache connection lost, try again\r\n";
const UNAVAILABLE: &[u8] = b"-ERR cache temporarily unavailable, try again\r\n";
/// Stop taking batches while this much waits to be written upstream.
const HIGH_WATER: usize = 4 * 1024 * 1024;
/// A mux no session has used for this long (up to twice as long) closes its connection, and
/// leaves the registry once no session holds it: idle clients hold no upstream connection.
const IDLE: Duration = Duration::from_secs(60);
/// Replies go to their session once this much has arrived, even before the batch, or the
/// reply, is complete: a batch of big replies, or one huge reply, is never held whole.
const CHUNK: usize = 256 * 1024;
/// Stop reading upstream while the session owed the front batch's replies has this much
/// output its client has not taken. A client that does not read holds up only its own
/// cache's shared connection (which Valkey's output-buffer limit then closes), never the
/// gateway's memory.
const OWED_LIMIT: usize = 4 * 1024 * 1024;
/// How often a paused mux looks again whether its session's client took its output.
const PAUSE_CHECK: Duration = Duration::from_millis(5);

/// Consecutive requests of one session, and where their replies go.
pub(crate) struct Batch {
    pub requests: Bytes,
    pub count: usize,
    /// Receives the `count` replies as one chunk.
    pub reply: mpsc::UnboundedSender<Replies>,
    /// An empty vector for the replies' lengths (the session hands back the last one it
    /// got, so that steady traffic allocates none).
    pub lens: Vec<usize>,
    /// Output the session has not written to its client yet (the session keeps it current).
    pub owed: Arc<AtomicUsize>,
}

/// Replies to a batch, in order: one chunk, and where each reply ends in it (the mux found
/// every boundary already; the session's metering reads the lengths instead of scanning
/// again). Usually the whole batch; a batch with much to answer comes in several.
pub(crate) struct Replies {
    pub chunk: BytesMut,
    /// The length of each whole reply (or end of a reply begun in an earlier chunk), in order.
    pub lens: Vec<usize>,
    /// Bytes at the end of the chunk that begin a reply not complete yet.
    pub partial: usize,
    /// The connection broke in the middle of a reply: the client has a piece of it and must
    /// be disconnected (the rest of the batch is answered with errors as usual).
    pub cut: bool,
}

impl Replies {
    /// `count` copies of a gateway error, for requests that never reached Valkey.
    pub fn errors(error: &[u8], count: usize, mut lens: Vec<usize>) -> Replies {
        let mut chunk = BytesMut::with_capacity(error.len() * count);
        for _ in 0..count {
            chunk.extend_from_slice(error);
        }
        lens.clear();
        lens.resize(count, error.len());
        Replies { chunk, lens, partial: 0, cut: false }
    }
}

pub(crate) type Handle = mpsc::UnboundedSender<Batch>;

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    addr: String,
    user: String,
    /// Part of the key so that new credentials get a fresh connection.
    password: String,
    db: u32,
    thread: std::thread::ThreadId,
}

type Map = Arc<Mutex<HashMap<Key, Handle>>>;

/// The running muxes, one per (node, ACL user, real database, thread).
#[derive(Default)]
pub struct Registry {
    muxes: Map,
}

impl Registry {
    /// The mux for the cache's database `db` (real, on the node) on this thread, started
    /// (on this thread's runtime) if need be.
    pub(crate) fn get(&self, route: &TenantRoute, db: u32) -> Handle {
        let key = Key {
            addr: route.node_addr.clone(),
            user: route.acl_user.clone(),
            password: route.acl_password.clone(),
            db,
            thread: std::thread::current().id(),
        };
        let mut muxes = self.muxes.lock().unwrap();
        if let Some(handle) = muxes.get(&key) {
            return handle.clone();
        }
        let (handle, batches) = mpsc::unbounded_channel();
        muxes.insert(key.clone(), handle.clone());
        let mux = Mux::new(route.clone(), db);
        tokio::spawn(mux.run(batches, self.muxes.clone(), key));
        handle
    }
}

/// A batch whose replies have not all arrived.
struct Waiting {
    /// Replies not sent to the session yet.
    count: usize,
    reply: mpsc::UnboundedSender<Replies>,
    /// The lengths of its replies that have arrived.
    lens: Vec<usize>,
    owed: Arc<AtomicUsize>,
}

impl Waiting {
    /// Whether its session's client is behind in reading (a session that left owes nothing).
    fn behind(&self) -> bool {
        self.owed.load(Ordering::Relaxed) > OWED_LIMIT && !self.reply.is_closed()
    }
}

struct Mux {
    route: TenantRoute,
    db: u32,
    read: Option<ReadHalf>,
    write: Option<WriteHalf>,
    /// Counts the connection in the metrics while it is open.
    metric: Option<crate::metrics::Upstream>,
    out: BytesMut,
    input: BytesMut,
    scanner: ReplyScanner,
    waiting: VecDeque<Waiting>,
    /// Complete replies at the front of `input` for `waiting[0]`: how many, how long.
    done: usize,
    done_len: usize,
}

enum Event {
    Batch(Option<Batch>),
    Read(std::io::Result<usize>),
    Wrote(std::io::Result<usize>),
    Idle,
    /// Paused for a slow client: look again.
    Recheck,
}

impl Mux {
    fn new(route: TenantRoute, db: u32) -> Mux {
        Mux {
            route,
            db,
            read: None,
            write: None,
            metric: None,
            // Grown by the load (doubling); small for the many caches that send little.
            out: BytesMut::new(),
            input: BytesMut::new(),
            scanner: ReplyScanner::new(),
            waiting: VecDeque::new(),
            done: 0,
            done_len: 0,
        }
    }

    async fn run(mut self, mut batches: mpsc::UnboundedReceiver<Batch>, registry: Map, key: Key) {
        let idle = tokio::time::sleep(IDLE);
        tokio::pin!(idle);
        // Whether a batch came since the last idle tick (a flag: no clock read per batch).
        let mut used = false;
        loop {
            self.input.reserve(4096);
            let paused = self.waiting.front().is_some_and(Waiting::behind);
            let event = tokio::select! {
                b = batches.recv(), if self.out.len() < HIGH_WATER => Event::Batch(b),
                r = read_opt(self.read.as_mut(), &mut self.input), if self.read.is_some() && !paused => Event::Read(r),
                r = write_opt(self.write.as_mut(), &self.out), if self.write.is_some() && !self.out.is_empty() => Event::Wrote(r),
                _ = tokio::time::sleep(PAUSE_CHECK), if paused => Event::Recheck,
                _ = &mut idle => Event::Idle,
            };
            match event {
                Event::Batch(None) => return,
                Event::Batch(Some(batch)) => {
                    used = true;
                    self.enqueue(batch);
                    // Let the other sessions woken with this one add their batches first, so
                    // that one write carries many (tokio would otherwise run this task next).
                    tokio::task::yield_now().await;
                    while self.out.len() < HIGH_WATER {
                        match batches.try_recv() {
                            Ok(batch) => self.enqueue(batch),
                            Err(_) => break,
                        }
                    }
                    self.ensure_connected().await;
                    self.write_now();
                }
                Event::Read(Ok(n)) if n > 0 => self.on_input(),
                Event::Read(Ok(_)) => self.lost("closed"),
                Event::Read(Err(e)) | Event::Wrote(Err(e)) => self.lost(&e.to_string()),
                Event::Wrote(Ok(n)) => self.out.advance(n),
                Event::Recheck => {}
                Event::Idle => {
                    idle.as_mut().reset((Instant::now() + IDLE).into());
                    if !self.waiting.is_empty() || std::mem::take(&mut used) {
                        continue;
                    }
                    // Leave unless a session still holds a handle (sessions get handles
                    // under this lock, so none can appear meanwhile).
                    let mut muxes = registry.lock().unwrap();
                    let only_registry = muxes.get(&key).is_some_and(|h| h.strong_count() == 1);
                    if only_registry && batches.is_empty() {
                        muxes.remove(&key);
                        return;
                    }
                    drop(muxes);
                    // Idle sessions still hold it: the node gets its connection back (and
                    // the gateway the buffers); the next batch opens a new one.
                    if self.write.is_some() && self.out.is_empty() {
                        self.lost("idle");
                        (self.input, self.out) = (BytesMut::new(), BytesMut::new());
                    }
                }
            }
        }
    }

    fn enqueue(&mut self, batch: Batch) {
        self.out.extend_from_slice(&batch.requests);
        self.waiting.push_back(Waiting {
            count: batch.count,
            reply: batch.reply,
            lens: batch.lens,
            owed: batch.owed,
        });
    }

    async fn ensure_connected(&mut self) {
        if self.write.is_some() || self.waiting.is_empty() {
            return;
        }
        match upstream::connect(&self.route, self.db, false).await {
            Ok(stream) => {
                let (read, write) = stream.into_split();
                self.read = Some(read);
                self.metric = Some(crate::metrics::Upstream::opened());
                self.write = Some(write);
                self.input.clear();
                self.scanner = ReplyScanner::new();
                self.done = 0;
                self.done_len = 0;
            }
            Err(e) => {
                tracing::warn!(error = %e, kind = e.kind(), "mux: upstream unavailable");
                self.fail_all(UNAVAILABLE);
            }
        }
    }

    /// Writes right away if the socket takes the bytes; the rest waits for writability.
    fn write_now(&mut self) {
        let Some(write) = self.write.as_mut() else { return };
        if self.out.is_empty() {
            return;
        }
        match write.try_write(&self.out) {
            Ok(n) => self.out.advance(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => self.lost(&e.to_string()),
        }
    }

    /// Sends every batch whose replies are all in, and what has come of a batch with much to
    /// answer.
    fn on_input(&mut self) {
        loop {
            let Some(front) = self.waiting.front_mut() else {
                if !self.input.is_empty() {
                    self.lost("reply nobody asked for");
                }
                return;
            };
            match self.scanner.next(&self.input[self.done_len..]) {
                Ok(Some(reply)) => {
                    self.done += 1;
                    self.done_len += reply.len;
                    front.lens.push(reply.len);
                    if self.done == front.count {
                        let chunk = self.input.split_to(self.done_len);
                        if let Some(w) = self.waiting.pop_front() {
                            // The session may have left: its replies are simply dropped.
                            let _ = w.reply.send(Replies { chunk, lens: w.lens, partial: 0, cut: false });
                        }
                        self.done = 0;
                        self.done_len = 0;
                    } else if self.done_len >= CHUNK {
                        self.send_part(0);
                    }
                }
                Ok(None) => {
                    if self.input.len() >= CHUNK {
                        let partial = self.scanner.take_partial(&self.input[self.done_len..]);
                        if self.done > 0 || partial > 0 {
                            self.send_part(partial);
                        }
                    }
                    return;
                }
                Err(e) => return self.lost(&e.to_string()),
            }
        }
    }

    /// Sends the front batch the replies that are in, and `partial` bytes of the next one.
    fn send_part(&mut self, partial: usize) {
        let Some(front) = self.waiting.front_mut() else { return };
        let chunk = self.input.split_to(self.done_len + partial);
        let lens = std::mem::take(&mut front.lens);
        front.count -= self.done;
        let _ = front.reply.send(Replies { chunk, lens, partial, cut: false });
        self.done = 0;
        self.done_len = 0;
    }

    /// The connection broke: replies that arrived are delivered, every other request is
    /// answered with an error; the next batch reconnects.
    fn lost(&mut self, why: &str) {
        if !self.waiting.is_empty() {
            tracing::warn!(reason = why, "mux: upstream connection lost");
        }
        self.read = None;
        self.metric = None;
        self.write = None;
        self.out.clear();
        if let Some(mut front) = self.waiting.pop_front() {
            let mut chunk = self.input.split_to(self.done_len);
            for _ in self.done..front.count {
                chunk.extend_from_slice(LOST);
                front.lens.push(LOST.len());
            }
            let cut = self.scanner.in_partial();
            let _ = front.reply.send(Replies { chunk, lens: front.lens, partial: 0, cut });
        }
        self.input.clear();
        self.scanner = ReplyScanner::new();
        self.done = 0;
        self.done_len = 0;
        self.fail_all(LOST);
    }

    fn fail_all(&mut self, error: &[u8]) {
        for w in self.waiting.drain(..) {
            let _ = w.reply.send(Replies::errors(error, w.count, w.lens));
        }
        self.out.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn route(node_addr: String) -> TenantRoute {
        TenantRoute {
            cache_id: shoal_types::CacheId::generate(),
            cache_name: "t".into(),
            node_addr,
            cluster_nodes: Vec::new(),
            db: 3,
            databases: 1,
            acl_user: "u".into(),
            acl_password: "p".into(),
            observer_user: String::new(),
            observer_password: String::new(),
            keyspace_events: String::new(),
            limits: Default::default(),
            storage_full: false,
            storage_bytes: 0,
            storage_sampled_at_ms: 0,
            eviction_policy: String::new(),
            dedicated: false,
        }
    }

    /// A fake node: answers the login, then `replies` to whatever comes, then hangs up.
    async fn node(replies: &'static [u8]) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                // AUTH, SELECT: two commands.
                while seen.iter().filter(|&&b| b == b'*').count() < 2 {
                    let n = s.read(&mut buf).await.unwrap();
                    seen.extend_from_slice(&buf[..n]);
                }
                s.write_all(b"+OK\r\n+OK\r\n").await.unwrap();
                let _ = s.read(&mut buf).await;
                s.write_all(replies).await.unwrap();
            }
        });
        addr
    }

    #[tokio::test]
    async fn batches_get_their_replies_in_order_and_errors_when_the_connection_drops() {
        // Three requests in two batches; the node answers two and hangs up.
        let addr = node(b"+OK\r\n$1\r\nx\r\n").await;
        let registry = Registry::default();
        let mux = registry.get(&route(addr), 3);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let set =
            Bytes::from_static(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nx\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
        mux.send(Batch {
            requests: set,
            count: 1,
            reply: tx.clone(),
            lens: Vec::new(),
            owed: Default::default(),
        })
        .unwrap();
        let get = Bytes::from_static(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n");
        mux.send(Batch {
            requests: get,
            count: 2,
            reply: tx.clone(),
            lens: Vec::new(),
            owed: Default::default(),
        })
        .unwrap();
        let first = rx.recv().await.unwrap();
        assert_eq!((&first.chunk[..], first.lens), (&b"+OK\r\n"[..], vec![5]));
        let second = rx.recv().await.unwrap();
        assert_eq!(&second.chunk[..], [&b"$1\r\nx\r\n"[..], LOST].concat());
        assert_eq!(second.lens, vec![7, LOST.len()], "each reply's length, the lost one's too");
        // The next batch reconnects.
        let ping = Bytes::from_static(b"*1\r\n$4\r\nPING\r\n");
        mux.send(Batch { requests: ping, count: 1, reply: tx, lens: Vec::new(), owed: Default::default() })
            .unwrap();
        assert_eq!(&rx.recv().await.unwrap().chunk[..], b"+OK\r\n");
    }

    #[test]
    fn each_cache_and_database_gets_its_own_mux() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let registry = Registry::default();
            let a = route("127.0.0.1:1".into());
            let b = TenantRoute { acl_user: "other".into(), ..a.clone() };
            let first = registry.get(&a, 3);
            assert!(first.same_channel(&registry.get(&a, 3)));
            assert!(!first.same_channel(&registry.get(&b, 3)));
            assert!(!first.same_channel(&registry.get(&a, 4)));
        });
    }
}
