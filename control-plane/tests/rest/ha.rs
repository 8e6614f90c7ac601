//! Two control planes on one PostgreSQL store, in this process, each with its listeners
//! (`startup::start`): one holds the background jobs' leases, the other forwards gateways'
//! limit reports to it, so the shares count every gateway whichever control plane it asked;
//! when the holder dies, the other takes every lease over, learns the gateways' demands for
//! a moment, and answers. Runs only in the Postgres lane (`SHOAL_TEST_POSTGRES_URL`).

use crate::support::{fresh_postgres_database, one_node_pool};
use shoal_control_plane::lease::{ACL_SWEEP, LIMITS, STORAGE_SAMPLER};
use shoal_control_plane::{startup, ControlPlane, ControlPlaneConfig};
use shoal_types::throttle::{LoginCount, LoginKind, LoginReport};
use shoal_types::{CacheId, LimitDemand, LimitReport, LimitShare};
use std::time::{Duration, Instant};

async fn control_plane(
    database_url: &str,
    dir: &std::path::Path,
    pool: &std::sync::Arc<shoal_engine::Pool>,
) -> ControlPlane {
    let config = ControlPlaneConfig {
        database_url: database_url.into(),
        // Shared by both, as an operator gives every control plane the same secrets.
        admin_token_path: dir.join("admin.token"),
        listen: "127.0.0.1:0".into(),
        internal_listen: "127.0.0.2:0".into(),
        ..Default::default()
    };
    let pools =
        shoal_control_plane::pools::Pools::new(vec![("main".to_string(), pool.clone())], "main").unwrap();
    startup::start(config, std::sync::Arc::new(pools)).await.expect("control plane starts")
}

/// A gateway instance's report: it wants all of a cache's 1,000 ECPU/s and connections.
fn report(gateway: &str, cache: &CacheId) -> LimitReport {
    LimitReport {
        gateway_id: gateway.into(),
        demands: vec![LimitDemand {
            cache: cache.clone(),
            ecpu_per_second: Some(1000),
            ecpu_demand: 0,
            ecpu_saturated: true,
            max_connections: Some(10),
            connections: 0,
            connections_refused: 1,
        }],
        logins: None,
    }
}

/// `POST /internal/v1/limits` to `cp` as the gateway `credential`: status and shares.
async fn post(
    http: &reqwest::Client,
    cp: &ControlPlane,
    credential: &str,
    report: &LimitReport,
    extra: Option<(&str, &str)>,
) -> (u16, Option<LimitShare>) {
    let mut req = http
        .post(format!("http://{}/internal/v1/limits", cp.internal_addr))
        .bearer_auth(credential)
        .json(report);
    if let Some((k, v)) = extra {
        req = req.header(k, v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let shares: Option<Vec<LimitShare>> = resp.json().await.ok();
    (status, shares.and_then(|s| s.into_iter().next()))
}

/// `report` with `failures` failed logins of one user at one source, as `gateway`:
/// status and answer.
async fn post_logins(
    http: &reqwest::Client,
    cp: &ControlPlane,
    credential: &str,
    report: &LimitReport,
    user: &str,
    failures: u32,
) -> (u16, serde_json::Value) {
    let mut policy = shoal_types::throttle::ThrottlePolicy::default();
    policy.per_user.lockout_after = 6;
    let key = LoginCount {
        kind: LoginKind::User,
        source: [10, 0, 0, 1].into(),
        user: user.into(),
        failures,
        succeeded: false,
    };
    let report =
        LimitReport { logins: Some(LoginReport { policy, keys: vec![key], since: None }), ..report.clone() };
    let resp = http
        .post(format!("http://{}/internal/v1/limits", cp.internal_addr))
        .bearer_auth(credential)
        .json(&report)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// Whether `cp` holds lease `name` within `limit`.
async fn held_within(cp: &ControlPlane, name: &str, limit: Duration) -> bool {
    let mut held = cp.lease(name).unwrap().watch();
    // The borrow `wait_for` returns is let go at once (the lease waits for it to change).
    tokio::time::timeout(limit, held.wait_for(|h| *h)).await.is_ok_and(|r| r.is_ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limits_coordinator_is_reached_through_either_control_plane_and_fails_over() {
    let Some(database_url) = fresh_postgres_database() else {
        println!("SKIPPED: no SHOAL_TEST_POSTGRES_URL (the Postgres lane of scripts/test.sh runs this)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let pool = one_node_pool(&tmp.path().join("valkey")).await;
    let mut first = control_plane(&database_url, tmp.path(), &pool).await;
    let second = control_plane(&database_url, tmp.path(), &pool).await;
    assert_ne!(first.instance, second.instance);
    for name in [STORAGE_SAMPLER, ACL_SWEEP] {
        assert!(first.lease(name).unwrap().held(), "{name}: the first to start holds it");
        assert!(!second.lease(name).unwrap().held(), "{name}: the second does not");
    }
    // The limits lease: only control planes that gateways ask take part.
    assert!(!first.lease(LIMITS).unwrap().held() && !second.lease(LIMITS).unwrap().held());

    let event = shoal_control_plane::store::audit::AuditEvent {
        actor: "test".into(),
        action: "gateway.create".into(),
        ..Default::default()
    };
    let credential = shoal_control_plane::gateways::issue(&first.store, "edge", false, event).await.unwrap();
    let credential = credential.expose().to_string();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let cache = CacheId::generate();
    let (g1, g2) = (report("g1", &cache), report("g2", &cache));

    // g1 asks the first: nobody coordinates yet, so the first offers to, takes the limits
    // lease at once and answers (no warm-up: nobody answered before it).
    let asked = Instant::now();
    let (status, share) = post(&http, &first, &credential, &g1, None).await;
    println!("FIGURE limits: the first report answered by a new coordinator after {:.2?}", asked.elapsed());
    assert_eq!((status, share.map(|s| s.gateways)), (200, Some(1)));
    assert!(first.lease(LIMITS).unwrap().held());
    let row = first.store.lease(LIMITS).await.unwrap().unwrap();
    assert_eq!(row.holder, first.instance);
    assert_eq!(row.url.as_deref(), Some(format!("http://{}", first.internal_addr).as_str()));
    // g2 asks the other, which forwards: the holder counts both and splits the limit.
    let (status, share) = post(&http, &second, &credential, &g2, None).await;
    let share = share.expect("the holder's answer, forwarded");
    assert_eq!(status, 200);
    assert_eq!((share.gateways, share.ecpu_milli_per_second), (2, Some(500_000)));
    let (_, share) = post(&http, &first, &credential, &g1, None).await;
    assert_eq!(share.unwrap().gateways, 2);
    // Failed logins count together too: 3 at each gateway lock the user out (at 6), and
    // the lockout comes back through the control plane that forwards.
    let (status, answer) = post_logins(&http, &first, &credential, &g1, "app@c0123456789ab", 3).await;
    assert_eq!((status, answer["logins"]["locks"].as_array().map(Vec::len)), (200, Some(0)), "{answer}");
    let (status, answer) = post_logins(&http, &second, &credential, &g2, "app@c0123456789ab", 3).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["logins"]["locks"][0]["user"], "app@c0123456789ab", "{answer}");
    assert_eq!(answer["shares"][0]["gateways"], 2, "{answer}");
    // A bad one is refused whole, before it is forwarded.
    let (status, answer) = post_logins(&http, &second, &credential, &g2, &"x".repeat(300), 1).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.to_string().contains("at most 256 bytes"), "{answer}");
    // A wrong credential is refused.
    let (status, _) = post(&http, &second, "sgw_edge_wrong-secret-wrong-secret-wrong", &g2, None).await;
    assert_eq!(status, 401);
    // A report forwarded already is never forwarded again: one that reaches a control plane
    // that does not coordinate is misdirected.
    let (status, _) =
        post(&http, &second, &credential, &g2, Some(("x-shoal-forwarded-by", "elsewhere"))).await;
    assert_eq!(status, 421);
    assert!(!second.lease(LIMITS).unwrap().held(), "a forwarded report does not make it take part");

    // The holder dies: its listeners go and its lease sessions end (as a killed process's
    // sockets close), without releasing anything. The second, asked by g2 just now, takes
    // part in the limits lease.
    let died = Instant::now();
    drop(std::mem::take(&mut first.leases));
    tokio::join!(first.handle.stop(false), first.internal_handle.stop(false));
    // Meanwhile the survivor answers 503: the gateway keeps its last shares.
    let (status, _) = post(&http, &second, &credential, &g2, None).await;
    assert_eq!(status, 503);
    assert!(
        held_within(&second, LIMITS, Duration::from_secs(10)).await,
        "the survivor takes the limits lease over within 10 s"
    );
    let took_limits = died.elapsed();
    // The new coordinator learns the gateways' demands before it answers (the old one
    // answered just now: gateways may hold its shares), so its first shares count both.
    let (status, _) = post(&http, &second, &credential, &g1, None).await;
    assert_eq!(status, 503, "a coordinator that has just taken over does not answer at once");
    for name in [STORAGE_SAMPLER, ACL_SWEEP] {
        assert!(
            held_within(&second, name, Duration::from_secs(10)).await,
            "{name}: the survivor takes it over within 10 s"
        );
    }
    let took = died.elapsed();
    println!(
        "FIGURE control plane failover (in-process): the survivor held the limits lease {took_limits:.2?} \
         and every lease {took:.2?} after the holder died"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    let row = second.store.lease(LIMITS).await.unwrap().unwrap();
    assert_eq!(row.holder, second.instance);

    let deadline = Instant::now() + Duration::from_secs(5);
    let first_share = loop {
        assert!(Instant::now() < deadline, "the new coordinator never answered");
        let (_, a) = post(&http, &second, &credential, &g1, None).await;
        let (_, b) = post(&http, &second, &credential, &g2, None).await;
        if let Some(share) = a.or(b) {
            break share;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(died.elapsed() >= took_limits + shoal_control_plane::limits::WARM_UP);
    assert_eq!((first_share.gateways, first_share.ecpu_milli_per_second), (2, Some(500_000)));
    second.stop().await;
    first.store.flush_audit().await.unwrap();
}
