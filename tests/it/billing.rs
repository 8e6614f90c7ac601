//! Billing end to end: usage batches (real gateway traffic plus late and duplicate batches
//! posted the way a gateway does) → hourly rollups → the month's invoice, equal to the
//! milli-ECPU; CSV and HTML renderings; the estimate; who may read which invoice.

use crate::support::ShoalDev;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

use crate::support::milli_ecpu as milli;

/// Posts a usage batch as gateway `billing-test` (its credential made on first use).
async fn post_batch(dev: &ShoalDev, seq: u64, cache: &str, minute: i64, ecpu_milli: u64) -> u16 {
    let path = dev.dir.join("billing-test.credential");
    if !path.exists() {
        std::fs::write(&path, dev.gateway_credential("billing-test").await).unwrap();
    }
    let credential = std::fs::read_to_string(&path).unwrap();
    let batch = json!({
        "gateway_id": "gw-billing-test",
        "seq": seq,
        "usage": [{
            "cache_id": cache, "minute": minute, "commands": 10, "ecpu_milli": ecpu_milli,
            "bytes_in": 100, "bytes_out": 200, "hits": 3, "misses": 1, "throttled": 0, "errors": 0
        }]
    });
    dev.http
        .post(dev.internal_url("/internal/v1/usage"))
        .bearer_auth(credential)
        .json(&batch)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn invoices_equal_stored_usage_to_the_milli_ecpu_with_late_and_duplicate_batches() {
    let dev = ShoalDev::start().await;
    let (account, owner) = dev.account_with_key("billed", "owner").await;
    let auditor = dev.api_key(&account, "auditor").await;
    let (_, other) = dev.account_with_key("not-billed", "owner").await;
    let (_, _, cache) =
        dev.call(Some(&owner), Method::POST, "/v1/caches", Some(json!({"name": "billed-cache"})), &[]).await;
    let cache_id = cache["id"].as_str().unwrap().to_string();

    // Real traffic through the gateway.
    let (_, _, minted) =
        dev.call(Some(&owner), Method::POST, &format!("/v1/caches/{cache_id}/tokens"), None, &[]).await;
    let mut conn = dev.client(minted["token"].as_str().unwrap()).await.unwrap();
    for i in 0..50 {
        let _: () = redis::cmd("SET")
            .arg(format!("k{i}"))
            .arg("x".repeat(3000))
            .query_async(&mut conn)
            .await
            .unwrap();
        let _: Option<String> = redis::cmd("GET").arg(format!("k{i}")).query_async(&mut conn).await.unwrap();
    }

    // Batches as a gateway cut off for a while would send them: one for two hours ago
    // (late: it lands in its own hour), and the same batch again (stored once).
    let now = chrono::Utc::now().timestamp();
    let month_start = {
        use chrono::Datelike;
        let d = chrono::Utc::now().date_naive();
        chrono::NaiveDate::from_ymd_opt(d.year(), d.month(), 1)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp()
    };
    let recent = now / 60 * 60 - 120;
    let late = (recent - 7200).max(month_start);
    assert_eq!(post_batch(&dev, 1, &cache_id, late, 123_457).await, 200);
    assert_eq!(post_batch(&dev, 1, &cache_id, late, 123_457).await, 200, "a resent batch is acknowledged");
    assert_eq!(post_batch(&dev, 2, &cache_id, recent, 5_001).await, 200);
    let (status, _, _) = dev.call(Some(&owner), Method::GET, "/v1/caches", None, &[]).await;
    assert_eq!(status, 200);

    // Wait until the gateway's own batches are stored (it flushes every second).
    let stored = || {
        dev.sql(&format!(
            "SELECT COALESCE(SUM(ecpu_milli), 0) FROM usage_minutes WHERE cache_id = '{cache_id}'"
        ))[0]
            .parse::<i64>()
            .unwrap()
    };
    let mut batches = 0;
    for _ in 0..100 {
        batches = stored();
        if batches > 123_457 + 5_001 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            if stored() == batches {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(batches > 123_457 + 5_001, "gateway usage arrived: {batches}");
    let late_minute = dev.sql(&format!(
        "SELECT ecpu_milli FROM usage_minutes WHERE cache_id = '{cache_id}' AND minute = '{}'",
        chrono::DateTime::from_timestamp(late, 0).unwrap().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    ));
    if late != recent {
        assert_eq!(late_minute, ["123457"], "the duplicate was stored once, in its own minute");
    }

    // Rollups: the hourly usage of the cache sums to the same.
    let from = chrono::DateTime::from_timestamp(month_start.max(late - 3600), 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (status, _, usage) = dev
        .call(
            Some(&owner),
            Method::GET,
            &format!("/v1/caches/{cache_id}/usage?granularity=hour&from={from}"),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 200, "{usage}");
    let rollups: i64 =
        usage["points"].as_array().unwrap().iter().map(|p| p["ecpu_milli"].as_i64().unwrap()).sum();
    assert_eq!(rollups, batches);

    // The month's draft invoice bills exactly that (usage up to the last completed minute:
    // wait for the current minute to end so every stored row is covered).
    tokio::time::sleep(Duration::from_secs((60 - chrono::Utc::now().timestamp() % 60 + 1) as u64)).await;
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let id = format!("{account}-{month}");
    let (status, _, invoice) =
        dev.call(Some(&owner), Method::GET, &format!("/v1/invoices/{id}"), None, &[]).await;
    assert_eq!(status, 200, "{invoice}");
    assert_eq!(invoice["status"], "draft");
    let ecpu_lines: Vec<&Value> =
        invoice["lines"].as_array().unwrap().iter().filter(|l| l["meter"] == "ecpu").collect();
    assert_eq!(ecpu_lines.len(), 1, "{invoice}");
    assert_eq!(ecpu_lines[0]["cache_name"], "billed-cache");
    assert_eq!(
        milli(&ecpu_lines[0]["quantity"]),
        batches,
        "invoice quantity = stored usage, to the milli-ECPU"
    );
    assert!(invoice["lines"].as_array().unwrap().iter().any(|l| l["meter"] == "storage"), "{invoice}");

    // The list shows it; CSV and HTML renderings; roles.
    let (_, _, list) = dev.call(Some(&auditor), Method::GET, "/v1/invoices", None, &[]).await;
    assert!(list["items"].as_array().unwrap().iter().any(|i| i["id"] == id.as_str()), "{list}");
    let csv = dev
        .http
        .get(dev.url(&format!("/v1/invoices/{id}")))
        .bearer_auth(&owner)
        .header("Accept", "text/csv")
        .send()
        .await
        .unwrap();
    assert!(csv.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    let csv = csv.text().await.unwrap();
    assert!(
        csv.lines().next().unwrap().contains("meter")
            && csv.contains("billed-cache")
            && csv.contains("total"),
        "{csv}"
    );
    let html = dev
        .http
        .get(dev.url(&format!("/v1/invoices/{id}?format=html")))
        .bearer_auth(&owner)
        .send()
        .await
        .unwrap();
    assert!(html.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(html.text().await.unwrap().contains("billed-cache"));
    let (status, _, _) = dev.call(Some(&other), Method::GET, &format!("/v1/invoices/{id}"), None, &[]).await;
    assert_eq!(status, 404, "another account's invoice does not exist for them");
    let (_, _, theirs) = dev.call(Some(&other), Method::GET, "/v1/invoices", None, &[]).await;
    assert!(theirs["items"].as_array().unwrap().iter().all(|i| i["account_id"] != account.as_str()));
    for bad in [format!("{account}-1999-01"), format!("{account}-2999-01"), "garbage".into()] {
        let (status, _, _) =
            dev.call(Some(&owner), Method::GET, &format!("/v1/invoices/{bad}"), None, &[]).await;
        assert_eq!(status, 404, "{bad}");
    }
}

#[tokio::test]
async fn the_estimate_shows_its_arithmetic() {
    let dev = ShoalDev::start().await;
    let body = json!({"requests_per_second": 1000, "avg_request_bytes": 500, "avg_reply_bytes": 1500, "stored_gb": 10});
    let (status, _, est) =
        dev.call(Some(&dev.admin_token()), Method::POST, "/v1/estimate", Some(body), &[]).await;
    assert_eq!(status, 200, "{est}");
    // 2,000 bytes a request = 1.953125 ECPU; 1,000/s for 730 h; $0.0023 per million ECPU;
    // 10 GB × 730 h × $0.084.
    assert_eq!(est["ecpu_cost"], "11.80546875");
    assert_eq!(est["storage_cost"], "613.2");
    assert!(est["steps"].as_array().unwrap().len() >= 4, "{est}");
    let (status, _, err) = dev
        .call(Some(&dev.admin_token()), Method::POST, "/v1/estimate", Some(json!({"requests_per_second": -1, "avg_request_bytes": 1, "avg_reply_bytes": 1, "stored_gb": 1})), &[])
        .await;
    assert_eq!(status, 400, "{err}");
    let (status, _, _) = dev.call(None, Method::POST, "/v1/estimate", Some(json!({})), &[]).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn a_past_month_is_final_and_frozen_late_usage_no_longer_changes_it() {
    let dev = ShoalDev::start().await;
    let (account, owner) = dev.account_with_key("last-month", "owner").await;
    let (_, _, cache) =
        dev.call(Some(&owner), Method::POST, "/v1/caches", Some(json!({"name": "old"})), &[]).await;
    let cache_id = cache["id"].as_str().unwrap().to_string();
    // The account (and its cache) existed last month: back-date them as a migration would.
    let now = chrono::Utc::now();
    let this_month = {
        use chrono::Datelike;
        chrono::NaiveDate::from_ymd_opt(now.year(), now.month(), 1)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc()
    };
    // A minute of the month before last: final whatever today's date (last month is not
    // final during its grace period, the first hour of this month).
    let last_month_minute = {
        use chrono::Datelike;
        let last_month = this_month - chrono::Duration::days(1);
        let start = chrono::NaiveDate::from_ymd_opt(last_month.year(), last_month.month(), 1).unwrap();
        start.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp() - 86_400
    };
    let long_ago = "2000-01-01T00:00:00.000Z";
    dev.sql(&format!("UPDATE accounts SET created_at = '{long_ago}' WHERE id = '{account}'"));
    dev.sql(&format!("UPDATE caches SET created_at = '{long_ago}' WHERE id = '{cache_id}'"));
    assert_eq!(post_batch(&dev, 10, &cache_id, last_month_minute, 2_000_000).await, 200);

    let month = chrono::DateTime::from_timestamp(last_month_minute, 0).unwrap().format("%Y-%m").to_string();
    let id = format!("{account}-{month}");
    let (status, _, first) =
        dev.call(Some(&owner), Method::GET, &format!("/v1/invoices/{id}"), None, &[]).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["status"], "final");
    let ecpu = first["lines"].as_array().unwrap().iter().find(|l| l["meter"] == "ecpu").unwrap();
    assert_eq!(milli(&ecpu["quantity"]), 2_000_000);
    let storage = first["lines"].as_array().unwrap().iter().find(|l| l["meter"] == "storage").unwrap();
    assert_eq!(
        storage["quantity"].as_str().unwrap().trim_end_matches('0'),
        "0.1",
        "the 100 MB minimum for its one hour"
    );
    // A batch for that month arriving now is stored (usage shows it) but the bill is frozen.
    assert_eq!(post_batch(&dev, 11, &cache_id, last_month_minute + 60, 7_000_000).await, 200);
    let (_, _, again) = dev.call(Some(&owner), Method::GET, &format!("/v1/invoices/{id}"), None, &[]).await;
    assert_eq!(again, first, "a final invoice never changes");
    let stored = dev.sql(&format!("SELECT SUM(ecpu_milli) FROM usage_minutes WHERE cache_id = '{cache_id}'"));
    assert_eq!(stored, ["9000000"]);
    let (_, _, list) =
        dev.call(Some(&owner), Method::GET, &format!("/v1/invoices?month={month}"), None, &[]).await;
    assert_eq!(list["items"][0]["status"], "final", "{list}");
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_new_platform_has_no_invoice_for_a_month_before_it_existed() {
    let dev = ShoalDev::start().await;
    let (status, _, list) = dev
        .call(Some(&dev.admin_token()), Method::GET, "/v1/invoices?account_id=a000000000000", None, &[])
        .await;
    assert_eq!(status, 200, "{list}");
    let this_month = chrono::Utc::now().format("%Y-%m").to_string();
    let months: Vec<&str> =
        list["items"].as_array().unwrap().iter().map(|i| i["month"].as_str().unwrap()).collect();
    assert_eq!(months, [this_month.as_str()], "only the month the platform started in: {list}");
    let earlier =
        format!("a000000000000-{}", (chrono::Utc::now() - chrono::Duration::days(40)).format("%Y-%m"));
    let (status, _, _) =
        dev.call(Some(&dev.admin_token()), Method::GET, &format!("/v1/invoices/{earlier}"), None, &[]).await;
    assert_eq!(status, 404, "no invoice before the account existed");
}
