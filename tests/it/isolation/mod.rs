//! The isolation suite: one cache (A, the attacker) against its neighbours (B on the same
//! Valkey node, C on the other one, D wherever placement put it), through the real gateway.
//! On a cluster pool (`SHOAL_TEST_ENGINE=cluster`) A and B share every shard of the cluster,
//! and C is put on the standalone pool `main`; "A's node" is then every node of the cluster.
//!
//! Every neighbour holds canary data whose values all carry a secret marker (`VS<hex>`) and
//! whose names all carry another (`BN<hex>`): keys of every type, a subscriber on a channel
//! and a pattern, a script in the node's script cache, named connections. Then every attack
//! in [`attacks`] is sent by A in every [`Wrapper`] (top level as RESP2 with redis-rs, as RESP3,
//! inline, in mixed case, inside MULTI with RESP2 and RESP3, inside EVAL via `redis.call` and
//! `redis.pcall`), and after each run:
//!
//! - no byte A received carries a neighbour's value marker, nor a neighbour's name that A did
//!   not send itself, nor anything only a node-wide view shows (the platform's calls in
//!   `cmdstat_`, `user=t…`, a
//!   keyspace line of a database A does not have, …);
//! - a command the gateway's table denies got `-NOPERM` (and doomed its transaction), and
//!   failed inside Lua too (Valkey's ACL, the second layer);
//! - each neighbour's data, client name, client id, script and Lua environment are unchanged,
//!   its publishes reach exactly its own two subscriptions and nothing else arrives there;
//! - no database of the nodes other than A's changed;
//! - A's connection still answers (unless the attack was `QUIT`).
//!
//! Failures are collected and reported together, each with the command, the wrapper and
//! what came back. A crashed Valkey node (its pid changes) or a gateway that stops answering
//! is reported with the node's crash log. `SHOAL_ISOLATION_ONLY=<text>` runs only the attacks
//! containing `<text>`; `SHOAL_ISOLATION_TRACE=1` prints what A got in every run.
//!
//! Accepted limitation, asserted as it is: the script cache is node-wide, so `SCRIPT EXISTS`
//! tells A whether a script it can name by SHA1 was loaded on its node by anyone.
//!
//! Further tests below target what a single reply cannot show: the Lua debugger freezing or
//! crashing a shared node, node-wide client ids, and keyspace-event flags of neighbours.

/// Scoped and read-only credentials against the rest of their own cache.
mod scoped;

use crate::support::{encode, module_fixture, shared, ShoalDev};
use redis::aio::MultiplexedConnection;
use reqwest::Method;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------
// RESP: a small reply model and parser (RESP2 and RESP3), and request encoders.
// ---------------------------------------------------------------------------------------

#[derive(Clone, PartialEq)]
enum R {
    /// Simple, bulk, verbatim, double and big-number strings.
    Str(Vec<u8>),
    Err(String),
    /// Integers, and RESP3 `#t`.
    Int(i64),
    /// Null bulk, null array, RESP3 null, and RESP3 `#f` (what Lua's `false` becomes).
    Nil,
    /// Arrays and sets.
    Arr(Vec<R>),
    Map(Vec<(R, R)>),
    Push(Vec<R>),
}

impl std::fmt::Debug for R {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            R::Str(s) => write!(f, "{:?}", String::from_utf8_lossy(s)),
            R::Err(e) => write!(f, "-{e}"),
            R::Int(i) => write!(f, "{i}"),
            R::Nil => write!(f, "nil"),
            R::Arr(v) => f.debug_list().entries(v).finish(),
            R::Map(v) => f.debug_map().entries(v.iter().map(|(k, v)| (k, v))).finish(),
            R::Push(v) => write!(f, "push{v:?}"),
        }
    }
}

impl R {
    fn is_err(&self) -> bool {
        matches!(self, R::Err(_))
    }

    fn is_empty_aggregate(&self) -> bool {
        matches!(self, R::Arr(v) if v.is_empty()) || matches!(self, R::Map(v) if v.is_empty())
    }

    fn carries(&self, needle: &[u8]) -> bool {
        match self {
            R::Str(s) => s == needle,
            R::Arr(v) | R::Push(v) => v.iter().any(|r| matches!(r, R::Str(s) if s == needle)),
            _ => false,
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

/// Parses the reply at `b[at..]`: `Ok(None)` while incomplete.
fn parse_at(b: &[u8], at: usize) -> Result<Option<(R, usize)>, String> {
    if at >= b.len() {
        return Ok(None);
    }
    let Some(nl) = find(&b[at..], b"\r\n").map(|p| p + at) else { return Ok(None) };
    let line = &b[at + 1..nl];
    let next = nl + 2;
    let text = String::from_utf8_lossy(line).into_owned();
    let number = || text.parse::<i64>().map_err(|_| format!("bad number {text:?}"));
    let kind = b[at];
    Ok(Some(match kind {
        b'+' | b',' | b'(' => (R::Str(line.to_vec()), next),
        b'-' => (R::Err(text.clone()), next),
        b':' => (R::Int(number()?), next),
        b'_' => (R::Nil, next),
        b'#' => (if line == b"t" { R::Int(1) } else { R::Nil }, next),
        b'$' | b'=' | b'!' => {
            let n = number()?;
            if n < 0 {
                return Ok(Some((R::Nil, next)));
            }
            let end = next + n as usize;
            if b.len() < end + 2 {
                return Ok(None);
            }
            let payload = &b[next..end];
            let r = match kind {
                b'!' => R::Err(String::from_utf8_lossy(payload).into_owned()),
                b'=' => R::Str(payload.get(4..).unwrap_or_default().to_vec()),
                _ => R::Str(payload.to_vec()),
            };
            (r, end + 2)
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let n = number()?;
            if n < 0 {
                return Ok(Some((R::Nil, next)));
            }
            let count = if matches!(kind, b'%' | b'|') { 2 * n as usize } else { n as usize };
            let mut items = Vec::with_capacity(count);
            let mut pos = next;
            for _ in 0..count {
                let Some((r, p)) = parse_at(b, pos)? else { return Ok(None) };
                items.push(r);
                pos = p;
            }
            match kind {
                b'%' => {
                    let mut pairs = Vec::new();
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    (R::Map(pairs), pos)
                }
                // An attribute: the reply proper follows it.
                b'|' => match parse_at(b, pos)? {
                    Some(x) => x,
                    None => return Ok(None),
                },
                b'>' => (R::Push(items), pos),
                _ => (R::Arr(items), pos),
            }
        }
        other => return Err(format!("unexpected reply type {:?}", other as char)),
    }))
}

/// The inline form of a command, if every argument can be written without quoting.
fn inline(args: &[String]) -> Option<Vec<u8>> {
    let plain =
        |a: &String| !a.is_empty() && a.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\'');
    args.iter().all(plain).then(|| format!("{}\r\n", args.join(" ")).into_bytes())
}

/// `gEt`, `cLiEnT`: alternating case.
fn mixed_case(s: &str) -> String {
    s.chars()
        .enumerate()
        .map(|(i, c)| if i % 2 == 0 { c.to_ascii_lowercase() } else { c.to_ascii_uppercase() })
        .collect()
}

fn show(bytes: &[u8], max: usize) -> String {
    let s: String = bytes.escape_ascii().to_string();
    if s.len() > max {
        format!("{}… ({} bytes)", &s[..max], bytes.len())
    } else {
        s
    }
}

// ---------------------------------------------------------------------------------------
// A raw RESP connection through the gateway.
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
enum Broken {
    Closed,
    Timeout,
    Protocol(#[allow(dead_code)] String),
}

struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Every byte of every complete reply read so far.
    seen: Vec<u8>,
}

impl Raw {
    /// Connects and logs in: `AUTH token` (RESP2) or `HELLO 3 AUTH default token [SETNAME n]`.
    async fn login(port: u16, token: &str, proto: u8, name: Option<&str>) -> Result<Raw, String> {
        let connect = TcpStream::connect(("127.0.0.1", port));
        let stream = match tokio::time::timeout(Duration::from_secs(5), connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("the gateway refused a connection: {e}")),
            Err(_) => return Err("the gateway did not accept a connection within 5 s".into()),
        };
        stream.set_nodelay(true).ok();
        let mut raw = Raw { stream, buf: Vec::new(), seen: Vec::new() };
        let mut login: Vec<&str> =
            if proto == 3 { vec!["HELLO", "3", "AUTH", "default", token] } else { vec!["AUTH", token] };
        if let Some(n) = name {
            login.extend(["SETNAME", n]);
        }
        raw.send(&encode(&login)).await;
        match raw.read(Duration::from_secs(5)).await {
            Ok(R::Err(e)) => Err(format!("login refused: {e}")),
            Ok(_) => {
                raw.seen.clear();
                Ok(raw)
            }
            Err(e) => Err(format!("no answer to the login within 5 s: {e:?}")),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> bool {
        let write = self.stream.write_all(bytes);
        matches!(tokio::time::timeout(Duration::from_secs(5), write).await, Ok(Ok(())))
    }

    async fn read(&mut self, timeout: Duration) -> Result<R, Broken> {
        let deadline = Instant::now() + timeout;
        loop {
            match parse_at(&self.buf, 0) {
                Err(e) => return Err(Broken::Protocol(e)),
                Ok(Some((r, n))) => {
                    self.seen.extend_from_slice(&self.buf[..n]);
                    self.buf.drain(..n);
                    return Ok(r);
                }
                Ok(None) => {}
            }
            let mut chunk = [0u8; 16 * 1024];
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(Broken::Timeout),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(Broken::Closed),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads replies up to the one that carries `nonce` (a `PING nonce` sent after them).
    async fn until(&mut self, nonce: &str, replies: &mut Vec<R>) -> Result<(), Broken> {
        loop {
            let r = self.read(Duration::from_secs(3)).await?;
            if r.carries(nonce.as_bytes()) {
                return Ok(());
            }
            replies.push(r);
        }
    }

    /// Whether the connection still answers (it may have been killed while idle).
    async fn healthy(&mut self) -> bool {
        self.send(&encode(&["PING", "pool"])).await
            && matches!(self.read(Duration::from_secs(1)).await, Ok(R::Str(s)) if s == b"pool")
    }

    /// Back to a fresh session of the same cache: `RESET`, then RESP3 again if it spoke it.
    /// (`CLIENT TRACKING off` too: the gateway's RESET leaves its virtual tracking on.)
    async fn reset(&mut self, proto: u8) -> bool {
        if !self.send(&encode(&["RESET"])).await
            || !matches!(self.read(Duration::from_secs(1)).await, Ok(R::Str(s)) if s == b"RESET")
            || !self.send(&encode(&["CLIENT", "TRACKING", "off"])).await
            || self.read(Duration::from_secs(1)).await.is_err()
        {
            return false;
        }
        proto == 2
            || (self.send(&encode(&["HELLO", "3"])).await
                && matches!(self.read(Duration::from_secs(1)).await, Ok(R::Map(_))))
    }

    /// Everything received, including an incomplete tail.
    fn transcript(&self) -> Vec<u8> {
        [self.seen.as_slice(), self.buf.as_slice()].concat()
    }
}

// ---------------------------------------------------------------------------------------
// The command table.
// ---------------------------------------------------------------------------------------

/// The command table, as the gateway resolves it.
struct Table(&'static shoal_commands::CommandTable);

impl Table {
    fn load() -> Table {
        Table(shoal_commands::table())
    }

    fn is_container(&self, name: &str) -> bool {
        self.0.get(&name.to_lowercase()).is_some_and(|s| s.container)
    }

    /// `pass`, `deny` or `virtual` for a command, resolved as the gateway does.
    fn treatment(&self, args: &[String]) -> &str {
        use shoal_commands::Treatment;
        let spec = self.0.lookup(args[0].as_bytes(), args.get(1).map(|s| s.as_bytes()));
        match spec.map_or(Treatment::Pass, |s| s.treatment) {
            Treatment::Pass => "pass",
            Treatment::Deny => "deny",
            Treatment::Virtual => "virtual",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Attacks and wrappers.
// ---------------------------------------------------------------------------------------

/// What one command of an attack must get back (on top of the automatic rules).
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// An error, in every wrapper.
    Err,
    /// An error inside Lua (where database numbers are real ones); anything elsewhere.
    ErrInLua,
    /// An error outside Lua; anything inside (where the number is one of A's real databases).
    ErrOutsideLua,
    /// Nil: A reads its own (empty) key of that name.
    Nil,
    NilOrErr,
    Int(i64),
    /// `0` (nothing matched among A's own) or an error.
    ZeroOrErr,
    /// An empty array/set/map.
    Empty,
    EmptyOrErr,
    Str(&'static str),
}

struct Attack {
    text: &'static str,
    /// Expectations by command index.
    expect: Vec<(usize, Expect)>,
    /// The attack may close A's connection (`QUIT`).
    closes: bool,
}

fn at(text: &'static str) -> Attack {
    Attack { text, expect: Vec::new(), closes: false }
}

impl Attack {
    fn commands(&self) -> usize {
        self.text.split(';').count()
    }

    /// Expectation for the last command.
    fn e(mut self, e: Expect) -> Attack {
        let last = self.commands() - 1;
        self.expect.push((last, e));
        self
    }

    /// Expectation for the first command.
    fn first(mut self, e: Expect) -> Attack {
        self.expect.push((0, e));
        self
    }

    fn closes(mut self) -> Attack {
        self.closes = true;
        self
    }
}

/// Every attack A makes. Placeholders (`{bstr}`, …) name B's things; see [`placeholders`].
/// Commands of one attack are separated by `;`.
fn attacks() -> Vec<Attack> {
    use Expect::*;
    vec![
        // --- B's keys, by name, from A's keyspace: A only ever sees its own (empty) keys.
        at("GET {bstr}").e(Nil),
        at("MGET {bstr} {bhash} {blist}"),
        at("GETEX {bstr} PERSIST").e(Nil),
        at("GETDEL {bstr}").e(Nil),
        at("GETRANGE {bstr} 0 -1").e(Str("")),
        at("STRLEN {bstr}").e(Int(0)),
        at("LCS {bstr} {bstr}").e(Str("")),
        at("HGETALL {bhash}").e(Empty),
        at("HGET {bhash} f1").e(Nil),
        at("HRANDFIELD {bhash} -5 WITHVALUES").e(Empty),
        at("HTTL {bhash} FIELDS 1 f1"),
        at("LRANGE {blist} 0 -1").e(Empty),
        at("LPOP {blist}").e(Nil),
        at("LINDEX {blist} 0").e(Nil),
        at("BLPOP {blist} 0.05").e(Nil),
        at("SMEMBERS {bset}").e(Empty),
        at("SRANDMEMBER {bset} 5").e(Empty),
        at("SINTERCARD 1 {bset}").e(Int(0)),
        at("ZRANGE {bzset} 0 -1 WITHSCORES").e(Empty),
        at("ZRANDMEMBER {bzset} 5").e(Empty),
        at("XRANGE {bstream} - +").e(Empty),
        at("XREVRANGE {bstream} + - COUNT 1").e(Empty),
        at("XREAD COUNT 10 STREAMS {bstream} 0").e(Nil),
        at("XREAD BLOCK 50 STREAMS {bstream} $"),
        at("XINFO STREAM {bstream} FULL").e(Err),
        at("TYPE {bstr}").e(Str("none")),
        at("EXISTS {bstr} {bhash} {blist} {bset} {bzset} {bstream}").e(Int(0)),
        at("TOUCH {bstr} {bhash}").e(Int(0)),
        at("TTL {bstr}").e(Int(-2)),
        at("DUMP {bstr}").e(Nil),
        at("OBJECT ENCODING {bstr}").e(Nil),
        at("OBJECT IDLETIME {bhash}").e(Nil),
        at("OBJECT REFCOUNT {bstr}").e(Nil),
        at("OBJECT FREQ {bstr}"),
        at("MEMORY USAGE {bstr}").e(Nil),
        at("PFCOUNT {bstr}").e(Int(0)),
        // Module types: JSON documents and Bloom filters are keys of A's own database.
        at("JSON.GET {bjson}").e(Nil),
        at("JSON.GET {bjson} $..v").e(Nil),
        at("JSON.MGET {bjson} {bstr} $"),
        at("JSON.TYPE {bjson}"),
        at("JSON.SET {bjson} $ \"A-WROTE\""),
        at("JSON.NUMINCRBY {bjson} $.n 1").e(Err),
        at("JSON.DEL {bjson}").e(Int(0)),
        // (RESP3: RedisBloom answers a boolean.)
        at("BF.EXISTS {bbloom} x"),
        at("BF.INFO {bbloom}").e(Err),
        at("BF.ADD {bbloom} A-WROTE"),
        at("BF.SCANDUMP {bbloom} 0").e(Err),
        // Search indexes are node-wide: refused, also inside scripts (the node's tenant ACL).
        at("FT._LIST").e(Err),
        at("FT.CREATE a-idx ON HASH PREFIX 1 {bprefix} SCHEMA f1 TEXT").e(Err),
        at("FT.SEARCH a-idx *").e(Err),
        at("BITCOUNT {bstr}").e(Int(0)),
        at("KEYS *"),
        at("KEYS {bprefix}*").e(Empty),
        at("SCAN 0 COUNT 10000"),
        at("SCAN 0 MATCH {bprefix}* COUNT 10000"),
        at("SCAN 0 TYPE stream COUNT 10000"),
        at("RANDOMKEY"),
        at("DBSIZE").e(Int(4)),
        at("SORT a:list BY {bprefix}* GET {bprefix}* GET # ALPHA"),
        at("SORT a:list BY nosort GET {bprefix}*->f1"),
        at("SORT_RO a:list BY {bprefix}*->f1 GET {bprefix}* ALPHA"),
        at("SORT a:list ALPHA GET {bprefix}* STORE {bstr}"),
        at("SORT {blist}").e(Empty),
        at("SELECT 1 ; KEYS *"),
        at("SELECT 1 ; SCAN 0 COUNT 10000"),
        // --- Writes to B's key names land in A's own keyspace.
        at("SET {bstr} A-WROTE"),
        at("SET {bstr} A-WROTE XX").e(Nil),
        at("APPEND {bstr} A-WROTE"),
        at("INCR {bstr}"),
        at("HSET {bhash} f1 A-WROTE"),
        at("HDEL {bhash} f1").e(Int(0)),
        at("RPUSH {blist} A-WROTE"),
        at("LMOVE {blist} a:list LEFT LEFT").e(Nil),
        at("SADD {bset} A-WROTE"),
        at("SMOVE {bset} a:set A-WROTE").e(Int(0)),
        at("ZADD {bzset} 9 A-WROTE"),
        at("ZUNIONSTORE a:z 1 {bzset}").e(Int(0)),
        at("XADD {bstream} * f A-WROTE"),
        at("XTRIM {bstream} MAXLEN 0").e(Int(0)),
        at("XGROUP CREATE {bstream} g 0").e(Err),
        at("XREADGROUP GROUP g c STREAMS {bstream} >").e(Err),
        at("SINTERSTORE a:x {bset}").e(Int(0)),
        at("BITOP OR a:x {bstr}").e(Int(0)),
        at("DELIFEQ {bstr} x").e(Int(0)),
        at("DEL {bstr} {bhash} {blist} {bset} {bzset} {bstream}").e(Int(0)),
        at("UNLINK {bstr} {bhash} {blist} {bset} {bzset} {bstream}").e(Int(0)),
        at("EXPIRE {bstr} 1").e(Int(0)),
        at("PEXPIREAT {bhash} 1").e(Int(0)),
        at("PERSIST {bstr}").e(Int(0)),
        at("RENAME {bstr} a:renamed").e(Err),
        at("RENAMENX {bhash} a:renamed").e(Err),
        at("RENAME a:str {bstr}"),
        at("COPY {bstr} a:copy").e(Int(0)),
        at("RESTORE a:r 0 x"),
        at("MIGRATE 127.0.0.1 {nodeport} {bstr} 0 1000"),
        // --- Other databases: A has virtual 0 and 1; in Lua numbers are the node's.
        at("SELECT {bdb}").e(Err),
        at("SELECT {bdb} ; GET {bstr}").first(Err).e(NilOrErr),
        at("SELECT {adbs}").e(ErrOutsideLua),
        at("SELECT 0").e(ErrInLua),
        at("SELECT -1").e(Err),
        at("SELECT 4294967296").e(Err),
        at("SELECT 63").e(Err),
        at("SELECT 1 ; FLUSHDB"),
        at("SELECT {bdb} ; FLUSHDB").first(Err),
        at("MOVE a:str {bdb}").e(Err),
        at("MOVE a:str {adbs}").e(ErrOutsideLua),
        at("MOVE a:str 0").e(Err),
        at("MOVE a:str 1"),
        at("COPY a:str {bstr} DB {bdb} REPLACE").e(Err),
        at("COPY a:str a:copy DB {adbs} REPLACE").e(ErrOutsideLua),
        at("COPY a:str a:copy DB 0 REPLACE").e(ErrInLua),
        at("SWAPDB 0 1"),
        at("SWAPDB 0 {bdb}"),
        at("SWAPDB {bdb} 1"),
        at("FLUSHDB"),
        at("FLUSHDB ASYNC"),
        at("FLUSHALL").e(ErrInLua),
        at("FLUSHALL SYNC").e(ErrInLua),
        at("FLUSHALL ASYNC").e(ErrInLua),
        at("WAIT 0 0"),
        at("WAIT 1 50"),
        at("WAITAOF 0 0 0"),
        // --- Node-wide observation and control.
        at("INFO").e(ErrInLua),
        at("INFO all").e(ErrInLua),
        at("INFO everything").e(ErrInLua),
        at("INFO default").e(ErrInLua),
        at("INFO keyspace").e(ErrInLua),
        at("INFO clients").e(ErrInLua),
        at("INFO commandstats").e(ErrInLua),
        at("INFO errorstats").e(ErrInLua),
        at("INFO latencystats").e(ErrInLua),
        at("INFO stats").e(ErrInLua),
        at("INFO memory").e(ErrInLua),
        at("INFO persistence").e(ErrInLua),
        at("INFO replication").e(ErrInLua),
        at("INFO cpu").e(ErrInLua),
        at("INFO server clients keyspace").e(ErrInLua),
        at("CLIENT LIST").e(ErrInLua),
        at("CLIENT LIST ID {bid}").e(ErrInLua),
        at("CLIENT LIST TYPE pubsub").e(ErrInLua),
        at("CLIENT INFO").e(ErrInLua),
        at("CLIENT KILL ID {bid}"),
        at("CLIENT KILL ID {bid} SKIPME no"),
        at("CLIENT KILL ADDR {baddr}").e(ZeroOrErr),
        at("CLIENT KILL ADDR {bupaddr}").e(ZeroOrErr),
        at("CLIENT KILL LADDR {bupaddr}").e(ZeroOrErr),
        at("CLIENT KILL USER {buser}").e(ZeroOrErr),
        at("CLIENT KILL TYPE pubsub").e(ZeroOrErr),
        at("CLIENT KILL ID {bsubid}"),
        at("CLIENT KILL ADDR {bsubaddr}").e(ZeroOrErr),
        at("CLIENT KILL ADDR {bsubupaddr} SKIPME no").e(ZeroOrErr),
        at("CLIENT KILL {baddr}").e(Err),
        at("CLIENT KILL {bupaddr}").e(Err),
        at("CLIENT KILL MAXAGE 0"),
        at("CLIENT KILL TYPE normal SKIPME yes"),
        at("CLIENT UNBLOCK {bid}"),
        at("CLIENT PAUSE 50"),
        at("CLIENT UNPAUSE"),
        at("CLIENT NO-EVICT on"),
        at("CLIENT NO-TOUCH on"),
        at("CLIENT TRACKING on REDIRECT {bid}"),
        at("CLIENT TRACKING on BCAST PREFIX {bprefix}"),
        // B writes its key `{bpulse}` during every run: A, tracking a key of the same name in
        // its own keyspace, or every key, must not hear of it.
        at("CLIENT TRACKING on ; GET {bpulse}"),
        at("CLIENT TRACKING on BCAST"),
        at("CLIENT TRACKING on BCAST PREFIX BN"),
        at("CLIENT TRACKING on OPTIN ; CLIENT CACHING yes ; GET {bpulse}"),
        at("CLIENT CACHING yes"),
        at("CLIENT GETREDIR"),
        at("CLIENT TRACKINGINFO"),
        at("CLIENT REPLY ON"),
        at("CLIENT ID"),
        at("CLIENT GETNAME"),
        at("CLIENT SETNAME a-conn"),
        at("CLIENT SETINFO LIB-NAME a-lib"),
        at("CLIENT CAPA redirect"),
        at("CLIENT IMPORT-SOURCE on"),
        at("CONFIG GET *"),
        at("CONFIG GET notify-keyspace-events"),
        at("CONFIG SET notify-keyspace-events KEA"),
        at("CONFIG SET maxmemory 1"),
        at("CONFIG RESETSTAT"),
        at("CONFIG REWRITE"),
        at("DEBUG OBJECT {bstr}"),
        at("DEBUG SLEEP 0"),
        at("DEBUG RELOAD"),
        at("SLOWLOG GET 128"),
        at("SLOWLOG LEN"),
        at("SLOWLOG RESET"),
        at("COMMANDLOG GET 10 slow"),
        at("COMMANDLOG RESET slow"),
        at("LATENCY LATEST"),
        at("LATENCY HISTORY command"),
        at("LATENCY DOCTOR"),
        at("LATENCY HISTOGRAM"),
        at("LATENCY RESET"),
        at("MEMORY STATS"),
        at("MEMORY DOCTOR"),
        at("MEMORY MALLOC-STATS"),
        at("MEMORY PURGE"),
        at("MONITOR"),
        at("ACL LIST"),
        at("ACL USERS"),
        at("ACL GETUSER {buser}"),
        at("ACL CAT"),
        at("ACL LOG"),
        at("ACL DRYRUN {buser} GET {bstr}"),
        at("ACL SETUSER {buser} off"),
        at("ACL DELUSER {buser}"),
        at("ACL SAVE"),
        at("ACL LOAD"),
        at("ACL WHOAMI"),
        at("AUTH {buser} not-a-token").e(Err),
        at("HELLO 3 AUTH {buser} not-a-token").e(Err),
        at("COMMAND"),
        at("COMMAND COUNT"),
        at("COMMAND INFO config get monitor"),
        at("COMMAND DOCS"),
        at("COMMAND LIST"),
        at("COMMAND GETKEYS SET {bstr} x"),
        at("LASTSAVE"),
        at("ROLE"),
        at("SAVE"),
        at("BGSAVE"),
        at("BGREWRITEAOF"),
        at("SHUTDOWN NOSAVE"),
        at("FAILOVER"),
        at("REPLICAOF 127.0.0.1 {nodeport}"),
        at("SLAVEOF NO ONE"),
        at("SYNC"),
        at("PSYNC ? -1"),
        at("REPLCONF listening-port 1"),
        at("MODULE LIST"),
        at("MODULE LOAD /nonexistent.so"),
        at("PFDEBUG GETREG {bstr}"),
        at("PFSELFTEST"),
        at("TIME"),
        at("LOLWUT"),
        at("RESET"),
        at("READONLY"),
        at("READWRITE"),
        at("HELLO 3"),
        at("HELLO 2 SETNAME a-conn"),
        at("QUIT").closes(),
        // --- Scripts and functions: the script cache and the Lua VM are node-wide.
        at("SCRIPT EXISTS {bsha}"),
        at("SCRIPT FLUSH"),
        at("SCRIPT FLUSH ASYNC"),
        at("SCRIPT KILL"),
        at("SCRIPT SHOW {bsha}"),
        at("SCRIPT LOAD {lua_ret1}"),
        at("SCRIPT DEBUG NO"),
        at("SCRIPT DEBUG YES"),
        at("SCRIPT DEBUG SYNC"),
        at("EVALSHA {bsha} 1 {bstr}").e(NilOrErr),
        at("EVALSHA_RO {bsha} 1 {bstr}").e(NilOrErr),
        at("EVAL {lua_select_b} 0").e(Err),
        at("EVAL {lua_publish_b} 0").e(Err),
        at("EVAL {lua_strmeta} 0"),
        at("EVAL {lua_string} 0"),
        at("EVAL {lua_redis} 0"),
        at("EVAL {lua_rawset} 0"),
        at("EVAL {lua_setmeta} 0"),
        at("FUNCTION LIST"),
        at("FUNCTION LIST WITHCODE"),
        at("FUNCTION DUMP"),
        at("FUNCTION STATS"),
        at("FUNCTION LOAD {fnlib}"),
        at("FUNCTION FLUSH"),
        at("FUNCTION DELETE pwn"),
        at("FUNCTION RESTORE x"),
        at("FUNCTION KILL"),
        at("FCALL pwn 0"),
        at("FCALL_RO pwn 0"),
        // --- Pub/sub: B's channel names, patterns, and the node's pub/sub views.
        at("PUBLISH {bchan} A-INJECT").e(ZeroOrErr),
        at("PUBLISH {buser}:{bchan} A-INJECT").e(ZeroOrErr),
        at("SPUBLISH {bchan} A-INJECT").e(ZeroOrErr),
        at("PUBSUB CHANNELS").e(EmptyOrErr),
        at("PUBSUB CHANNELS *").e(EmptyOrErr),
        at("PUBSUB CHANNELS {buser}:*").e(EmptyOrErr),
        at("PUBSUB NUMSUB {bchan} {buser}:{bchan}"),
        at("PUBSUB NUMPAT"),
        at("PUBSUB SHARDCHANNELS").e(EmptyOrErr),
        at("PUBSUB CHANNELS __key*").e(EmptyOrErr),
        at("PUBSUB SHARDNUMSUB {bchan}"),
        at("SUBSCRIBE {bchan}"),
        at("SUBSCRIBE {buser}:{bchan}"),
        at("PSUBSCRIBE *"),
        at("PSUBSCRIBE {bprefix}*"),
        at("SSUBSCRIBE {bchan}"),
        at("SUBSCRIBE __keyspace@{bdb}__:{bstr} __keyevent@{bdb}__:set"),
        at("PSUBSCRIBE __key*__:*"),
        at("PSUBSCRIBE __keyspace@*__:*"),
        at("SUBSCRIBE __keyevent@{bdb}__:del __keyevent@{bdb}__:set"),
        at("SUBSCRIBE __keyspace@0__:a:str"),
        at("SUBSCRIBE __keyspace@0__:{bpulse} __keyevent@0__:set __keyevent@0__:del"),
        at("PSUBSCRIBE __keyspace@0__:*"),
        at("UNSUBSCRIBE"),
        at("PUNSUBSCRIBE"),
        // --- Cluster: a one-node "cluster" at the gateway's address.
        at("CLUSTER NODES").e(ErrInLua),
        at("CLUSTER SLOTS").e(ErrInLua),
        at("CLUSTER SHARDS").e(ErrInLua),
        at("CLUSTER INFO").e(ErrInLua),
        at("CLUSTER MYID").e(ErrInLua),
        at("CLUSTER KEYSLOT {bstr}"),
        at("CLUSTER COUNTKEYSINSLOT {bslot}"),
        at("CLUSTER GETKEYSINSLOT {bslot} 10"),
        at("CLUSTER LINKS"),
        at("CLUSTER RESET"),
    ]
}

const CALL_SCRIPT: &str = "local out, i = {}, 1\n\
    while i <= #ARGV do\n\
    local n = tonumber(ARGV[i])\n\
    local args = {}\n\
    for j = 1, n do args[j] = ARGV[i + j] end\n\
    out[#out + 1] = redis.call(unpack(args))\n\
    i = i + n + 1\n\
    end\n\
    return out\n";

/// How A sends an attack.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Wrapper {
    /// Top level, redis-rs, RESP2.
    Resp2,
    /// Top level, raw RESP3 (`HELLO 3 AUTH`).
    Resp3,
    /// Top level, inline commands (lowercase).
    Inline,
    /// Top level, RESP2, mixed-case command and subcommand names.
    Mixed,
    /// `MULTI … EXEC`, RESP2.
    Multi,
    /// `MULTI … EXEC`, RESP3, mixed case.
    Multi3,
    /// `EVAL` with `redis.call` for each command, RESP2.
    Eval,
    /// `EVAL` with `redis.pcall`, RESP3, mixed case.
    Pcall3,
}

const WRAPPERS: [Wrapper; 8] = [
    Wrapper::Resp2,
    Wrapper::Resp3,
    Wrapper::Inline,
    Wrapper::Mixed,
    Wrapper::Multi,
    Wrapper::Multi3,
    Wrapper::Eval,
    Wrapper::Pcall3,
];

impl Wrapper {
    fn lua(self) -> bool {
        matches!(self, Wrapper::Eval | Wrapper::Pcall3)
    }

    fn multi(self) -> bool {
        matches!(self, Wrapper::Multi | Wrapper::Multi3)
    }

    fn proto(self) -> u8 {
        if matches!(self, Wrapper::Resp3 | Wrapper::Multi3 | Wrapper::Pcall3) {
            3
        } else {
            2
        }
    }
}

fn is_subscription(args: &[String]) -> bool {
    let n = args[0].to_lowercase();
    n.ends_with("subscribe")
}

/// A command's name (and subcommand, for containers) in mixed case.
fn with_mixed_case(table: &Table, args: &[String]) -> Vec<String> {
    let mut out = args.to_vec();
    out[0] = mixed_case(&out[0]);
    if table.is_container(&args[0]) && out.len() > 1 {
        out[1] = mixed_case(&out[1]);
    }
    out
}

/// What each command of an attack got back: `None` where it cannot be told.
type Outcome = Option<Result<R, String>>;

struct Run {
    /// Every byte A received (or redis-rs's view of it).
    transcript: Vec<u8>,
    outcomes: Vec<Outcome>,
    /// The reply to EXEC, for MULTI wrappers.
    exec: Option<R>,
    /// Whether A's connection still answered afterwards, and if not why.
    sane: Result<(), String>,
    /// Messages and invalidations A received. Nothing of A's changes during a run (only the
    /// neighbours write and publish), so there must be none.
    messages: Vec<R>,
}

/// Pub/sub messages and client-side-caching invalidations among replies (RESP3 pushes, or
/// RESP2 arrays of those kinds).
fn messages(replies: &[R]) -> Vec<R> {
    let kind = |items: &[R]| match items.first() {
        Some(R::Str(k)) => k.to_ascii_lowercase(),
        _ => Vec::new(),
    };
    replies
        .iter()
        .filter(|r| match r {
            R::Push(items) => !kind(items).ends_with(b"subscribe"),
            R::Arr(items) => {
                matches!(kind(items).as_slice(), b"message" | b"pmessage" | b"smessage" | b"invalidate")
            }
            _ => false,
        })
        .cloned()
        .collect()
}

fn split_outcome(r: &R) -> Result<R, String> {
    match r {
        R::Err(e) => Err(e.clone()),
        other => Ok(other.clone()),
    }
}

/// Maps the replies of a raw run to the attack's commands.
fn outcomes(wrapper: Wrapper, cmds: &[Vec<String>], replies: &[R]) -> (Vec<Outcome>, Option<R>) {
    let n = cmds.len();
    let mut out: Vec<Outcome> = vec![None; n];
    let regular: Vec<&R> = replies.iter().filter(|r| !matches!(r, R::Push(_))).collect();
    let first_sub = cmds.iter().position(|c| is_subscription(c)).unwrap_or(n);
    match wrapper {
        Wrapper::Resp2 | Wrapper::Resp3 | Wrapper::Inline | Wrapper::Mixed => {
            for (slot, r) in out.iter_mut().zip(&regular).take(first_sub) {
                *slot = Some(split_outcome(r));
            }
            (out, None)
        }
        Wrapper::Multi | Wrapper::Multi3 => {
            if first_sub < n || regular.len() < n + 2 {
                return (out, regular.last().map(|r| (*r).clone()));
            }
            let exec = regular[n + 1].clone();
            let mut executed = match &exec {
                R::Arr(items) => items.clone().into_iter(),
                _ => Vec::new().into_iter(),
            };
            for i in 0..n {
                let queued = regular[1 + i];
                out[i] = Some(if queued.is_err() {
                    split_outcome(queued)
                } else if let R::Err(e) = &exec {
                    Err(e.clone())
                } else {
                    match executed.next() {
                        Some(r) => split_outcome(&r),
                        None => continue,
                    }
                });
            }
            (out, Some(exec))
        }
        Wrapper::Eval | Wrapper::Pcall3 => {
            match regular.first() {
                Some(R::Err(e)) => out = vec![Some(Err(e.clone())); n],
                Some(R::Arr(items)) => {
                    for (i, r) in items.iter().enumerate().take(n) {
                        out[i] = Some(split_outcome(r));
                    }
                }
                _ => {}
            }
            (out, None)
        }
    }
}

fn from_redis(v: &redis::Value) -> R {
    use redis::Value as V;
    match v {
        V::Nil => R::Nil,
        V::Int(i) => R::Int(*i),
        V::BulkString(b) => R::Str(b.clone()),
        V::SimpleString(s) => R::Str(s.clone().into_bytes()),
        V::Okay => R::Str(b"OK".to_vec()),
        V::Array(items) | V::Set(items) => R::Arr(items.iter().map(from_redis).collect()),
        V::Map(pairs) => R::Map(pairs.iter().map(|(k, v)| (from_redis(k), from_redis(v))).collect()),
        V::Push { data, .. } => R::Push(data.iter().map(from_redis).collect()),
        V::Boolean(true) => R::Int(1),
        V::Boolean(false) => R::Nil,
        V::ServerError(e) => R::Err(format!("{} {}", e.code(), e.details().unwrap_or_default())),
        other => R::Str(format!("{other:?}").into_bytes()),
    }
}

/// The bytes a reply carries, for leak checks.
fn flatten(r: &R, out: &mut Vec<u8>) {
    match r {
        R::Str(s) => out.extend_from_slice(s),
        R::Err(e) => out.extend_from_slice(e.as_bytes()),
        R::Int(i) => out.extend_from_slice(i.to_string().as_bytes()),
        R::Nil => out.extend_from_slice(b"(nil)"),
        R::Arr(v) | R::Push(v) => v.iter().for_each(|r| {
            flatten(r, out);
            out.push(b'\n');
        }),
        R::Map(v) => v.iter().for_each(|(k, val)| {
            flatten(k, out);
            out.push(b'\n');
            flatten(val, out);
            out.push(b'\n');
        }),
    }
}

fn redis_error(e: &redis::RedisError) -> String {
    match e.code() {
        Some(code) => format!("{code} {}", e.detail().unwrap_or_default()),
        None => e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// The neighbours (victims) and their canaries.
// ---------------------------------------------------------------------------------------

const KINDS: [&str; 6] = ["str", "hash", "list", "set", "zset", "stream"];
/// The victims' keys of module types (RedisJSON, RedisBloom).
const MODULE_KINDS: [&str; 2] = ["json", "bloom"];

/// B checks that the (node-wide) Lua VM is as Valkey made it.
const LUA_ENV_PROBE: &str = "return {string.upper('abc'), type(redis.call), type(redis.pcall), \
     tostring(rawget(_G, 'pwn')), tostring(getmetatable('').__index == string), type(cjson)}";

/// Where `SCRIPT EXISTS` is in a [`Victim`]'s snapshot: after six reads, a TTL per kind,
/// `DBSIZE`, `CLIENT GETNAME` and `CLIENT ID`.
const SCRIPT_EXISTS: usize = 6 + KINDS.len() + 3;

struct Victim {
    label: &'static str,
    id: String,
    token: String,
    hex: String,
    /// Its standalone node, or [`cluster_place`].
    node: usize,
    db: u32,
    conn: MultiplexedConnection,
    sub: Raw,
    sha: String,
    /// The node's id for B's upstream connection (what a node-wide view would show).
    client_id: i64,
    /// Address of B's connection as the gateway sees it, and of B's upstream at the node.
    addr: String,
    up_addr: String,
    /// The same three for B's subscriber.
    sub_id: i64,
    sub_addr: String,
    sub_up_addr: String,
    /// On a cluster pool: the addresses of B's other upstreams (one per node the gateway
    /// connected each of B's two connections to).
    more_up_addrs: Vec<String>,
    expected: Vec<redis::Value>,
    /// On a cluster pool, pub/sub hiccups that a failover explains (see [`Victim::pulse`]),
    /// for the matrix to judge against the engine's heals.
    on_cluster: bool,
    pubsub_unsettled: Vec<String>,
}

impl Victim {
    fn prefix(&self) -> String {
        format!("BN{}:", self.hex)
    }

    fn key(&self, kind: &str) -> String {
        format!("{}{kind}", self.prefix())
    }

    fn chan(&self) -> String {
        format!("{}chan", self.prefix())
    }

    /// Every value of the victim carries this; A must never see it.
    fn marker(&self) -> String {
        format!("VS{}", self.hex)
    }

    fn value(&self, what: &str) -> String {
        format!("{}-{what}", self.marker())
    }

    fn script(&self) -> String {
        format!("-- {} script\nreturn redis.call('GET', KEYS[1])", self.marker())
    }

    /// Names A may only see if it sent them itself.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = KINDS.iter().map(|k| self.key(k)).collect();
        names.extend([self.prefix(), self.key("pulse"), self.chan(), self.sha.clone()]);
        names.extend([format!("t{}", self.id), self.id.clone()]);
        names.extend([
            self.addr.clone(),
            self.up_addr.clone(),
            self.sub_addr.clone(),
            self.sub_up_addr.clone(),
        ]);
        names.extend(self.more_up_addrs.iter().cloned());
        names
    }

    /// Connects a victim's two connections, seeds its canaries and records what it looks like.
    #[allow(clippy::too_many_arguments)]
    async fn open(
        dev: &ShoalDev,
        admins: &mut [MultiplexedConnection],
        label: &'static str,
        id: String,
        token: String,
        hex: String,
        node: usize,
    ) -> Result<Victim, String> {
        let conn = client(dev, &token).await?;
        let sub = Raw::login(dev.resp_port, &token, 3, Some(&format!("VS{hex}-sub"))).await?;
        let sub_addr = sub.stream.local_addr().map_err(|e| e.to_string())?.to_string();
        let mut v = Victim {
            label,
            id,
            token,
            hex,
            node,
            db: 0,
            conn,
            sub,
            sha: String::new(),
            client_id: 0,
            addr: String::new(),
            up_addr: String::new(),
            sub_id: 0,
            sub_addr,
            sub_up_addr: String::new(),
            more_up_addrs: Vec::new(),
            expected: Vec::new(),
            on_cluster: dev.cluster.is_some(),
            pubsub_unsettled: Vec::new(),
        };
        v.subscribe().await?;
        v.seed().await?;
        let conns = locate(dev, admins, &v.value("conn")).await?;
        let subs = locate(dev, admins, &v.value("sub")).await?;
        for (i, _) in conns.iter().chain(&subs) {
            if !holders(dev, node).contains(i) {
                return Err(format!(
                    "{label} has a connection on node {i}, not where it was placed ({node})"
                ));
            }
        }
        let fields = &conns[0].1;
        v.db = fields["db"].parse().map_err(|_| "no db field".to_string())?;
        v.up_addr = fields["addr"].clone();
        v.client_id = fields["id"].parse().map_err(|_| "no id field".to_string())?;
        let fields = &subs[0].1;
        v.sub_up_addr = fields["addr"].clone();
        v.sub_id = fields["id"].parse().map_err(|_| "no id field".to_string())?;
        v.more_up_addrs = conns[1..].iter().chain(&subs[1..]).map(|(_, f)| f["addr"].clone()).collect();
        let info: String =
            redis::cmd("CLIENT").arg("INFO").query_async(&mut v.conn).await.map_err(|e| e.to_string())?;
        v.addr = info.split(' ').find_map(|f| f.strip_prefix("addr=")).unwrap_or_default().to_string();
        v.expected = v.snapshot().await?;
        Ok(v)
    }

    async fn seed(&mut self) -> Result<(), String> {
        let (k, v) = (|kind: &str| self.key(kind), |what: &str| self.value(what));
        let mut p = redis::pipe();
        p.cmd("FLUSHDB").ignore();
        p.cmd("SET").arg(k("str")).arg(v("string")).ignore();
        p.cmd("HSET").arg(k("hash")).arg("f1").arg(v("h1")).arg(v("field")).arg(v("hv")).ignore();
        p.cmd("RPUSH").arg(k("list")).arg(v("l1")).arg(v("l2")).arg(v("l3")).ignore();
        p.cmd("SADD").arg(k("set")).arg(v("m1")).arg(v("m2")).ignore();
        p.cmd("ZADD").arg(k("zset")).arg(1).arg(v("z1")).arg(2).arg(v("z2")).ignore();
        p.cmd("XADD").arg(k("stream")).arg("1-1").arg(v("sf")).arg(v("sv")).ignore();
        p.cmd("JSON.SET").arg(k("json")).arg("$").arg(format!(r#"{{"v":"{}"}}"#, v("json"))).ignore();
        p.cmd("BF.ADD").arg(k("bloom")).arg(v("bf")).ignore();
        p.cmd("CLIENT").arg("SETNAME").arg(v("conn")).ignore();
        p.cmd("SCRIPT").arg("LOAD").arg(self.script());
        let (sha,): (String,) = p.query_async(&mut self.conn).await.map_err(|e| format!("seeding: {e}"))?;
        self.sha = sha;
        Ok(())
    }

    /// Subscribes the victim's subscriber to its channel and to every channel (`*`).
    async fn subscribe(&mut self) -> Result<(), String> {
        let chan = self.chan();
        self.sub.send(&[encode(&["SUBSCRIBE", &chan]), encode(&["PSUBSCRIBE", "*"])].concat()).await;
        for _ in 0..2 {
            match self.sub.read(Duration::from_secs(5)).await {
                Ok(R::Push(_)) => {}
                other => return Err(format!("subscribing: {other:?}")),
            }
        }
        self.sub.seen.clear();
        Ok(())
    }

    /// What changed in a snapshot.
    fn diff(&self, now: &[redis::Value]) -> String {
        let changed: Vec<String> = self
            .expected
            .iter()
            .zip(now)
            .filter(|(x, y)| x != y)
            .map(|(x, y)| format!("{x:?} → {y:?}"))
            .collect();
        changed.join("; ")
    }

    async fn load_script(&mut self) {
        let load = redis::cmd("SCRIPT").arg("LOAD").arg(self.script()).clone();
        let _: redis::RedisResult<String> = load.query_async(&mut self.conn).await;
    }

    /// Everything about the victim that A must not be able to change ([`SCRIPT_EXISTS`] is
    /// the place of `SCRIPT EXISTS` in it).
    async fn snapshot(&mut self) -> Result<Vec<redis::Value>, String> {
        let mut p = redis::pipe();
        p.cmd("GET").arg(self.key("str"));
        p.cmd("HGETALL").arg(self.key("hash"));
        p.cmd("LRANGE").arg(self.key("list")).arg(0).arg(-1);
        p.cmd("SORT").arg(self.key("set")).arg("ALPHA");
        p.cmd("ZRANGE").arg(self.key("zset")).arg(0).arg(-1).arg("WITHSCORES");
        p.cmd("XRANGE").arg(self.key("stream")).arg("-").arg("+");
        for kind in KINDS {
            p.cmd("TTL").arg(self.key(kind));
        }
        p.cmd("DBSIZE");
        p.cmd("CLIENT").arg("GETNAME");
        p.cmd("CLIENT").arg("ID");
        p.cmd("SCRIPT").arg("EXISTS").arg(&self.sha);
        p.cmd("EVALSHA").arg(&self.sha).arg(1).arg(self.key("str"));
        // Scripts still run on every node that holds a key of B's (every shard of a cluster).
        for kind in KINDS {
            p.cmd("EVAL").arg("return redis.call('TYPE', KEYS[1])").arg(1).arg(self.key(kind));
        }
        p.cmd("JSON.GET").arg(self.key("json"));
        p.cmd("BF.EXISTS").arg(self.key("bloom")).arg(self.value("bf"));
        for kind in MODULE_KINDS {
            p.cmd("TTL").arg(self.key(kind));
        }
        // Last: the Lua environment probe.
        p.cmd("EVAL").arg(LUA_ENV_PROBE).arg(0);
        match tokio::time::timeout(Duration::from_secs(5), p.query_async::<Vec<redis::Value>>(&mut self.conn))
            .await
        {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(format!("{} could not read its own canaries: {}", self.label, redis_error(&e))),
            Err(_) => Err(format!("{} could not read its own canaries within 5 s", self.label)),
        }
    }

    /// B publishes on its channel: exactly its own two subscriptions receive it, and nothing
    /// else arrives at its subscriber. On a cluster pool PUBLISH counts the subscribers on the
    /// node that took it, and a failover moves B's subscriptions to the new primary a moment
    /// after B's publishes go there: fewer than 2 (never more), or a message lost meanwhile,
    /// go to `pubsub_unsettled` for the matrix to allow only around a heal.
    async fn pulse(&mut self, n: usize) -> Vec<String> {
        let (problems, unsettled) = self.pulse_once(n, false).await;
        self.pubsub_unsettled.extend(unsettled);
        problems
    }

    /// After a heal: pulses until B's pub/sub works as before (a clean pulse) or `within`
    /// passes; how long it took, or what was still wrong. Late copies of B's own earlier
    /// pulses are not strangers' pushes.
    async fn pubsub_settles(&mut self, n: usize, within: Duration) -> Result<Duration, String> {
        let began = Instant::now();
        loop {
            let (problems, unsettled) = self.pulse_once(n, true).await;
            if problems.is_empty() && unsettled.is_empty() {
                return Ok(began.elapsed());
            }
            if !problems.is_empty() || began.elapsed() > within {
                return Err(problems.into_iter().chain(unsettled).collect::<Vec<_>>().join("; "));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn pulse_once(&mut self, n: usize, late_own_ok: bool) -> (Vec<String>, Vec<String>) {
        let mut unsettled = Vec::new();
        let mut problems = Vec::new();
        let payload = self.value(&format!("pulse-{n}"));
        // A write (keyspace notifications are on), then a publish.
        let mut p = redis::pipe();
        p.cmd("SET").arg(self.key("pulse")).arg(&payload).ignore();
        p.cmd("DEL").arg(self.key("pulse")).ignore();
        p.cmd("PUBLISH").arg(self.chan()).arg(&payload);
        let published =
            tokio::time::timeout(Duration::from_secs(3), p.query_async::<(i64,)>(&mut self.conn)).await;
        match published {
            Ok(Ok((2,))) => {}
            Ok(Ok((k,))) if k < 2 && self.on_cluster => unsettled.push(format!(
                "{}'s PUBLISH reached {k} subscriptions on its node, not its own 2",
                self.label
            )),
            Ok(Ok((k,))) => problems.push(format!(
                "{}'s PUBLISH reached {k} subscriptions, not its own 2 (someone else listens to its channel)",
                self.label
            )),
            other => problems.push(format!("{}'s PUBLISH failed: {other:?}", self.label)),
        }
        let mut got = 0;
        while got < 2 {
            match self.sub.read(Duration::from_secs(3)).await {
                Ok(R::Push(items)) => {
                    let kind = match items.first() {
                        Some(R::Str(k)) => String::from_utf8_lossy(k).into_owned(),
                        _ => String::new(),
                    };
                    let last = items.last().cloned();
                    let message = matches!(kind.as_str(), "message" | "pmessage");
                    if message && last == Some(R::Str(payload.clone().into_bytes())) {
                        got += 1;
                    } else if message
                        && late_own_ok
                        && matches!(&last, Some(R::Str(p)) if p.starts_with(self.value("pulse-").as_bytes()))
                    {
                    } else {
                        problems.push(format!(
                            "{}'s subscriber received a stranger's push: {items:?}",
                            self.label
                        ));
                    }
                }
                Ok(other) => problems.push(format!("{}'s subscriber received {other:?}", self.label)),
                Err(e) if self.on_cluster => {
                    unsettled.push(format!("{}'s subscriber stopped receiving ({e:?})", self.label));
                    break;
                }
                Err(e) => {
                    problems.push(format!("{}'s subscriber stopped receiving ({e:?})", self.label));
                    break;
                }
            }
        }
        (problems, unsettled)
    }
}

// ---------------------------------------------------------------------------------------
// Setup helpers.
// ---------------------------------------------------------------------------------------

fn random_hex() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    format!("{:016x}", h.finish())
}

/// The platform's admin connection to node `i` (in `ShoalDev::node_admins` order: the
/// standalone nodes, then a cluster's), retried for 10 s (a crashed node restarts).
async fn admin(dev: &ShoalDev, i: usize) -> Result<MultiplexedConnection, String> {
    let secret =
        std::fs::read_to_string(dev.node_dirs()[i].join("admin.secret")).map_err(|e| e.to_string())?;
    let url = format!("redis://shoal:{}@127.0.0.1:{}/", secret.trim(), dev.every_node_port()[i]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = async {
            redis::Client::open(url.as_str())?.get_multiplexed_async_connection_with_config(&bounded()).await
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(c)) => return Ok(c),
            other if Instant::now() > deadline => return Err(format!("{other:?}")),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// `cmd` on node `i` as the platform's admin; reconnects once if the connection broke.
async fn admin_query<T: redis::FromRedisValue>(
    dev: &ShoalDev,
    admins: &mut [MultiplexedConnection],
    i: usize,
    cmd: &redis::Cmd,
) -> Result<T, String> {
    match tokio::time::timeout(Duration::from_secs(5), cmd.query_async(&mut admins[i])).await {
        Ok(Ok(v)) => return Ok(v),
        _ => admins[i] = admin(dev, i).await?,
    }
    match tokio::time::timeout(Duration::from_secs(5), cmd.query_async(&mut admins[i])).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("node {i}: {e}")),
        Err(_) => Err(format!("node {i}: no answer within 5 s")),
    }
}

/// The crash report in node `i`'s log if there is one, else its last lines.
fn node_log(dev: &ShoalDev, i: usize) -> String {
    let log = std::fs::read_to_string(dev.node_dirs()[i].join("valkey.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.contains("crashed by signal") || l.contains("BUG REPORT START"))
        .map_or(lines.len().saturating_sub(15), |p| p.saturating_sub(2));
    lines[start..].iter().take(60).copied().collect::<Vec<_>>().join("\n")
}

/// The test's redis-rs connections give up on a reply after 10 s (an error the run reports,
/// rather than a wait that outlasts the test's time).
fn bounded() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Duration::from_secs(5))
        .set_response_timeout(Duration::from_secs(10))
}

/// A redis-rs connection through the gateway, or why not within 5 s.
async fn client(dev: &ShoalDev, token: &str) -> Result<MultiplexedConnection, String> {
    let url = format!("redis://:{token}@127.0.0.1:{}/", dev.resp_port);
    let connect =
        async { redis::Client::open(url)?.get_multiplexed_async_connection_with_config(&bounded()).await };
    match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("redis-rs could not connect: {e}")),
        Err(_) => Err("redis-rs could not connect within 5 s".into()),
    }
}

/// Creates a cache with every keyspace notification on (so that its writes publish events
/// its neighbours must never see), and mints a token for it.
async fn create_cache(dev: &ShoalDev, name: &str, databases: u32) -> (String, String) {
    let (id, token, _) = create_cache_in(dev, name, databases, None).await;
    (id, token)
}

/// [`create_cache`] in a given pool (None: the default), with where it was placed: the
/// index of its standalone node, or [`cluster_place`] for a cluster cache.
async fn create_cache_in(
    dev: &ShoalDev,
    name: &str,
    databases: u32,
    pool: Option<&str>,
) -> (String, String, usize) {
    let mut body = serde_json::json!({"name": name, "databases": databases, "keyspace_notifications": "KEA"});
    if let Some(pool) = pool {
        body["pool"] = pool.into();
    }
    let (mut status, mut cache) = dev.api(Method::POST, "/v1/caches", Some(body)).await;
    if status == 400 {
        // A platform without per-cache keyspace notifications: the node's own setting.
        let mut body = serde_json::json!({"name": name, "databases": databases});
        if let Some(pool) = pool {
            body["pool"] = pool.into();
        }
        (status, cache) = dev.api(Method::POST, "/v1/caches", Some(body)).await;
        for i in 0..dev.node_ports.len() {
            let mut admin = dev.node_admin(i).await;
            let set = redis::cmd("CONFIG").arg("SET").arg("notify-keyspace-events").arg("KEA").clone();
            let _: () = set.query_async(&mut admin).await.unwrap();
        }
    }
    assert_eq!(status, 201, "{cache}");
    let id = cache["id"].as_str().unwrap().to_string();
    let token = dev.mint_token(&id).await;
    let place = match cache["allocation"]["node"].as_str() {
        Some("cluster") => cluster_place(dev),
        _ => ShoalDev::node_of(&cache),
    };
    (id, token, place)
}

/// Where a cache lives, for the suite: a standalone node's index, or this one (one past the
/// standalone nodes) for the cluster pool, whose caches all share every shard.
fn cluster_place(dev: &ShoalDev) -> usize {
    dev.node_ports.len()
}

/// The nodes (indexes of `ShoalDev::node_admins`) that hold the caches of a place: its
/// standalone node, or every node of the cluster (primaries first, replicas too).
fn holders(dev: &ShoalDev, place: usize) -> Vec<usize> {
    match dev.cluster {
        Some(_) if place == cluster_place(dev) => (place..dev.node_dirs().len()).collect(),
        _ => vec![place],
    }
}

/// Where the connection named `name` lives: (node, `CLIENT LIST` fields) via the nodes'
/// admin connections; on a cluster pool one for every node the gateway connected it to.
async fn locate(
    dev: &ShoalDev,
    admins: &mut [MultiplexedConnection],
    name: &str,
) -> Result<Vec<(usize, HashMap<String, String>)>, String> {
    let mut found = Vec::new();
    for i in 0..admins.len() {
        let list: String = admin_query(dev, admins, i, redis::cmd("CLIENT").arg("LIST")).await?;
        for line in list.lines().filter(|l| l.contains(&format!(" name={name} "))) {
            let fields = line
                .split(' ')
                .filter_map(|f| f.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            found.push((i, fields));
        }
    }
    if found.is_empty() {
        return Err(format!("no node has a client named {name}"));
    }
    Ok(found)
}

/// Keys per database of every node (a cluster's replicas too), except A's databases on the
/// nodes that hold A (which A may change).
async fn node_keyspaces(
    dev: &ShoalDev,
    admins: &mut [MultiplexedConnection],
    a_nodes: &[usize],
    a_dbs: std::ops::Range<u32>,
) -> Result<BTreeMap<(usize, u32), String>, String> {
    let mut out = BTreeMap::new();
    for i in 0..admins.len() {
        let info: String = admin_query(dev, admins, i, redis::cmd("INFO").arg("keyspace")).await?;
        for line in info.lines() {
            let Some((db, rest)) = line.strip_prefix("db").and_then(|l| l.split_once(':')) else { continue };
            let Ok(db) = db.parse::<u32>() else { continue };
            if a_nodes.contains(&i) && a_dbs.contains(&db) {
                continue;
            }
            let keys = rest.split(',').next().unwrap_or_default().to_string();
            out.insert((i, db), keys);
        }
    }
    Ok(out)
}

/// A's own keys, back to a known state: db0 has 4 keys, db1 one.
async fn reset_a(
    dev: &ShoalDev,
    token: &str,
    conn: &mut Option<MultiplexedConnection>,
) -> Result<(), String> {
    // Up to 15 s in all: after a node restart its caches take a moment before they can log in.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = String::new();
    while Instant::now() < deadline {
        if conn.is_none() {
            match client(dev, token).await {
                Ok(c) => *conn = Some(c),
                Err(e) => {
                    last = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let mut p = redis::pipe();
        p.cmd("SELECT").arg(0).ignore();
        p.cmd("FLUSHALL").ignore();
        p.cmd("SET").arg("a:str").arg("a-value").ignore();
        p.cmd("RPUSH").arg("a:list").arg("str").arg("hash").arg("list").ignore();
        p.cmd("SADD").arg("a:set").arg("a1").ignore();
        p.cmd("HSET").arg("a:hash").arg("f1").arg("a").ignore();
        p.cmd("SELECT").arg(1).ignore();
        p.cmd("SET").arg("a:db1").arg("a-db1").ignore();
        p.cmd("SELECT").arg(0).ignore();
        match tokio::time::timeout(Duration::from_secs(5), p.query_async::<()>(c)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last = redis_error(&e),
            Err(_) => last = "no answer within 5 s".into(),
        }
        *conn = None;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!("could not reset cache A's keys within 15 s: {last}"))
}

// ---------------------------------------------------------------------------------------
// One run: an attack in a wrapper.
// ---------------------------------------------------------------------------------------

/// A's connections, reused from run to run after a `RESET` (a fresh login per run would
/// cost a token verification each); one that is not healthy is replaced by a fresh login.
#[derive(Default)]
struct AConnections {
    raw: [Option<Raw>; 2],
    redis_rs: Option<MultiplexedConnection>,
}

#[allow(clippy::too_many_arguments)]
async fn run_raw(
    dev: &ShoalDev,
    token: &str,
    pool: &mut AConnections,
    table: &Table,
    wrapper: Wrapper,
    cmds: &[Vec<String>],
    victims: &mut [Victim],
    n: usize,
    problems: &mut Vec<String>,
) -> Result<Run, String> {
    let slot = usize::from(wrapper.proto() - 2);
    let mut conn = match pool.raw[slot].take() {
        Some(mut c) => {
            if c.healthy().await {
                c
            } else {
                Raw::login(dev.resp_port, token, wrapper.proto(), None).await?
            }
        }
        None => Raw::login(dev.resp_port, token, wrapper.proto(), None).await?,
    };
    conn.seen.clear();
    let mut bytes = Vec::new();
    match wrapper {
        Wrapper::Resp3 => cmds.iter().for_each(|c| bytes.extend(encode(c))),
        Wrapper::Inline => {
            for c in cmds {
                let mut lower = c.clone();
                lower[0] = lower[0].to_lowercase();
                bytes.extend(inline(&lower).expect("inline-able"));
            }
        }
        Wrapper::Mixed => cmds.iter().for_each(|c| bytes.extend(encode(&with_mixed_case(table, c)))),
        Wrapper::Multi | Wrapper::Multi3 => {
            let mixed = wrapper == Wrapper::Multi3;
            bytes.extend(encode(&[if mixed { "mUlTi" } else { "MULTI" }]));
            for c in cmds {
                bytes.extend(encode(&if mixed { with_mixed_case(table, c) } else { c.clone() }));
            }
            bytes.extend(encode(&[if mixed { "eXeC" } else { "EXEC" }]));
        }
        Wrapper::Eval | Wrapper::Pcall3 => {
            let pcall = wrapper == Wrapper::Pcall3;
            let script =
                if pcall { CALL_SCRIPT.replace("redis.call", "redis.pcall") } else { CALL_SCRIPT.into() };
            let mut args =
                vec![if pcall { "eVaL".to_string() } else { "EVAL".to_string() }, script, "0".into()];
            for c in cmds {
                args.push(c.len().to_string());
                args.extend(if pcall { with_mixed_case(table, c) } else { c.clone() });
            }
            bytes.extend(encode(&args));
        }
        Wrapper::Resp2 => unreachable!("redis-rs"),
    }
    let mut replies = Vec::new();
    let nonce1 = format!("nonce-{n}-1");
    bytes.extend(encode(&["PING", &nonce1]));
    conn.send(&bytes).await;
    let mut sane = conn
        .until(&nonce1, &mut replies)
        .await
        .map_err(|e| format!("no answer to PING after the attack: {e:?}"));
    // While A's connection is still open (and maybe subscribed), every neighbour publishes.
    for v in victims.iter_mut() {
        problems.extend(v.pulse(n).await);
    }
    if sane.is_ok() {
        let nonce2 = format!("nonce-{n}-2");
        conn.send(&encode(&["PING", &nonce2])).await;
        sane =
            conn.until(&nonce2, &mut replies).await.map_err(|e| format!("no answer to a second PING: {e:?}"));
    }
    let (outcomes, exec) = outcomes(wrapper, cmds, &replies);
    let run = Run { transcript: conn.transcript(), outcomes, exec, sane, messages: messages(&replies) };
    if run.sane.is_ok() && conn.reset(wrapper.proto()).await {
        pool.raw[slot] = Some(conn);
    }
    Ok(run)
}

async fn run_redis_rs(
    dev: &ShoalDev,
    token: &str,
    pool: &mut AConnections,
    cmds: &[Vec<String>],
    victims: &mut [Victim],
    n: usize,
    problems: &mut Vec<String>,
) -> Result<Run, String> {
    let ping = redis::cmd("PING").clone();
    let mut conn = match pool.redis_rs.take() {
        Some(mut c) => {
            if ping.query_async::<String>(&mut c).await.is_ok_and(|p| p == "PONG") {
                c
            } else {
                client(dev, token).await?
            }
        }
        None => client(dev, token).await?,
    };
    let mut transcript = Vec::new();
    let mut outcomes = Vec::new();
    let mut sane = Ok(());
    for c in cmds {
        let mut cmd = redis::cmd(&c[0]);
        for a in &c[1..] {
            cmd.arg(a.as_str());
        }
        let r = match tokio::time::timeout(Duration::from_secs(5), cmd.query_async::<redis::Value>(&mut conn))
            .await
        {
            Ok(Ok(v)) => Ok(from_redis(&v)),
            Ok(Err(e)) => Err(redis_error(&e)),
            Err(_) => {
                sane = Err("no reply within 5 s".to_string());
                Err("timeout".into())
            }
        };
        match &r {
            Ok(v) => flatten(v, &mut transcript),
            Err(e) => transcript.extend_from_slice(e.as_bytes()),
        }
        transcript.push(b'\n');
        outcomes.push(Some(r));
    }
    for v in victims.iter_mut() {
        problems.extend(v.pulse(n).await);
    }
    let nonce = format!("nonce-{n}");
    if sane.is_ok() {
        let mut ping = redis::cmd("PING");
        ping.arg(&nonce);
        sane = match tokio::time::timeout(Duration::from_secs(3), ping.query_async::<redis::Value>(&mut conn))
            .await
        {
            Ok(Ok(v)) => {
                let r = from_redis(&v);
                flatten(&r, &mut transcript);
                if r.carries(nonce.as_bytes()) {
                    Ok(())
                } else {
                    Err(format!("PING {nonce} answered {r:?}"))
                }
            }
            Ok(Err(e)) => Err(format!("PING failed: {}", redis_error(&e))),
            Err(_) => Err("PING timed out".into()),
        };
    }
    if sane.is_ok() {
        let reset = redis::cmd("RESET").clone();
        let done = tokio::time::timeout(Duration::from_secs(1), reset.query_async::<String>(&mut conn)).await;
        let untrack = redis::cmd("CLIENT").arg("TRACKING").arg("off").clone();
        let untracked =
            tokio::time::timeout(Duration::from_secs(1), untrack.query_async::<redis::Value>(&mut conn))
                .await;
        if matches!(done, Ok(Ok(ref r)) if r == "RESET") && untracked.is_ok() {
            pool.redis_rs = Some(conn);
        }
    }
    Ok(Run { transcript, outcomes, exec: None, sane, messages: Vec::new() })
}

/// What A must never see: the neighbours' values, their names unless A sent them, and
/// node-wide views.
fn leaks(transcript: &[u8], sent: &[u8], victims: &[Victim], a_dbs: u32) -> Vec<String> {
    let mut found = Vec::new();
    for v in victims {
        if let Some(at) = find(transcript, v.marker().as_bytes()) {
            let from = at.saturating_sub(80);
            found.push(format!(
                "LEAK of {}'s data: …{}…",
                v.label,
                show(&transcript[from..(at + 120).min(transcript.len())], 400)
            ));
        }
        for name in v.names() {
            if contains(transcript, name.as_bytes()) && !contains(sent, name.as_bytes()) {
                found.push(format!("LEAK of {}'s name {name:?}", v.label));
            }
        }
    }
    // INFO's commandstats, errorstats and memory sections are the cache's own (the gateway
    // counts them per cache): what only the node's would show is the platform's own calls,
    // which A can never make (refused ones count no calls), and the node's memory details.
    for command in [
        "acl|setuser",
        "acl|deluser",
        "acl|save",
        "config|set",
        "config|rewrite",
        "replconf",
        "psync",
        "sync",
    ] {
        let marker = format!("cmdstat_{command}:calls=");
        if let Some(at) = find(transcript, marker.as_bytes()) {
            if !transcript[at + marker.len()..].starts_with(b"0,") {
                found.push(format!("LEAK of a node-wide view: {marker:?} with calls in the reply"));
            }
        }
    }
    for marker in [
        "latency_percentiles_usec_",
        "used_memory_rss:",
        "used_memory_peak:",
        "keyspace_hits:",
        "total_net_input_bytes:",
        "instantaneous_ops_per_sec:",
        "master_replid:",
        "rdb_changes_since_last_save:",
        "mem_fragmentation_ratio:",
        "user=t",
        "user=shoal",
        "shoal-observer",
        "aclfile",
    ] {
        if contains(transcript, marker.as_bytes()) {
            found.push(format!("LEAK of a node-wide view: {marker:?} in the reply"));
        }
    }
    // Keyspace lines of databases A does not have.
    let mut pos = 0;
    while let Some(at) = find(&transcript[pos..], b"db").map(|p| p + pos) {
        let digits: Vec<u8> =
            transcript[at + 2..].iter().take_while(|b| b.is_ascii_digit()).copied().collect();
        if !digits.is_empty() && transcript[at + 2 + digits.len()..].starts_with(b":keys=") {
            let db: u64 = String::from_utf8_lossy(&digits).parse().unwrap_or(u64::MAX);
            if db >= a_dbs as u64 {
                found.push(format!("LEAK of the node's keyspace: a line for db{db}"));
            }
        }
        pos = at + 2;
    }
    found
}

/// `cluster`: A is on a cluster pool.
fn check_expectations(
    table: &Table,
    attack: &Attack,
    cmds: &[Vec<String>],
    wrapper: Wrapper,
    run: &Run,
    cluster: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut denied_any = false;
    for (i, cmd) in cmds.iter().enumerate() {
        let Some(Some(outcome)) = run.outcomes.get(i) else { continue };
        if table.treatment(cmd) == "deny" {
            denied_any = true;
            match outcome {
                Err(e) if wrapper.lua() || e.starts_with("NOPERM") => {}
                Err(e) => problems.push(format!("{:?} is denied by the gateway but got -{e}", cmd.join(" "))),
                Ok(r) => problems.push(format!(
                    "{:?} is denied by the gateway but succeeded{}: {}",
                    cmd.join(" "),
                    if wrapper.lua() { " inside Lua (the ACL let it through)" } else { "" },
                    show(
                        &{
                            let mut b = Vec::new();
                            flatten(r, &mut b);
                            b
                        },
                        300
                    )
                )),
            }
        }
    }
    if wrapper.multi() && denied_any {
        match &run.exec {
            Some(R::Err(e)) if e.starts_with("EXECABORT") => {}
            other => problems
                .push(format!("a transaction with a denied command was not aborted: EXEC → {other:?}")),
        }
    }
    for &(i, expect) in &attack.expect {
        let Some(Some(outcome)) = run.outcomes.get(i) else { continue };
        let ok = match (expect, outcome) {
            (Expect::Err, r) => r.is_err(),
            (Expect::ErrInLua, r) => !wrapper.lua() || r.is_err(),
            (Expect::ErrOutsideLua, r) => wrapper.lua() || r.is_err(),
            (Expect::Nil, r) => r == &Ok(R::Nil),
            (Expect::NilOrErr, r) => r.is_err() || r == &Ok(R::Nil),
            (Expect::Int(n), r) => r == &Ok(R::Int(n)),
            (Expect::ZeroOrErr, r) => r.is_err() || r == &Ok(R::Int(0)),
            (Expect::Empty, Ok(r)) => r.is_empty_aggregate(),
            (Expect::Empty, Err(_)) => false,
            (Expect::EmptyOrErr, r) => r.as_ref().map_or(true, R::is_empty_aggregate),
            (Expect::Str(s), r) => r == &Ok(R::Str(s.as_bytes().to_vec())),
        };
        // What a cluster answers otherwise, about A's own keys: a command whose keys are in
        // several slots gets -CROSSSLOT where the gateway cannot split it (always in MULTI);
        // a keyless EVAL runs on one shard, where Valkey refuses the keys of the others; and
        // DBSIZE in MULTI or Lua counts the keys of that one shard.
        let on_cluster = cluster
            && match outcome {
                Err(e) => {
                    (e.starts_with("CROSSSLOT") && spans_slots(table, &cmds[i]))
                        || (wrapper.lua() && e.contains("non local key in a cluster node"))
                }
                Ok(R::Int(n)) => {
                    (wrapper.multi() || wrapper.lua())
                        && cmds[i][0].eq_ignore_ascii_case("dbsize")
                        && matches!(expect, Expect::Int(all) if (0..=all).contains(n))
                }
                _ => false,
            };
        if !ok && !on_cluster {
            problems.push(format!("{:?} expected {expect:?}, got {outcome:?}", cmds[i].join(" ")));
        }
    }
    problems
}

fn placeholders(
    victims: &[Victim],
    b: usize,
    a_db: u32,
    a_dbs: u32,
    node_port: u16,
    slot: i64,
) -> Vec<(String, String)> {
    let v = &victims[b];
    let mut map: Vec<(String, String)> = vec![
        ("{lua_select_b}".into(), "redis.call('SELECT', '{bdb}') return redis.call('GET', '{bstr}')".into()),
        ("{lua_publish_b}".into(), "return redis.call('PUBLISH', '{buser}:{bchan}', 'A-INJECT')".into()),
        (
            "{lua_strmeta}".into(),
            "getmetatable('').__index.upper = function() return 'PWNED' end return 1".into(),
        ),
        ("{lua_string}".into(), "string.upper = function() return 'PWNED' end return 1".into()),
        ("{lua_redis}".into(), "redis.call = function() return 'PWNED' end return 1".into()),
        ("{lua_rawset}".into(), "rawset(_G, 'pwn', 'PWNED') return 1".into()),
        ("{lua_setmeta}".into(), "setmetatable(_G, nil) pwn = 'PWNED' return 1".into()),
        ("{lua_ret1}".into(), "return 1".into()),
        ("{fnlib}".into(), "#!lua name=pwn\nredis.register_function('pwn', function() return 1 end)".into()),
    ];
    for kind in KINDS.iter().chain(&MODULE_KINDS) {
        map.push((format!("{{b{kind}}}"), v.key(kind)));
    }
    map.extend([
        ("{bprefix}".into(), v.prefix()),
        ("{bchan}".into(), v.chan()),
        ("{bsha}".into(), v.sha.clone()),
        ("{bid}".into(), v.client_id.to_string()),
        ("{baddr}".into(), v.addr.clone()),
        ("{bupaddr}".into(), v.up_addr.clone()),
        ("{bdb}".into(), v.db.to_string()),
        ("{buser}".into(), format!("t{}", v.id)),
        ("{adbs}".into(), a_dbs.to_string()),
        ("{nodeport}".into(), node_port.to_string()),
        ("{bslot}".into(), slot.to_string()),
        ("{bsubid}".into(), v.sub_id.to_string()),
        ("{bsubaddr}".into(), v.sub_addr.clone()),
        ("{bsubupaddr}".into(), v.sub_up_addr.clone()),
        ("{bpulse}".into(), v.key("pulse")),
    ]);
    assert!(v.db >= a_db + a_dbs, "B's database lies after A's");
    map
}

/// Whether a command names keys in several hash slots.
fn spans_slots(table: &Table, cmd: &[String]) -> bool {
    let argv: Vec<&[u8]> = cmd.iter().map(|a| a.as_bytes()).collect();
    let Some(spec) = table.0.lookup(argv[0], argv.get(1).copied()) else { return false };
    let slots: std::collections::HashSet<u16> =
        spec.routing_keys(&argv).iter().map(|k| shoal_gateway::cluster::key_slot(k)).collect();
    slots.len() > 1
}

fn expand(text: &str, map: &[(String, String)]) -> Vec<Vec<String>> {
    text.split(';')
        .map(|c| {
            c.split_whitespace()
                .map(|arg| {
                    let mut a = arg.to_string();
                    for _ in 0..2 {
                        for (k, v) in map {
                            a = a.replace(k.as_str(), v);
                        }
                    }
                    a
                })
                .collect()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The suite.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_cannot_read_write_or_observe_its_neighbours() {
    let started = Instant::now();
    // With JSON and Bloom loaded (their keys are ordinary keys of each cache's database) and
    // Search (refused on shared nodes).
    let modules = ["rejson.so", "redisbloom.so", "redisearch.so"].map(module_fixture);
    let module_args: Vec<&str> = modules.iter().flat_map(|m| ["--module", m.to_str().unwrap()]).collect();
    let dev = ShoalDev::start_with(&module_args).await;
    let table = Table::load();
    // Every node: the standalone pool's, then (cluster lane) the cluster pool's.
    let mut admins = Vec::new();
    for i in 0..dev.every_node_port().len() {
        admins.push(admin(&dev, i).await.unwrap());
    }

    // A: two databases. Its keys are reset after every run.
    let (_, a_token, a_node) = create_cache_in(&dev, "attacker", 2, None).await;
    // The nodes that hold A: its node, or every node of the cluster (where every cache
    // shares every shard with A).
    let a_nodes = holders(&dev, a_node);
    let a_on_cluster = a_nodes.len() > 1;
    let a_dbs = 2u32;
    let mut ra = Some(client(&dev, &a_token).await.unwrap());
    let a_name = format!("a-{}", random_hex());
    let _: () =
        redis::cmd("CLIENT").arg("SETNAME").arg(&a_name).query_async(ra.as_mut().unwrap()).await.unwrap();
    let a_conns = locate(&dev, &mut admins, &a_name).await.unwrap();
    assert!(a_conns.iter().all(|(i, _)| a_nodes.contains(i)), "A is connected where it was placed");
    let a_db: u32 = a_conns[0].1["db"].parse().unwrap();
    reset_a(&dev, &a_token, &mut ra).await.unwrap();

    // Neighbours, until one shares A's node (that one is B) and one does not. On a cluster
    // pool the first (in the default pool, the cluster) shares every shard with A, and the
    // next ones are put on the standalone pool `main`, beside it.
    let mut victims: Vec<Victim> = Vec::new();
    for label in ["B", "C", "D", "E"] {
        let pool = (dev.cluster.is_some() && !victims.is_empty()).then_some("main");
        let (id, token, place) = create_cache_in(&dev, &format!("victim-{label}"), 1, pool).await;
        // On a cluster, B's keys (so its canaries) are on every shard.
        let holding = holders(&dev, place);
        let hex = loop {
            let hex = random_hex();
            let mut primaries = std::collections::BTreeSet::new();
            for kind in KINDS {
                let slot = shoal_gateway::cluster::key_slot(format!("BN{hex}:{kind}").as_bytes());
                primaries.insert(primary_of_slot(&dev, &mut admins, &holding, slot.into()).await);
            }
            if holding.len() == 1 || primaries.len() == dev.cluster.map_or(1, |c| c.shards) {
                break hex;
            }
        };
        let mut v = Victim::open(&dev, &mut admins, label, id, token, hex, place).await.unwrap();
        assert_eq!(v.prefix(), format!("BN{}:", v.hex));
        assert_eq!(v.expected[0], redis::Value::BulkString(v.value("string").into_bytes()));
        assert_eq!(
            v.expected[v.expected.len() - 1],
            redis::Value::Array(
                ["ABC", "function", "function", "nil", "true", "table"]
                    .iter()
                    .map(|s| redis::Value::BulkString(s.as_bytes().to_vec()))
                    .collect()
            ),
            "the Lua environment probe"
        );
        assert!(v.pulse(0).await.is_empty(), "{label}'s subscriber works");
        victims.push(v);
        let same = victims.iter().any(|v| v.node == a_node);
        let other = victims.iter().any(|v| v.node != a_node);
        if same && other {
            break;
        }
    }
    // The labels follow the roles: B shares A's node, C and D do not.
    victims.sort_by_key(|v| v.node != a_node);
    for (v, label) in victims.iter_mut().zip(["B", "C", "D", "E"]) {
        v.label = label;
    }
    let b = victims.iter().position(|v| v.node == a_node).expect("a neighbour on A's node");
    assert!(victims.iter().any(|v| v.node != a_node), "a neighbour on the other node");
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(victims[b].key("str"))
        .query_async(ra.as_mut().unwrap())
        .await
        .unwrap();
    // The node that holds B's `{bstr}`: A's node, or on a cluster the primary of its slot.
    let b_node = primary_of_slot(&dev, &mut admins, &a_nodes, slot).await;
    let node_port = dev.every_node_port()[b_node];
    let mut baseline_keyspace =
        node_keyspaces(&dev, &mut admins, &a_nodes, a_db..a_db + a_dbs).await.unwrap();
    let mut baseline_users: Vec<Vec<String>> = Vec::new();
    for &i in &a_nodes {
        baseline_users.push(redis::cmd("ACL").arg("USERS").query_async(&mut admins[i]).await.unwrap());
    }
    let mut baseline_config = Vec::new();
    for admin in admins.iter_mut() {
        let config: BTreeMap<String, String> =
            redis::cmd("CONFIG").arg("GET").arg("*").query_async(admin).await.unwrap();
        baseline_config.push(config);
    }

    // The detectors are not blind: B's own view of its data, the node's INFO and CLIENT LIST
    // would all be flagged had A received them.
    {
        let v = &mut victims[b];
        let own: redis::Value =
            redis::cmd("HGETALL").arg(v.key("hash")).query_async(&mut v.conn).await.unwrap();
        let keys: redis::Value = redis::cmd("KEYS").arg("*").query_async(&mut v.conn).await.unwrap();
        let (mut own_bytes, mut keys_bytes) = (Vec::new(), Vec::new());
        flatten(&from_redis(&own), &mut own_bytes);
        flatten(&from_redis(&keys), &mut keys_bytes);
        let info: String =
            redis::cmd("INFO").arg("everything").query_async(&mut admins[b_node]).await.unwrap();
        let list: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut admins[b_node]).await.unwrap();
        for (what, bytes) in [
            ("B's hash", own_bytes),
            ("B's KEYS *", keys_bytes),
            ("node INFO", info.into()),
            ("node CLIENT LIST", list.into()),
        ] {
            let found = leaks(&bytes, b"", &victims, a_dbs);
            assert!(!found.is_empty(), "the leak detector misses {what}: {}", show(&bytes, 300));
        }
    }
    println!(
        "setup: A on {} db {a_db}..{}; {} ({:.1}s)",
        place_name(&dev, a_node),
        a_db + a_dbs,
        victims
            .iter()
            .map(|v| format!("{} on {} db {}", v.label, place_name(&dev, v.node), v.db))
            .collect::<Vec<_>>()
            .join(", "),
        started.elapsed().as_secs_f64()
    );

    // Positive controls: the channels the matrix watches for B's events (keyspace
    // notifications, client-side caching) do carry A's own, so their silence means something.
    // (The gateway starts following a cache's keyspace on its first CLIENT TRACKING, a moment
    // later: A writes until the invalidation comes. From then on the matrix's tracking
    // attacks run with the following in place.)
    {
        let mut a = Raw::login(dev.resp_port, &a_token, 3, None).await.unwrap();
        let watch = [encode(&["CLIENT", "TRACKING", "on"]), encode(&["SUBSCRIBE", "__keyspace@0__:a:str"])];
        a.send(&watch.concat()).await;
        let tracking = a.read(Duration::from_secs(2)).await.unwrap();
        a.read(Duration::from_secs(2)).await.unwrap();
        let (mut invalidated, mut notified) = (tracking.is_err(), false);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !(invalidated && notified) {
            assert!(
                Instant::now() < deadline,
                "A did not hear of its own writes: invalidation {invalidated}, keyspace event {notified}"
            );
            a.send(&encode(&["GET", "a:str"])).await;
            let set = redis::cmd("SET").arg("a:str").arg("changed").clone();
            let _: () = set.query_async(ra.as_mut().unwrap()).await.unwrap();
            while let Ok(r) = a.read(Duration::from_millis(200)).await {
                let kind = match &r {
                    R::Push(items) => items.first().cloned(),
                    _ => None,
                };
                invalidated |= kind == Some(R::Str(b"invalidate".to_vec()));
                notified |= kind == Some(R::Str(b"message".to_vec()));
            }
        }
        reset_a(&dev, &a_token, &mut ra).await.unwrap();
    }

    // --- The matrix: every attack in every wrapper.
    let attacks = attacks();
    let mut failures: Vec<String> = Vec::new();
    let mut runs = 0;
    let mut pool = AConnections::default();
    let loop_started = Instant::now();
    // SHOAL_ISOLATION_TRACE=1 prints what A got in every run.
    let trace = std::env::var_os("SHOAL_ISOLATION_TRACE").is_some();
    // SHOAL_ISOLATION_ONLY=text runs only the attacks whose text contains it.
    let only = std::env::var("SHOAL_ISOLATION_ONLY").unwrap_or_default();
    let mut gateway_down: Option<String> = None;
    let mut stopped: Option<String> = None;
    let nodes = admins.len();
    let node_pids = || (0..nodes).map(|i| dev.node_pid(i)).collect::<Vec<_>>();
    let mut pids = node_pids();
    // How long neighbours' scripts took to heal after A tripped Valkey's script bug.
    let mut heal_times: Vec<Duration> = Vec::new();
    // The engine's heals so far, as its log tells: (found, healed).
    let heals = || {
        let log = dev.log();
        (
            log.matches("node poisoned: every keyed script").count(),
            log.matches("poisoned node healed").count(),
        )
    };
    let mut heals_seen = heals();
    // When the engine was last seen healing, and how long B's pub/sub took to settle after.
    let mut heal_seen_at: Option<Instant> = None;
    let mut pubsub_settle_times: Vec<Duration> = Vec::new();
    let mut previous: Option<String> = None;
    // Runs after which a primary was poisoned, and the engine's heal awaited.
    let mut heals_awaited = 0;
    'matrix: for attack in &attacks {
        if !attack.text.contains(only.as_str()) {
            continue;
        }
        for wrapper in WRAPPERS {
            // The matrix takes 60–90 s; past this, something waits that should not, and the
            // failures so far are the clue (rather than the test being stopped from outside).
            if loop_started.elapsed() > Duration::from_secs(200) {
                stopped = Some(format!(
                    "the matrix ran past 200 s (it takes 60–90 s), at [{wrapper:?}] {} (run {})",
                    attack.text,
                    runs + 1
                ));
                break 'matrix;
            }
            let map = placeholders(&victims, b, a_db, a_dbs, node_port, slot);
            let cmds = expand(attack.text, &map);
            if wrapper == Wrapper::Inline && cmds.iter().any(|c| inline(c).is_none()) {
                continue;
            }
            runs += 1;
            let run_started = Instant::now();
            let mut problems = Vec::new();
            let run = if wrapper == Wrapper::Resp2 {
                run_redis_rs(&dev, &a_token, &mut pool, &cmds, &mut victims, runs, &mut problems).await
            } else {
                run_raw(&dev, &a_token, &mut pool, &table, wrapper, &cmds, &mut victims, runs, &mut problems)
                    .await
            };
            let run = match run {
                Ok(run) => run,
                Err(e) => {
                    gateway_down = Some(format!(
                        "[{wrapper:?}] {}: A could not even connect: {e}; the previous run was {}",
                        attack.text,
                        previous.as_deref().unwrap_or("none")
                    ));
                    break 'matrix;
                }
            };
            previous = Some(format!("[{wrapper:?}] {}", attack.text));
            let sent: Vec<u8> = cmds.iter().flatten().flat_map(|a| a.bytes().chain([b' '])).collect();
            problems.extend(leaks(&run.transcript, &sent, &victims, a_dbs));
            problems.extend(check_expectations(&table, attack, &cmds, wrapper, &run, a_on_cluster));
            for m in &run.messages {
                problems.push(format!("A received {m:?} though nothing of A's changed during the run"));
            }
            if let Err(e) = &run.sane {
                if !attack.closes {
                    problems.push(format!("A's connection is not sane afterwards: {e}"));
                }
            }
            // The neighbours' canaries are untouched. On a cluster pool, one exception: a
            // command over two slots inside A's script trips a Valkey 9.1.2 bug that breaks
            // every keyed script on that node until it restarts; the engine finds such a node
            // and heals it (fails it over and restarts it). The neighbours' scripts fail until
            // then: the time is measured, and must stay short.
            // (`redis.pcall`'s error ends at "cluster node", `redis.call`'s goes on "script".)
            // A heal may also begin or end a little after the run that tripped the bug
            // (the engine probes every 500 ms): any heal since the last check counts.
            const POISONED: &str = "non local key in a cluster node";
            // When A's run did poison a primary, the engine's heal (a failover, then a
            // restart) is awaited here, so that its effects are not taken for A's harm.
            let poisoned_here = dev.cluster.is_some()
                && String::from_utf8_lossy(&run.transcript).contains(POISONED)
                && !poisoned_primaries(&dev, &mut admins, &a_nodes).await.is_empty();
            if poisoned_here {
                heals_awaited += 1;
                let began = Instant::now();
                loop {
                    let (found, healed) = heals();
                    if healed > heals_seen.1 && found == healed {
                        break;
                    }
                    if began.elapsed() > Duration::from_secs(20) {
                        problems.push("A poisoned a primary and the engine did not heal it in 20 s".into());
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                for (i, conn) in admins.iter_mut().enumerate() {
                    if let Ok(c) = admin(&dev, i).await {
                        *conn = c;
                    }
                }
                pids = node_pids();
            }
            let now_heals = heals();
            let tripped = dev.cluster.is_some()
                && (poisoned_here
                    || String::from_utf8_lossy(&run.transcript).contains(POISONED)
                    || now_heals != heals_seen
                    || now_heals.0 > now_heals.1);
            if now_heals != heals_seen || now_heals.0 > now_heals.1 {
                heal_seen_at = Some(Instant::now());
            }
            heals_seen = now_heals;
            // A pub/sub hiccup on a cluster pool is allowed only around a heal (the engine
            // probes every 500 ms: one may show up in its log a little later), and must end
            // within 5 s of it.
            let recent = |at: Option<Instant>| at.is_some_and(|at| at.elapsed() < Duration::from_secs(3));
            if victims.iter().any(|v| !v.pubsub_unsettled.is_empty()) && !recent(heal_seen_at) {
                let deadline = Instant::now() + Duration::from_secs(2);
                while Instant::now() < deadline && heals() == heals_seen {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if heals() != heals_seen {
                    (heals_seen, heal_seen_at) = (heals(), Some(Instant::now()));
                }
            }
            for v in victims.iter_mut() {
                let unsettled = std::mem::take(&mut v.pubsub_unsettled);
                if unsettled.is_empty() {
                    continue;
                }
                if !recent(heal_seen_at) {
                    problems.extend(unsettled);
                    continue;
                }
                match v.pubsub_settles(runs, Duration::from_secs(5)).await {
                    Ok(took) => pubsub_settle_times.push(took),
                    Err(e) => {
                        problems.push(format!("{}'s pub/sub not settled 5 s after a heal: {e}", v.label))
                    }
                }
            }
            let mut broken = Vec::new();
            let mut healing = Vec::new();
            for (i, v) in victims.iter_mut().enumerate() {
                match v.snapshot().await {
                    // (Mid-heal, B may also see a shard's old and new primary at once.)
                    // (Healed by a failover, B's script is not on the new primary yet.)
                    Err(e) if tripped && (e.contains(POISONED) || e.contains("NOSCRIPT")) => healing.push(i),
                    Ok(now) if tripped && now != v.expected => healing.push(i),
                    Ok(now) if now == v.expected => {}
                    Ok(now) => {
                        problems.push(format!("{}'s canaries changed: {}", v.label, v.diff(&now)));
                        broken.push(i);
                    }
                    Err(e) => {
                        problems.push(e);
                        broken.push(i);
                    }
                }
            }
            if !healing.is_empty() {
                let began = Instant::now();
                for &i in &healing {
                    let v = &mut victims[i];
                    loop {
                        match v.snapshot().await {
                            Ok(now) if now == v.expected => break,
                            // Healed by a failover: the new primary never loaded B's script,
                            // as after any failover (`NOSCRIPT`, or `SCRIPT EXISTS` 0 on one
                            // shard); B loads it again, as its library would.
                            Err(e) if e.contains("NOSCRIPT") => v.load_script().await,
                            Ok(now) if now[SCRIPT_EXISTS] != v.expected[SCRIPT_EXISTS] => {
                                v.load_script().await
                            }
                            _ if began.elapsed() < Duration::from_secs(5) => {
                                tokio::time::sleep(Duration::from_millis(50)).await
                            }
                            other => {
                                let other = match other {
                                    Ok(now) => format!("changed: {}", v.diff(&now)),
                                    Err(e) => e,
                                };
                                problems.push(format!("{}'s scripts not healed in 5 s: {other}", v.label));
                                broken.push(i);
                                break;
                            }
                        }
                    }
                }
                heal_times.push(began.elapsed());
                // The healed node restarted (a new pid): not a crash. Fresh admin connections.
                for (i, conn) in admins.iter_mut().enumerate() {
                    if let Ok(c) = admin(&dev, i).await {
                        *conn = c;
                    }
                }
                pids = node_pids();
            }
            // A heal restarts the node it healed: not a crash. (Its log may show it a moment
            // after the run that tripped it.)
            if heal_seen_at.is_some_and(|at| at.elapsed() < Duration::from_secs(3)) {
                let deadline = Instant::now() + Duration::from_secs(5);
                while heals().0 > heals().1 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                pids = node_pids();
            }
            // No Valkey node crashed (the engine restarts a crashed node, with a new pid).
            let gone = |pids: &[Option<i32>]| -> Vec<usize> {
                (0..pids.len())
                    .filter(|&i| {
                        pids[i].is_some_and(|p| !crate::support::pid_alive(p) || dev.node_pid(i) != Some(p))
                    })
                    .collect()
            };
            let mut crashed = gone(&pids);
            let deadline = Instant::now() + Duration::from_secs(2);
            while !broken.is_empty() && crashed.is_empty() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                crashed = gone(&pids);
            }
            for &i in &crashed {
                problems.push(format!(
                    "CRASH of Valkey node {i} (port {}, pid {:?}); its log:\n{}",
                    dev.every_node_port()[i],
                    pids[i],
                    node_log(&dev, i)
                ));
                match admin(&dev, i).await {
                    Ok(c) => admins[i] = c,
                    Err(e) => problems.push(format!("node {i} did not come back: {e}")),
                }
            }
            if !crashed.is_empty() {
                pids = node_pids();
            }
            let mut unrestored = false;
            for i in broken {
                // A restarted node takes a moment before its caches can log in again.
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    match restore(&dev, &mut victims[i], &mut admins).await {
                        Ok(()) => break,
                        Err(_) if Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(200)).await
                        }
                        Err(e) => {
                            problems.push(format!("{} could not be restored: {e}", victims[i].label));
                            unrestored = true;
                            break;
                        }
                    }
                }
            }
            match node_keyspaces(&dev, &mut admins, &a_nodes, a_db..a_db + a_dbs).await {
                Ok(now) if now == baseline_keyspace => {}
                Ok(now) => problems.push(format!(
                    "databases outside A changed on the nodes: {baseline_keyspace:?} → {now:?}"
                )),
                Err(e) => problems.push(e),
            }
            // A run takes well under a second, a heal's up to 5 s or so.
            if run_started.elapsed() > Duration::from_secs(20) {
                problems.push(format!("the run took {:.1} s", run_started.elapsed().as_secs_f64()));
            }
            println!(
                "{:6.1}s run {runs} [{wrapper:?}] {}: {}",
                loop_started.elapsed().as_secs_f64(),
                attack.text,
                if problems.is_empty() { "ok".to_string() } else { problems.join(" | ") }
            );
            if trace {
                println!("        got: {}\n        outcomes: {:?}", show(&run.transcript, 300), run.outcomes);
            }
            if !problems.is_empty() {
                failures.push(format!(
                    "[{wrapper:?}] {}\n    sent: {}\n    got:  {}\n    {}",
                    attack.text,
                    show(&cmds.iter().map(|c| c.join(" ")).collect::<Vec<_>>().join(" ; ").into_bytes(), 200),
                    show(&run.transcript, 600),
                    problems.join("\n    ")
                ));
            }
            if unrestored {
                // Every later run would fail the same way (and wait for it): the harm A did
                // lasts, which is the finding.
                stopped = Some(format!(
                    "[{wrapper:?}] {} left a neighbour broken for good (it could not be restored); \
                     the matrix stopped there",
                    attack.text
                ));
                break 'matrix;
            }
            if let Err(e) = reset_a(&dev, &a_token, &mut ra).await {
                gateway_down = Some(format!("after [{wrapper:?}] {}: {e}", attack.text));
                break 'matrix;
            }
            if problems.iter().any(|p| p.starts_with("CRASH")) {
                // Fresh baselines after a node restart, so that later runs stand alone.
                if let Ok(now) = node_keyspaces(&dev, &mut admins, &a_nodes, a_db..a_db + a_dbs).await {
                    baseline_keyspace = now;
                }
            }
        }
    }
    let loop_time = loop_started.elapsed();
    if let Some(longest) = heal_times.iter().max() {
        println!(
            "FIGURE Valkey script bug tripped {} times ({heals_awaited} heals awaited): neighbours' keyed scripts healed within {:.2} s at most",
            heal_times.len(),
            longest.as_secs_f64()
        );
    }
    if let Some(longest) = pubsub_settle_times.iter().max() {
        println!(
            "FIGURE neighbours' pub/sub after a heal: {} hiccups (PUBLISH counting fewer on its node, or a message lost while subscriptions moved), settled within {:.2} s at most",
            pubsub_settle_times.len(),
            longest.as_secs_f64()
        );
    }
    if let Some(down) = gateway_down {
        let log = dev.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        let logs: Vec<String> =
            (0..admins.len()).map(|i| format!("node {i} log:\n{}", node_log(&dev, i))).collect();
        panic!(
            "the gateway stopped answering (a crash or a hang): {down}\n\n{} failing runs before that:\n\n{}\n\n\
             shoal log tail:\n{}\n\n{}",
            failures.len(),
            failures.join("\n\n"),
            tail.join("\n"),
            logs.join("\n\n")
        );
    }

    // What the platform did about failures (heals, lost connections, paused scripts).
    let log = dev.log();
    let events: Vec<&str> = log
        .lines()
        .filter(|l| {
            ["poison", "heal", "by force", "connection lost", "subscriptions moved"]
                .iter()
                .any(|w| l.contains(w))
        })
        .collect();
    let events = format!(
        "the platform's log about heals and lost connections:\n{}",
        events[events.len().saturating_sub(60)..].join("\n")
    );
    if let Some(stopped) = stopped {
        panic!("{stopped}\n\n{} failing runs:\n\n{}\n\n{events}", failures.len(), failures.join("\n\n"));
    }

    // --- Accepted limitations, asserted as they are.
    // The script cache is node-wide (Valkey has one per node): SCRIPT EXISTS tells A whether
    // a script it can name by SHA1 has been loaded on its node, by anyone. Naming it means
    // knowing its body already, so this reveals only that someone on the node used it.
    // EVALSHA of such a script runs it as A, on A's keys: nothing of B's is read.
    {
        // (After a heal's failover the new primary has not seen B's script until B loads it
        // again, as its library does on NOSCRIPT.)
        if dev.cluster.is_some() {
            victims[b].load_script().await;
        }
        let (bsha, csha) = (victims[b].sha.clone(), victims[if b == 0 { 1 } else { 0 }].sha.clone());
        let mut a = Raw::login(dev.resp_port, &a_token, 3, None).await.unwrap();
        a.send(&encode(&["SCRIPT", "EXISTS", &bsha, &csha])).await;
        let exists = a.read(Duration::from_secs(2)).await.unwrap();
        assert_eq!(
            exists,
            R::Arr(vec![R::Int(1), R::Int(0)]),
            "SCRIPT EXISTS of B's (same node) and C's (other node)"
        );
        a.send(&encode(&["EVALSHA", &bsha, "1", &victims[b].key("str")])).await;
        assert_eq!(
            a.read(Duration::from_secs(2)).await.unwrap(),
            R::Nil,
            "B's script, run by A, reads A's keys"
        );
        a.send(&encode(&["EVALSHA", &csha, "0"])).await;
        let other = a.read(Duration::from_secs(2)).await.unwrap();
        assert!(matches!(&other, R::Err(e) if e.starts_with("NOSCRIPT")), "{other:?}");
    }

    // --- A's stats do not move with B's activity.
    {
        let mut a = Raw::login(dev.resp_port, &a_token, 2, None).await.unwrap();
        let field = |info: &R, name: &str| -> i64 {
            let R::Str(text) = info else { panic!("INFO answered {info:?}") };
            let text = String::from_utf8_lossy(text);
            let line = text.lines().find_map(|l| l.strip_prefix(&format!("{name}:"))).unwrap_or_default();
            line.trim().parse().unwrap_or_else(|_| panic!("no {name} in {text}"))
        };
        a.send(&encode(&["INFO", "clients", "stats"])).await;
        let before = a.read(Duration::from_secs(2)).await.unwrap();
        let v = &mut victims[b];
        let mut extra = Vec::new();
        for _ in 0..3 {
            let mut c = client(&dev, &v.token).await.unwrap();
            let mut p = redis::pipe();
            for i in 0..20 {
                p.cmd("GET")
                    .arg(v.key("str"))
                    .cmd("SET")
                    .arg(v.key(&format!("extra{i}")))
                    .arg("x")
                    .cmd("DEL")
                    .arg(v.key(&format!("extra{i}")));
            }
            let _: redis::Value = p.query_async(&mut c).await.unwrap();
            extra.push(c);
        }
        a.send(&encode(&["INFO", "clients", "stats"])).await;
        let after = a.read(Duration::from_secs(2)).await.unwrap();
        for (name, most) in
            [("connected_clients", 0), ("total_connections_received", 0), ("total_commands_processed", 1)]
        {
            let delta = field(&after, name) - field(&before, name);
            if !(0..=most).contains(&delta) {
                failures.push(format!(
                    "A's INFO {name} moved by {delta} while B opened 3 connections and ran 180 commands"
                ));
            }
        }
    }

    // --- Node-level state A must not have changed.
    for (&i, baseline) in a_nodes.iter().zip(&baseline_users) {
        let users: Vec<String> = redis::cmd("ACL").arg("USERS").query_async(&mut admins[i]).await.unwrap();
        if &users != baseline {
            failures.push(format!("ACL users changed on node {i}: {baseline:?} → {users:?}"));
        }
    }
    for (i, admin) in admins.iter_mut().enumerate() {
        let functions: redis::Value = redis::cmd("FUNCTION").arg("LIST").query_async(admin).await.unwrap();
        if functions != redis::Value::Array(vec![]) {
            failures.push(format!("node {i} has functions: {functions:?}"));
        }
        let config: BTreeMap<String, String> =
            redis::cmd("CONFIG").arg("GET").arg("*").query_async(admin).await.unwrap();
        for (k, v) in &config {
            if baseline_config[i].get(k) != Some(v) {
                failures.push(format!(
                    "node {i} configuration changed: {k} {:?} → {v:?}",
                    baseline_config[i].get(k)
                ));
            }
        }
    }

    println!(
        "isolation: {} attacks × {} wrappers = {runs} runs (inline only where the arguments allow) \
         against {} neighbours in {:.1}s; {} failing runs",
        attacks.len(),
        WRAPPERS.len(),
        victims.len(),
        loop_time.as_secs_f64(),
        failures.len()
    );
    assert!(failures.is_empty(), "{} failing runs:\n\n{}\n\n{events}", failures.len(), failures.join("\n\n"));
}

/// A place for the setup line: `node <n>`, or `the cluster`.
fn place_name(dev: &ShoalDev, place: usize) -> String {
    if dev.cluster.is_some() && place == cluster_place(dev) {
        "the cluster".into()
    } else {
        format!("node {place}")
    }
}

/// Of `nodes` (a place's holders), the one that serves `slot`: the only one on a standalone
/// pool, the primary that owns it on a cluster (from `CLUSTER NODES`).
async fn primary_of_slot(
    dev: &ShoalDev,
    admins: &mut [MultiplexedConnection],
    nodes: &[usize],
    slot: i64,
) -> usize {
    if nodes.len() == 1 {
        return nodes[0];
    }
    let text: String = redis::cmd("CLUSTER").arg("NODES").query_async(&mut admins[nodes[0]]).await.unwrap();
    for (port, ranges) in primaries(&text) {
        if ranges.iter().any(|r| r.contains(&slot)) {
            let ports = dev.every_node_port();
            return *nodes.iter().find(|&&i| ports[i] == port).expect("the slot's primary is a cluster node");
        }
    }
    panic!("no primary owns slot {slot}:\n{text}")
}

/// The primaries of a `CLUSTER NODES` reply: each one's port and the slot ranges it serves.
fn primaries(cluster_nodes: &str) -> Vec<(u16, Vec<std::ops::RangeInclusive<i64>>)> {
    let mut out = Vec::new();
    for line in cluster_nodes.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 8 || !fields[2].contains("master") {
            continue;
        }
        let port: u16 = fields[1].split([':', '@']).nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
        let ranges = fields[8..]
            .iter()
            .filter_map(|range| {
                let (first, last) = range.split_once('-').unwrap_or((range, range));
                Some(first.parse::<i64>().ok()?..=last.parse::<i64>().ok()?)
            })
            .collect();
        out.push((port, ranges));
    }
    out
}

/// The cluster's primaries (indices among `nodes`) that refuse a keyed script as Valkey
/// 9.1.2's multi-slot-script bug leaves them (see the matrix): each asked, as the admin, to
/// run a script on a key of a slot it owns. A primary that cannot be asked (restarting) counts.
async fn poisoned_primaries(
    dev: &ShoalDev,
    admins: &mut [MultiplexedConnection],
    nodes: &[usize],
) -> Vec<usize> {
    const SCRIPT: &str = "return redis.call('EXISTS', KEYS[1])";
    let ports = dev.every_node_port();
    let Some(&first) = nodes.first() else { return Vec::new() };
    let text: String = match redis::cmd("CLUSTER").arg("NODES").query_async(&mut admins[first]).await {
        Ok(text) => text,
        Err(_) => return vec![first],
    };
    let mut poisoned = Vec::new();
    for (port, ranges) in primaries(&text) {
        let Some(&i) = nodes.iter().find(|&&i| ports[i] == port) else { continue };
        let Some(&slot) = ranges.first().map(|r| r.start()) else { continue };
        let Some(key) = (0..100_000)
            .map(|n| format!("probe{n}"))
            .find(|k| i64::from(shoal_gateway::cluster::key_slot(k.as_bytes())) == slot)
        else {
            continue;
        };
        let reply: redis::RedisResult<i64> =
            redis::cmd("EVAL").arg(SCRIPT).arg(1).arg(&key).query_async(&mut admins[i]).await;
        if reply.is_err_and(|e| !e.to_string().contains("MOVED")) {
            poisoned.push(i);
        }
    }
    poisoned
}

/// Puts a victim back as it was after A broke something, so that later runs stand alone.
async fn restore(dev: &ShoalDev, v: &mut Victim, admins: &mut [MultiplexedConnection]) -> Result<(), String> {
    *v = Victim::open(dev, admins, v.label, v.id.clone(), v.token.clone(), v.hex.clone(), v.node).await?;
    Ok(())
}

/// A (1 database) and a neighbour B on the same Valkey node: (A's token, B's token).
async fn neighbours_on_one_node(dev: &ShoalDev) -> (String, String) {
    let mut admins = [dev.node_admin(0).await, dev.node_admin(1).await];
    let node_of = |users: &[Vec<String>], id: &str| users.iter().position(|u| u.contains(&format!("t{id}")));
    let (a_id, a_token) = create_cache(dev, "attacker", 1).await;
    for i in 0..4 {
        let (b_id, b_token) = create_cache(dev, &format!("neighbour-{i}"), 1).await;
        let mut users = Vec::new();
        for admin in admins.iter_mut() {
            users.push(redis::cmd("ACL").arg("USERS").query_async::<Vec<String>>(admin).await.unwrap());
        }
        if node_of(&users, &a_id) == node_of(&users, &b_id) {
            return (a_token, b_token);
        }
    }
    panic!("no neighbour landed on A's node");
}

/// `SCRIPT DEBUG SYNC` runs the Lua debugger inside the server's main thread: while A's
/// session waits at a breakpoint, the whole node waits with it.
#[tokio::test]
async fn the_lua_debugger_cannot_freeze_a_neighbours_node() {
    let dev = ShoalDev::start().await;
    let (a_token, b_token) = neighbours_on_one_node(&dev).await;
    let mut b = client(&dev, &b_token).await.unwrap();
    let _: () = redis::cmd("SET").arg("k").arg("v").query_async(&mut b).await.unwrap();

    let mut a = Raw::login(dev.resp_port, &a_token, 2, None).await.unwrap();
    a.send(&encode(&["SCRIPT", "DEBUG", "SYNC"])).await;
    let armed = a.read(Duration::from_secs(2)).await;
    a.send(&encode(&["EVAL", "redis.breakpoint() return 1", "0"])).await;
    let session = a.read(Duration::from_secs(2)).await;
    println!("SCRIPT DEBUG SYNC → {armed:?}; EVAL → {session:?}");

    let started = Instant::now();
    let get = redis::cmd("GET").arg("k").clone();
    let answered =
        tokio::time::timeout(Duration::from_secs(2), get.query_async::<Option<String>>(&mut b)).await;
    let waited = started.elapsed();
    drop(a);
    // Whatever happened, B gets its node back once A's session is gone.
    let recovered =
        tokio::time::timeout(Duration::from_secs(10), get.query_async::<Option<String>>(&mut b)).await;
    assert!(
        matches!(answered, Ok(Ok(Some(ref v))) if v == "v"),
        "while A sat in a SCRIPT DEBUG SYNC session, B's GET got {answered:?} after {waited:?} \
         (A froze the node); after A left: {recovered:?}"
    );
}

/// Valkey's client ids count every connection the node ever accepted. They reach a cache as
/// `CLIENT ID`, the `id` of `HELLO` and `CLIENT LIST`/`INFO`: two connections in a row tell A
/// how many connections its neighbours opened in between.
#[tokio::test]
async fn client_ids_do_not_reveal_a_neighbours_connections() {
    let dev = shared().await;
    let (a_token, b_token) = neighbours_on_one_node(&dev).await;
    async fn next_id(dev: &ShoalDev, token: &str) -> i64 {
        let mut a = client(dev, token).await.unwrap();
        redis::cmd("CLIENT").arg("ID").query_async(&mut a).await.unwrap()
    }
    // B idle: the step between two of A's connections.
    let first = next_id(&dev, &a_token).await;
    let quiet_step = next_id(&dev, &a_token).await - first;
    // B opens five connections: does the step change?
    let before = next_id(&dev, &a_token).await;
    let mut b_connections = Vec::new();
    for _ in 0..5 {
        let mut b = client(&dev, &b_token).await.unwrap();
        let _: () = redis::cmd("PING").query_async(&mut b).await.unwrap();
        b_connections.push(b);
    }
    let busy_step = next_id(&dev, &a_token).await - before;
    assert_eq!(
        busy_step, quiet_step,
        "A's CLIENT ID advanced by {quiet_step} while B was idle and by {busy_step} while B opened 5 \
         connections: the node-wide id counter shows A its neighbours' connections"
    );
}

/// Valkey 9.1.2 crashes (SIGSEGV in `scriptingEngineDebuggerFlushLogs`) when a client that
/// ran `SCRIPT DEBUG YES` disconnects and any client then runs a script: A can take down the
/// node of every neighbour, as often as it likes.
#[tokio::test]
async fn the_lua_debugger_cannot_crash_a_neighbours_node() {
    let dev = ShoalDev::start().await;
    let (a_token, b_token) = neighbours_on_one_node(&dev).await;
    let pids = dev.node_pids();
    let mut a = Raw::login(dev.resp_port, &a_token, 2, None).await.unwrap();
    a.send(&encode(&["SCRIPT", "DEBUG", "YES"])).await;
    let armed = a.read(Duration::from_secs(2)).await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut b = client(&dev, &b_token).await.unwrap();
    let script = redis::cmd("EVAL").arg("return 1").arg(0).clone();
    let answered = tokio::time::timeout(Duration::from_secs(2), script.query_async::<i64>(&mut b)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let crashed: Vec<i32> = pids.iter().copied().filter(|&p| !crate::support::pid_alive(p)).collect();
    let node = dev.node_pids().iter().position(|p| !pids.contains(p)).unwrap_or(0);
    assert!(
        matches!(answered, Ok(Ok(1))) && crashed.is_empty(),
        "after A's SCRIPT DEBUG YES ({armed:?}) and disconnect, B's EVAL got {answered:?}; \
         crashed valkey-server pids: {crashed:?}; log:\n{}",
        node_log(&dev, node)
    );
}

/// A cache's keyspace-notification flags are its own. A node publishes the union of its
/// caches' flags, so a neighbour asking for more events (or turning on client-side caching)
/// must not change which events the cache's subscribers get.
#[tokio::test]
async fn a_neighbours_keyspace_flags_do_not_change_what_a_cache_receives() {
    let dev = shared().await;
    // B asks for expiry events only.
    let body = serde_json::json!({"name": "quiet", "keyspace_notifications": "Kx"});
    let (status, b) = dev.api(Method::POST, "/v1/caches", Some(body)).await;
    if status == 400 {
        println!("this platform has no per-cache keyspace notifications: nothing to test");
        return;
    }
    assert_eq!(status, 201, "{b}");
    let b_token = dev.mint_token(b["id"].as_str().unwrap()).await;
    // Neighbours on both nodes ask for every event.
    for i in 0..3 {
        create_cache(&dev, &format!("loud-{i}"), 1).await;
    }
    let mut sub = Raw::login(dev.resp_port, &b_token, 3, None).await.unwrap();
    sub.send(&encode(&["PSUBSCRIBE", "__keyspace@0__:*"])).await;
    let confirmed = sub.read(Duration::from_secs(2)).await;
    assert!(matches!(confirmed, Ok(R::Push(_))), "{confirmed:?}");
    let mut b = client(&dev, &b_token).await.unwrap();
    let _: () = redis::cmd("SET").arg("k").arg("v").query_async(&mut b).await.unwrap();
    let heard = sub.read(Duration::from_millis(500)).await;
    assert!(
        matches!(heard, Err(Broken::Timeout)),
        "B asked for expiry events only (Kx), yet its SET published {heard:?}: the node's flags \
         are the union of its caches' and the gateway passes every event through"
    );
}
