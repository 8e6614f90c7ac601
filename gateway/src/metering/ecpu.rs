//! The ECPU rule, as ElastiCache Serverless meters it, in integer milli-ECPU:
//!
//! ```text
//! ecpu(cmd) = max(weight(cmd) + per_element(cmd) × elements(reply), (request + reply bytes) / 1024)
//! ```
//!
//! - `weight` and `per_element` come from the command table (`commands/data/commands.tsv`) (milli-ECPU; 1000 =
//!   a small GET/SET). A weight of 0 marks a free command (AUTH, HELLO, PING, QUIT, RESET,
//!   MULTI, EXEC, DISCARD, (P|S)(UN)SUBSCRIBE): it is not metered at all.
//! - `elements(reply)` is the number of top-level elements of an aggregate reply (arrays,
//!   sets, pushes; a map's keys and values count separately, so RESP2 and RESP3 agree);
//!   0 for anything else. LRANGE 0 99 on a long list: 100; HGETALL of 50 fields: 100.
//! - Bytes are the bytes the client sent (the request as framed) and received (the reply
//!   as delivered); `(bytes × 1000) / 1024` rounded down.
//!
//! Pure functions only: the session feeds them, the tests below pin them.

use crate::resp::reply::ReplyScanner;
use shoal_commands::{CommandSpec, Hits};

pub use shoal_commands::ecpu::{ecpu_milli, transfer_milli, FREE_BYTES};

/// What a script (EVAL, EVALSHA, FCALL and their `_RO` forms) costs beyond its weight for
/// the time it ran: 1 ECPU per started millisecond after the first, so a 4 s script costs
/// about 4,000 ECPU, not one GET's worth.
pub fn script_time_milli(ran: std::time::Duration) -> u64 {
    let started_ms = (ran.as_micros() as u64).div_ceil(1000);
    started_ms.saturating_sub(1) * 1000
}

/// Elements of an aggregate reply (see the module docs); 0 for other replies.
#[inline]
pub fn reply_elements(reply: &[u8]) -> u64 {
    let Some(&kind) = reply.first() else { return 0 };
    if !matches!(kind, b'*' | b'~' | b'%' | b'>') {
        return 0;
    }
    let end = reply.iter().position(|&b| b == b'\r').unwrap_or(reply.len());
    let n = crate::resp::parse_int(&reply[1..end]).unwrap_or(0).max(0) as u64;
    if kind == b'%' {
        n * 2
    } else {
        n
    }
}

/// Whether a (complete) reply is nil: `$-1`, `*-1` or RESP3 `_`.
#[inline]
pub fn is_nil(reply: &[u8]) -> bool {
    // Byte patterns, not `starts_with`: no call to `memcmp` on every read's reply.
    matches!(reply, [b'$' | b'*', b'-', b'1', b'\r', b'\n', ..] | [b'_', b'\r', b'\n', ..])
}

/// Read hits and misses of one reply.
#[inline]
pub fn hits(kind: Hits, reply: &[u8]) -> (u64, u64) {
    match kind {
        Hits::None => (0, 0),
        _ if reply.first().is_some_and(|&b| b == b'-' || b == b'!') => (0, 0),
        Hits::Value => {
            if is_nil(reply) {
                (0, 1)
            } else {
                (1, 0)
            }
        }
        Hits::Elements => {
            let n = reply_elements(reply);
            if n == 0 {
                return (0, 0);
            }
            let Some(header) = reply.iter().position(|&b| b == b'\n') else { return (0, 0) };
            let (mut hit, mut miss, mut pos) = (0, 0, header + 1);
            for _ in 0..n {
                let element = &reply[pos.min(reply.len())..];
                let Ok(Some(r)) = ReplyScanner::new().next(element) else { break };
                if is_nil(element) {
                    miss += 1;
                } else {
                    hit += 1;
                }
                pos += r.len;
            }
            (hit, miss)
        }
    }
}

/// The weights of a command, or of an unknown one (forwarded; Valkey answers it): 1000.
#[inline]
pub fn weights(spec: Option<&CommandSpec>) -> (u32, u32) {
    spec.map_or((1000, 0), |s| (s.weight, s.per_element))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_commands::table;

    /// Request bytes of a command as a client frames it.
    fn request(args: &[&[u8]]) -> u64 {
        let mut out = bytes::BytesMut::new();
        crate::resp::command(&mut out, args);
        out.len() as u64
    }

    /// Weights of the examples: those bench/calibrate.py measured (the table may move on).
    fn example_weights(name: &str) -> (u32, u32) {
        match name {
            "lrange" => (1000, 156),
            "hgetall" => (1000, 232),
            "ping" | "exec" | "auth" => (0, 0),
            _ => (1000, 0),
        }
    }

    fn ecpu(name: &str, args: &[&[u8]], reply: &[u8]) -> u64 {
        let (w, pe) = example_weights(name);
        ecpu_milli(w, pe, reply_elements(reply), request(args), reply.len() as u64)
    }

    #[test]
    fn worked_examples() {
        let kb10 = vec![b'x'; 10 * 1024];
        let mb1 = vec![b'x'; 1024 * 1024];
        let bulk = |v: &[u8]| [format!("${}\r\n", v.len()).as_bytes(), v, b"\r\n"].concat();
        let list100: Vec<u8> =
            [b"*100\r\n".to_vec(), (0..100).flat_map(|_| bulk(b"0123456789")).collect()].concat();
        let hash50: Vec<u8> =
            [b"*100\r\n".to_vec(), (0..100).flat_map(|_| bulk(b"field")).collect()].concat();
        let hash50_resp3: Vec<u8> =
            [b"%50\r\n".to_vec(), (0..100).flat_map(|_| bulk(b"field")).collect()].concat();
        // (command, request arguments, reply, milli-ECPU)
        type Case<'a> = (&'a str, Vec<&'a [u8]>, Vec<u8>, u64);
        let cases: Vec<Case> = vec![
            // A small GET: the weight (1 ECPU), 22 + 11 bytes are far below 1 KiB.
            ("get", vec![b"GET", b"key"], bulk(b"hello"), 1000),
            // A miss costs the same.
            ("get", vec![b"GET", b"key"], b"$-1\r\n".to_vec(), 1000),
            // SET of 10 KiB: (10272 request + 5 reply bytes) × 1000 / 1024 = 10036.
            ("set", vec![b"SET", b"key", &kb10], b"+OK\r\n".to_vec(), 10036),
            // GET of 1 MiB: (22 request + 1048588 reply bytes) × 1000 / 1024 = 1024033.
            ("get", vec![b"GET", b"key"], bulk(&mb1), 1024033),
            // LRANGE of 100 ten-byte elements: 1000 + 100 × 156 = 16600 > 1744 bytes (1703).
            ("lrange", vec![b"LRANGE", b"l", b"0", b"99"], list100, 16600),
            // HGETALL of 50 fields: 100 elements in RESP2 and in RESP3: 1000 + 100 × 232.
            ("hgetall", vec![b"HGETALL", b"h"], hash50, 24200),
            ("hgetall", vec![b"HGETALL", b"h"], hash50_resp3, 24200),
            // Free commands are free up to 1 KiB moved; a 10 KB PING is billed by transfer.
            ("ping", vec![b"PING", &kb10], bulk(&kb10), 20_033),
            ("exec", vec![b"EXEC"], b"*0\r\n".to_vec(), 0),
            ("auth", vec![b"AUTH", b"token"], b"+OK\r\n".to_vec(), 0),
            // An error from Valkey is billed like any reply.
            (
                "incr",
                vec![b"INCR", b"key"],
                b"-ERR value is not an integer or out of range\r\n".to_vec(),
                1000,
            ),
        ];
        for (name, args, reply, want) in cases {
            assert_eq!(ecpu(name, &args, &reply), want, "{name} {}", String::from_utf8_lossy(args[0]));
        }
        // An unknown command is forwarded (Valkey refuses it): weight 1000.
        assert_eq!(ecpu_milli(weights(None).0, 0, 0, 30, 40), 1000);
        // A pub/sub delivery of 2 KiB costs 2 ECPU.
        assert_eq!(transfer_milli(2048), 2000);
    }

    #[test]
    fn hits_and_misses() {
        assert_eq!(hits(Hits::Value, b"$5\r\nhello\r\n"), (1, 0));
        assert_eq!(hits(Hits::Value, b"$-1\r\n"), (0, 1));
        assert_eq!(hits(Hits::Value, b"_\r\n"), (0, 1));
        assert_eq!(hits(Hits::Value, b"$0\r\n\r\n"), (1, 0), "an empty string is a hit");
        assert_eq!(hits(Hits::Value, b"-WRONGTYPE x\r\n"), (0, 0), "errors are neither");
        assert_eq!(hits(Hits::Elements, b"*3\r\n$1\r\na\r\n$-1\r\n_\r\n"), (1, 2));
        assert_eq!(hits(Hits::Elements, b"*0\r\n"), (0, 0));
        assert_eq!(hits(Hits::None, b"$-1\r\n"), (0, 0));
        let t = table();
        assert_eq!(t.get("get").unwrap().hits, Hits::Value);
        assert_eq!(t.get("mget").unwrap().hits, Hits::Elements);
        assert_eq!(t.get("set").unwrap().hits, Hits::None);
    }

    #[test]
    fn free_commands_are_free_only_while_small_and_scripts_pay_for_their_time() {
        use std::time::Duration;
        assert_eq!(ecpu_milli(0, 0, 0, 14, 7), 0, "PING");
        assert_eq!(ecpu_milli(0, 0, 0, 1000, 24), 0, "1 KiB moved");
        assert_eq!(ecpu_milli(0, 0, 0, 1000, 1000), 1953, "2000 bytes moved: by transfer");
        let ping = 512u64 << 20;
        assert_eq!(ecpu_milli(0, 0, 0, ping, ping), 1_048_576_000, "PING <512 MB> echoes 1 GiB");
        assert_eq!(script_time_milli(Duration::from_micros(300)), 0);
        assert_eq!(script_time_milli(Duration::from_millis(1)), 0);
        assert_eq!(script_time_milli(Duration::from_micros(1001)), 1000);
        assert_eq!(script_time_milli(Duration::from_millis(4000)), 3_999_000);
    }

    #[test]
    fn free_commands_are_those_the_issue_names() {
        let t = table();
        for name in [
            "auth",
            "hello",
            "ping",
            "quit",
            "reset",
            "multi",
            "exec",
            "discard",
            "subscribe",
            "unsubscribe",
            "psubscribe",
            "punsubscribe",
            "ssubscribe",
            "sunsubscribe",
        ] {
            assert_eq!(t.get(name).unwrap().weight, 0, "{name}");
        }
        let free: Vec<_> = t.iter().filter(|s| s.weight == 0).map(|s| s.name.as_str()).collect();
        assert_eq!(free.len(), 14, "{free:?}");
    }
}
