//! Reading and writing RDB files that a real valkey-server writes and loads.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use common::{Conn, Server, TempDir, Value};
use shoal_rdb::{dump_payload, Entry, Error, Header, Reader, Writer};

/// Fills `db` of the server with one or more keys of every type and encoding. `p` prefixes the
/// key names; `shared` exists in both databases with different values.
fn populate(c: &mut Conn, db: u32, p: &str) {
    c.ok(&["SELECT", &db.to_string()]);
    let k = |name: &str| format!("{p}{name}");
    // Strings: int-encoded, 64-bit int as text, plain, LZF-compressible, and keys that are
    // themselves int- and LZF-encoded in the file.
    c.ok(&["SET", &k("str:int"), "12345"]);
    c.ok(&["SET", &k("str:neg"), "-7"]);
    c.ok(&["SET", &k("str:i64"), "1234567890123"]);
    c.ok(&["SET", &k("str:plain"), "Zq8!vN2@rT5#wK9$mL3%pX7^bH4&jC6*"]);
    c.ok(&["SET", &k("str:lzf"), &"compress-me-please;".repeat(20)]);
    c.ok(&["SET", &format!("{}", 4242 + db), "int key"]);
    c.ok(&["SET", &format!("{p}{}", "long-compressible-key-".repeat(6)), "lzf key"]);
    c.ok(&["SET", "shared", &format!("shared in db {db}")]);
    // Lists: small (one listpack node) and large (several nodes).
    c.ok(&["RPUSH", &k("list:small"), "a", "b", "1", "2", "c"]);
    let big: Vec<String> = (0..300).map(|i| format!("element-{i}-{}", "x".repeat(i % 40))).collect();
    let mut args = vec!["RPUSH".to_string(), k("list:big")];
    args.extend(big.iter().cloned());
    c.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // Sets: intset, listpack, hash table.
    c.ok(&["SADD", &k("set:int"), "1", "2", "3", "100000", "-5"]);
    c.ok(&["SADD", &k("set:lp"), "apple", "banana", "cherry"]);
    let mut args = vec!["SADD".to_string(), k("set:ht")];
    args.extend((0..200).map(|i| format!("member-{i}")));
    c.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // Sorted sets: listpack and skiplist (with an infinite score).
    c.ok(&["ZADD", &k("zset:small"), "1", "one", "2.5", "two", "-inf", "low"]);
    let mut args = vec!["ZADD".to_string(), k("zset:big")];
    for i in 0..200 {
        args.push(format!("{}", i as f64 * 1.5));
        args.push(format!("zmember-{i}"));
    }
    args.extend(["+inf".to_string(), "top".to_string()]);
    c.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // Hashes: listpack and hash table.
    c.ok(&["HSET", &k("hash:small"), "f1", "v1", "f2", "2"]);
    let mut args = vec!["HSET".to_string(), k("hash:big")];
    for i in 0..600 {
        args.push(format!("field-{i}"));
        args.push(format!("value-{i}-{}", "y".repeat(i % 30)));
    }
    c.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // Hashes with field TTLs (Valkey 9).
    c.ok(&["HSET", &k("hash:ttl"), "keep", "1", "expiring", "2", "other", "3"]);
    assert_eq!(c.ok(&["HEXPIRE", &k("hash:ttl"), "1000", "FIELDS", "1", "expiring"]).array().len(), 1);
    c.ok(&["HSETEX", &k("hash:setex"), "EX", "500", "FIELDS", "2", "a", "1", "b", "2"]);
    // Streams: several nodes, a consumer group with two consumers and pending entries.
    let s = k("stream");
    for i in 0..250 {
        c.ok(&["XADD", &s, "*", "n", &i.to_string(), "payload", "some text"]);
    }
    let first = c.ok(&["XRANGE", &s, "-", "+", "COUNT", "1"]).array()[0].array()[0].bytes_str();
    c.ok(&["XDEL", &s, &first]);
    c.ok(&["XGROUP", "CREATE", &s, "group1", "0"]);
    c.ok(&["XREADGROUP", "GROUP", "group1", "alice", "COUNT", "3", "STREAMS", &s, ">"]);
    c.ok(&["XREADGROUP", "GROUP", "group1", "bob", "COUNT", "2", "STREAMS", &s, ">"]);
    c.ok(&["XGROUP", "CREATE", &s, "group2", "$"]);
    c.ok(&["XADD", &k("stream:small"), "1-1", "a", "b"]);
    // HyperLogLog, GEO, bitmap.
    c.ok(&["PFADD", &k("hll"), "a", "b", "c", "d"]);
    c.ok(&["GEOADD", &k("geo"), "13.361389", "38.115556", "Palermo", "15.087269", "37.502669", "Catania"]);
    c.ok(&["SETBIT", &k("bitmap"), "1000", "1"]);
    // Keys with TTLs.
    c.ok(&["SET", &k("ttl:str"), "v", "PX", "600000"]);
    c.ok(&["EXPIRE", &k("list:small"), "3600"]);
    c.ok(&["PEXPIRE", &k("set:ht"), "7200000"]);
    c.ok(&["EXPIRE", &k("hash:ttl"), "86400"]);
}

trait BulkStr {
    fn bytes_str(&self) -> String;
}

impl BulkStr for Value {
    fn bytes_str(&self) -> String {
        String::from_utf8(self.bytes()).unwrap()
    }
}

/// Populates db 0 and db 3 of a fresh server, saves, and returns the server and the dump path.
fn saved_server(dir: &Path) -> Server {
    let server = Server::start(dir, "dump.rdb");
    let mut c = server.conn();
    populate(&mut c, 0, "");
    populate(&mut c, 3, "three:");
    c.ok(&["FUNCTION", "LOAD", "#!lua name=mylib\nserver.register_function('f1', function() return 1 end)"]);
    assert_eq!(c.ok(&["SAVE"]), Value::Simple("OK".into()));
    server
}

/// AUX fields as the reader returns them.
type Aux = Vec<(Vec<u8>, Vec<u8>)>;

fn read_all(path: &Path) -> (Header, Aux, Vec<Entry>) {
    let mut r = Reader::new(File::open(path).unwrap()).unwrap();
    let mut entries = Vec::new();
    while let Some(e) = r.next_entry().unwrap() {
        entries.push(e);
    }
    assert_eq!(r.bytes_read(), std::fs::metadata(path).unwrap().len());
    (r.header().clone(), r.aux().to_vec(), entries)
}

fn write_file(path: &Path, header: &Header, aux: &[(Vec<u8>, Vec<u8>)], entries: &[Entry]) {
    let mut w = Writer::new(File::create(path).unwrap(), header, aux).unwrap();
    for e in entries {
        w.entry(e).unwrap();
    }
    w.finish().unwrap().sync_all().unwrap();
}

fn select(c: &mut Conn, db: u32) {
    c.ok(&["SELECT", &db.to_string()]);
}

fn dump(c: &mut Conn, key: &[u8]) -> Vec<u8> {
    c.cmd_bytes(&[b"DUMP", key]).bytes()
}

fn pttl(c: &mut Conn, key: &[u8]) -> i64 {
    c.cmd_bytes(&[b"PTTL", key]).int()
}

/// All keys of `db`, sorted.
fn keys(c: &mut Conn, db: u32) -> Vec<Vec<u8>> {
    select(c, db);
    let mut k: Vec<Vec<u8>> = c.ok(&["KEYS", "*"]).array().iter().map(Value::bytes).collect();
    k.sort();
    k
}

/// Asserts that `dst` db `dst_db` holds exactly `entries` (taken from `src` db `src_db`): the
/// same keys, byte-identical DUMPs, and PTTLs within a second.
fn assert_same(src: &mut Conn, src_db: u32, dst: &mut Conn, dst_db: u32, entries: &[&Entry]) {
    let mut want: Vec<Vec<u8>> = entries.iter().map(|e| e.key.clone()).collect();
    want.sort();
    assert_eq!(keys(dst, dst_db), want, "keys of db {dst_db}");
    select(src, src_db);
    select(dst, dst_db);
    for e in entries {
        let name = String::from_utf8_lossy(&e.key);
        assert_same_dump(&dump(src, &e.key), &dump(dst, &e.key), &name);
        let (a, b) = (pttl(src, &e.key), pttl(dst, &e.key));
        assert!(a > 0 || a == b, "PTTL of {name}: {a} vs {b}");
        assert!((a - b).abs() <= 1000, "PTTL of {name}: {a} vs {b}");
    }
}

/// Asserts two DUMP payloads are byte-identical, except for hash-table encoded sets and
/// hashes (types 2, 4 and 22): their DUMP lists elements in the table's iteration order, which
/// differs between two server processes even when both load the same file (so also with a fixed
/// `hash-seed`). For those the payloads must hold the same type, RDB version, element count and
/// the same serialized elements, in any order.
fn assert_same_dump(a: &[u8], b: &[u8], name: &str) {
    if a == b {
        return;
    }
    assert_eq!(a.len(), b.len(), "DUMP length of {name}");
    let per_element = match a[0] {
        2 => 1,
        4 => 2,
        22 => 3,
        t => panic!("DUMP of {name} (type {t}) differs:\n{a:?}\n{b:?}"),
    };
    let (ea, eb) = (dump_elements(a, per_element), dump_elements(b, per_element));
    assert_eq!(ea.0, eb.0, "DUMP header of {name}");
    let (mut xa, mut xb) = (ea.1, eb.1);
    xa.sort();
    xb.sort();
    assert_eq!(xa, xb, "DUMP elements of {name}");
    assert_eq!(a[a.len() - 10..a.len() - 8], b[b.len() - 10..b.len() - 8], "RDB version in DUMP of {name}");
}

/// Splits the DUMP of a type 2/4/22 object into its header (type byte and count bytes) and its
/// elements, each the serialized bytes of `per_element` strings (type 22 adds an 8-byte TTL).
fn dump_elements(p: &[u8], per_element: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
    let body = &p[..p.len() - 10];
    let mut at = 1;
    let count = read_len(body, &mut at);
    let header = body[..at].to_vec();
    let mut out = Vec::new();
    for _ in 0..count {
        let start = at;
        for _ in 0..per_element.min(2) {
            skip_string(body, &mut at);
        }
        if per_element == 3 {
            at += 8;
        }
        out.push(body[start..at].to_vec());
    }
    assert_eq!(at, body.len(), "DUMP body fully consumed");
    (header, out)
}

fn read_len(b: &[u8], at: &mut usize) -> u64 {
    let first = b[*at];
    *at += 1;
    match first >> 6 {
        0 => u64::from(first & 0x3f),
        1 => {
            *at += 1;
            (u64::from(first & 0x3f) << 8) | u64::from(b[*at - 1])
        }
        2 => {
            let n = if first == 0x80 { 4 } else { 8 };
            let v = b[*at..*at + n].iter().fold(0u64, |acc, x| acc << 8 | u64::from(*x));
            *at += n;
            v
        }
        _ => 0xC0 | u64::from(first & 0x3f), // an encoded string marker
    }
}

fn skip_string(b: &[u8], at: &mut usize) {
    match read_len(b, at) {
        0xC0 => *at += 1,
        0xC1 => *at += 2,
        0xC2 => *at += 4,
        0xC3 => {
            let clen = read_len(b, at);
            read_len(b, at);
            *at += clen as usize;
        }
        n => *at += n as usize,
    }
}

#[test]
fn round_trip_every_type() {
    let dir1 = TempDir::new("src");
    let server1 = saved_server(dir1.path());
    let (header, aux, entries) = read_all(&dir1.path().join("dump.rdb"));
    assert_eq!(header.magic, *b"VALKEY080");
    assert_eq!(header.version(), 80);
    assert!(aux.iter().any(|(k, _)| k == b"ctime"), "aux: {aux:?}");
    assert!(aux.iter().any(|(k, v)| k == b"valkey-ver" && v.starts_with(b"9.")), "aux: {aux:?}");

    // Every type the server wrote is in there, in the right databases.
    let by_key: BTreeMap<(u32, Vec<u8>), &Entry> =
        entries.iter().map(|e| ((e.db, e.key.clone()), e)).collect();
    assert_eq!(by_key.len(), entries.len());
    let ty = |db: u32, k: &str| by_key[&(db, k.as_bytes().to_vec())].value_type;
    assert_eq!(ty(0, "str:int"), 0);
    assert_eq!(ty(0, "list:big"), 18);
    assert_eq!(ty(0, "set:int"), 11);
    assert_eq!(ty(0, "set:lp"), 20);
    assert_eq!(ty(0, "set:ht"), 2);
    assert_eq!(ty(0, "zset:small"), 17);
    assert_eq!(ty(3, "three:zset:big"), 5);
    assert_eq!(ty(0, "hash:small"), 16);
    assert_eq!(ty(0, "hash:big"), 4);
    assert_eq!(ty(0, "hash:ttl"), 22);
    assert_eq!(ty(3, "three:hash:setex"), 22);
    assert_eq!(ty(0, "stream"), 21);
    assert!(by_key.contains_key(&(0, b"4242".to_vec())));
    assert!(by_key.contains_key(&(3, b"4245".to_vec())));
    assert!(by_key.contains_key(&(3, format!("three:{}", "long-compressible-key-".repeat(6)).into_bytes())));
    assert_eq!(by_key[&(3, b"shared".to_vec())].db, 3);
    assert!(by_key[&(0, b"ttl:str".to_vec())].expire_ms.is_some());
    assert!(by_key[&(0, b"str:int".to_vec())].expire_ms.is_none());

    // Write every entry to a new file and load it in a second server.
    let dir2 = TempDir::new("dst");
    write_file(&dir2.path().join("copy.rdb"), &header, &aux, &entries);
    let server2 = Server::start(dir2.path(), "copy.rdb");
    let (mut c1, mut c2) = (server1.conn(), server2.conn());
    for db in [0, 3] {
        let in_db: Vec<&Entry> = entries.iter().filter(|e| e.db == db).collect();
        assert_eq!(keys(&mut c1, db), keys(&mut c2, db));
        assert_same(&mut c1, db, &mut c2, db, &in_db);
    }
    for db in (1..16).filter(|d| *d != 3) {
        select(&mut c2, db);
        assert_eq!(c2.ok(&["DBSIZE"]).int(), 0, "db {db}");
    }

    // The same entries (without the Valkey-only hash type) under a REDIS0011 header load too.
    let dir3 = TempDir::new("redis11");
    let legacy: Vec<Entry> = entries.iter().filter(|e| e.value_type != 22).cloned().collect();
    write_file(&dir3.path().join("legacy.rdb"), &Header::REDIS_11, &[], &legacy);
    let server3 = Server::start(dir3.path(), "legacy.rdb");
    let mut c3 = server3.conn();
    for db in [0, 3] {
        let in_db: Vec<&Entry> = legacy.iter().filter(|e| e.db == db).collect();
        assert_same(&mut c1, db, &mut c3, db, &in_db);
    }
}

#[test]
fn filter_and_renumber() {
    let dir1 = TempDir::new("src");
    let server1 = saved_server(dir1.path());
    let (header, aux, entries) = read_all(&dir1.path().join("dump.rdb"));
    let kept: Vec<Entry> =
        entries.iter().filter(|e| e.db == 3).map(|e| Entry { db: 0, ..e.clone() }).collect();
    assert!(kept.len() > 20);

    let dir2 = TempDir::new("dst");
    write_file(&dir2.path().join("db3.rdb"), &header, &aux, &kept);
    let server2 = Server::start(dir2.path(), "db3.rdb");
    let (mut c1, mut c2) = (server1.conn(), server2.conn());
    assert_same(&mut c1, 3, &mut c2, 0, &kept.iter().collect::<Vec<_>>());
    select(&mut c2, 0);
    assert_eq!(c2.ok(&["GET", "shared"]).bytes(), b"shared in db 3");
    for db in 1..16 {
        select(&mut c2, db);
        assert_eq!(c2.ok(&["DBSIZE"]).int(), 0, "db {db}");
    }
}

#[test]
fn dump_payload_restores() {
    let dir = TempDir::new("restore");
    let server = saved_server(dir.path());
    let (header, _, entries) = read_all(&dir.path().join("dump.rdb"));
    let version = header.version() as u16;
    let mut c = server.conn();
    for e in &entries {
        select(&mut c, e.db);
        let payload = dump_payload(e, version);
        let mut fresh = b"restored:".to_vec();
        fresh.extend_from_slice(&e.key);
        let r = c.cmd_bytes(&[b"RESTORE", &fresh, b"0", &payload]);
        assert_eq!(r, Value::Simple("OK".into()), "RESTORE of {}", String::from_utf8_lossy(&e.key));
        let (restored, original) = (dump(&mut c, &fresh), dump(&mut c, &e.key));
        assert_same_dump(&restored, &original, &String::from_utf8_lossy(&e.key));
    }
    // And the server's own DUMP equals ours for the same key.
    select(&mut c, 0);
    let e = entries.iter().find(|e| e.db == 0 && e.key == b"hash:small").unwrap();
    assert_eq!(dump(&mut c, b"hash:small"), dump_payload(e, version));
}

fn read_to_end(bytes: &[u8]) -> Result<usize, Error> {
    let mut r = Reader::new(bytes)?;
    let mut n = 0;
    while r.next_entry()?.is_some() {
        n += 1;
    }
    Ok(n)
}

#[test]
fn damaged_files() {
    let dir = TempDir::new("damaged");
    let _server = saved_server(dir.path());
    let file = std::fs::read(dir.path().join("dump.rdb")).unwrap();
    assert!(read_to_end(&file).unwrap() > 40);

    // Truncated anywhere: Truncated (or Checksum), never a panic or Ok.
    let len = file.len();
    let mut cuts: Vec<usize> =
        vec![5, 9, 10, 20, len / 4, len / 3, len / 2, len - 9, len - 8, len - 4, len - 1];
    cuts.extend((0..len).step_by(97));
    for cut in cuts {
        match read_to_end(&file[..cut]) {
            Err(Error::Truncated | Error::Checksum) => {}
            Err(Error::NotRdb) if cut == 0 => {}
            other => panic!("cut at {cut} of {len}: {other:?}"),
        }
    }

    // A flipped byte inside a string's data: the structure parses, the checksum does not match.
    let needle = b"Zq8!vN2@rT5#wK9$";
    let at = file.windows(needle.len()).position(|w| w == needle).unwrap() + 5;
    let mut flipped = file.clone();
    flipped[at] ^= 0x20;
    assert!(matches!(read_to_end(&flipped), Err(Error::Checksum)));

    // A flipped byte anywhere is an error of some kind, never a panic or Ok.
    for at in (9..len).step_by(13) {
        let mut flipped = file.clone();
        flipped[at] ^= 0x5a;
        let r = read_to_end(&flipped);
        assert!(r.is_err(), "flip at {at}: {r:?}");
        let msg = r.unwrap_err().to_string();
        assert!(!msg.is_empty());
    }

    // Not an RDB file at all.
    let text = b"# Valkey configuration\nport 6379\nsave \"\"\n";
    assert!(matches!(Reader::new(&text[..]), Err(Error::NotRdb)));
    assert_eq!(Reader::new(&text[..]).err().unwrap().to_string(), "not an RDB file");
    assert_eq!(Error::Truncated.to_string(), "the RDB file is truncated");
    assert_eq!(Error::Checksum.to_string(), "RDB checksum mismatch: the file is corrupt");
}
