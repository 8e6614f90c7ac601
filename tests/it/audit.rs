//! An audit log you can trust (issue 16): records are chained with a key kept outside the
//! database and the head is checkpointed, so someone who can write the database cannot
//! change, delete or truncate records unnoticed; floods of failed logins are throttled into
//! counted aggregates and cannot stall REST writes. Through the real binary.

use crate::support::ShoalDev;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A running dev with some history (account, caches, keys), the audit triggers dropped as
/// an attacker with database access would, and the newest seq.
async fn tampering_target() -> (ShoalDev, i64) {
    let dev = ShoalDev::start().await;
    let (_, owner) = dev.account_with_key("victim", "owner").await;
    for name in ["alpha", "beta", "gamma"] {
        let (status, _, body) =
            dev.call(Some(&owner), Method::POST, "/v1/caches", Some(json!({"name": name})), &[]).await;
        assert_eq!(status, 201, "{body}");
    }
    let report = verify(&dev).await;
    assert_eq!(report["ok"], true, "{report}");
    for table in ["audit_log", "audit_checkpoints"] {
        for trigger in trigger_names(&dev, table) {
            dev.sql(&drop_trigger(&dev, &trigger, table));
        }
    }
    let newest = report["records"].as_i64().unwrap();
    assert!(newest >= 6, "{report}");
    (dev, newest)
}

fn trigger_names(dev: &ShoalDev, table: &str) -> Vec<String> {
    if dev.database_url.is_some() {
        dev.sql(&format!(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = '{table}'::regclass AND NOT tgisinternal"
        ))
    } else {
        dev.sql(&format!("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = '{table}'"))
    }
}

fn drop_trigger(dev: &ShoalDev, trigger: &str, table: &str) -> String {
    match dev.database_url {
        Some(_) => format!("DROP TRIGGER {trigger} ON {table}"),
        None => format!("DROP TRIGGER {trigger}"),
    }
}

async fn verify(dev: &ShoalDev) -> Value {
    let (status, report) = dev.api(Method::GET, "/v1/audit/verify", None).await;
    assert_eq!(status, 200, "{report}");
    report
}

/// The (seq, kind) pairs verify reports.
fn problems(report: &Value) -> Vec<(i64, String)> {
    report["problems"]
        .as_array()
        .unwrap_or_else(|| panic!("no problems list: {report}"))
        .iter()
        .map(|p| (p["seq"].as_i64().unwrap(), p["kind"].as_str().unwrap().to_string()))
        .collect()
}

#[tokio::test]
async fn verify_names_a_changed_record() {
    let (dev, _) = tampering_target().await;
    dev.sql("UPDATE audit_log SET actor = 'key:someone-else' WHERE seq = 3");
    let report = verify(&dev).await;
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(problems(&report), [(3, "changed".to_string())], "{report}");
}

#[tokio::test]
async fn verify_names_a_deleted_record() {
    let (dev, _) = tampering_target().await;
    dev.sql("DELETE FROM audit_log WHERE seq = 4");
    let report = verify(&dev).await;
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(problems(&report), [(4, "missing".to_string())], "{report}");
}

#[tokio::test]
async fn verify_detects_the_newest_records_deleted() {
    let (dev, newest) = tampering_target().await;
    dev.sql(&format!("DELETE FROM audit_log WHERE seq > {}", newest - 2));
    let report = verify(&dev).await;
    assert_eq!(report["ok"], false, "{report}");
    assert!(problems(&report).contains(&(newest - 1, "truncated".to_string())), "{report}");
}

#[tokio::test]
async fn verify_detects_the_newest_records_deleted_with_their_checkpoints_also_after_a_restart() {
    let (mut dev, newest) = tampering_target().await;
    dev.sql(&format!("DELETE FROM audit_log WHERE seq > {}", newest - 2));
    dev.sql(&format!("DELETE FROM audit_checkpoints WHERE seq > {}", newest - 2));
    let report = verify(&dev).await;
    assert_eq!(report["ok"], false, "{report}");
    assert!(problems(&report).contains(&(newest - 1, "truncated".to_string())), "{report}");
    // The control plane's memory is gone after a restart; the head file next to the key is not.
    dev.stop_with(libc::SIGTERM);
    dev.launch().await;
    let report = verify(&dev).await;
    assert_eq!(report["ok"], false, "{report}");
    // A start writes records of its own (`shoal dev` issues its gateway's credential), so the
    // deleted ones are now a gap before them rather than a missing tail: either way, named.
    let named = problems(&report)
        .into_iter()
        .any(|(seq, kind)| seq == newest - 1 && (kind == "truncated" || kind == "missing"));
    assert!(named, "{report}");
}

/// Rewrites every record from `from` on as the old unkeyed chain would have hashed it
/// (SHA-256 of the previous hash and the fields), with `actor` changed at `from`: what an
/// attacker without the key can compute. SQLite only (Python's sqlite3).
fn recompute_unkeyed_chain(dev: &ShoalDev, from: i64) {
    let script = r#"
import hashlib, json, sqlite3, sys
c = sqlite3.connect(sys.argv[1])
start = int(sys.argv[2])
prev = c.execute("SELECT hash FROM audit_log WHERE seq = ?", (start - 1,)).fetchone()
prev = prev[0] if prev else "0" * 64
cols = "seq, at, actor, account_id, source, action, target, cache_id, outcome, reason, request_id, details"
for row in c.execute(f"SELECT {cols} FROM audit_log WHERE seq >= ? ORDER BY seq", (start,)).fetchall():
    row = list(row)
    if row[0] == start:
        row[2] = "key:someone-else"
    fields = json.dumps(row, separators=(",", ":"), ensure_ascii=False)
    h = hashlib.sha256((prev + "\n" + fields).encode()).hexdigest()
    c.execute("UPDATE audit_log SET actor = ?, prev_hash = ?, hash = ?, chain = 1 WHERE seq = ?",
              (row[2], prev, h, row[0]))
    prev = h
c.commit()
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, dev.dir.join(".shoal/shoal.db").to_str().unwrap(), &from.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn verify_detects_a_recomputed_unkeyed_chain() {
    let (dev, newest) = tampering_target().await;
    if dev.database_url.is_some() {
        return; // The rewrite is done with Python's sqlite3.
    }
    recompute_unkeyed_chain(&dev, 3);
    let report = verify(&dev).await;
    assert_eq!(report["ok"], false, "{report}");
    let found = problems(&report);
    assert_eq!(found.first(), Some(&(3, "changed".to_string())), "{report}");
    // Even the whole chain rewritten, checkpoints gone, is caught (by the remembered head).
    dev.sql("DELETE FROM audit_checkpoints");
    recompute_unkeyed_chain(&dev, 1);
    let report = verify(&dev).await;
    assert_eq!(report["ok"], false, "{report}");
    // A faithful unkeyed chain: every link holds, and only the anchors outside it disagree.
    let found = problems(&report);
    assert!(found.contains(&(newest, "changed".to_string())), "{report}");
    assert!(found.iter().all(|(_, kind)| kind != "changed" || found.len() <= 2), "{report}");
}

#[tokio::test]
async fn the_audit_key_lives_outside_the_database_and_only_platform_readers_verify() {
    let dev = ShoalDev::start().await;
    let key = dev.dir.join(".shoal/audit.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let (account, owner) = dev.account_with_key("someone", "owner").await;
    let auditor = dev.api_key(&account, "auditor").await;
    for token in [&owner, &auditor] {
        let (status, _, _) = dev.call(Some(token), Method::GET, "/v1/audit/verify", None, &[]).await;
        assert_eq!(status, 403);
    }
    let (status, body) =
        dev.api(Method::POST, "/v1/api-keys", Some(json!({"name": "ops", "role": "auditor"}))).await;
    assert_eq!(status, 201, "{body}");
    let platform_auditor = body["token"].as_str().unwrap();
    let (status, _, report) =
        dev.call(Some(platform_auditor), Method::GET, "/v1/audit/verify", None, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["problems"], json!([]), "{report}");
}

/// Every record of `query` (all pages).
async fn all_records(dev: &ShoalDev, query: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let (status, body) =
            dev.api(Method::GET, &format!("/v1/audit?limit=500&{query}{cursor}"), None).await;
        assert_eq!(status, 200, "{body}");
        out.extend(body["items"].as_array().unwrap().iter().cloned());
        match body["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return out,
        }
    }
}

/// How many events the records stand for (an aggregate counts many).
fn counted(records: &[Value]) -> u64 {
    records.iter().map(|r| r["details"]["count"].as_u64().unwrap_or(1)).sum()
}

/// Waits until the records of `query` count `n` events (aggregates are written when their
/// window ends); returns them.
async fn until_counted(dev: &ShoalDev, query: &str, n: u64) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let records = all_records(dev, query).await;
        if counted(&records) >= n || Instant::now() > deadline {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn a_pipelined_flood_of_bad_auths_is_aggregated_counted_and_does_not_stall_rest_writes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const N: usize = 5000;
    let dev = ShoalDev::start().await;
    let one = "*3\r\n$4\r\nAUTH\r\n$5\r\nflood\r\n$1\r\nb\r\n";
    let port = dev.resp_port;
    let flood = tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (mut r, mut w) = s.split();
        let write = async {
            w.write_all(one.repeat(N).as_bytes()).await.unwrap();
        };
        let read = async {
            let (mut errors, mut buf) = (0, vec![0u8; 64 * 1024]);
            while errors < N {
                let n = r.read(&mut buf).await.unwrap();
                assert!(n > 0, "the gateway closed the connection after {errors} replies");
                // One error line per AUTH.
                errors += buf[..n].iter().filter(|b| **b == b'\n').count();
            }
        };
        tokio::join!(write, read);
    });
    // REST writes go on meanwhile.
    let mut creates = Vec::new();
    while !flood.is_finished() || creates.len() < 5 {
        let started = Instant::now();
        let (status, body) =
            dev.api(Method::POST, "/v1/accounts", Some(json!({"name": format!("a{}", creates.len())}))).await;
        assert_eq!(status, 201, "{body}");
        creates.push(started.elapsed());
    }
    flood.await.unwrap();
    println!("REST creates during the flood: {creates:?}");

    let records = until_counted(&dev, "action=data.auth&outcome=failure", N as u64).await;
    assert_eq!(counted(&records), N as u64, "every failed AUTH is accounted for");
    assert!(records.len() <= 100, "{} records for {N} failures from one source", records.len());
    let aggregate = records.iter().find(|r| r["details"]["count"].as_u64().unwrap_or(1) > 1).unwrap();
    assert_eq!(aggregate["source"], "127.0.0.1");
    assert!(aggregate["details"]["first_at"].is_string() && aggregate["details"]["last_at"].is_string());
    assert!(aggregate["details"]["reasons"].is_object(), "{aggregate}");
    assert_eq!(verify(&dev).await["ok"], true);
}

#[tokio::test]
async fn unauthenticated_rest_calls_are_audited_as_counted_aggregates() {
    const N: u64 = 300;
    let dev = ShoalDev::start().await;
    for _ in 0..N {
        let (status, _, _) = dev.call(Some("not-a-key"), Method::GET, "/v1/caches", None, &[]).await;
        assert_eq!(status, 401);
    }
    let records = until_counted(&dev, "outcome=failure&actor=anonymous", N).await;
    assert_eq!(counted(&records), N, "every 401 is accounted for");
    assert!(records.len() <= 50, "{} records for {N} refusals from one source", records.len());
}
