//! Pub/sub namespacing: a cache's channels are `t<id>:<name>` upstream and `<name>` to the
//! client. Keyspace-notification channels map the cache's database numbers
//! (`__keyspace@0__:k` for the client is `__keyspace@<real db>__:k` upstream).

use crate::resp::value::Value;

/// Reply kinds that belong to pub/sub rather than to a request.
pub const CONFIRMATIONS: &[&[u8]] =
    &[b"subscribe", b"unsubscribe", b"psubscribe", b"punsubscribe", b"ssubscribe", b"sunsubscribe"];
pub const MESSAGES: &[&[u8]] = &[b"message", b"pmessage", b"smessage"];

/// Maps one cache's channel names between client and upstream.
#[derive(Clone, Debug)]
pub struct Namespace {
    prefix: Vec<u8>,
    first_db: u32,
    databases: u32,
    /// Whether the cache has keyspace notifications on; if not, keyspace channel names are
    /// ordinary channel names in its namespace (and receive nothing from Valkey).
    keyspace: bool,
    /// The cache's own `notify-keyspace-events` flags. The node publishes the union of its
    /// caches' flags, so events are filtered down to these.
    keyspace_flags: String,
}

const KEYSPACE: &[u8] = b"__keyspace@";
const KEYEVENT: &[u8] = b"__keyevent@";

impl Namespace {
    pub fn new(acl_user: &str, first_db: u32, databases: u32, keyspace_flags: &str) -> Self {
        Namespace {
            prefix: format!("{acl_user}:").into_bytes(),
            first_db,
            databases,
            keyspace: !keyspace_flags.is_empty(),
            keyspace_flags: keyspace_flags.to_string(),
        }
    }

    /// Whether a message on `channel` (as Valkey sent it) with `payload` is one the cache
    /// asked for: keyspace events are kept only if the cache's own flags cover them.
    pub fn wants_message(&self, channel: &[u8], payload: &[u8]) -> bool {
        let Some((kind, _, rest)) = split_keyspace(channel) else { return true };
        let flags = &self.keyspace_flags;
        let (needed, event) = if kind == KEYSPACE { ('K', payload) } else { ('E', rest) };
        flags.contains(needed)
            && event_class(event).is_some_and(|class| {
                flags.contains(class) || (flags.contains('A') && "g$lshzxetd".contains(class))
            })
    }

    /// The cache's database `db` if `name` is one of its keyspace channels or patterns.
    fn own_keyspace<'a>(&self, name: &'a [u8]) -> Option<(&'static [u8], u64, &'a [u8])> {
        split_keyspace(name).filter(|(_, db, _)| self.keyspace && *db < self.databases as u64)
    }

    /// The one upstream pattern that stands for every client pattern: `t<id>:*`. Valkey's
    /// channel ACL matches patterns literally, so tenants' own patterns are matched here.
    pub fn catch_all(&self) -> Vec<u8> {
        [self.prefix.as_slice(), b"*"].concat()
    }

    /// Whether a client pattern goes upstream as is (a keyspace-notification pattern of one
    /// of the cache's databases) rather than being matched by the gateway.
    pub fn is_direct_pattern(&self, pattern: &[u8]) -> bool {
        self.own_keyspace(pattern).is_some()
    }

    /// A channel or pattern as the client wrote it → as Valkey should see it.
    pub fn to_upstream(&self, name: &[u8]) -> Vec<u8> {
        if let Some((kind, db, rest)) = self.own_keyspace(name) {
            return [kind, (self.first_db as u64 + db).to_string().as_bytes(), b"__:", rest].concat();
        }
        [self.prefix.as_slice(), name].concat()
    }

    /// A channel or pattern from Valkey → as the client wrote it.
    pub fn from_upstream(&self, name: &[u8]) -> Vec<u8> {
        if let Some(rest) = name.strip_prefix(self.prefix.as_slice()) {
            return rest.to_vec();
        }
        if let Some((kind, db, rest)) = split_keyspace(name) {
            if let Some(virtual_db) = db.checked_sub(self.first_db as u64) {
                return [kind, virtual_db.to_string().as_bytes(), b"__:", rest].concat();
            }
        }
        name.to_vec()
    }

    /// Rewrites the channel fields of a pub/sub message or confirmation in place.
    /// Returns false if `items` is not one.
    pub fn rewrite_message(&self, items: &mut [Value]) -> bool {
        let Some(kind) = items.first().and_then(Value::as_bytes).map(<[u8]>::to_ascii_lowercase) else {
            return false;
        };
        let fields = match kind.as_slice() {
            b"pmessage" => 1..3,
            k if MESSAGES.contains(&k) || CONFIRMATIONS.contains(&k) => 1..2,
            _ => return false,
        };
        for item in &mut items[fields] {
            if let Value::Bulk(name) = item {
                *name = self.from_upstream(name);
            }
        }
        true
    }
}

/// The `notify-keyspace-events` class of a keyspace event name; `None` for names this
/// table does not know (such events are not delivered to caches with partial flags).
fn event_class(event: &[u8]) -> Option<char> {
    Some(match event {
        b"expired" => 'x',
        b"evicted" => 'e',
        b"new" => 'n',
        b"keymiss" => 'm',
        b"del" | b"expire" | b"rename_from" | b"rename_to" | b"move_from" | b"move_to" | b"copy_to"
        | b"restore" | b"persist" => 'g',
        b"set" | b"setrange" | b"incrby" | b"incrbyfloat" | b"append" => '$',
        b"lpush" | b"rpush" | b"lpop" | b"rpop" | b"linsert" | b"lset" | b"lrem" | b"ltrim"
        | b"sortstore" => 'l',
        b"sadd" | b"srem" | b"spop" | b"sinterstore" | b"sunionstore" | b"sdiffstore" => 's',
        b"hset" | b"hdel" | b"hincrby" | b"hincrbyfloat" | b"hexpire" | b"hpersist" | b"hexpired"
        | b"hgetdel" => 'h',
        b"zadd" | b"zincr" | b"zrem" | b"zrembyscore" | b"zrembyrank" | b"zrembylex" | b"zinterstore"
        | b"zunionstore" | b"zdiffstore" | b"zpopmin" | b"zpopmax" | b"zrangestore" => 'z',
        b"xadd"
        | b"xdel"
        | b"xtrim"
        | b"xsetid"
        | b"xclaim"
        | b"xautoclaim"
        | b"xgroup-create"
        | b"xgroup-destroy"
        | b"xgroup-setid"
        | b"xgroup-createconsumer"
        | b"xgroup-delconsumer" => 't',
        _ => return None,
    })
}

/// Longest pattern a client may subscribe to, in bytes (`PSUBSCRIBE` with a longer one is
/// refused). Matching a pattern costs up to its length per channel byte; real patterns are
/// a few dozen bytes.
pub const MAX_PATTERN_LEN: usize = 1024;
/// Most patterns one connection may subscribe to.
pub const MAX_PATTERNS: usize = 1024;
/// Matching steps (a byte compared, or 16 bytes scanned for a literal) one message may cost
/// a session's patterns, or one `PUBLISH` the receiver count of its cache's patterns on this
/// gateway: well under a millisecond of CPU, far above what real patterns and channels need
/// (1,024 patterns such as `news.*` or `*:user:*` against a 100-byte channel take some
/// thousands). A subscriber whose patterns cost more
/// for one message is closed with an error; the receiver count past it is approximate.
pub const MATCH_BUDGET: u64 = 1 << 16;
/// Most channels one connection may subscribe to (`SUBSCRIBE` and `SSUBSCRIBE` together,
/// keyspace-notification patterns counted with them). Each costs its node about 230 bytes
/// that no cache's storage counts, and `PUBSUB CHANNELS` walks them all.
pub const MAX_CHANNELS: i64 = 10_000;
/// Most channel subscriptions one cache's connections may hold on one gateway: about 23 MB
/// of its node's memory.
pub const MAX_CACHE_CHANNELS: i64 = 100_000;
/// Matching steps (see [`MATCH_BUDGET`]) one `PUBSUB CHANNELS` may cost the gateway: its
/// pattern against each of the cache's channels on each node (10 ms or so of CPU).
pub const LISTING_BUDGET: u64 = 1 << 24;

/// One session's upstream subscriptions, counted in its cache's total on this gateway (held
/// by the cache's registry entry) until the share is dropped.
pub struct ChannelShare {
    total: std::sync::Arc<std::sync::atomic::AtomicI64>,
    held: i64,
}

impl ChannelShare {
    pub fn new(total: std::sync::Arc<std::sync::atomic::AtomicI64>) -> ChannelShare {
        ChannelShare { total, held: 0 }
    }

    /// Counts `n` for this session instead of what it counted before; the cache's total.
    pub fn set(&mut self, n: i64) -> i64 {
        let delta = n - std::mem::replace(&mut self.held, n);
        self.total.fetch_add(delta, std::sync::atomic::Ordering::Relaxed) + delta
    }
}

impl Drop for ChannelShare {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// A node's channels that have subscribers (its `PUBSUB CHANNELS` or `SHARDCHANNELS` with no
/// pattern), grouped by what comes before their first `:` (a cache's namespace `t<id>`, or a
/// keyspace channel's `__keyspace@<db>__`), so that listing one cache's channels looks at
/// that cache's alone.
#[derive(Default)]
pub struct NodeChannels {
    groups: rustc_hash::FxHashMap<Vec<u8>, Vec<Vec<u8>>>,
}

fn group(name: &[u8]) -> &[u8] {
    name.split(|&b| b == b':').next().unwrap_or(name)
}

impl NodeChannels {
    /// From a `PUBSUB CHANNELS` reply; None if it is not a list of names.
    pub fn parse(reply: &[u8]) -> Option<NodeChannels> {
        let Some((Value::Array(items), _)) = crate::resp::value::decode(reply) else { return None };
        let mut channels = NodeChannels::default();
        for item in items {
            let Value::Bulk(name) = item else { return None };
            channels.groups.entry(group(&name).to_vec()).or_default().push(name.to_vec());
        }
        Some(channels)
    }

    /// Channels on the node.
    pub fn count(&self) -> usize {
        self.groups.values().map(Vec::len).sum()
    }

    /// The channels `pattern` (upstream, as the node would match it) matches, spending at
    /// most `budget` steps; None once it is spent. A pattern whose part before its first `:`
    /// has no wildcard only looks at that group.
    pub fn matching<'a>(&'a self, pattern: &Glob, budget: &mut u64) -> Option<Vec<&'a [u8]>> {
        let prefix = group(pattern.raw());
        let literal = !prefix.iter().any(|&b| matches!(b, b'*' | b'?' | b'[' | b'\\'));
        let groups: Vec<&Vec<Vec<u8>>> = if literal {
            self.groups.get(prefix).into_iter().collect()
        } else {
            self.groups.values().collect()
        };
        let mut out = Vec::new();
        for name in groups.into_iter().flatten() {
            if pattern.matches_within(name, budget)? {
                out.push(name.as_slice());
            }
        }
        Some(out)
    }
}

/// Valkey gives up matching past this many nested `*` (protection against abusive patterns).
const MAX_STAR_NESTING: usize = 1000;

/// One pattern position: it matches exactly one byte of the string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    Byte(u8),
    Any,
    /// Index into [`Glob::classes`].
    Class(u32),
}

/// A glob pattern compiled once, with Valkey's `stringmatchlen` semantics (case-sensitive):
/// `*`, `?`, `[abc]`, `[^a-z]` (ranges compare bytes as C's signed `char`, as Valkey does),
/// `\` escapes (a trailing `\` is literal, an unclosed `[` takes the rest of the pattern),
/// an empty string matches only the empty pattern, and a pattern whose 1001st `*` is not its
/// last character matches nothing (Valkey's nesting limit).
///
/// Matching is greedy: the pattern is cut at its stars into fixed-length segments; the first
/// must match the start, the last the end, and each other one is placed at its leftmost
/// occurrence after the previous one (which leaves the most room for the rest). Segments
/// without wildcards are found with a linear substring search; others are compared at each
/// position, so a match costs at most the string's length times the longest segment (and
/// the steps are counted, see [`Glob::matches_within`]) — never the exponential
/// backtracking of a naive recursive matcher.
#[derive(Clone, Debug)]
pub struct Glob {
    raw: Vec<u8>,
    hash: u64,
    tokens: Vec<Token>,
    /// Token ranges between star groups: one more than there are star groups.
    segments: Vec<(u32, u32)>,
    /// Per segment: its bytes when it has no wildcard (searched with `memmem`).
    literals: Vec<Option<Vec<u8>>>,
    classes: Vec<[u64; 4]>,
    /// Valkey's nesting limit makes the pattern match nothing.
    never: bool,
}

impl PartialEq for Glob {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}

impl Eq for Glob {}

/// A pattern's hash, to find it among a connection's patterns without comparing bytes.
pub fn pattern_hash(raw: &[u8]) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<rustc_hash::FxHasher>::default().hash_one(raw)
}

impl Glob {
    pub fn new(raw: &[u8]) -> Glob {
        let (p, n) = (raw, raw.len());
        let mut tokens = Vec::with_capacity(n);
        let mut classes: Vec<[u64; 4]> = Vec::new();
        let mut segments = Vec::new();
        let mut seg_start = 0u32;
        let mut i = 0;
        while i < n {
            let token = match p[i] {
                b'*' => {
                    while i < n && p[i] == b'*' {
                        i += 1;
                    }
                    segments.push((seg_start, tokens.len() as u32));
                    seg_start = tokens.len() as u32;
                    continue;
                }
                b'?' => {
                    i += 1;
                    Token::Any
                }
                b'[' => {
                    i += 1;
                    let negate = i < n && p[i] == b'^';
                    if negate {
                        i += 1;
                    }
                    let mut set = [0u64; 4];
                    let add = |set: &mut [u64; 4], c: u8| set[(c >> 6) as usize] |= 1 << (c & 63);
                    loop {
                        if i + 1 < n && p[i] == b'\\' {
                            add(&mut set, p[i + 1]);
                            i += 2;
                        } else if i < n && p[i] == b']' {
                            i += 1;
                            break;
                        } else if i >= n {
                            // Unclosed: the class takes the rest of the pattern.
                            break;
                        } else if i + 2 < n && p[i + 1] == b'-' {
                            // Valkey compares `char`s, which are signed.
                            let (a, b) = (p[i] as i8, p[i + 2] as i8);
                            let (lo, hi) = (a.min(b), a.max(b));
                            for c in 0..=255u8 {
                                if (lo..=hi).contains(&(c as i8)) {
                                    add(&mut set, c);
                                }
                            }
                            i += 3;
                        } else {
                            add(&mut set, p[i]);
                            i += 1;
                        }
                    }
                    if negate {
                        set.iter_mut().for_each(|w| *w = !*w);
                    }
                    classes.push(set);
                    Token::Class(classes.len() as u32 - 1)
                }
                b'\\' if i + 1 < n => {
                    i += 2;
                    Token::Byte(p[i - 1])
                }
                c => {
                    i += 1;
                    Token::Byte(c)
                }
            };
            tokens.push(token);
        }
        segments.push((seg_start, tokens.len() as u32));
        let literals = segments
            .iter()
            .map(|&(a, b)| {
                tokens[a as usize..b as usize]
                    .iter()
                    .map(|t| match t {
                        Token::Byte(c) => Some(*c),
                        _ => None,
                    })
                    .collect::<Option<Vec<u8>>>()
            })
            .collect();
        let stars = segments.len() - 1;
        // The 1001st star group is matched only as the pattern's very end.
        let last_empty = segments.last().is_some_and(|&(a, b)| a == b);
        let never = stars > MAX_STAR_NESTING + 1 || (stars == MAX_STAR_NESTING + 1 && !last_empty);
        Glob { hash: pattern_hash(raw), raw: raw.to_vec(), tokens, segments, literals, classes, never }
    }

    /// The pattern as the client wrote it.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Whether this is the pattern `raw` whose [`pattern_hash`] is `hash`.
    pub fn is(&self, raw: &[u8], hash: u64) -> bool {
        self.hash == hash && self.raw == raw
    }

    pub fn matches(&self, s: &[u8]) -> bool {
        let mut unlimited = u64::MAX;
        self.matches_within(s, &mut unlimited).unwrap_or(false)
    }

    /// Like [`Glob::matches`], spending at most `budget` steps (see [`MATCH_BUDGET`]) and
    /// taking them off it; `None` once the budget is spent.
    pub fn matches_within(&self, s: &[u8], budget: &mut u64) -> Option<bool> {
        *budget = budget.checked_sub(1)?;
        if s.is_empty() {
            return Some(self.raw.is_empty());
        }
        if self.never {
            return Some(false);
        }
        let seg = |i: usize| {
            let (a, b) = self.segments[i];
            &self.tokens[a as usize..b as usize]
        };
        let last = self.segments.len() - 1;
        if last == 0 {
            return Some(s.len() == self.tokens.len() && self.match_at(seg(0), s, budget)?);
        }
        let (first, tail) = (seg(0), seg(last));
        if first.len() + tail.len() > s.len() {
            return Some(false);
        }
        if !self.match_at(first, s, budget)? || !self.match_at(tail, &s[s.len() - tail.len()..], budget)? {
            return Some(false);
        }
        let (mut pos, end) = (first.len(), s.len() - tail.len());
        for i in 1..last {
            match self.find(i, seg(i), &s[pos..end], budget)? {
                Some(at) => pos += at + seg(i).len(),
                None => return Some(false),
            }
        }
        Some(true)
    }

    /// Whether `tokens` match the start of `s` (which is at least as long).
    fn match_at(&self, tokens: &[Token], s: &[u8], budget: &mut u64) -> Option<bool> {
        for (t, &c) in tokens.iter().zip(s) {
            *budget = budget.checked_sub(1)?;
            let hit = match *t {
                Token::Byte(b) => b == c,
                Token::Any => true,
                Token::Class(k) => self.classes[k as usize][(c >> 6) as usize] >> (c & 63) & 1 == 1,
            };
            if !hit {
                return Some(false);
            }
        }
        Some(true)
    }

    /// The leftmost position of segment `i` in `window`.
    fn find(&self, i: usize, tokens: &[Token], window: &[u8], budget: &mut u64) -> Option<Option<usize>> {
        if tokens.len() > window.len() {
            return Some(None);
        }
        if let Some(literal) = &self.literals[i] {
            let found = memchr::memmem::find(window, literal);
            // A vectorized scan: 16 bytes cost about what one comparison does.
            let scanned = found.map_or(window.len(), |at| at + literal.len());
            *budget = budget.checked_sub(1 + scanned as u64 / 16)?;
            return Some(found);
        }
        for at in 0..=window.len() - tokens.len() {
            if self.match_at(tokens, &window[at..], budget)? {
                return Some(Some(at));
            }
        }
        Some(None)
    }
}

/// Glob matching as Valkey's `stringmatchlen` (see [`Glob`]); compiles the pattern each time.
pub fn glob_match(pattern: &[u8], s: &[u8]) -> bool {
    Glob::new(pattern).matches(s)
}

/// `__keyspace@<n>__:<rest>` → (`__keyspace@`, n, rest).
fn split_keyspace(name: &[u8]) -> Option<(&'static [u8], u64, &[u8])> {
    let kind = [KEYSPACE, KEYEVENT].into_iter().find(|k| name.starts_with(k))?;
    let after = &name[kind.len()..];
    let digits = after.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 9 || !after[digits..].starts_with(b"__:") {
        return None;
    }
    let db = std::str::from_utf8(&after[..digits]).ok()?.parse().ok()?;
    Some((kind, db, &after[digits + 3..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(names: &[&str]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", names.len()).into_bytes();
        for n in names {
            out.extend(format!("${}\r\n{n}\r\n", n.len()).into_bytes());
        }
        out
    }

    #[test]
    fn a_nodes_channels_are_listed_for_one_cache_as_the_node_would_match_them() {
        let node = NodeChannels::parse(&listing(&[
            "tc1:news",
            "tc1:news:eu",
            "tc12:news",
            "tc2:news",
            "__keyspace@5__:k",
            "__keyspace@6__:k",
            "plain",
        ]))
        .unwrap();
        assert_eq!(node.count(), 7);
        let matching = |pattern: &str| {
            let mut budget = LISTING_BUDGET;
            let mut names: Vec<String> = node
                .matching(&Glob::new(pattern.as_bytes()), &mut budget)
                .unwrap()
                .into_iter()
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .collect();
            names.sort();
            names
        };
        assert_eq!(matching("tc1:*"), ["tc1:news", "tc1:news:eu"]);
        assert_eq!(matching("tc1:news"), ["tc1:news"]);
        assert_eq!(matching("tc1:*:eu"), ["tc1:news:eu"]);
        assert_eq!(matching("__keyspace@5__:*"), ["__keyspace@5__:k"]);
        assert_eq!(matching("plain"), ["plain"]);
        // A wildcard before the first `:` looks at every group.
        assert_eq!(matching("tc?:news"), ["tc1:news", "tc2:news"]);
        assert!(matching("tc3:*").is_empty());
        assert!(NodeChannels::parse(b":1\r\n").is_none(), "not a listing");
    }

    #[test]
    fn listing_a_nodes_channels_stops_when_its_budget_is_spent() {
        let names: Vec<String> = (0..1000).map(|i| format!("tc1:{}", "a".repeat(100 + i % 7))).collect();
        let node =
            NodeChannels::parse(&listing(&names.iter().map(String::as_str).collect::<Vec<_>>())).unwrap();
        let costly = Glob::new(format!("tc1:{}b", "*a".repeat(40)).as_bytes());
        let mut budget = 1_000;
        assert!(node.matching(&costly, &mut budget).is_none());
        let mut budget = LISTING_BUDGET;
        assert_eq!(node.matching(&Glob::new(b"tc1:*"), &mut budget).unwrap().len(), 1000);
    }

    #[test]
    fn a_sessions_channel_share_is_given_back_when_it_is_dropped() {
        let total = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
        let mut a = ChannelShare::new(total.clone());
        let mut b = ChannelShare::new(total.clone());
        assert_eq!(a.set(10), 10);
        assert_eq!(b.set(5), 15);
        assert_eq!(a.set(3), 8);
        drop(a);
        assert_eq!(total.load(std::sync::atomic::Ordering::Relaxed), 5);
        drop(b);
        assert_eq!(total.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[test]
    fn keyspace_events_are_filtered_by_the_caches_own_flags() {
        let expiry_only = Namespace::new("tc1", 5, 1, "Kx");
        assert!(expiry_only.wants_message(b"__keyspace@5__:k", b"expired"));
        assert!(!expiry_only.wants_message(b"__keyspace@5__:k", b"set"));
        assert!(!expiry_only.wants_message(b"__keyevent@5__:expired", b"k"), "no E flag");
        let all = Namespace::new("tc1", 5, 1, "KEA");
        assert!(all.wants_message(b"__keyevent@5__:set", b"k"));
        assert!(!all.wants_message(b"__keyspace@5__:k", b"keymiss"), "A does not include m");
        assert!(all.wants_message(b"tc1:news", b"hello"), "ordinary channels are not filtered");
    }

    #[test]
    fn glob_matching_follows_valkey() {
        for (p, s, m) in [
            ("*", "anything", true),
            ("news.*", "news.tech", true),
            ("news.*", "sports", false),
            ("h?llo", "hello", true),
            ("h[ae]llo", "hallo", true),
            ("h[^e]llo", "hello", false),
            ("h[a-c]llo", "hbllo", true),
            ("a\\*b", "a*b", true),
            ("a\\*b", "axb", false),
            ("*.*.x", "a.b.x", true),
            ("", "", true),
            ("abc", "ab", false),
        ] {
            assert_eq!(glob_match(p.as_bytes(), s.as_bytes()), m, "{p} ~ {s}");
        }
    }

    /// Valkey's recursive `stringmatchlen_impl` (util.c, with its nesting limit), ported
    /// as literally as Rust allows: the reference the greedy matcher is checked against.
    /// `p`/`s` are positions; reading past the end yields C's terminating NUL.
    fn valkey_match(pattern: &[u8], string: &[u8]) -> bool {
        fn at(b: &[u8], i: usize) -> u8 {
            b.get(i).copied().unwrap_or(0)
        }
        fn imp(pat: &[u8], mut p: usize, st: &[u8], mut s: usize, skip: &mut bool, nesting: u32) -> bool {
            if nesting > 1000 {
                return false;
            }
            let (mut plen, mut slen) = (pat.len() as isize - p as isize, st.len() as isize - s as isize);
            while plen > 0 && slen > 0 {
                match at(pat, p) {
                    b'*' => {
                        while plen > 0 && at(pat, p + 1) == b'*' {
                            p += 1;
                            plen -= 1;
                        }
                        if plen == 1 {
                            return true;
                        }
                        while slen > 0 {
                            if imp(pat, p + 1, st, s, skip, nesting + 1) {
                                return true;
                            }
                            if *skip {
                                return false;
                            }
                            s += 1;
                            slen -= 1;
                        }
                        *skip = true;
                        return false;
                    }
                    b'?' => {
                        s += 1;
                        slen -= 1;
                    }
                    b'[' => {
                        p += 1;
                        plen -= 1;
                        let not = at(pat, p) == b'^';
                        if not {
                            p += 1;
                            plen -= 1;
                        }
                        let mut matched = false;
                        loop {
                            if at(pat, p) == b'\\' && plen >= 2 {
                                p += 1;
                                plen -= 1;
                                matched |= at(pat, p) == st[s];
                            } else if at(pat, p) == b']' {
                                break;
                            } else if plen == 0 {
                                p -= 1;
                                plen += 1;
                                break;
                            } else if plen >= 3 && at(pat, p + 1) == b'-' {
                                let (mut start, mut end) = (at(pat, p) as i8, at(pat, p + 2) as i8);
                                if start > end {
                                    std::mem::swap(&mut start, &mut end);
                                }
                                p += 2;
                                plen -= 2;
                                matched |= (start..=end).contains(&(st[s] as i8));
                            } else {
                                matched |= at(pat, p) == st[s];
                            }
                            p += 1;
                            plen -= 1;
                        }
                        if not {
                            matched = !matched;
                        }
                        if !matched {
                            return false;
                        }
                        s += 1;
                        slen -= 1;
                    }
                    c => {
                        let c = if c == b'\\' && plen >= 2 {
                            p += 1;
                            plen -= 1;
                            at(pat, p)
                        } else {
                            c
                        };
                        if c != st[s] {
                            return false;
                        }
                        s += 1;
                        slen -= 1;
                    }
                }
                p += 1;
                plen -= 1;
                if slen == 0 {
                    while at(pat, p) == b'*' && plen > 0 {
                        p += 1;
                        plen -= 1;
                    }
                    break;
                }
            }
            plen == 0 && slen == 0
        }
        imp(pattern, 0, string, 0, &mut false, 0)
    }

    #[test]
    fn glob_edge_cases_follow_valkey() {
        for (p, s, m) in [
            (&b"*"[..], &b""[..], false),
            (b"", b"", true),
            (b"?*", b"", false),
            (b"[a", b"a", true),
            (b"[a", b"b", false),
            (b"[^", b"x", true),
            (b"[", b"x", false),
            (b"a\\", b"a\\", true),
            (b"[a-]", b"]", true),
            (b"[a-]", b"b", false),
            (b"[]a]", b"a", false),
            (b"[\\]]", b"]", true),
            (b"[\x01-\xff]", b"\x80", false),
            (b"[\x01-\xff]", b"\xff", true),
            (b"[\x7f-\x81]", b"\x80", false),
            (b"[\x7f-\x81]", b"a", true),
            (b"a*", b"a", true),
            (b"a**b", b"ab", true),
            (b"*a*", b"bab", true),
            (b"*a*b", b"ba", false),
        ] {
            assert_eq!(valkey_match(p, s), m, "reference: {p:?} ~ {s:?}");
            assert_eq!(glob_match(p, s), m, "{p:?} ~ {s:?}");
        }
    }

    #[test]
    fn a_1001st_star_that_is_not_the_last_character_matches_nothing() {
        for k in [999, 1000, 1001] {
            let ending_b = [b"*a".repeat(k), b"b".to_vec()].concat();
            let trailing = [b"*a".repeat(k), b"*".to_vec()].concat();
            let s = [b"a".repeat(k), b"b".to_vec()].concat();
            // As measured on Valkey 9.1: up to 1000 star groups match; a 1001st only at the end.
            assert_eq!(glob_match(&ending_b, &s), k <= 1000, "{k}");
            assert_eq!(glob_match(&trailing, &s), k <= 1000, "{k}");
            assert_eq!(glob_match(&trailing, &b"a".repeat(k)), k <= 1000, "{k}");
            assert_eq!(valkey_match(&ending_b, &s), k <= 1000, "{k}");
        }
    }

    #[test]
    fn matching_costs_at_most_the_string_times_the_longest_segment() {
        // The classic worst cases of backtracking matchers: many stars, or a long segment
        // that almost matches everywhere.
        let s = b"a".repeat(100_000);
        let many_stars = [b"*a".repeat(500), b"*b".to_vec()].concat();
        let mut budget = u64::MAX;
        assert_eq!(Glob::new(&many_stars).matches_within(&s, &mut budget), Some(false));
        let spent = u64::MAX - budget;
        assert!(spent < s.len() as u64, "literal segments are searched linearly: {spent} steps");
        let long_segment = [b"*".to_vec(), b"a?".repeat(100), b"b*".to_vec()].concat();
        let mut budget = u64::MAX;
        assert_eq!(Glob::new(&long_segment).matches_within(&s, &mut budget), Some(false));
        let spent = u64::MAX - budget;
        assert!(spent <= 201 * s.len() as u64, "{spent} steps");
        // A budget stops it.
        let mut budget = 1000;
        assert_eq!(Glob::new(&long_segment).matches_within(&s, &mut budget), None);
        let started = std::time::Instant::now();
        let huge = [b"*".to_vec(), b"a".repeat(1 << 20), b"b".to_vec()].concat();
        assert!(!glob_match(&huge, &b"a".repeat(1 << 21)));
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(20_000))]
        #[test]
        fn greedy_matching_agrees_with_valkeys_recursion(
            p in proptest::collection::vec(proptest::sample::select(b"ab*?[]^-\\\x80\xff".to_vec()), 0..10),
            s in proptest::collection::vec(proptest::sample::select(b"ab]-\\*\x80\xff".to_vec()), 0..8),
        ) {
            proptest::prop_assert_eq!(glob_match(&p, &s), valkey_match(&p, &s), "{:?} ~ {:?}", p, s);
        }
    }

    #[test]
    fn channels_are_prefixed_and_stripped() {
        let ns = Namespace::new("tc1", 5, 2, "KEA");
        assert_eq!(ns.to_upstream(b"news"), b"tc1:news");
        assert_eq!(ns.to_upstream(b"*"), b"tc1:*");
        assert_eq!(ns.from_upstream(b"tc1:news"), b"news");
        assert_eq!(ns.to_upstream(b"__keyspace@1__:k"), b"__keyspace@6__:k");
        assert_eq!(ns.from_upstream(b"__keyevent@5__:set"), b"__keyevent@0__:set");
        // A database the cache does not have is just a channel name in its namespace.
        assert_eq!(ns.to_upstream(b"__keyspace@2__:k"), b"tc1:__keyspace@2__:k");
        let quiet = Namespace::new("tc1", 5, 2, "");
        assert_eq!(quiet.to_upstream(b"__keyspace@1__:k"), b"tc1:__keyspace@1__:k", "notifications off");
        let mut msg =
            vec![Value::bulk("pmessage"), Value::bulk("tc1:n*"), Value::bulk("tc1:news"), Value::bulk("hi")];
        assert!(ns.rewrite_message(&mut msg));
        assert_eq!(msg[1], Value::bulk("n*"));
        assert_eq!(msg[2], Value::bulk("news"));
        assert_eq!(msg[3], Value::bulk("hi"));
    }
}
