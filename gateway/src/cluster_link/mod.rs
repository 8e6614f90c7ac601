//! A session's upstream on a cluster pool. To the session it is one Valkey connection (an
//! in-memory pipe: requests in, replies out, in order), so nothing above it knows about shards.
//! Behind it a task routes each request by its keys' slot ([`plan`]) to the node that owns
//! it, on connections of its own (logged in as the cache's ACL user, `SELECT`ed to its
//! database), and puts the replies back in request order:
//!
//! - `MOVED` and `ASK` are followed and `TRYAGAIN` retried, the slot map read again
//!   ([`slot_map`]): no client sees a redirect. After a `MOVED` nothing new is sent until
//!   the connection that answered it has nothing in flight, so a pipeline keeps its order.
//! - MGET, MSET, DEL, UNLINK, EXISTS and TOUCH over several slots are split per slot and
//!   merged ([`merge`]); other commands over several slots get the node's `-CROSSSLOT`.
//! - Keyless whole-cache commands (DBSIZE, KEYS, FLUSHDB, RANDOMKEY, SCAN, SCRIPT LOAD …)
//!   go to every shard; SCAN's cursor says which shard it is on.
//! - A transaction goes to one node: the first key's (or WATCH's); keyless commands before
//!   it wait. A key in another slot gets `-CROSSSLOT` and EXEC `-EXECABORT`, as in Valkey.
//! - Subscriptions get connections of their own: (P)SUBSCRIBE one (a cluster delivers every
//!   PUBLISH to every node), keyspace-notification channels and patterns one per primary
//!   (notifications are local to the node of the key), SSUBSCRIBE the channel's shard. They are sent once
//!   every earlier reply is out, and later requests wait for their confirmations, so the
//!   session sees the order one connection gives.
//! - On the reader endpoint, reads go to replicas (`READONLY`) and writes get `-READONLY`.
//! - Big replies go on in pieces and big one-key requests as they come: neither is held
//!   whole.
//!
//! When a connection that owed replies breaks, the link closes, like a standalone node's
//! connection: the session turns what it owed into errors and opens a new link. An idle
//! one (a drained shard's node, stopped) is just dropped.

mod conns;
pub mod merge;
pub mod plan;
mod pubsub;
mod replies;
pub mod slot_map;
mod spread;
mod tx;

use crate::resp::request::{Limits, RequestParser, Rest};
use crate::GatewayError;
use bytes::{Bytes, BytesMut};
use conns::{sent, unwanted, Conn, Incoming, Kind, Sent};
use plan::{Merge, Plan};
use replies::Entry;
use shoal_types::TenantRoute;
use slot_map::{Seeds, SlotMap};
use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tx::Tx;

const UNAVAILABLE: &[u8] = b"-ERR cache temporarily unavailable, try again\r\n";
const EXECABORT: &[u8] = b"-EXECABORT Transaction discarded because of previous errors.\r\n";
/// A redirect that cannot be followed (in a transaction, or of a request passed on as it
/// came): the client retries, as it would after Valkey's own `-TRYAGAIN`.
const REBALANCING: &[u8] = b"-TRYAGAIN The cache is being rebalanced, try again\r\n";
/// Redirects followed for one request before its last answer is given as it is.
const MAX_REDIRECTS: u8 = 5;
/// Replies (or pieces of one) read ahead per connection before its reader waits for the link.
const FRAMES_AHEAD: usize = 64;
/// A reply this big goes on in pieces, straight to the session when it is the next one owed.
const PIECE: usize = 64 * 1024;
/// Bytes the pipe between the session and the link holds each way.
const PIPE: usize = 256 * 1024;
/// A request this big is passed on as it comes, to the node its first key names.
const STREAM_REQUEST_FROM: usize = 1024 * 1024;

/// Opens a link for a cache on a cluster pool: logs in on one node first, so a wrong
/// password fails here, as it does on a standalone pool.
pub async fn open(route: &TenantRoute, db: u32, reader: bool) -> Result<DuplexStream, GatewayError> {
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
    let (ours, theirs) = tokio::io::duplex(PIPE);
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
    /// Until a node has answered MULTI (entry `seq`): the login may not be allowed
    /// transactions, and what follows is queued only if it is.
    Multi {
        key: (String, Kind),
        seq: u64,
        refused: bool,
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
    async fn run(mut self, session: DuplexStream) {
        let (mut read, mut write) = tokio::io::split(session);
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
                _ = tokio::time::sleep(slot_map::UNSETTLED_AGE), if self.subscriptions_unsettled() => {
                    self.check_subscriptions().await;
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
    /// to that key's node, without holding it whole (so a redirect cannot be followed: a
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
                Hold::Multi { key, refused, .. }
                    if self.conns.get(key).is_none_or(|c| c.inflight.is_empty()) =>
                {
                    let (node, refused) = (key.0.clone(), *refused);
                    self.hold = Hold::None;
                    let slot = self.watched.clone();
                    if !refused {
                        if slot.is_none() {
                            // The transaction runs where its first key is: not necessarily here.
                            self.send(&node, Kind::Data, unwanted(Request::built(&[b"DISCARD"]), true)).await;
                        }
                        self.tx =
                            Some(Tx { multi_sent: slot.is_some(), slot, held: Vec::new(), dirty: false });
                    }
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
        let unsettled =
            || !self.seeds.settled(&self.map) && self.map.read_at().elapsed() > slot_map::UNSETTLED_AGE;
        if self.map_stale || unsettled() {
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
                let seq = self.entry(1, Merge::First);
                self.send(&addr, Kind::Data, Sent { slot: Some(slot), ..sent(seq, 0, request.bytes) }).await;
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
                        // No MOVED corrects a keyless request: the newest map this gateway has.
                        if let Some(newer) = self.seeds.newer_than(&self.map) {
                            self.map = newer;
                        }
                        // Routed by slot 0 (see `any_node`): sent again to its owner if this
                        // node turns out to be a replica now, or gone.
                        let addr = self.any_node();
                        let seq = self.entry(1, Merge::First);
                        self.send(&addr, Kind::Data, Sent { slot: Some(0), ..sent(seq, 0, request.bytes) })
                            .await;
                    }
                }
            }
            Plan::LastWritten => {
                let addr = self.last_written.clone().unwrap_or_else(|| self.any_node());
                self.one(&addr, request.bytes).await;
            }
            Plan::CrossSlot(slot) => {
                let addr = self.node_for(slot);
                self.one(&addr, request.bytes).await;
            }
            Plan::ReadOnly => self.local(plan::READONLY),
            Plan::Split(kind) => self.split(kind, &request).await,
            Plan::Fanout(merge) => {
                let nodes = self.every_shard().await;
                let seq = self.entry(nodes.len(), merge);
                for (i, (addr, slot)) in nodes.iter().enumerate() {
                    // By a slot of its shard: sent again to the shard's new primary if that
                    // node turns out to be a replica now, or gone.
                    self.send(addr, Kind::Data, Sent { slot: *slot, ..sent(seq, i, request.bytes.clone()) })
                        .await;
                }
            }
            Plan::Setup => self.setup(request).await,
            Plan::Scan => self.scan(&request).await,
            Plan::Multi if self.tx.is_some() => self.local(b"-ERR MULTI calls can not be nested\r\n"),
            Plan::Multi => {
                // Asked of a node (the WATCHed keys', which keeps it open), whose ACL check
                // answers as Valkey would; the transaction starts once it said +OK.
                let node = self.watched.as_ref().map_or_else(|| self.any_node(), |w| w.1.clone());
                let seq = self.entry(1, Merge::First);
                self.send(&node, Kind::Data, Sent { in_tx: true, ..sent(seq, 0, request.bytes) }).await;
                self.hold = Hold::Multi { key: (node, Kind::Data), seq, refused: false };
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

    /// One node per shard, in slot order, with a slot of the shard (none for a shard without
    /// slots), from a map as read from the cluster (the newest this gateway has, or read now
    /// if this link's was patched by a `MOVED`): a request with no key never meets a `MOVED`
    /// that would say a shard's primary changed.
    async fn every_shard(&mut self) -> Vec<(String, Option<u16>)> {
        if let Some(newer) = self.seeds.newer_than(&self.map) {
            self.map = newer;
        }
        if self.map.patched {
            if let Ok(map) = self.seeds.refresh(Some(&self.map)).await {
                self.map = map;
            }
        }
        self.map
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let addr = match s.replicas.first() {
                    Some(r) if self.reader => r.clone(),
                    _ => s.primary.clone(),
                };
                (addr, self.map.first_slot(i))
            })
            .collect()
    }
}
