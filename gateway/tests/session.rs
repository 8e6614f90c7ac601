//! A gateway in-process against the fake control plane and one real `valkey-server`: logins,
//! a round trip, usage reaching the control plane, caches kept apart. No `shoal dev`, no
//! control plane: each test starts in well under a second (the whole-system tests of the
//! same kind are in the workspace's `tests/it`).

use redis::aio::MultiplexedConnection;
use redis::Value;
use shoal_engine::TenantAcl;
use shoal_gateway::control_plane::fake::FakeControlPlane;
use shoal_gateway::control_plane::ControlPlane;
use shoal_gateway::{Gateway, GatewayConfig};
use shoal_types::{CacheId, TenantRoute};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// One valkey-server, a gateway in front of it, and the fake control plane both answer to.
struct Setup {
    fake: Arc<FakeControlPlane>,
    /// The gateway's RESP address.
    addr: SocketAddr,
    valkey_addr: String,
    valkey: Child,
    _dir: tempfile::TempDir,
    _stop: watch::Sender<bool>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = self.valkey.kill();
        let _ = self.valkey.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Setup {
    async fn start() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let bin = shoal_engine::find_valkey_server().expect("valkey-server (SHOAL_VALKEY_SERVER)");
        let port = free_port();
        let valkey = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--databases", "16"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let valkey_addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect(&valkey_addr).await.is_err() {
            assert!(Instant::now() < deadline, "valkey-server did not start");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let fake = FakeControlPlane::new();
        let config = GatewayConfig { listen: "127.0.0.1:0".into(), threads: 1, ..Default::default() };
        let gateway = Gateway::bind_with(config, ControlPlane::Fake(fake.clone())).await.unwrap();
        let addr = gateway.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(gateway.run(stopped));
        Setup { fake, addr, valkey_addr, valkey, _dir: dir, _stop: stop }
    }

    /// A cache on the node at database `db`: its ACL user made as the engine makes it, its
    /// route on the fake control plane.
    async fn cache(&self, name: &str, db: u32) -> CacheId {
        let id = CacheId::generate();
        let acl = TenantAcl {
            user: format!("t{id}"),
            password: format!("pw-{id}"),
            db,
            databases: 1,
            placement: Default::default(),
        };
        let mut admin = connect(&format!("redis://{}/", self.valkey_addr)).await;
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&acl.user)
            .arg(acl.setuser_rules())
            .query_async(&mut admin)
            .await
            .unwrap();
        self.fake.add_route(TenantRoute {
            cache_id: id.clone(),
            cache_name: name.into(),
            node_addr: self.valkey_addr.clone(),
            cluster_nodes: Vec::new(),
            db,
            databases: 1,
            acl_user: acl.user,
            acl_password: acl.password,
            observer_user: String::new(),
            observer_password: String::new(),
            keyspace_events: String::new(),
            limits: Default::default(),
            storage_full: false,
            storage_bytes: 0,
            storage_sampled_at_ms: 0,
            eviction_policy: "noeviction".into(),
            dedicated: false,
        });
        id
    }

    /// A client logged in through the gateway as `user` (`AUTH user password`).
    async fn client(&self, user: &str, password: &str) -> MultiplexedConnection {
        let user = user.replace('@', "%40");
        connect(&format!("redis://{user}:{password}@{}/", self.addr)).await
    }

    /// Raw bytes in, everything the gateway answered until it stops for 200 ms out.
    async fn raw(&self, request: &[u8]) -> String {
        let mut stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

async fn connect(url: &str) -> MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

async fn set_get(c: &mut MultiplexedConnection, key: &str, value: &str) -> Option<String> {
    let _: () = redis::cmd("SET").arg(key).arg(value).query_async(c).await.unwrap();
    redis::cmd("GET").arg(key).query_async(c).await.unwrap()
}

fn auth(user: &str, password: &str) -> String {
    format!("*3\r\n$4\r\nAUTH\r\n${}\r\n{user}\r\n${}\r\n{password}\r\n", user.len(), password.len())
}

const PING: &str = "*1\r\n$4\r\nPING\r\n";

#[tokio::test]
async fn a_cache_user_logs_in_and_reads_back_what_it_wrote() {
    let s = Setup::start().await;
    let cache = s.cache("users", 3).await;
    s.fake.add_user(&cache, "alice", "secret");
    let mut c = s.client(&format!("alice@{cache}"), "secret").await;
    assert_eq!(set_get(&mut c, "k", "v").await.as_deref(), Some("v"));
    // The cache's database 0 is the node's database 3.
    let mut node = connect(&format!("redis://{}/3", s.valkey_addr)).await;
    let stored: Option<String> = redis::cmd("GET").arg("k").query_async(&mut node).await.unwrap();
    assert_eq!(stored.as_deref(), Some("v"));
}

#[tokio::test]
async fn a_token_the_control_plane_signed_logs_in() {
    let s = Setup::start().await;
    let cache = s.cache("tokens", 0).await;
    let token = s.fake.token(&cache);
    let mut c = s.client("default", &token).await;
    assert_eq!(set_get(&mut c, "k", "v").await.as_deref(), Some("v"));
    let name: String = redis::cmd("CLIENT").arg("GETNAME").query_async(&mut c).await.unwrap_or_default();
    assert_eq!(name, "", "a virtual command answers after a token login too");
}

#[tokio::test]
async fn a_refused_login_gets_wrongpass_runs_nothing_and_is_audited() {
    let s = Setup::start().await;
    let cache = s.cache("refused", 0).await;
    s.fake.add_user(&cache, "alice", "secret");
    for (user, password) in [(format!("alice@{cache}"), "wrong"), (format!("bob@{cache}"), "secret")] {
        let out = s.raw(format!("{}{PING}", auth(&user, password)).as_bytes()).await;
        assert_eq!(
            out,
            "-WRONGPASS invalid username-password pair or user is disabled.\r\n\
             -NOAUTH Authentication required.\r\n",
            "{user}"
        );
    }
    // The gateway sends login events in batches, about every second.
    let deadline = Instant::now() + Duration::from_secs(5);
    let reasons = loop {
        let audit = s.fake.audit();
        if audit.len() >= 2 || Instant::now() > deadline {
            break audit.into_iter().map(|e| (e.outcome, e.reason)).collect::<Vec<_>>();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        reasons,
        [("failure".to_string(), "wrong password".to_string()), ("failure".into(), "unknown user".into())]
    );
}

#[tokio::test]
async fn usage_of_the_commands_reaches_the_control_plane() {
    let s = Setup::start().await;
    let cache = s.cache("metered", 0).await;
    let mut c = s.client("default", &s.fake.token(&cache)).await;
    for i in 0..10 {
        let _: () = redis::cmd("SET").arg(format!("k{i}")).arg("v").query_async(&mut c).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let commands = loop {
        let batches = s.fake.usage();
        let usage = batches.iter().flat_map(|b| &b.usage).filter(|u| u.cache_id == cache);
        let commands: u64 = usage.map(|u| u.counters.commands).sum();
        if commands >= 10 || Instant::now() > deadline {
            break commands;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(commands, 10, "ten SETs, each counted once");
}

#[tokio::test]
async fn a_second_cache_cannot_read_the_firsts_keys() {
    let s = Setup::start().await;
    let (a, b) = (s.cache("a", 0).await, s.cache("b", 1).await);
    let mut ca = s.client("default", &s.fake.token(&a)).await;
    let mut cb = s.client("default", &s.fake.token(&b)).await;
    let _: () = redis::cmd("SET").arg("secret").arg("a's").query_async(&mut ca).await.unwrap();
    let read: Option<String> = redis::cmd("GET").arg("secret").query_async(&mut cb).await.unwrap();
    assert_eq!(read, None);
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut cb).await.unwrap();
    assert!(keys.is_empty(), "{keys:?}");
    // Nor by selecting past its own databases.
    let selected = redis::cmd("SELECT").arg(1).query_async::<Value>(&mut cb).await;
    assert!(selected.is_err(), "{selected:?}");
    // A's token does not open B, even named as B.
    let out = s.raw(format!("{}{PING}", auth(b.as_str(), &s.fake.token(&a))).as_bytes()).await;
    assert!(out.starts_with("-WRONGPASS"), "{out}");
}

#[tokio::test]
async fn a_control_plane_that_does_not_answer_fails_logins_closed() {
    let s = Setup::start().await;
    let cache = s.cache("down", 0).await;
    s.fake.add_user(&cache, "alice", "secret");
    s.fake.set_down(true);
    let out = s.raw(format!("{}{PING}", auth(&format!("alice@{cache}"), "secret")).as_bytes()).await;
    assert!(out.starts_with('-') && out.ends_with("-NOAUTH Authentication required.\r\n"), "{out}");
    s.fake.set_down(false);
    let mut c = s.client(&format!("alice@{cache}"), "secret").await;
    assert_eq!(set_get(&mut c, "k", "v").await.as_deref(), Some("v"));
}
