//! Test harness: the public REST API in-process ([`startup::public_app`] driven by
//! `actix_web::test`), on a fresh store in a temporary directory (or a fresh PostgreSQL
//! database in the Postgres lane) and a pool of one real valkey-server node (`main`), with
//! a small Valkey cluster pool beside it when a test asks ([`Api::start_with_cluster`]).
#![allow(dead_code)]

use actix_web::dev::Service;
use actix_web::http::Method;
use actix_web::test::TestRequest;
use serde_json::Value;
use shoal_control_plane::state::AppState;
use shoal_control_plane::{startup, ControlPlaneConfig};
use shoal_engine::{NodeSpec, Pool, PoolConfig};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::process::Command;
use std::sync::Arc;

/// What a request got back.
pub struct Reply {
    pub status: u16,
    /// Header names in lower case.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as JSON (Null when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

type Send = Box<dyn Fn(TestRequest) -> Pin<Box<dyn Future<Output = Reply>>>>;

/// The public REST API of a fresh control plane, called in-process.
pub struct Api {
    send: Send,
    pub state: actix_web::web::Data<AppState>,
    /// The nodes die with the test's thread (PR_SET_PDEATHSIG), so nothing stops them.
    pool: Arc<Pool>,
    /// The store: SQLite in the temporary directory unless the Postgres lane gave a server.
    pub database_url: String,
    pub postgres: bool,
    admin_token: String,
    _tmp: tempfile::TempDir,
}

impl Api {
    pub async fn start() -> Api {
        Api::start_with(None).await
    }

    /// With a Valkey cluster pool named `cluster` beside the standalone `main` (the
    /// default): `shards` × `replicas`, node timeout 1 s, on ports below the ephemeral range.
    pub async fn start_with_cluster(shards: usize, replicas: usize) -> Api {
        Api::start_with(Some((shards, replicas))).await
    }

    async fn start_with(cluster: Option<(usize, usize)>) -> Api {
        let tmp = tempfile::tempdir().unwrap();
        let pool = one_node_pool(&tmp.path().join("valkey")).await;
        let postgres_url = fresh_postgres_database();
        let database_url = postgres_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", tmp.path().join("shoal.db").display()));
        let config = ControlPlaneConfig {
            database_url: database_url.clone(),
            admin_token_path: tmp.path().join("admin.token"),
            ..Default::default()
        };
        let mut pools = vec![("main".to_string(), pool.clone())];
        if let Some((shards, replicas)) = cluster {
            let config = shoal_engine::ClusterConfig {
                valkey_server: shoal_engine::find_valkey_server().unwrap(),
                dir: tmp.path().join("cluster"),
                host: "127.0.0.1".into(),
                base_port: cluster_base_port(),
                shards,
                replicas,
                databases: 64,
                maxmemory_mb: Some(128),
                script_time_limit: shoal_engine::DEFAULT_SCRIPT_TIME_LIMIT,
                modules: Vec::new(),
                node_timeout: std::time::Duration::from_secs(1),
                agents: None,
            };
            pools.push((
                "cluster".to_string(),
                Arc::new(Pool::start_cluster(config).await.expect("cluster starts")),
            ));
        }
        let pools = Arc::new(shoal_control_plane::pools::Pools::new(pools, "main").unwrap());
        let state = startup::state(config, pools).await.expect("control plane state");
        let admin_token = std::fs::read_to_string(tmp.path().join("admin.token")).unwrap().trim().to_string();
        let service =
            std::rc::Rc::new(actix_web::test::init_service(startup::public_app(state.clone())).await);
        let send: Send = Box::new(move |req: TestRequest| {
            let service = service.clone();
            Box::pin(async move {
                let req = req.peer_addr("127.0.0.1:40000".parse().unwrap()).to_request();
                // An error the middleware passes on is answered as actix-web's server would.
                let resp = match service.call(req).await {
                    Ok(resp) => resp.into_parts().1.map_into_boxed_body(),
                    Err(e) => e.error_response(),
                };
                let status = resp.status().as_u16();
                let headers = resp
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or_default().to_string()))
                    .collect();
                let body =
                    actix_web::body::to_bytes(resp.into_body()).await.map(|b| b.to_vec()).unwrap_or_default();
                Reply { status, headers, body }
            })
        });
        Api { send, state, pool, postgres: postgres_url.is_some(), database_url, admin_token, _tmp: tmp }
    }

    pub fn admin_token(&self) -> String {
        self.admin_token.clone()
    }

    /// A request as built by the caller.
    pub async fn send(&self, req: TestRequest) -> Reply {
        (self.send)(req).await
    }

    /// A REST call as the admin.
    pub async fn api(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let (status, _, body) = self.call(Some(&self.admin_token()), method, path, body, &[]).await;
        (status, body)
    }

    /// A REST call as `token` (None = no Authorization header) with extra headers; returns
    /// status, headers (lower-case names) and the JSON body (Null when the body is not JSON).
    pub async fn call(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (u16, HashMap<String, String>, Value) {
        let mut req = TestRequest::default().method(method).uri(path);
        if let Some(t) = token {
            req = req.insert_header(("Authorization", format!("Bearer {t}")));
        }
        for (k, v) in headers {
            req = req.insert_header((*k, *v));
        }
        if let Some(body) = body {
            req = req.set_json(body);
        }
        let reply = self.send(req).await;
        let json = reply.json();
        (reply.status, reply.headers, json)
    }

    /// Creates an account and an API key of `role` for it; returns (account id, token).
    pub async fn account_with_key(&self, name: &str, role: &str) -> (String, String) {
        let (status, account) =
            self.api(Method::POST, "/v1/accounts", Some(serde_json::json!({ "name": name }))).await;
        assert_eq!(status, 201, "{account}");
        let id = account["id"].as_str().unwrap().to_string();
        let token = self.api_key(&id, role).await;
        (id, token)
    }

    /// A new API key of `role` for an account (created by the admin).
    pub async fn api_key(&self, account: &str, role: &str) -> String {
        let (status, key) = self
            .api(
                Method::POST,
                &format!("/v1/accounts/{account}/api-keys"),
                Some(serde_json::json!({ "name": format!("{role} key"), "role": role })),
            )
            .await;
        assert_eq!(status, 201, "{key}");
        key["token"].as_str().unwrap().to_string()
    }

    pub async fn create_cache(&self, name: &str) -> Value {
        let (status, body) =
            self.api(Method::POST, "/v1/caches", Some(serde_json::json!({"name": name}))).await;
        assert_eq!(status, 201, "{body}");
        body
    }

    /// Runs raw SQL on the store (as an operator or attacker with database access could).
    pub async fn sql(&self, query: &str) {
        if let Err(e) = self.run_sql(query).await {
            panic!("SQL {query:?} failed: {e}");
        }
    }

    /// Like [`sql`](Self::sql), for statements expected to fail: the error text.
    pub async fn sql_err(&self, query: &str) -> String {
        match self.run_sql(query).await {
            Ok(()) => panic!("SQL {query:?} should have failed"),
            Err(e) => e,
        }
    }

    /// On a connection of its own, not the control plane's pool.
    async fn run_sql(&self, query: &str) -> Result<(), String> {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&self.database_url).await.map_err(|e| e.to_string())?;
        let result = sqlx::raw_sql(query).execute(&mut conn).await.map(|_| ()).map_err(|e| e.to_string());
        let _ = conn.close().await;
        result
    }
}

/// A standalone pool of one real valkey-server node (`n0`) in `dir`, on a free port.
pub async fn one_node_pool(dir: &std::path::Path) -> Arc<Pool> {
    let free_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    Arc::new(
        Pool::start(PoolConfig {
            valkey_server: shoal_engine::find_valkey_server().expect("valkey-server ($SHOAL_VALKEY_SERVER)"),
            dir: dir.to_path_buf(),
            nodes: vec![NodeSpec::new("n0", "127.0.0.1", free_port)],
            databases: 64,
            maxmemory_mb: None,
            script_time_limit: shoal_engine::DEFAULT_SCRIPT_TIME_LIMIT,
            modules: Vec::new(),
            node_secret: None,
            supervisor: Default::default(),
            cluster: None,
        })
        .await
        .expect("pool starts"),
    )
}

/// A base port for a small cluster: node n on base + n, its bus on base + n + 10000, all
/// below Linux's ephemeral range (32768 on) where other tests' free ports come from. Bases
/// 2000–9990 (buses 12000–19990); the engine's own cluster tests take 10000–19990.
fn cluster_base_port() -> u16 {
    loop {
        let base = 2000 + (rand::random::<u16>() % 800) * 10;
        let free = (0..8).all(|i| {
            std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", base + i + 10000)).is_ok()
        });
        if free {
            return base;
        }
    }
}

/// With `SHOAL_TEST_POSTGRES_URL` set (the Postgres lane of scripts/test.sh), a new empty
/// database on that server for one test; otherwise None (SQLite). As in tests/it/support.
pub fn fresh_postgres_database() -> Option<String> {
    let server = std::env::var("SHOAL_TEST_POSTGRES_URL").ok().filter(|u| !u.is_empty())?;
    let name = format!("shoal_{:016x}", rand::random::<u64>());
    let out = Command::new("psql")
        .arg(&server)
        .args(["-v", "ON_ERROR_STOP=1", "-qc", &format!("CREATE DATABASE {name}")])
        .output()
        .expect("psql runs");
    assert!(out.status.success(), "CREATE DATABASE failed: {}", String::from_utf8_lossy(&out.stderr));
    let base = server.rsplit_once('/').map(|(b, _)| b).unwrap_or(&server);
    Some(format!("{base}/{name}"))
}
