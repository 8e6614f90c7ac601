//! Snapshots through the REST API with real clients: every data type round trips into a new
//! cache with its TTLs; a snapshot under writes is one consistent point; the exported RDB
//! opens in a plain valkey-server and holds this cache alone; imports of RDB files written
//! by a plain valkey-server, and bad files refused with nothing changed; a corrupt snapshot
//! refused at restore; the final snapshot of a delete; the daily window and retention; the
//! snapshot line of the invoice; and S3-compatible storage (moto's server).

use crate::support::{free_port, shared, PlainValkey, Proc, ShoalDev};
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

type Conn = redis::aio::MultiplexedConnection;

async fn cache(dev: &ShoalDev, name: &str, extra: Value) -> (String, String) {
    let mut body = json!({ "name": name });
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let (status, body) = dev.api(Method::POST, "/v1/caches", Some(body)).await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let token = dev.mint_token(&id).await;
    (id, token)
}

fn unique(name: &str) -> String {
    format!("{name}-{}", &hex::encode(rand_bytes())[..8])
}

fn rand_bytes() -> [u8; 8] {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    ((nanos as u64) ^ (std::process::id() as u64) << 32).to_le_bytes()
}

/// Takes a snapshot of `cache` and waits until it is available; returns it.
async fn snapshot(dev: &ShoalDev, cache: &str, name: Option<&str>) -> Value {
    let body = name.map(|n| json!({ "name": n }));
    let (status, started) = dev.api(Method::POST, &format!("/v1/caches/{cache}/snapshots"), body).await;
    assert_eq!(status, 202, "{started}");
    assert_eq!(started["status"], "creating");
    wait_available(dev, started["id"].as_str().unwrap()).await
}

async fn wait_available(dev: &ShoalDev, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, s) = dev.api(Method::GET, &format!("/v1/snapshots/{id}"), None).await;
        assert_eq!(status, 200, "{s}");
        match s["status"].as_str().unwrap() {
            "available" => return s,
            "failed" => panic!("snapshot failed: {s}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "snapshot not available in 60 s: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn q<T: redis::FromRedisValue>(c: &mut Conn, args: &[&str]) -> T {
    let mut cmd = redis::cmd(args[0]);
    cmd.arg(&args[1..]);
    cmd.query_async(c).await.unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// A key's value, comparable across servers: its DUMP, except for a set stored as a hash
/// table, whose DUMP lists the members in an order that differs between any two processes
/// (even loading the same file): its sorted members.
async fn value(c: &mut Conn, key: &[u8]) -> Vec<u8> {
    let kind: String = redis::cmd("TYPE").arg(key).query_async(c).await.unwrap();
    let encoding: String = redis::cmd("OBJECT").arg("ENCODING").arg(key).query_async(c).await.unwrap();
    if kind == "set" && encoding == "hashtable" {
        let mut members: Vec<Vec<u8>> = redis::cmd("SMEMBERS").arg(key).query_async(c).await.unwrap();
        members.sort();
        return members.join(&b'\n');
    }
    redis::cmd("DUMP").arg(key).query_async(c).await.unwrap()
}

/// Every key of database `db` of the cache behind `c`: its [`value`] and PTTL.
async fn contents(c: &mut Conn, db: u32) -> BTreeMap<Vec<u8>, (Vec<u8>, i64)> {
    let _: () = q(c, &["SELECT", &db.to_string()]).await;
    let keys: Vec<Vec<u8>> = q(c, &["KEYS", "*"]).await;
    let mut out = BTreeMap::new();
    for key in keys {
        let value = value(c, &key).await;
        let pttl: i64 = redis::cmd("PTTL").arg(&key).query_async(c).await.unwrap();
        out.insert(key, (value, pttl));
    }
    let _: () = q(c, &["SELECT", "0"]).await;
    out
}

/// Every data type, in databases 0 and 1; hash tags keep a cluster pool's multi-key
/// commands in one slot.
async fn fill_every_type(c: &mut Conn) {
    let big = "x".repeat(5000);
    let members: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
    let mut setup: Vec<Vec<String>> = vec![
        vec!["SET".into(), "str:int".into(), "12345".into()],
        vec!["SET".into(), "str:big".into(), big.clone()],
        vec!["SET".into(), "str:ttl".into(), "v".into(), "EX".into(), "600".into()],
        vec!["HSET".into(), "hash:small".into(), "a".into(), "1".into(), "b".into(), "2".into()],
        vec!["HSET".into(), "hash:ttl".into(), "keep".into(), "1".into(), "go".into(), "2".into()],
        vec!["HEXPIRE".into(), "hash:ttl".into(), "500".into(), "FIELDS".into(), "1".into(), "go".into()],
        vec!["RPUSH".into(), "list:small".into(), "a".into(), "b".into(), "c".into()],
        vec!["SADD".into(), "set:ints".into(), "1".into(), "2".into(), "3".into()],
        vec!["ZADD".into(), "zset:small".into(), "1.5".into(), "a".into(), "2".into(), "b".into()],
        vec!["PFADD".into(), "hll".into(), "a".into(), "b".into(), "c".into()],
        vec!["GEOADD".into(), "geo".into(), "13.361389".into(), "38.115556".into(), "Palermo".into()],
        vec!["SETBIT".into(), "bitmap".into(), "1000".into(), "1".into()],
        vec!["XADD".into(), "stream".into(), "1-1".into(), "f".into(), "v1".into()],
        vec!["XADD".into(), "stream".into(), "2-1".into(), "f".into(), "v2".into()],
        vec!["XGROUP".into(), "CREATE".into(), "stream".into(), "g".into(), "0".into()],
        vec![
            "XREADGROUP".into(),
            "GROUP".into(),
            "g".into(),
            "alice".into(),
            "COUNT".into(),
            "1".into(),
            "STREAMS".into(),
            "stream".into(),
            ">".into(),
        ],
        vec![
            "XREADGROUP".into(),
            "GROUP".into(),
            "g".into(),
            "bob".into(),
            "COUNT".into(),
            "1".into(),
            "STREAMS".into(),
            "stream".into(),
            ">".into(),
        ],
        vec!["PEXPIRE".into(), "hll".into(), "900000".into()],
    ];
    let mut big_list = vec!["RPUSH".to_string(), "list:big".into()];
    big_list.extend(members.iter().map(|m| format!("{m}-{big}")).take(150));
    setup.push(big_list);
    let mut big_set = vec!["SADD".to_string(), "set:big".into()];
    big_set.extend(members.iter().cloned());
    setup.push(big_set);
    let mut big_zset = vec!["ZADD".to_string(), "zset:big".into()];
    for (i, m) in members.iter().enumerate() {
        big_zset.push(i.to_string());
        big_zset.push(m.clone());
    }
    setup.push(big_zset);
    let mut big_hash = vec!["HSET".to_string(), "hash:big".into()];
    for m in &members {
        big_hash.push(m.clone());
        big_hash.push(format!("{m}{m}"));
    }
    setup.push(big_hash);
    for cmd in &setup {
        let mut c2 = redis::cmd(&cmd[0]);
        c2.arg(&cmd[1..]);
        let _: redis::Value = c2.query_async(c).await.unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    }
    let _: () = q(c, &["SELECT", "1"]).await;
    let _: () = q(c, &["SET", "db1:key", "in database one"]).await;
    let _: () = q(c, &["HSET", "db1:hash", "f", "v"]).await;
    let _: () = q(c, &["SELECT", "0"]).await;
}

async fn download(dev: &ShoalDev, id: &str) -> Vec<u8> {
    let resp = reqwest::Client::new()
        .get(dev.url(&format!("/v1/snapshots/{id}/rdb")))
        .bearer_auth(dev.admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap().to_vec()
}

async fn import(dev: &ShoalDev, cache: &str, body: Vec<u8>) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .put(dev.url(&format!("/v1/caches/{cache}/import")))
        .bearer_auth(dev.admin_token())
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, serde_json::from_str(&resp.text().await.unwrap()).unwrap_or(Value::Null))
}

#[tokio::test]
async fn every_data_type_round_trips_into_a_new_cache_and_the_rdb_holds_this_cache_alone() {
    let dev = shared().await;
    let (_, neighbour_token) = cache(&dev, &unique("snap-neighbour"), json!({})).await;
    let mut n = dev.client(&neighbour_token).await.unwrap();
    let _: () = q(&mut n, &["SET", "neighbour-secret", "never in another cache's snapshot"]).await;
    let (a, token) = cache(&dev, &unique("snap-source"), json!({ "databases": 2 })).await;
    let mut c = dev.client(&token).await.unwrap();
    fill_every_type(&mut c).await;
    let before = [contents(&mut c, 0).await, contents(&mut c, 1).await];
    let field_ttl: Vec<i64> = q(&mut c, &["HPTTL", "hash:ttl", "FIELDS", "2", "keep", "go"]).await;

    let snap = snapshot(&dev, &a, None).await;
    assert_eq!(snap["keys"], 18, "{snap}");
    assert_eq!(snap["databases"], 2);
    assert_eq!(snap["sha256"].as_str().unwrap().len(), 64);
    let (status, listed) = dev.api(Method::GET, &format!("/v1/caches/{a}/snapshots"), None).await;
    assert_eq!((status, listed["items"][0]["id"].clone()), (200, snap["id"].clone()));

    let (status, restored) = dev
        .api(
            Method::POST,
            "/v1/caches",
            Some(json!({ "name": unique("snap-restored"), "from_snapshot": snap["id"] })),
        )
        .await;
    assert_eq!(status, 201, "{restored}");
    assert_eq!(restored["databases"], 2, "the snapshot's databases by default");
    let b_token = dev.mint_token(restored["id"].as_str().unwrap()).await;
    let mut b = dev.client(&b_token).await.unwrap();
    for db in 0..2 {
        let after = contents(&mut b, db).await;
        assert_eq!(
            after.keys().collect::<Vec<_>>(),
            before[db as usize].keys().collect::<Vec<_>>(),
            "database {db}: the same keys"
        );
        for (key, (dump, pttl)) in &after {
            let (was_dump, was_pttl) = &before[db as usize][key];
            assert_eq!(dump, was_dump, "the value of {:?}", String::from_utf8_lossy(key));
            if *was_pttl < 0 {
                assert_eq!(*pttl, *was_pttl, "{:?} had no TTL", String::from_utf8_lossy(key));
            } else {
                assert!(
                    (pttl - was_pttl).abs() <= 1000,
                    "{:?}: TTL {pttl} ms, was {was_pttl} ms",
                    String::from_utf8_lossy(key)
                );
            }
        }
    }
    // A hash field's TTL is an expiry time, kept as it was: the same as the source's now.
    let restored_field_ttl: Vec<i64> = q(&mut b, &["HPTTL", "hash:ttl", "FIELDS", "2", "keep", "go"]).await;
    let field_ttl_now: Vec<i64> = q(&mut c, &["HPTTL", "hash:ttl", "FIELDS", "2", "keep", "go"]).await;
    assert_eq!(restored_field_ttl[0], -1, "the field without a TTL");
    assert!(field_ttl_now[1] < field_ttl[1], "{field_ttl_now:?} counts down from {field_ttl:?}");
    assert!(
        (restored_field_ttl[1] - field_ttl_now[1]).abs() <= 1000,
        "{restored_field_ttl:?} vs {field_ttl_now:?}"
    );
    let pending: redis::Value = q(&mut b, &["XPENDING", "stream", "g"]).await;
    assert!(
        format!("{pending:?}").contains("alice") && format!("{pending:?}").contains("bob"),
        "{pending:?}"
    );

    // The export loads in a plain valkey-server: this cache's keys only, in its databases.
    let rdb = download(&dev, snap["id"].as_str().unwrap()).await;
    assert_eq!(rdb.len() as u64, snap["bytes"].as_u64().unwrap());
    assert!(!rdb.windows(16).any(|w| w == b"neighbour-secret"), "no neighbour's key in the file");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("export.rdb"), &rdb).unwrap();
    let plain = PlainValkey::with_rdb(dir.path(), "export.rdb").await;
    let mut p = plain.try_client().await.unwrap();
    let keyspace: String = q(&mut p, &["INFO", "keyspace"]).await;
    let dbs: Vec<&str> = keyspace.lines().filter(|l| l.starts_with("db")).collect();
    assert_eq!(dbs.len(), 2, "{keyspace}");
    assert!(dbs[0].starts_with(&format!("db0:keys={},", before[0].len())), "{keyspace}");
    assert!(dbs[1].starts_with(&format!("db1:keys={},", before[1].len())), "{keyspace}");
    for (key, (dump, _)) in &before[0] {
        assert_eq!(
            &value(&mut p, key).await,
            dump,
            "{:?} in the plain valkey-server",
            String::from_utf8_lossy(key)
        );
    }

    // Snapshot storage is a line of this month's invoice. (A draft counts up to the last
    // completed minute: the snapshot is made two minutes older.)
    dev.sql(&format!(
        "UPDATE snapshots SET completed_at_ms = completed_at_ms - 120000 WHERE id = '{}'",
        snap["id"].as_str().unwrap()
    ));
    let (_, source) = dev.api(Method::GET, &format!("/v1/caches/{a}"), None).await;
    let line = dev.invoice_line(source["account_id"].as_str().unwrap(), &a, "snapshots").await;
    assert_eq!(line["unit"], "GB-month");
    assert_eq!(line["unit_price"], "0.085");
}

#[tokio::test]
async fn a_snapshot_under_writes_is_one_consistent_point() {
    let dev = shared().await;
    let (a, token) = cache(&dev, &unique("snap-busy"), json!({})).await;
    let mut c = dev.client(&token).await.unwrap();
    let counters: Vec<String> = (0..10).map(|i| format!("{{c}}{i}")).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (mut c, counters, stop) = (c.clone(), counters.clone(), stop.clone());
        tokio::spawn(async move {
            let mut rounds = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let mut pipe = redis::pipe();
                pipe.atomic();
                for k in &counters {
                    pipe.cmd("INCR").arg(k).ignore();
                }
                pipe.query_async::<()>(&mut c).await.unwrap();
                rounds += 1;
            }
            rounds
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let snap = snapshot(&dev, &a, None).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let rounds = writer.await.unwrap();
    let (status, restored) = dev
        .api(
            Method::POST,
            "/v1/caches",
            Some(json!({ "name": unique("snap-busy-copy"), "from_snapshot": snap["id"] })),
        )
        .await;
    assert_eq!(status, 201, "{restored}");
    let mut b = dev.client(&dev.mint_token(restored["id"].as_str().unwrap()).await).await.unwrap();
    let mut values = Vec::new();
    for k in &counters {
        let v: Option<u64> = redis::cmd("GET").arg(k).query_async(&mut b).await.unwrap();
        values.push(v.unwrap_or(0));
    }
    assert!(values.iter().all(|&v| v == values[0]), "a torn transaction in the snapshot: {values:?}");
    assert!(values[0] > 0 && values[0] < rounds, "taken while the writes went on: {} of {rounds}", values[0]);
    let now: u64 = q(&mut c, &["GET", &counters[0]]).await;
    assert_eq!(now, rounds, "the source cache kept every write");
}

/// An RDB written by a plain valkey-server (`SAVE`): (file bytes, keys written).
async fn plain_rdb(dir: &Path, keys: usize) -> Vec<u8> {
    let plain = PlainValkey::with_rdb(dir, "plain.rdb").await;
    let mut p = plain.try_client().await.unwrap();
    for i in 0..keys {
        let _: () = q(&mut p, &["SET", &format!("imported:{i}"), &format!("value {i}")]).await;
    }
    let _: () = q(&mut p, &["HSET", "imported:hash", "f", "v"]).await;
    let _: () = q(&mut p, &["SET", "imported:ttl", "v", "EX", "3600"]).await;
    let _: () = q(&mut p, &["SAVE"]).await;
    drop(plain);
    std::fs::read(dir.join("plain.rdb")).unwrap()
}

#[tokio::test]
async fn imports_add_a_plain_valkey_rdb_and_bad_files_change_nothing() {
    let dev = shared().await;
    let (a, token) = cache(&dev, &unique("snap-import"), json!({})).await;
    let mut c = dev.client(&token).await.unwrap();
    let _: () = q(&mut c, &["SET", "mine", "kept"]).await;
    let dir = tempfile::tempdir().unwrap();
    let rdb = plain_rdb(dir.path(), 100).await;

    // Bad files: refused, and the cache is as it was.
    let truncated = rdb[..rdb.len() - 20].to_vec();
    let mut flipped = rdb.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0xff;
    for (what, body, says) in [
        ("truncated", truncated, "truncated"),
        ("a text file", b"hello, this is not an RDB file\n".repeat(10), "not an RDB"),
        ("corrupt", flipped, ""),
        ("empty", Vec::new(), ""),
    ] {
        let (status, problem) = import(&dev, &a, body).await;
        assert_eq!(status, 422, "{what}: {problem}");
        assert!(problem["detail"].as_str().unwrap().contains(says), "{what}: {problem}");
        assert!(problem["detail"].as_str().unwrap().contains("nothing was imported"), "{what}: {problem}");
        let size: u64 = q(&mut c, &["DBSIZE"]).await;
        assert_eq!(size, 1, "{what}: nothing changed");
    }

    let (status, result) = import(&dev, &a, rdb.clone()).await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["keys"], 102);
    assert!(result["ecpu"].as_f64().unwrap() >= 102.0, "metered as RESTOREs: {result}");
    let size: u64 = q(&mut c, &["DBSIZE"]).await;
    assert_eq!(size, 103);
    let v: String = q(&mut c, &["GET", "imported:42"]).await;
    assert_eq!(v, "value 42");
    let ttl: i64 = q(&mut c, &["TTL", "imported:ttl"]).await;
    // (The file's `ctime` is in whole seconds: a TTL may count up to a second long.)
    assert!((3590..=3601).contains(&ttl), "{ttl}");

    // The same file again: its keys are there already; nothing changes.
    let _: () = q(&mut c, &["SET", "imported:42", "changed since"]).await;
    let (status, problem) = import(&dev, &a, rdb).await;
    assert_eq!(status, 409, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("already has key"), "{problem}");
    let v: String = q(&mut c, &["GET", "imported:42"]).await;
    assert_eq!(v, "changed since");
    let size: u64 = q(&mut c, &["DBSIZE"]).await;
    assert_eq!(size, 103);
}

#[tokio::test]
async fn a_corrupt_snapshot_is_refused_at_restore_and_a_delete_can_take_a_final_one() {
    let dev = ShoalDev::start().await;
    let (a, token) = cache(&dev, "final", json!({})).await;
    let mut c = dev.client(&token).await.unwrap();
    let _: () = q(&mut c, &["SET", "last", "words"]).await;

    // Each snapshot forks the node: 20 a day per cache, then 429 (a final one still goes).
    let (_, cached) = dev.api(Method::GET, &format!("/v1/caches/{a}"), None).await;
    let now_ms = chrono::Utc::now().timestamp_millis();
    for i in 0..20 {
        dev.sql(&format!(
            "INSERT INTO snapshots (id, account_id, cache_id, cache_name, name, kind, status, databases, created_at_ms, completed_at_ms, deleted_at_ms)
             VALUES ('snap-day{i}', '{}', '{a}', 'final', 'day{i}', 'manual', 'available', 1, {now_ms}, {now_ms}, {now_ms})",
            cached["account_id"].as_str().unwrap()
        ));
    }
    let (status, body) = dev.api(Method::POST, &format!("/v1/caches/{a}/snapshots"), None).await;
    assert_eq!(status, 429, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("20 snapshots"), "{body}");

    let (status, _, body) = dev
        .call(
            Some(&dev.admin_token()),
            Method::DELETE,
            &format!("/v1/caches/{a}?final_snapshot=bad%20name"),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, _, body) = dev
        .call(
            Some(&dev.admin_token()),
            Method::DELETE,
            &format!("/v1/caches/{a}?final_snapshot=final-words"),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 204, "{body}");
    let (_, list) = dev.api(Method::GET, &format!("/v1/snapshots?cache_id={a}"), None).await;
    let snap = &list["items"][0];
    assert_eq!(
        (snap["name"].as_str(), snap["kind"].as_str(), snap["status"].as_str()),
        (Some("final-words"), Some("final"), Some("available"))
    );
    let id = snap["id"].as_str().unwrap();

    let (status, restored) =
        dev.api(Method::POST, "/v1/caches", Some(json!({ "name": "after", "from_snapshot": id }))).await;
    assert_eq!(status, 201, "{restored}");
    let mut b = dev.client(&dev.mint_token(restored["id"].as_str().unwrap()).await).await.unwrap();
    let v: String = q(&mut b, &["GET", "last"]).await;
    assert_eq!(v, "words");

    // The file in the snapshot store changes under it: refused, and no cache is made.
    let file = dev.dir.join(".shoal/snapshots").join(format!("{id}.rdb"));
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 12;
    bytes[last] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let (status, problem) = dev
        .api(Method::POST, "/v1/caches", Some(json!({ "name": "from-corrupt", "from_snapshot": id })))
        .await;
    assert_eq!(status, 409, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("corrupt"), "{problem}");
    let (_, caches) = dev.api(Method::GET, "/v1/caches?name=from-corrupt", None).await;
    assert_eq!(caches["items"], json!([]));

    let (status, _) = dev.api(Method::DELETE, &format!("/v1/snapshots/{id}"), None).await;
    assert_eq!(status, 204);
    assert!(!file.exists(), "its file is gone");
    let (status, _) = dev.api(Method::GET, &format!("/v1/snapshots/{id}"), None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn the_daily_window_takes_a_snapshot_and_retention_deletes_the_older_ones() {
    let dev = ShoalDev::start_with(&["--snapshot-schedule-interval", "0.5"]).await;
    let now = chrono::Utc::now();
    let window = now.format("%H:%M").to_string();
    let (a, _) =
        cache(&dev, "daily", json!({ "snapshot_window": window, "snapshot_retention_limit": 1 })).await;
    let (status, body) =
        dev.api(Method::PATCH, &format!("/v1/caches/{a}"), Some(json!({ "snapshot_window": "25:00" }))).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "snapshot_window");
    // An automatic snapshot of yesterday, which retention 1 expires once today's is there.
    let yesterday = now.timestamp_millis() - 86_400_000;
    let (_, cached) = dev.api(Method::GET, &format!("/v1/caches/{a}"), None).await;
    dev.sql(&format!(
        "INSERT INTO snapshots (id, account_id, cache_id, cache_name, name, kind, status, databases, created_at_ms, completed_at_ms)
         VALUES ('snap-old', '{}', '{a}', 'daily', 'daily-old', 'automatic', 'available', 1, {yesterday}, {yesterday})",
        cached["account_id"].as_str().unwrap()
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, list) = dev.api(Method::GET, &format!("/v1/caches/{a}/snapshots"), None).await;
        let items = list["items"].as_array().unwrap();
        let ids: Vec<&str> = items.iter().map(|s| s["id"].as_str().unwrap()).collect();
        if items.len() == 1 && ids[0] != "snap-old" && items[0]["status"] == "available" {
            assert_eq!(items[0]["kind"], "automatic");
            break;
        }
        assert!(Instant::now() < deadline, "no daily snapshot, or the old one kept: {list}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let audit =
        dev.sql("SELECT actor || ' ' || action FROM audit_log WHERE action LIKE 'snapshot.%' ORDER BY seq");
    assert!(audit.iter().any(|a| a == "snapshot-schedule snapshot.create"), "{audit:?}");
    assert!(audit.iter().any(|a| a == "snapshot-schedule snapshot.delete"), "{audit:?}");
}

#[tokio::test]
async fn snapshots_are_kept_in_s3_compatible_storage() {
    let moto_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut moto = Proc::from_command(
        {
            let mut cmd = std::process::Command::new("moto_server");
            cmd.args(["-H", "127.0.0.1", "-p", &moto_port.to_string()]);
            cmd
        },
        &dir.path().join("moto.log"),
    );
    let endpoint = format!("http://127.0.0.1:{moto_port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.put(format!("{endpoint}/shoal-snapshots")).send().await.map(|r| r.status().is_success()).ok()
        != Some(true)
    {
        assert!(
            Instant::now() < deadline,
            "moto_server did not start: {:?}",
            std::fs::read_to_string(dir.path().join("moto.log"))
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // SAFETY: set before the platform starts, read by it (a child process) only.
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    let dev =
        ShoalDev::start_with(&["--snapshots", "s3://shoal-snapshots/prod", "--s3-endpoint", &endpoint]).await;
    let (a, token) = cache(&dev, "on-s3", json!({})).await;
    let mut c = dev.client(&token).await.unwrap();
    let _: () = q(&mut c, &["SET", "where", "s3"]).await;
    let snap = snapshot(&dev, &a, Some("first")).await;
    let id = snap["id"].as_str().unwrap();
    let object = format!("{endpoint}/shoal-snapshots/prod/{id}.rdb");
    let stored = http.get(&object).send().await.unwrap();
    assert_eq!(stored.status(), 200, "the RDB is in the bucket");
    assert_eq!(stored.bytes().await.unwrap().len() as u64, snap["bytes"].as_u64().unwrap());
    assert!(!dev.dir.join(".shoal/snapshots").exists(), "nothing kept on local disk");

    let (status, restored) =
        dev.api(Method::POST, "/v1/caches", Some(json!({ "name": "from-s3", "from_snapshot": id }))).await;
    assert_eq!(status, 201, "{restored}");
    let mut b = dev.client(&dev.mint_token(restored["id"].as_str().unwrap()).await).await.unwrap();
    let v: String = q(&mut b, &["GET", "where"]).await;
    assert_eq!(v, "s3");
    assert_eq!(download(&dev, id).await.len() as u64, snap["bytes"].as_u64().unwrap());
    let (status, _) = dev.api(Method::DELETE, &format!("/v1/snapshots/{id}"), None).await;
    assert_eq!(status, 204);
    assert_eq!(http.get(&object).send().await.unwrap().status(), 404, "deleted from the bucket");
    moto.kill();
}
