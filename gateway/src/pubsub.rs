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

/// Glob matching as Valkey's `stringmatchlen`: `*`, `?`, `[abc]`, `[^a-z]`, `\` escapes.
pub fn glob_match(pattern: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let (mut star_p, mut star_i) = (None, 0);
    while i < s.len() {
        let matched_one = match pattern.get(p) {
            Some(b'*') => {
                star_p = Some(p);
                star_i = i;
                p += 1;
                continue;
            }
            Some(b'?') => Some(p + 1),
            Some(b'[') => match_class(pattern, p, s[i]),
            Some(b'\\') if p + 1 < pattern.len() => (pattern[p + 1] == s[i]).then_some(p + 2),
            Some(&c) => (c == s[i]).then_some(p + 1),
            None => None,
        };
        match (matched_one, star_p) {
            (Some(next), _) => {
                p = next;
                i += 1;
            }
            (None, Some(sp)) => {
                p = sp + 1;
                star_i += 1;
                i = star_i;
            }
            (None, None) => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Matches `c` against the class starting at `pattern[p] == '['`; the index after the class.
fn match_class(pattern: &[u8], p: usize, c: u8) -> Option<usize> {
    let mut j = p + 1;
    let negate = pattern.get(j) == Some(&b'^');
    if negate {
        j += 1;
    }
    let mut hit = false;
    while j < pattern.len() && pattern[j] != b']' {
        if pattern[j] == b'\\' && j + 1 < pattern.len() {
            hit |= pattern[j + 1] == c;
            j += 2;
        } else if j + 2 < pattern.len() && pattern[j + 1] == b'-' && pattern[j + 2] != b']' {
            let (lo, hi) = (pattern[j].min(pattern[j + 2]), pattern[j].max(pattern[j + 2]));
            hit |= (lo..=hi).contains(&c);
            j += 3;
        } else {
            hit |= pattern[j] == c;
            j += 1;
        }
    }
    (hit != negate).then_some(j + 1)
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
