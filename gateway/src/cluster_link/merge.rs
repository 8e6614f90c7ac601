//! One reply from the replies of a command that went to several nodes ([`Merge`]).
//! Replies are Valkey's own, so they are read with the gateway's reply scanner; anything
//! unexpected gives the first part back as it came.

use super::plan::{next_scan_cursor, Merge};
use crate::resp::reply::ReplyScanner;
use crate::resp::{find_crlf, parse_int};
use bytes::{BufMut, Bytes, BytesMut};

pub fn merge(how: &Merge, parts: Vec<Bytes>) -> Bytes {
    if let Some(err) = parts.iter().find(|p| matches!(p.first(), Some(b'-' | b'!'))) {
        return err.clone();
    }
    let merged = match how {
        Merge::First => None,
        Merge::AllOk => Some(Bytes::from_static(b"+OK\r\n")),
        Merge::Sum => {
            parts.iter().map(|p| integer(p)).sum::<Option<i64>>().map(|n| Bytes::from(format!(":{n}\r\n")))
        }
        Merge::Concat => concat(&parts),
        Merge::AnyNonNull => {
            let found: Vec<&Bytes> = parts.iter().filter(|p| !is_null(p)).collect();
            use rand::Rng;
            found.get(rand::thread_rng().gen_range(0..found.len().max(1))).map(|p| (*p).clone())
        }
        Merge::AllTrue => all_true(&parts),
        Merge::Values { positions, keys } => values(&parts, positions, *keys),
        Merge::Scan { shard, shards } => scan(&parts[0], *shard, *shards),
    };
    merged.unwrap_or_else(|| parts.into_iter().next().unwrap_or_default())
}

fn integer(reply: &[u8]) -> Option<i64> {
    let cr = find_crlf(reply, 1)?;
    (reply.first() == Some(&b':')).then(|| parse_int(&reply[1..cr]))?
}

fn is_null(reply: &[u8]) -> bool {
    reply == b"$-1\r\n" || reply == b"_\r\n" || reply == b"*-1\r\n"
}

/// The elements of an array reply: its header's length and each element's bytes.
fn elements(reply: &[u8]) -> Option<Vec<&[u8]>> {
    if !matches!(reply.first(), Some(b'*' | b'~')) {
        return None;
    }
    let cr = find_crlf(reply, 1)?;
    let n = parse_int(&reply[1..cr])?;
    let mut at = cr + 2;
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n.max(0) {
        let len = ReplyScanner::new().next(&reply[at..]).ok()??.len;
        out.push(&reply[at..at + len]);
        at += len;
    }
    Some(out)
}

fn array(kind: u8, items: &[&[u8]]) -> Bytes {
    let mut out = BytesMut::with_capacity(16 + items.iter().map(|i| i.len()).sum::<usize>());
    out.put_u8(kind);
    out.extend_from_slice(format!("{}\r\n", items.len()).as_bytes());
    for item in items {
        out.extend_from_slice(item);
    }
    out.freeze()
}

fn concat(parts: &[Bytes]) -> Option<Bytes> {
    let mut all = Vec::new();
    for p in parts {
        all.extend(elements(p)?);
    }
    Some(array(parts.first()?[0], &all))
}

fn all_true(parts: &[Bytes]) -> Option<Bytes> {
    let lists: Vec<Vec<&[u8]>> = parts.iter().map(|p| elements(p)).collect::<Option<_>>()?;
    let first = lists.first()?;
    let items: Vec<&[u8]> = (0..first.len())
        .map(|i| {
            if lists.iter().all(|l| l.get(i) == Some(&&b":1\r\n"[..])) {
                &b":1\r\n"[..]
            } else {
                &b":0\r\n"[..]
            }
        })
        .collect();
    Some(array(parts[0][0], &items))
}

fn values(parts: &[Bytes], positions: &[Vec<usize>], keys: usize) -> Option<Bytes> {
    let mut slots: Vec<&[u8]> = vec![&b"$-1\r\n"[..]; keys];
    for (part, at) in parts.iter().zip(positions) {
        for (value, &i) in elements(part)?.into_iter().zip(at) {
            *slots.get_mut(i)? = value;
        }
    }
    Some(array(b'*', &slots))
}

/// `[cursor, [keys…]]` with the node's cursor made the client's.
fn scan(reply: &[u8], shard: usize, shards: usize) -> Option<Bytes> {
    let items = elements(reply)?;
    let cursor_reply = items.first()?;
    let cr = find_crlf(cursor_reply, 1)?;
    let body = &cursor_reply[cr + 2..cursor_reply.len() - 2];
    let node: u64 = std::str::from_utf8(body).ok()?.parse().ok()?;
    let cursor = next_scan_cursor(node, shard, shards).to_string();
    let cursor = format!("${}\r\n{cursor}\r\n", cursor.len());
    Some(array(b'*', &[cursor.as_bytes(), items.get(1)?]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn counts_add_up_and_errors_win() {
        assert_eq!(merge(&Merge::Sum, vec![b(":2\r\n"), b(":3\r\n")]), b(":5\r\n"));
        assert_eq!(merge(&Merge::Sum, vec![b(":2\r\n"), b("-ERR x\r\n")]), b("-ERR x\r\n"));
    }

    #[test]
    fn values_come_back_in_the_order_of_the_keys() {
        let how = Merge::Values { positions: vec![vec![0, 2], vec![1]], keys: 3 };
        let merged = merge(&how, vec![b("*2\r\n$1\r\na\r\n$-1\r\n"), b("*1\r\n$1\r\nb\r\n")]);
        assert_eq!(merged, b("*3\r\n$1\r\na\r\n$1\r\nb\r\n$-1\r\n"));
    }

    #[test]
    fn arrays_join_and_scan_cursors_are_rewritten() {
        assert_eq!(
            merge(&Merge::Concat, vec![b("*1\r\n$1\r\na\r\n"), b("*0\r\n"), b("*1\r\n$1\r\nb\r\n")]),
            b("*2\r\n$1\r\na\r\n$1\r\nb\r\n")
        );
        let how = Merge::Scan { shard: 1, shards: 3 };
        assert_eq!(
            merge(&how, vec![b("*2\r\n$1\r\n0\r\n*1\r\n$1\r\nk\r\n")]),
            b("*2\r\n$1\r\n2\r\n*1\r\n$1\r\nk\r\n")
        );
        let how = Merge::Scan { shard: 2, shards: 3 };
        assert_eq!(merge(&how, vec![b("*2\r\n$1\r\n5\r\n*0\r\n")]), b("*2\r\n$4\r\n5122\r\n*0\r\n"));
    }

    #[test]
    fn scripts_exist_only_where_every_node_has_them() {
        let merged = merge(&Merge::AllTrue, vec![b("*2\r\n:1\r\n:1\r\n"), b("*2\r\n:1\r\n:0\r\n")]);
        assert_eq!(merged, b("*2\r\n:1\r\n:0\r\n"));
    }
}
