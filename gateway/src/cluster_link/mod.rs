//! A session's upstream on a cluster pool. To the session it is one Valkey connection (a
//! socket: requests in, replies out, in order), so nothing above it knows about shards.
//! Behind it a task routes each request by its keys' slot ([`plan`]) to the node that owns
//! it, on connections of its own (logged in as the cache's ACL user, `SELECT`ed to its
//! database), and puts the replies back in request order:
//!
//! - `MOVED` and `ASK` are followed and `TRYAGAIN` retried, the slot map read again
//!   ([`slot_map`]): no client sees a redirect. After a `MOVED` nothing new is sent until
//!   the connection that answered it has nothing in flight, so a pipeline keeps its order.
//! - MGET, MSET, DEL, UNLINK, EXISTS and TOUCH over several slots are split per slot and
//!   merged ([`merge`]); other commands over several slots get `-CROSSSLOT`.
//! - Keyless whole-cache commands (DBSIZE, KEYS, FLUSHDB, RANDOMKEY, SCAN, SCRIPT LOAD …)
//!   go to every shard; SCAN's cursor says which shard it is on.
//! - A transaction goes to one node: the first key's (or WATCH's); keyless commands before
//!   it wait. A key in another slot gets `-CROSSSLOT` and EXEC `-EXECABORT`, as in Valkey.
//! - Subscriptions get connections of their own: (P)SUBSCRIBE one (a cluster delivers every
//!   PUBLISH to every node), keyspace-notification patterns one per primary (notifications
//!   are local to the node of the key), SSUBSCRIBE the channel's shard. They are sent once
//!   every earlier reply is out, so the session tells confirmations from replies as usual.
//! - On the reader endpoint, reads go to replicas (`READONLY`) and writes get `-READONLY`.
//!
//! When a connection that owed replies breaks, the link closes, like a standalone node's
//! connection: the session turns what it owed into errors and opens a new link. An idle
//! one (a drained shard's node, stopped) is just dropped.

pub mod merge;
pub mod plan;
pub mod slot_map;

use crate::resp::reply::ReplyScanner;
use crate::resp::request::{Limits, RequestParser, Rest};
use crate::GatewayError;
use bytes::{Bytes, BytesMut};
use plan::{Merge, Plan, Split};
use shoal_types::TenantRoute;
use slot_map::{Seeds, SlotMap};
use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const UNAVAILABLE: &[u8] = b"-ERR cache temporarily unavailable, try again\r\n";
const EXECABORT: &[u8] = b"-EXECABORT Transaction discarded because of previous errors.\r\n";
const MOVED_IN_TX: &[u8] = b"-TRYAGAIN The cache is being rebalanced: retry the transaction\r\n";
/// Redirects followed for one request before its last answer is given as it is.
const MAX_REDIRECTS: u8 = 5;
/// Replies (or pieces of one) read ahead per connection before its reader waits for the link.
const FRAMES_AHEAD: usize = 64;
/// A reply this big goes on in pieces, straight to the session when it is the next one owed.
const PIECE: usize = 64 * 1024;
/// A request this big is passed on as it comes, to the node its first key names.
const STREAM_REQUEST_FROM: usize = 1024 * 1024;

/// Opens a link for a cache on a cluster pool: logs in on one node first, so a wrong
/// password fails here, as it does on a standalone pool.
pub async fn open(route: &TenantRoute, db: u32, reader: bool) -> Result<UnixStream, GatewayError> {
    let seeds = Seeds::new(&route.cluster_nodes, &route.observer_user, &route.observer_password);
    let map = seeds.map().await?;
    let (frames_tx, frames) = mpsc::channel(FRAMES_AHEAD);
    let mut link = Link {
        user: route.acl_user.clone(),
        password: route.acl_password.clone(),
        db,
        reader,
        seeds,
        map,
        map_stale: false,
        conns: HashMap::new(),
        next_conn: 0,
        setup: Vec::new(),
        resp3: false,
        pending: VecDeque::new(),
        first_seq: 0,
        tx: None,
        watched: None,
        last_written: None,
        queued: VecDeque::new(),
        hold: Hold::None,
        redirected: Vec::new(),
        frames_tx,
        frames,
        out: BytesMut::new(),
        streaming: None,
        held_out: BytesMut::new(),
        request_rest: None,
        sub_home: None,
        closed: false,
    };
    let first = link.any_node();
    if link.open_conn(&first, Kind::Data).await.is_err() {
        // The map may name a node that died: read it again and try its successor.
        link.map = link.seeds.refresh(Some(&link.map)).await?;
        let first = link.any_node();
        link.open_conn(&first, Kind::Data).await?;
    }
    let (ours, theirs) = UnixStream::pair().map_err(|e| GatewayError::Upstream(e.to_string()))?;
    tokio::spawn(link.run(ours));
    Ok(theirs)
}

/// A request from the session: its bytes and its arguments' ranges in them.
struct Request {
    bytes: Bytes,
    args: Vec<Range<usize>>,
}

impl Request {
    fn argv(&self) -> Vec<&[u8]> {
        self.args.iter().map(|r| &self.bytes[r.clone()]).collect()
    }

    fn built(args: &[&[u8]]) -> Bytes {
        let mut out = BytesMut::new();
        crate::resp::command(&mut out, args);
        out.freeze()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Data,
    /// Holds subscriptions; `echo`: its confirmations go to the session (one connection's
    /// do; the copies of keyspace-notification patterns on other primaries are quiet).
    Subscriber {
        echo: bool,
    },
}

struct Conn {
    id: u64,
    kind: Kind,
    write: OwnedWriteHalf,
    out: BytesMut,
    inflight: VecDeque<Sent>,
    /// A reply arriving in pieces: passed on as it comes (`direct`), or gathered.
    partial: Option<(bool, BytesMut)>,
    /// A subscription was sent on it: RESP2 messages may come.
    subscribed: bool,
    reader: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A request on a connection, waiting for its reply.
struct Sent {
    /// The entry and part its reply fills; `None`: a reply nobody wants.
    to: Option<(u64, usize)>,
    request: Bytes,
    redirects: u8,
    /// Queued in a transaction: a redirect cannot be followed.
    in_tx: bool,
}

/// One reply owed to the session, in request order.
struct Entry {
    parts: Vec<Option<Bytes>>,
    missing: usize,
    merge: Merge,
    reply: Option<Bytes>,
}

/// A transaction being queued: where it runs, and what waits for that to be known.
struct Tx {
    /// The slot of its keys (all must share one, as in a Valkey cluster) and its node.
    slot: Option<(u16, String)>,
    multi_sent: bool,
    held: Vec<(u64, Bytes)>,
    dirty: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Hold {
    None,
    /// Until every earlier reply is out (a subscription's confirmations come out of band).
    Barrier,
    /// Until the connection that answered `MOVED` has nothing in flight.
    Drain(String),
    /// Until a subscription's confirmations are in: a PING sent after it on its
    /// connection has been answered (later replies come after them, as on one connection).
    Confirming((String, Kind)),
}

enum Incoming {
    Reply {
        conn: u64,
        frame: Bytes,
        push: bool,
    },
    /// Part of a big reply; `end`: its last part.
    Piece {
        conn: u64,
        bytes: Bytes,
        end: bool,
    },
    Closed {
        conn: u64,
    },
}

struct Link {
    user: String,
    password: String,
    db: u32,
    reader: bool,
    seeds: Seeds,
    map: Arc<SlotMap>,
    map_stale: bool,
    /// Connections by address and kind.
    conns: HashMap<(String, Kind), Conn>,
    next_conn: u64,
    /// Connection state replayed on every new connection (HELLO, CLIENT SETNAME …).
    setup: Vec<(String, Bytes)>,
    resp3: bool,
    pending: VecDeque<Entry>,
    /// The sequence number of `pending[0]`.
    first_seq: u64,
    tx: Option<Tx>,
    /// The slot (and node) of the keys WATCHed.
    watched: Option<(u16, String)>,
    last_written: Option<String>,
    /// Requests not sent yet, behind a [`Hold`].
    queued: VecDeque<Request>,
    hold: Hold,
    /// Requests to send again once the hold is over: target, and the request.
    redirected: Vec<(String, Sent)>,
    frames_tx: mpsc::Sender<Incoming>,
    frames: mpsc::Receiver<Incoming>,
    out: BytesMut,
    /// The connection whose reply is being passed on in pieces; what else is out of band
    /// meanwhile waits in `held_out`.
    streaming: Option<u64>,
    held_out: BytesMut,
    /// A big request being passed on as it comes: to which connection, and its rest.
    request_rest: Option<((String, Kind), Rest)>,
    /// The node of the (P)SUBSCRIBE connection, once there is one.
    sub_home: Option<String>,
    closed: bool,
}

impl Link {
    async fn run(mut self, session: UnixStream) {
        let (mut read, mut write) = session.into_split();
        let mut input = BytesMut::with_capacity(16 * 1024);
        let mut parser = RequestParser::new();
        let limits = Limits::authenticated(usize::MAX, usize::MAX);
        while !self.closed {
            self.flush_conns().await;
            if !self.out.is_empty() {
                if write.write_all(&self.out).await.is_err() {
                    break;
                }
                self.out.clear();
            }
            tokio::select! {
                r = read.read_buf(&mut input) => {
                    if !matches!(r, Ok(n) if n > 0) {
                        break;
                    }
                    if self.requests(&mut input, &mut parser, limits).await.is_err() {
                        break;
                    }
                }
                Some(incoming) = self.frames.recv() => {
                    self.incoming(incoming).await;
                    while let Ok(incoming) = self.frames.try_recv() {
                        self.incoming(incoming).await;
                    }
                }
            }
            self.release().await;
        }
    }

    /// Takes the requests at the front of `input`; a big one is passed on as it comes.
    async fn requests(
        &mut self,
        input: &mut BytesMut,
        parser: &mut RequestParser,
        limits: Limits,
    ) -> Result<(), ()> {
        loop {
            if let Some((key, rest)) = self.request_rest.as_mut() {
                let n = rest.advance(input, limits).map_err(|_| ())?;
                let done = rest.done();
                let piece = input.split_to(n);
                if let Some(conn) = self.conns.get_mut(key) {
                    conn.out.extend_from_slice(&piece);
                }
                if !done {
                    return Ok(());
                }
                self.request_rest = None;
            }
            match parser.next(input, limits).map_err(|_| ())? {
                Some(frame) => {
                    let bytes = input.split_to(frame.len).freeze();
                    let args = parser.take_args();
                    if !args.is_empty() {
                        self.request(Request { bytes, args }).await;
                    }
                }
                None => {
                    if input.len() >= STREAM_REQUEST_FROM && self.stream_request(input, parser).await {
                        continue;
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Starts passing on the big request at the front of `input`, once its first key is in:
    /// to that key's node, without holding it whole (and without following a redirect: a
    /// rebalance at that moment gives the client `-TRYAGAIN`). Whether it started.
    async fn stream_request(&mut self, input: &mut BytesMut, parser: &mut RequestParser) -> bool {
        if self.hold != Hold::None || self.tx.is_some() {
            return false;
        }
        let Some((args, pos, rest)) = parser.partial() else { return false };
        let argv: Vec<&[u8]> = args.iter().map(|r| &input[r.clone()]).collect();
        let Some(spec) =
            argv.first().and_then(|name| shoal_commands::table().lookup(name, argv.get(1).copied()))
        else {
            return false;
        };
        // Only a command with one key (SET, APPEND, RPUSH …): the rest of a multi-key one
        // may name other slots (MSET is split, the others get -CROSSSLOT), so it is held.
        let one_key = spec.first_key > 0 && spec.last_key == spec.first_key && !spec.has_flag("movablekeys");
        let addr = match plan::plan(spec, &argv, self.reader) {
            Plan::Slot(slot) if one_key && argv.len() > spec.first_key as usize => self.node_for(slot),
            _ => return false,
        };
        let seq = self.entry(1, Merge::First);
        let head = Bytes::copy_from_slice(&input[..pos]);
        self.send(&addr, Kind::Data, Sent { redirects: MAX_REDIRECTS, ..sent(seq, 0, head) }).await;
        let _ = input.split_to(pos);
        parser.abandon();
        self.request_rest = Some(((addr, Kind::Data), rest));
        true
    }

    /// Sends what waited behind a hold that is over.
    async fn release(&mut self) {
        loop {
            match &self.hold {
                Hold::Barrier if self.pending.is_empty() => self.hold = Hold::None,
                Hold::Drain(addr)
                    if self.conns.get(&(addr.clone(), Kind::Data)).is_none_or(|c| c.inflight.is_empty()) =>
                {
                    self.hold = Hold::None;
                    let mut again = std::mem::take(&mut self.redirected);
                    again.sort_by_key(|(_, s)| s.to);
                    for (addr, sent) in again {
                        self.send(&addr, Kind::Data, sent).await;
                    }
                }
                Hold::Confirming(key) if self.conns.get(key).is_none_or(|c| c.inflight.is_empty()) => {
                    self.hold = Hold::None;
                }
                Hold::None => {}
                _ => return,
            }
            if self.hold != Hold::None || self.closed {
                return;
            }
            let Some(request) = self.queued.pop_front() else { return };
            self.request(request).await;
        }
    }

    async fn request(&mut self, request: Request) {
        if self.hold != Hold::None {
            self.queued.push_back(request);
            return;
        }
        if self.map_stale {
            self.map_stale = false;
            if let Ok(map) = self.seeds.refresh(Some(&self.map)).await {
                self.map = map;
            }
        }
        let argv = request.argv();
        let table = shoal_commands::table();
        let plan = match table.lookup(argv[0], argv.get(1).copied()) {
            Some(spec) => plan::plan(spec, &argv, self.reader),
            None => Plan::Any,
        };
        let writes = table.lookup(argv[0], argv.get(1).copied()).is_some_and(|s| s.writes());
        drop(argv);
        if self.tx.is_some() && !matches!(plan, Plan::Multi | Plan::Exec | Plan::Discard | Plan::Watch(_)) {
            return self.queue_in_tx(plan, request).await;
        }
        match plan {
            Plan::Slot(slot) => {
                let addr = self.node_for(slot);
                if writes {
                    self.last_written = Some(addr.clone());
                }
                self.one(&addr, request.bytes).await;
            }
            Plan::Any => {
                // PING on a subscribed session goes where its subscriptions are, as on one
                // connection: its answer (`pong` in RESP2) comes after their confirmations.
                let home = self.sub_home.clone().filter(|_| request.argv()[0].eq_ignore_ascii_case(b"ping"));
                match home {
                    Some(home) => {
                        let seq = self.entry(1, Merge::First);
                        let key = (home, Kind::Subscriber { echo: true });
                        match self.conns.get_mut(&key) {
                            Some(conn) => {
                                conn.out.extend_from_slice(&request.bytes);
                                conn.inflight.push_back(sent(seq, 0, request.bytes));
                            }
                            None => self.fill(seq, 0, Bytes::from_static(UNAVAILABLE)),
                        }
                    }
                    None => {
                        let addr = self.any_node();
                        self.one(&addr, request.bytes).await;
                    }
                }
            }
            Plan::LastWritten => {
                let addr = self.last_written.clone().unwrap_or_else(|| self.any_node());
                self.one(&addr, request.bytes).await;
            }
            Plan::CrossSlot => self.local(plan::CROSSSLOT),
            Plan::ReadOnly => self.local(plan::READONLY),
            Plan::Split(kind) => self.split(kind, &request).await,
            Plan::Fanout(merge) => {
                let nodes = self.every_shard();
                let seq = self.entry(nodes.len(), merge);
                for (i, addr) in nodes.iter().enumerate() {
                    self.send(addr, Kind::Data, sent(seq, i, request.bytes.clone())).await;
                }
            }
            Plan::Setup => self.setup(request).await,
            Plan::Scan => self.scan(&request).await,
            Plan::Multi => {
                self.local(b"+OK\r\n");
                let slot = self.watched.clone();
                if let Some((_, node)) = &slot {
                    self.send(node, Kind::Data, unwanted(Request::built(&[b"MULTI"]), true)).await;
                }
                self.tx = Some(Tx { multi_sent: slot.is_some(), slot, held: Vec::new(), dirty: false });
            }
            Plan::Exec | Plan::Discard => {
                self.watched = None;
                let Some(tx) = self.tx.take() else {
                    // Valkey's own "without MULTI" error.
                    let addr = self.any_node();
                    return self.one(&addr, request.bytes).await;
                };
                let node = tx.slot.clone().map_or_else(|| self.any_node(), |(_, node)| node);
                self.start_tx(&node, tx.multi_sent, tx.held).await;
                if tx.dirty && plan == Plan::Exec {
                    self.send(&node, Kind::Data, unwanted(Request::built(&[b"DISCARD"]), true)).await;
                    self.local(EXECABORT);
                } else {
                    let seq = self.entry(1, Merge::First);
                    self.send(&node, Kind::Data, sent(seq, 0, request.bytes)).await;
                }
            }
            Plan::Watch(slot) => {
                let Some(slot) = slot else { return self.local(plan::CROSSSLOT) };
                let addr = self.map.primary(slot).to_string();
                if self.watched.as_ref().is_some_and(|w| w.0 != slot) {
                    return self.local(plan::CROSSSLOT);
                }
                self.watched = Some((slot, addr.clone()));
                self.one(&addr, request.bytes).await;
            }
            Plan::Unwatch => {
                let addr = self.watched.take().map_or_else(|| self.any_node(), |(_, node)| node);
                self.one(&addr, request.bytes).await;
            }
            Plan::Subscribe | Plan::ShardSubscribe(_) if !self.pending.is_empty() => {
                self.hold = Hold::Barrier;
                self.queued.push_front(request);
            }
            Plan::Subscribe => self.subscribe(request).await,
            Plan::ShardSubscribe(slot) => {
                let targets: Vec<String> = match slot {
                    Some(slot) => vec![self.map.primary(slot).to_string()],
                    None => {
                        let echo = Kind::Subscriber { echo: true };
                        self.conns.keys().filter(|k| k.1 == echo).map(|k| k.0.clone()).collect()
                    }
                };
                for addr in targets {
                    self.send_subscription(&addr, Kind::Subscriber { echo: true }, &request.bytes).await;
                }
            }
        }
    }

    /// A command in a transaction: queued on the transaction's node, which its first key
    /// decides; every key must be in that key's slot.
    async fn queue_in_tx(&mut self, plan: Plan, request: Request) {
        let target = match plan {
            Plan::Slot(slot) => Ok(Some(slot)),
            Plan::Split(_) | Plan::CrossSlot => Err(plan::CROSSSLOT),
            Plan::ReadOnly => Err(plan::READONLY),
            _ => Ok(None),
        };
        let tx = self.tx.as_mut().expect("in a transaction");
        match (tx.slot.clone(), target) {
            (_, Err(error)) => {
                tx.dirty = true;
                self.local(error);
            }
            (None, Ok(None)) => {
                let seq = self.entry(1, Merge::First);
                self.tx.as_mut().expect("in a transaction").held.push((seq, request.bytes));
            }
            (None, Ok(Some(slot))) => {
                let held = std::mem::take(&mut tx.held);
                let node = self.map.primary(slot).to_string();
                let tx = self.tx.as_mut().expect("in a transaction");
                tx.slot = Some((slot, node.clone()));
                tx.multi_sent = true;
                self.start_tx(&node, false, held).await;
                let seq = self.entry(1, Merge::First);
                self.send(&node, Kind::Data, Sent { in_tx: true, ..sent(seq, 0, request.bytes) }).await;
            }
            (Some((slot, node)), Ok(target)) if target.is_none_or(|t| t == slot) => {
                let seq = self.entry(1, Merge::First);
                self.send(&node, Kind::Data, Sent { in_tx: true, ..sent(seq, 0, request.bytes) }).await;
            }
            (Some(_), _) => {
                tx.dirty = true;
                self.local(plan::CROSSSLOT);
            }
        }
    }

    /// MULTI (unless sent) and the commands that waited for the transaction's node.
    async fn start_tx(&mut self, node: &str, multi_sent: bool, held: Vec<(u64, Bytes)>) {
        if !multi_sent {
            self.send(node, Kind::Data, unwanted(Request::built(&[b"MULTI"]), true)).await;
        }
        for (seq, bytes) in held {
            self.send(node, Kind::Data, Sent { in_tx: true, ..sent(seq, 0, bytes) }).await;
        }
    }

    async fn split(&mut self, kind: Split, request: &Request) {
        let argv = request.argv();
        let groups = plan::split(kind, &argv);
        let merge = match kind {
            Split::Values => Merge::Values {
                positions: groups.iter().map(|g| g.2.clone()).collect(),
                keys: argv.len() - 1,
            },
            Split::Pairs => Merge::AllOk,
            Split::Count => Merge::Sum,
        };
        let seq = self.entry(groups.len(), merge);
        for (i, (slot, args, _)) in groups.iter().enumerate() {
            let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            let addr = self.node_for(*slot);
            if kind != Split::Values && !self.reader {
                self.last_written = Some(addr.clone());
            }
            self.send(&addr, Kind::Data, sent(seq, i, Request::built(&args))).await;
        }
    }

    /// SCAN on the shard its cursor names, with that shard's own cursor.
    async fn scan(&mut self, request: &Request) {
        let argv = request.argv();
        let client: u64 = std::str::from_utf8(argv.get(1).copied().unwrap_or_default())
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(u64::MAX);
        if client == u64::MAX {
            return self.local(b"-ERR invalid cursor\r\n");
        }
        let (cursor, shard) = plan::scan_cursor(client);
        let nodes = self.every_shard();
        let Some(addr) = nodes.get(shard) else {
            return self.local(b"*2\r\n$1\r\n0\r\n*0\r\n");
        };
        let cursor = cursor.to_string();
        let mut args = argv.clone();
        args[1] = cursor.as_bytes();
        let seq = self.entry(1, Merge::Scan { shard, shards: nodes.len() });
        let addr = addr.clone();
        self.send(&addr, Kind::Data, sent(seq, 0, Request::built(&args))).await;
    }

    /// Connection state: remembered for connections opened later, sent on every open one.
    async fn setup(&mut self, request: Request) {
        let argv = request.argv();
        let name = String::from_utf8_lossy(argv[0]).to_ascii_lowercase();
        let key = match argv.get(1) {
            Some(sub) if name == "client" => {
                format!("client {}", String::from_utf8_lossy(sub).to_ascii_lowercase())
            }
            _ => name.clone(),
        };
        match name.as_str() {
            "select" => match std::str::from_utf8(argv.get(1).copied().unwrap_or_default())
                .ok()
                .and_then(|d| d.parse().ok())
            {
                Some(db) => self.db = db,
                None => return self.local(b"-ERR value is not an integer or out of range\r\n"),
            },
            "auth" if argv.len() == 3 => {
                self.user = String::from_utf8_lossy(argv[1]).into_owned();
                self.password = String::from_utf8_lossy(argv[2]).into_owned();
            }
            "hello" => {
                self.resp3 = argv.get(1).is_some_and(|v| *v == b"3");
                self.setup.retain(|(k, _)| *k != key);
                self.setup.push((key, request.bytes.clone()));
            }
            _ => {
                self.setup.retain(|(k, _)| *k != key);
                self.setup.push((key, request.bytes.clone()));
            }
        }
        drop(argv);
        if !self.conns.values().any(|c| c.kind == Kind::Data) {
            let addr = self.any_node();
            if self.open_conn(&addr, Kind::Data).await.is_err() {
                return self.local(UNAVAILABLE);
            }
            // Its replay already carries the new state; sending it again answers it.
        }
        // Subscriber connections got the state when opened; once subscribed (RESP2) they
        // would refuse it.
        let targets: Vec<(String, Kind)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.kind == Kind::Data)
            .map(|(k, c)| (k.0.clone(), c.kind))
            .collect();
        let seq = self.entry(targets.len(), Merge::First);
        for (i, (addr, kind)) in targets.iter().enumerate() {
            self.send(addr, *kind, sent(seq, i, request.bytes.clone())).await;
        }
    }

    /// (P)(UN)SUBSCRIBE on the subscriber connection; keyspace-notification patterns on
    /// every primary's too.
    async fn subscribe(&mut self, request: Request) {
        let argv = request.argv();
        let notifications =
            argv[0].eq_ignore_ascii_case(b"psubscribe") || argv[0].eq_ignore_ascii_case(b"punsubscribe");
        let notifications =
            notifications && argv.len() > 1 && argv[1..].iter().all(|p| p.starts_with(b"__key"));
        drop(argv);
        let home = self.sub_home.get_or_insert_with(|| self.map.shards[0].primary.clone()).clone();
        self.send_subscription(&home, Kind::Subscriber { echo: true }, &request.bytes).await;
        if notifications {
            for addr in self.every_shard().into_iter().filter(|a| *a != home) {
                self.send_subscription(&addr, Kind::Subscriber { echo: false }, &request.bytes).await;
            }
        }
    }

    /// A (un)subscribe command: its confirmations come out of band, so nothing waits for
    /// them in order.
    async fn send_subscription(&mut self, addr: &str, kind: Kind, request: &[u8]) {
        let key = (addr.to_string(), kind);
        if !self.conns.contains_key(&key) && self.open_conn(addr, kind).await.is_err() {
            // Like a lost connection: the session cannot be told which confirmations failed.
            self.closed = true;
            return;
        }
        let conn = self.conns.get_mut(&key).expect("opened above");
        conn.subscribed = true;
        conn.out.extend_from_slice(request);
        if kind == (Kind::Subscriber { echo: true }) {
            let ping = Request::built(&[b"PING"]);
            conn.out.extend_from_slice(&ping);
            conn.inflight.push_back(unwanted(ping, false));
            self.hold = Hold::Confirming(key);
        }
    }

    async fn one(&mut self, addr: &str, bytes: Bytes) {
        let seq = self.entry(1, Merge::First);
        self.send(addr, Kind::Data, sent(seq, 0, bytes)).await;
    }

    /// A reply the link gives itself.
    fn local(&mut self, reply: &[u8]) {
        self.pending.push_back(Entry {
            parts: Vec::new(),
            missing: 0,
            merge: Merge::First,
            reply: Some(Bytes::copy_from_slice(reply)),
        });
        self.deliver();
    }

    fn entry(&mut self, parts: usize, merge: Merge) -> u64 {
        self.pending.push_back(Entry { parts: vec![None; parts], missing: parts, merge, reply: None });
        self.first_seq + self.pending.len() as u64 - 1
    }

    /// The node a keyed command goes to: the slot's primary, or on the reader endpoint one
    /// of its replicas (the primary when it has none).
    fn node_for(&self, slot: u16) -> String {
        let shard = self.map.shard(slot);
        match shard.replicas.first() {
            Some(replica) if self.reader => replica.clone(),
            _ => shard.primary.clone(),
        }
    }

    fn any_node(&self) -> String {
        self.node_for(0)
    }

    /// One node per shard, in slot order.
    fn every_shard(&self) -> Vec<String> {
        self.map
            .shards
            .iter()
            .map(|s| match s.replicas.first() {
                Some(r) if self.reader => r.clone(),
                _ => s.primary.clone(),
            })
            .collect()
    }

    async fn open_conn(&mut self, addr: &str, kind: Kind) -> Result<(), GatewayError> {
        let readonly = self.reader && kind == Kind::Data;
        let stream = crate::upstream::connect_to(addr, &self.user, &self.password, self.db, readonly).await?;
        let (read, write) = stream.into_split();
        let id = self.next_conn;
        self.next_conn += 1;
        let reader = tokio::spawn(read_replies(id, read, self.frames_tx.clone()));
        let mut conn = Conn {
            id,
            kind,
            write,
            out: BytesMut::new(),
            inflight: VecDeque::new(),
            partial: None,
            subscribed: false,
            reader,
        };
        for (_, bytes) in &self.setup {
            conn.out.extend_from_slice(bytes);
            conn.inflight.push_back(unwanted(bytes.clone(), false));
        }
        self.conns.insert((addr.to_string(), kind), conn);
        Ok(())
    }

    /// Queues a request on a connection (opened if needed); written at the next flush.
    async fn send(&mut self, addr: &str, kind: Kind, sent: Sent) {
        let key = (addr.to_string(), kind);
        if !self.conns.contains_key(&key) {
            if let Err(e) = self.open_conn(addr, kind).await {
                tracing::warn!(error = %e, node = addr, "cluster node unavailable");
                self.map_stale = true;
                if let Some((seq, part)) = sent.to {
                    self.fill(seq, part, Bytes::from_static(UNAVAILABLE));
                }
                return;
            }
        }
        let conn = self.conns.get_mut(&key).expect("opened above");
        conn.out.extend_from_slice(&sent.request);
        conn.inflight.push_back(sent);
    }

    async fn flush_conns(&mut self) {
        let mut broken = false;
        for conn in self.conns.values_mut() {
            if !conn.out.is_empty() {
                if conn.write.write_all(&conn.out).await.is_err() {
                    broken = true;
                }
                conn.out.clear();
            }
        }
        if broken {
            self.closed = true;
        }
    }

    async fn incoming(&mut self, incoming: Incoming) {
        let (id, frame, push) = match incoming {
            Incoming::Reply { conn, frame, push } => (conn, frame, push),
            Incoming::Piece { conn, bytes, end } => match self.piece(conn, bytes, end) {
                Some(frame) => {
                    let push = frame.first() == Some(&b'>');
                    (conn, frame, push)
                }
                None => return,
            },
            Incoming::Closed { conn } => return self.conn_closed(conn),
        };
        let Some((key, conn)) = self.conns.iter_mut().find(|(_, c)| c.id == id) else { return };
        let addr = key.0.clone();
        if push || (conn.subscribed && !self.resp3 && is_pubsub_message(&frame)) {
            let echo = !matches!(conn.kind, Kind::Subscriber { echo: false });
            if echo || is_message(&frame) {
                let out = if self.streaming.is_some() { &mut self.held_out } else { &mut self.out };
                out.extend_from_slice(&frame);
            }
            return;
        }
        let Some(sent) = conn.inflight.pop_front() else { return };
        let Some((seq, part)) = sent.to else { return };
        if let Some(redirect) = Redirect::parse(&frame) {
            if sent.in_tx {
                self.map_stale = true;
                return self.fill(seq, part, Bytes::from_static(MOVED_IN_TX));
            }
            if sent.redirects < MAX_REDIRECTS {
                return self.redirect(addr, redirect, sent).await;
            }
        }
        self.fill(seq, part, frame);
    }

    /// Part of a big reply. The next reply owed, whole from one node, goes straight on to
    /// the session; any other is gathered and returned whole with its last part.
    fn piece(&mut self, id: u64, bytes: Bytes, end: bool) -> Option<Bytes> {
        let conn = self.conns.values_mut().find(|c| c.id == id)?;
        if conn.partial.is_none() {
            let next_owed =
                conn.inflight.front().and_then(|s| s.to).is_some_and(|(seq, _)| seq == self.first_seq)
                    && self.pending.front().is_some_and(|e| e.parts.len() == 1 && e.merge == Merge::First);
            let direct = next_owed
                && self.streaming.is_none()
                && conn.kind == Kind::Data
                && !matches!(bytes.first(), Some(b'-' | b'>'));
            conn.partial = Some((direct, BytesMut::new()));
            if direct {
                self.streaming = Some(id);
            }
        }
        let (direct, gathered) = conn.partial.as_mut().expect("set above");
        if !*direct {
            gathered.extend_from_slice(&bytes);
            return end.then(|| conn.partial.take().expect("set above").1.freeze());
        }
        self.out.extend_from_slice(&bytes);
        if end {
            conn.partial = None;
            conn.inflight.pop_front();
            self.pending.pop_front();
            self.first_seq += 1;
            self.streaming = None;
            let held = self.held_out.split();
            self.out.extend_from_slice(&held);
            self.deliver();
        }
        None
    }

    /// A connection that owed nothing (a node drained and removed, an idle one restarted) is
    /// just dropped. One that owed replies or held subscriptions closes the link: the
    /// session turns what it owed into errors, as when a standalone node goes away.
    fn conn_closed(&mut self, id: u64) {
        let Some(key) = self.conns.iter().find(|(_, c)| c.id == id).map(|(k, _)| k.clone()) else { return };
        let conn = &self.conns[&key];
        let owed = conn.inflight.iter().any(|s| s.to.is_some() || s.in_tx);
        if owed || conn.kind != Kind::Data || self.watched.as_ref().is_some_and(|w| w.1 == key.0) {
            self.closed = true;
        } else {
            self.conns.remove(&key);
            self.map_stale = true;
        }
    }

    async fn redirect(&mut self, from: String, redirect: Redirect, mut sent: Sent) {
        sent.redirects += 1;
        match redirect {
            Redirect::Moved { slot, addr } => {
                self.map = Arc::new(self.map.moved(slot, &addr));
                let seeds = self.seeds.clone();
                let seen = self.map.clone();
                tokio::spawn(async move { seeds.refresh(Some(&seen)).await });
                self.redirected.push((addr, sent));
                self.hold = Hold::Drain(from);
            }
            Redirect::Ask { addr } => {
                self.send(&addr, Kind::Data, unwanted(Request::built(&[b"ASKING"]), false)).await;
                self.send(&addr, Kind::Data, sent).await;
            }
            Redirect::TryAgain => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                self.redirected.push((from.clone(), sent));
                self.hold = Hold::Drain(from);
            }
        }
    }

    fn fill(&mut self, seq: u64, part: usize, reply: Bytes) {
        let Some(entry) = seq.checked_sub(self.first_seq).and_then(|i| self.pending.get_mut(i as usize))
        else {
            return;
        };
        if entry.parts[part].replace(reply).is_none() {
            entry.missing -= 1;
        }
        if entry.missing == 0 {
            let parts = entry.parts.iter_mut().map(|p| p.take().unwrap_or_default()).collect();
            entry.reply = Some(merge::merge(&entry.merge, parts));
        }
        self.deliver();
    }

    /// Passes on every reply at the front that is complete.
    fn deliver(&mut self) {
        if self.streaming.is_some() {
            return;
        }
        while let Some(reply) = self.pending.front().and_then(|e| e.reply.as_ref()) {
            self.out.extend_from_slice(reply);
            self.pending.pop_front();
            self.first_seq += 1;
        }
    }
}

fn sent(seq: u64, part: usize, request: Bytes) -> Sent {
    Sent { to: Some((seq, part)), request, redirects: 0, in_tx: false }
}

fn unwanted(request: Bytes, in_tx: bool) -> Sent {
    Sent { to: None, request, redirects: 0, in_tx }
}

enum Redirect {
    Moved { slot: u16, addr: String },
    Ask { addr: String },
    TryAgain,
}

impl Redirect {
    fn parse(frame: &[u8]) -> Option<Redirect> {
        if frame.starts_with(b"-TRYAGAIN") {
            return Some(Redirect::TryAgain);
        }
        let moved = frame.starts_with(b"-MOVED ");
        if !moved && !frame.starts_with(b"-ASK ") {
            return None;
        }
        let text = std::str::from_utf8(frame).ok()?.trim_end();
        let mut words = text.split(' ').skip(1);
        let slot: u16 = words.next()?.parse().ok()?;
        let addr = words.next()?.to_string();
        Some(if moved { Redirect::Moved { slot, addr } } else { Redirect::Ask { addr } })
    }
}

/// A RESP2 array that a subscribed connection sends out of band: a message or a
/// subscription confirmation (not a PING's `pong`, not a reply to what it was sent before).
fn is_pubsub_message(frame: &[u8]) -> bool {
    frame.first() == Some(&b'*')
        && first_element_is(
            frame,
            &[
                b"message",
                b"pmessage",
                b"smessage",
                b"subscribe",
                b"unsubscribe",
                b"psubscribe",
                b"punsubscribe",
                b"ssubscribe",
                b"sunsubscribe",
            ],
        )
}

/// A message (not a confirmation).
fn is_message(frame: &[u8]) -> bool {
    first_element_is(frame, &[b"message", b"pmessage", b"smessage"])
}

fn first_element_is(frame: &[u8], words: &[&[u8]]) -> bool {
    let Some(cr) = crate::resp::find_crlf(frame, 1) else { return false };
    let rest = &frame[cr + 2..];
    let Some(cr2) = crate::resp::find_crlf(rest, 1) else { return false };
    let body = &rest[cr2 + 2..];
    words.iter().any(|w| {
        body.len() >= w.len() + 2
            && body[..w.len()].eq_ignore_ascii_case(w)
            && &body[w.len()..w.len() + 2] == b"\r\n"
    })
}

/// A connection's replies, whole, to the link.
async fn read_replies(conn: u64, mut read: tokio::net::tcp::OwnedReadHalf, link: mpsc::Sender<Incoming>) {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut scanner = ReplyScanner::new();
    let mut in_piece = false;
    loop {
        loop {
            let incoming = match scanner.next(&buf) {
                Ok(Some(reply)) => {
                    let bytes = buf.split_to(reply.len).freeze();
                    match std::mem::take(&mut in_piece) {
                        true => Incoming::Piece { conn, bytes, end: true },
                        false => Incoming::Reply { conn, frame: bytes, push: reply.push },
                    }
                }
                Ok(None) if buf.len() >= PIECE => match scanner.take_partial(&buf) {
                    0 => break,
                    n => {
                        in_piece = true;
                        Incoming::Piece { conn, bytes: buf.split_to(n).freeze(), end: false }
                    }
                },
                Ok(None) => break,
                Err(_) => {
                    let _ = link.send(Incoming::Closed { conn }).await;
                    return;
                }
            };
            if link.send(incoming).await.is_err() {
                return;
            }
        }
        match read.read_buf(&mut buf).await {
            Ok(n) if n > 0 => {}
            _ => {
                let _ = link.send(Incoming::Closed { conn }).await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_are_read_from_errors() {
        assert!(matches!(
            Redirect::parse(b"-MOVED 3999 127.0.0.1:7001\r\n"),
            Some(Redirect::Moved { slot: 3999, addr }) if addr == "127.0.0.1:7001"
        ));
        assert!(
            matches!(Redirect::parse(b"-ASK 1 127.0.0.1:7002\r\n"), Some(Redirect::Ask { addr }) if addr == "127.0.0.1:7002")
        );
        assert!(matches!(
            Redirect::parse(b"-TRYAGAIN Multiple keys request during rehashing\r\n"),
            Some(Redirect::TryAgain)
        ));
        assert!(Redirect::parse(b"-ERR MOVED\r\n").is_none());
    }

    #[test]
    fn subscribed_connections_tell_messages_from_replies() {
        assert!(is_pubsub_message(b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n"));
        assert!(is_pubsub_message(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n"));
        assert!(!is_pubsub_message(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"));
        assert!(!is_pubsub_message(b"-ERR nope\r\n"));
        assert!(!is_pubsub_message(b"*2\r\n$6\r\nserver\r\n$6\r\nvalkey\r\n"), "a HELLO reply");
        assert!(is_message(b"*4\r\n$8\r\npmessage\r\n$1\r\np\r\n$1\r\nc\r\n$1\r\nm\r\n"));
        assert!(!is_message(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n"));
    }
}
