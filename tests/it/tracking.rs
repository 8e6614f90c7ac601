//! Client-side caching (`CLIENT TRACKING`) through the gateway, frame by frame against a
//! plain valkey-server: each test drives the same sequence on both, on raw connections that
//! read exact RESP frames (so a push is seen before or after a reply), and compares what
//! every connection received, in order.
//!
//! What plain Valkey 9.1 does, as these tests record it:
//! - Default mode (and OPTIN/OPTOUT, REDIRECT): one `invalidate` message per key, in the
//!   order the command modified the keys (an MSET of three keys: three messages), and only
//!   for keys really modified (a failed `SET NX`, a DEL of a missing key: none).
//! - On a connection that tracks itself, the messages of its own write come right after the
//!   write's reply, before the reply of its next command.
//! - BCAST: one message per prefix per event-loop iteration, its keys sorted and
//!   deduplicated, after the replies of that iteration (a single command: after its reply).
//! - NOLOOP: the client's own writes are not reported to it, yet the keys stop being
//!   tracked.
//! - REDIRECT: RESP3 pushes to the target, or in RESP2 `message __redis__:invalidate`
//!   to a target subscribed to that channel.
//! - Expired keys: one message per key as it expires; keys written by scripts: one per key,
//!   undeclared keys included, after the script's reply.

use crate::support::resp::frame_len;
use crate::support::{encode, shared, PlainValkey};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a connection stays quiet before what it received is taken as complete.
const QUIET: Duration = Duration::from_millis(250);

/// Where a scenario runs: a plain valkey-server, or the gateway (with a cache's token).
enum Side {
    Plain(u16),
    Gateway(u16, String),
}

/// A raw connection that reads whole RESP frames.
struct Conn {
    name: &'static str,
    stream: TcpStream,
    buf: Vec<u8>,
}

/// A scenario's run on one side: what each connection sent and received, in order.
struct Run {
    side: Side,
    log: Vec<String>,
    /// Client ids, shown as the connection's name (the gateway numbers its own).
    ids: Vec<(String, String)>,
}

impl Run {
    fn new(side: Side) -> Run {
        Run { side, log: Vec::new(), ids: Vec::new() }
    }

    fn gateway(&self) -> bool {
        matches!(self.side, Side::Gateway(..))
    }

    /// Opens a connection speaking `proto` (logged in, on the gateway); not logged.
    async fn open(&mut self, name: &'static str, proto: u8) -> Conn {
        let (port, hello) = match &self.side {
            Side::Plain(port) => (*port, vec!["HELLO".to_string(), proto.to_string()]),
            Side::Gateway(port, token) => (
                *port,
                vec!["HELLO".into(), proto.to_string(), "AUTH".into(), "default".into(), token.clone()],
            ),
        };
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut c = Conn { name, stream, buf: Vec::new() };
        c.stream.write_all(&encode(&hello)).await.unwrap();
        let reply = c.frame(Duration::from_secs(5)).await.expect("HELLO answered");
        assert!(!reply.starts_with('-'), "{reply}");
        c
    }

    /// Sends a command; logs it, then every frame the connection gets until its reply and
    /// until it has been quiet for a while (pushes before or after the reply included).
    async fn call(&mut self, c: &mut Conn, args: &[&str]) {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        self.log.push(format!("{} > {}", c.name, self.shown(&args)));
        c.stream.write_all(&encode(&args)).await.unwrap();
        self.replies(c, 1).await;
    }

    /// Sends several commands in one write (a pipeline); logs as [`Run::call`] does.
    async fn pipeline(&mut self, c: &mut Conn, commands: &[&[&str]]) {
        let mut out = Vec::new();
        for args in commands {
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            self.log.push(format!("{} > {}", c.name, self.shown(&args)));
            out.extend(encode(&args));
        }
        c.stream.write_all(&out).await.unwrap();
        self.replies(c, commands.len()).await;
    }

    /// A command as logged: client ids by their connection's name.
    fn shown(&self, args: &[String]) -> String {
        let shown: Vec<String> = args
            .iter()
            .enumerate()
            .map(|(i, a)| match i > 0 && args[i - 1].eq_ignore_ascii_case("REDIRECT") {
                true => {
                    self.ids.iter().find(|(id, _)| id == a).map_or(a.clone(), |(_, name)| format!("<{name}>"))
                }
                false => a.clone(),
            })
            .collect();
        shown.join(" ")
    }

    async fn replies(&mut self, c: &mut Conn, mut n: usize) {
        while n > 0 {
            let frame = c.frame(Duration::from_secs(5)).await.expect("a reply");
            if !is_push(&frame) {
                n -= 1;
            }
            self.log.push(format!("{} < {frame}", c.name));
        }
        self.seen(c).await;
    }

    /// Logs what arrives on `c` until it has been quiet for a while.
    async fn seen(&mut self, c: &mut Conn) {
        while let Some(frame) = c.frame(QUIET).await {
            self.log.push(format!("{} < {frame}", c.name));
        }
    }

    /// The connection's `CLIENT ID` (not logged: the gateway numbers its own).
    async fn client_id(&mut self, c: &mut Conn) -> String {
        c.stream.write_all(&encode(&["CLIENT", "ID"])).await.unwrap();
        let reply = c.frame(Duration::from_secs(5)).await.expect("an id");
        let id = reply.trim_start_matches(':').to_string();
        self.ids.push((id.clone(), c.name.to_string()));
        id
    }

    async fn sleep(&mut self, ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

impl Conn {
    /// The next whole frame, shown on one line (`\r\n` as spaces); None if none comes in
    /// `wait`.
    async fn frame(&mut self, wait: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(len) = frame_len(&self.buf) {
                let frame: Vec<u8> = self.buf.drain(..len).collect();
                let text = String::from_utf8_lossy(&frame).replace("\r\n", " ");
                return Some(text.trim_end().to_string());
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) => panic!("{} closed", self.name),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => panic!("{}: {e}", self.name),
                Err(_) => return None,
            }
        }
    }
}

/// An invalidation: a RESP3 push, or a RESP2 `message` on `__redis__:invalidate`.
fn is_push(frame: &str) -> bool {
    frame.starts_with('>') || frame.starts_with("*3 $7 message ")
}

/// Runs `scenario` on a plain valkey-server and through the gateway (in a fresh cache),
/// and asserts both logs are the same; returns the log.
macro_rules! same_as_valkey {
    ($name:literal, $scenario:ident) => {{
        let plain = PlainValkey::start().await;
        let mut on_plain = Run::new(Side::Plain(plain.port));
        $scenario(&mut on_plain).await;
        let dev = shared().await;
        let cache = dev.create_cache($name).await;
        let token = dev.mint_token(cache["id"].as_str().unwrap()).await;
        let mut on_gateway = Run::new(Side::Gateway(dev.resp_port, token));
        $scenario(&mut on_gateway).await;
        assert_eq!(
            on_gateway.log.join("\n"),
            on_plain.log.join("\n"),
            "\n--- gateway ---\n{}\n--- valkey ---\n{}\n",
            on_gateway.log.join("\n"),
            on_plain.log.join("\n")
        );
        on_plain.log
    }};
}

/// Default mode on a connection that tracks itself: one message per key, after the reply.
async fn default_mode(r: &mut Run) {
    let mut a = r.open("a", 3).await;
    let mut b = r.open("b", 3).await;
    r.call(&mut a, &["CLIENT", "TRACKING", "ON"]).await;
    r.call(&mut a, &["MGET", "k1", "k2", "k3"]).await;
    r.call(&mut a, &["MSET", "k1", "1", "k2", "2", "k3", "3"]).await;
    r.call(&mut a, &["MGET", "k1", "k2", "k3"]).await;
    // k4 is missing: nothing is said of it.
    r.call(&mut a, &["DEL", "k1", "k2", "k4"]).await;
    r.call(&mut a, &["MGET", "k1", "k2", "k3"]).await;
    // Not modified: no message.
    r.call(&mut a, &["SET", "k3", "y", "NX"]).await;
    r.call(&mut a, &["MULTI"]).await;
    r.call(&mut a, &["SET", "k1", "a"]).await;
    r.call(&mut a, &["INCR", "k2"]).await;
    r.call(&mut a, &["SET", "k5", "z"]).await;
    r.call(&mut a, &["EXEC"]).await;
    // Another connection's writes.
    r.call(&mut a, &["MGET", "k1", "k2", "k3"]).await;
    r.call(&mut b, &["MSET", "k3", "1", "k1", "2", "k2", "3"]).await;
    r.seen(&mut a).await;
    r.call(&mut a, &["MGET", "k1", "k2", "k3"]).await;
    r.call(&mut b, &["DEL", "k2", "k1", "k9"]).await;
    r.seen(&mut a).await;
    // Read again, then flushed.
    r.call(&mut a, &["GET", "k3"]).await;
    r.call(&mut a, &["FLUSHDB"]).await;
    r.call(&mut a, &["GET", "k3"]).await;
    r.call(&mut b, &["FLUSHDB"]).await;
    r.seen(&mut a).await;
}

#[tokio::test]
async fn default_mode_sends_one_message_per_key_after_the_writes_reply() {
    let log = same_as_valkey!("track-default", default_mode);
    let text = log.join("\n");
    assert!(text.contains("a > MSET k1 1 k2 2 k3 3\na < +OK\na < >2 $10 invalidate *1 $2 k1\n"), "{text}");
}

/// BCAST with prefixes: one message per prefix, sorted keys.
async fn bcast(r: &mut Run) {
    let mut a = r.open("a", 3).await;
    let mut b = r.open("b", 3).await;
    r.call(&mut a, &["CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "user:", "PREFIX", "order:"]).await;
    r.call(&mut a, &["MSET", "user:2", "1", "order:1", "2", "user:1", "3", "other", "x", "user:2", "4"])
        .await;
    r.call(&mut a, &["DEL", "user:1", "user:2", "user:9"]).await;
    r.call(&mut a, &["SET", "user:1", "y", "XX"]).await;
    r.call(&mut a, &["MULTI"]).await;
    r.call(&mut a, &["SET", "user:4", "1"]).await;
    r.call(&mut a, &["SET", "order:3", "1"]).await;
    r.call(&mut a, &["SET", "user:3", "1"]).await;
    r.call(&mut a, &["EXEC"]).await;
    r.call(&mut b, &["MSET", "user:1", "1", "order:1", "2", "user:2", "3", "other", "x"]).await;
    r.seen(&mut a).await;
    let script =
        "redis.call('set','user:6','1') redis.call('set','order:5','1') redis.call('set','user:5','1')";
    r.call(&mut b, &["EVAL", script, "0"]).await;
    r.seen(&mut a).await;
    // Without a prefix: every key.
    let mut c = r.open("c", 3).await;
    r.call(&mut c, &["CLIENT", "TRACKING", "ON", "BCAST"]).await;
    r.call(&mut b, &["MSET", "x2", "1", "x1", "2"]).await;
    r.seen(&mut c).await;
    r.seen(&mut a).await;
}

#[tokio::test]
async fn bcast_sends_one_message_per_prefix_with_sorted_keys() {
    let log = same_as_valkey!("track-bcast", bcast);
    let text = log.join("\n");
    assert!(
        text.contains(
            "a < +OK\na < >2 $10 invalidate *1 $7 order:1\na < >2 $10 invalidate *2 $6 user:1 $6 user:2"
        ),
        "{text}"
    );
}

async fn optin_optout(r: &mut Run) {
    let mut a = r.open("a", 3).await;
    let mut b = r.open("b", 3).await;
    r.call(&mut a, &["CLIENT", "TRACKING", "ON", "OPTIN"]).await;
    r.call(&mut a, &["GET", "a"]).await;
    r.call(&mut a, &["CLIENT", "CACHING", "yes"]).await;
    r.call(&mut a, &["MGET", "b", "c"]).await;
    r.call(&mut a, &["GET", "d"]).await;
    r.call(&mut b, &["MSET", "a", "1", "b", "1", "c", "1", "d", "1"]).await;
    r.seen(&mut a).await;
    r.call(&mut a, &["CLIENT", "CACHING", "yes"]).await;
    r.call(&mut a, &["GET", "a"]).await;
    r.call(&mut a, &["MSET", "a", "2", "b", "2"]).await;
    let mut o = r.open("o", 3).await;
    r.call(&mut o, &["CLIENT", "TRACKING", "ON", "OPTOUT"]).await;
    r.call(&mut o, &["GET", "a"]).await;
    r.call(&mut o, &["CLIENT", "CACHING", "no"]).await;
    r.call(&mut o, &["GET", "b"]).await;
    r.call(&mut o, &["GET", "c"]).await;
    r.call(&mut b, &["MSET", "c", "1", "b", "1", "a", "1"]).await;
    r.seen(&mut o).await;
    r.seen(&mut a).await;
}

#[tokio::test]
async fn optin_and_optout_track_what_client_caching_says() {
    same_as_valkey!("track-optin", optin_optout);
}

async fn noloop(r: &mut Run) {
    let mut n = r.open("n", 3).await;
    let mut b = r.open("b", 3).await;
    r.call(&mut n, &["CLIENT", "TRACKING", "ON", "NOLOOP"]).await;
    r.call(&mut n, &["MGET", "a", "b"]).await;
    r.call(&mut n, &["MSET", "a", "3", "b", "3"]).await;
    // Its own write was not reported, and the keys are no longer tracked.
    r.call(&mut b, &["SET", "a", "4"]).await;
    r.seen(&mut n).await;
    r.call(&mut n, &["MGET", "a", "b"]).await;
    r.call(&mut b, &["SET", "a", "5"]).await;
    r.seen(&mut n).await;
    r.call(&mut n, &["SET", "b", "4"]).await;
    let mut d = r.open("d", 3).await;
    r.call(&mut d, &["CLIENT", "TRACKING", "ON", "BCAST", "NOLOOP", "PREFIX", "n:"]).await;
    r.call(&mut d, &["MSET", "n:1", "1", "n:2", "2"]).await;
    r.call(&mut b, &["MSET", "n:2", "1", "n:1", "2"]).await;
    r.seen(&mut d).await;
    r.seen(&mut n).await;
}

#[tokio::test]
async fn noloop_leaves_out_the_clients_own_writes() {
    same_as_valkey!("track-noloop", noloop);
}

async fn redirect(r: &mut Run) {
    let mut b = r.open("b", 3).await;
    // RESP3: pushes to the target.
    let mut sink = r.open("sink", 3).await;
    let id = r.client_id(&mut sink).await;
    let mut t = r.open("t", 3).await;
    r.call(&mut t, &["CLIENT", "TRACKING", "ON", "REDIRECT", &id]).await;
    r.call(&mut t, &["MGET", "a", "b"]).await;
    r.call(&mut t, &["MSET", "a", "3", "b", "3"]).await;
    r.seen(&mut sink).await;
    r.call(&mut t, &["MGET", "a", "b"]).await;
    r.call(&mut b, &["MSET", "b", "4", "a", "4"]).await;
    r.seen(&mut sink).await;
    r.seen(&mut t).await;
    // RESP2: messages on __redis__:invalidate to a subscribed target.
    let mut sink2 = r.open("sink2", 2).await;
    let id2 = r.client_id(&mut sink2).await;
    r.call(&mut sink2, &["SUBSCRIBE", "__redis__:invalidate"]).await;
    let mut t2 = r.open("t2", 2).await;
    r.call(&mut t2, &["CLIENT", "TRACKING", "ON", "REDIRECT", &id2]).await;
    r.call(&mut t2, &["MGET", "a", "b"]).await;
    r.call(&mut t2, &["MSET", "a", "5", "b", "5"]).await;
    r.seen(&mut sink2).await;
    r.call(&mut t2, &["MGET", "a", "b"]).await;
    r.call(&mut b, &["DEL", "a", "b"]).await;
    r.seen(&mut sink2).await;
    let mut t3 = r.open("t3", 2).await;
    r.call(&mut t3, &["CLIENT", "TRACKING", "ON", "REDIRECT", &id2, "BCAST", "PREFIX", "x"]).await;
    r.call(&mut b, &["MSET", "xb", "1", "xa", "1", "y", "1"]).await;
    r.seen(&mut sink2).await;
    r.seen(&mut t2).await;
    r.seen(&mut t3).await;
}

#[tokio::test]
async fn redirect_delivers_to_the_target_in_resp2_and_resp3() {
    same_as_valkey!("track-redirect", redirect);
}

async fn expired(r: &mut Run) {
    let mut a = r.open("a", 3).await;
    let mut b = r.open("b", 3).await;
    let mut c = r.open("c", 3).await;
    r.call(&mut a, &["CLIENT", "TRACKING", "ON"]).await;
    r.call(&mut c, &["CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "e"]).await;
    r.call(&mut b, &["SET", "e1", "1", "PX", "400"]).await;
    r.call(&mut b, &["SET", "e2", "1", "PX", "1200"]).await;
    r.call(&mut a, &["MGET", "e1", "e2"]).await;
    r.seen(&mut c).await;
    r.sleep(1500).await;
    r.seen(&mut a).await;
    r.seen(&mut c).await;
    // PEXPIRE itself modifies the key; its expiry is not reported again (no longer tracked).
    r.call(&mut a, &["SET", "e3", "1"]).await;
    r.call(&mut a, &["GET", "e3"]).await;
    r.call(&mut a, &["PEXPIRE", "e3", "200"]).await;
    r.sleep(600).await;
    r.seen(&mut a).await;
    r.seen(&mut c).await;
}

#[tokio::test]
async fn expired_keys_are_invalidated_one_message_each() {
    same_as_valkey!("track-expired", expired);
}

async fn scripts(r: &mut Run) {
    let mut a = r.open("a", 3).await;
    let mut b = r.open("b", 3).await;
    r.call(&mut a, &["CLIENT", "TRACKING", "ON"]).await;
    r.call(&mut a, &["MGET", "s1", "s2", "s3"]).await;
    // Keys in the order the script writes them, the undeclared s2 included.
    let script =
        "redis.call('set',KEYS[2],'1') redis.call('set','s2','1') redis.call('set',KEYS[1],'1') return 1";
    r.call(&mut a, &["EVAL", script, "2", "s1", "s3"]).await;
    r.call(&mut a, &["MGET", "s1", "s2", "s3"]).await;
    r.call(&mut b, &["EVAL", "redis.call('del','s2','s1') return 1", "0"]).await;
    r.seen(&mut a).await;
    r.call(&mut a, &["MGET", "s1", "s2"]).await;
    r.call(&mut a, &["EVAL_RO", "return redis.call('get',KEYS[1])", "1", "s3"]).await;
    r.call(&mut a, &["EVAL", "return redis.call('get',KEYS[1])", "1", "s1"]).await;
    r.call(&mut b, &["SET", "s1", "1"]).await;
    r.seen(&mut a).await;
}

#[tokio::test]
async fn keys_written_by_scripts_are_invalidated_after_the_scripts_reply() {
    same_as_valkey!("track-scripts", scripts);
}

/// A pipeline on a connection that tracks itself: the write's messages come before the
/// reply of the command after it, when that command does not read the written keys.
async fn pipeline(r: &mut Run) {
    let mut a = r.open("a", 3).await;
    r.call(&mut a, &["CLIENT", "TRACKING", "ON"]).await;
    r.call(&mut a, &["MGET", "k1", "k2", "k3"]).await;
    r.pipeline(&mut a, &[&["MSET", "k2", "1", "k3", "1"], &["GET", "k1"]]).await;
    r.call(&mut a, &["MGET", "k1", "k2", "k3"]).await;
    r.pipeline(&mut a, &[&["SET", "k1", "1"], &["PING"], &["SET", "k2", "2"], &["PING"]]).await;
}

#[tokio::test]
async fn a_pipelined_writes_messages_come_before_the_next_reply() {
    same_as_valkey!("track-pipeline", pipeline);
}

/// A pipeline whose next command reads the key just written: Valkey sends the message
/// between the two replies; the gateway sends it after the read's reply (it cannot tell
/// whether the read ran before a write of another connection), which never leaves a stale
/// value cached.
#[tokio::test]
async fn a_pipelined_read_of_the_written_key_is_never_left_stale() {
    async fn scenario(r: &mut Run) {
        let mut a = r.open("a", 3).await;
        r.call(&mut a, &["CLIENT", "TRACKING", "ON"]).await;
        r.call(&mut a, &["GET", "k1"]).await;
        r.pipeline(&mut a, &[&["SET", "k1", "1"], &["GET", "k1"]]).await;
    }
    let plain = PlainValkey::start().await;
    let mut on_plain = Run::new(Side::Plain(plain.port));
    scenario(&mut on_plain).await;
    let valkey = ["a > SET k1 1", "a > GET k1", "a < +OK", "a < >2 $10 invalidate *1 $2 k1", "a < $1 1"];
    assert_eq!(on_plain.log[4..], valkey, "{:?}", on_plain.log);
    let dev = shared().await;
    let cache = dev.create_cache("track-pipeline-read").await;
    let token = dev.mint_token(cache["id"].as_str().unwrap()).await;
    let mut on_gateway = Run::new(Side::Gateway(dev.resp_port, token));
    assert!(on_gateway.gateway());
    scenario(&mut on_gateway).await;
    let gateway = ["a > SET k1 1", "a > GET k1", "a < +OK", "a < $1 1", "a < >2 $10 invalidate *1 $2 k1"];
    assert_eq!(on_gateway.log[4..], gateway, "{:?}", on_gateway.log);
}
