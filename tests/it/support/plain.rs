//! A plain valkey-server of a test's own, on a free port: what the gateway's replies are
//! compared with, and what loads or writes an RDB file.

use redis::aio::MultiplexedConnection;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A plain valkey-server, killed when dropped.
pub struct PlainValkey {
    child: Child,
    pub port: u16,
    _dir: Option<tempfile::TempDir>,
}

impl PlainValkey {
    /// An empty server in a directory of its own.
    pub async fn start() -> PlainValkey {
        let dir = tempfile::tempdir().unwrap();
        let mut server = PlainValkey::spawn(dir.path(), None).await;
        server._dir = Some(dir);
        server
    }

    /// A server in `dir` that loads (and `SAVE`s to) `dir/dbfilename`.
    pub async fn with_rdb(dir: &Path, dbfilename: &str) -> PlainValkey {
        PlainValkey::spawn(dir, Some(dbfilename)).await
    }

    async fn spawn(dir: &Path, dbfilename: Option<&str>) -> PlainValkey {
        let binary = shoal_engine::find_valkey_server()
            .expect("valkey-server (set SHOAL_VALKEY_SERVER or run scripts/setup.sh --test)");
        let port = super::free_port();
        let mut cmd = Command::new(binary);
        cmd.args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .arg("--dir")
            .arg(dir);
        if let Some(file) = dbfilename {
            cmd.args(["--dbfilename", file]);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().expect("valkey-server runs");
        let server = PlainValkey { child, port, _dir: None };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = server.try_client().await {
                if redis::cmd("PING").query_async::<String>(&mut c).await.is_ok() {
                    return server;
                }
            }
            assert!(Instant::now() < deadline, "valkey-server did not come up on port {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn try_client(&self) -> redis::RedisResult<MultiplexedConnection> {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))?
            .get_multiplexed_async_connection()
            .await
    }
}

impl Drop for PlainValkey {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
