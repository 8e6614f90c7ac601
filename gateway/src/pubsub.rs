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
}

const KEYSPACE: &[u8] = b"__keyspace@";
const KEYEVENT: &[u8] = b"__keyevent@";

impl Namespace {
    pub fn new(acl_user: &str, first_db: u32, databases: u32) -> Self {
        Namespace { prefix: format!("{acl_user}:").into_bytes(), first_db, databases }
    }

    /// A channel or pattern as the client wrote it → as Valkey should see it.
    pub fn to_upstream(&self, name: &[u8]) -> Vec<u8> {
        if let Some((kind, db, rest)) = split_keyspace(name) {
            if db < self.databases as u64 {
                return [kind, (self.first_db as u64 + db).to_string().as_bytes(), b"__:", rest].concat();
            }
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
    fn channels_are_prefixed_and_stripped() {
        let ns = Namespace::new("tc1", 5, 2);
        assert_eq!(ns.to_upstream(b"news"), b"tc1:news");
        assert_eq!(ns.to_upstream(b"*"), b"tc1:*");
        assert_eq!(ns.from_upstream(b"tc1:news"), b"news");
        assert_eq!(ns.to_upstream(b"__keyspace@1__:k"), b"__keyspace@6__:k");
        assert_eq!(ns.from_upstream(b"__keyevent@5__:set"), b"__keyevent@0__:set");
        // A database the cache does not have is just a channel name in its namespace.
        assert_eq!(ns.to_upstream(b"__keyspace@2__:k"), b"tc1:__keyspace@2__:k");
        let mut msg =
            vec![Value::bulk("pmessage"), Value::bulk("tc1:n*"), Value::bulk("tc1:news"), Value::bulk("hi")];
        assert!(ns.rewrite_message(&mut msg));
        assert_eq!(msg[1], Value::bulk("n*"));
        assert_eq!(msg[2], Value::bulk("news"));
        assert_eq!(msg[3], Value::bulk("hi"));
    }
}
