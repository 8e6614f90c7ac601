//! Upstream connections: one per session, to the cache's node, logged in as the cache's
//! ACL user and `SELECT`ed to its database.

use crate::resp;
use crate::GatewayError;
use bytes::BytesMut;
use shoal_types::TenantRoute;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Opens a connection to the cache's node and prepares it: AUTH, then SELECT `db`.
pub async fn connect(route: &TenantRoute, db: u32) -> Result<TcpStream, GatewayError> {
    let setup = async {
        let mut stream = TcpStream::connect(&route.node_addr)
            .await
            .map_err(|e| GatewayError::Upstream(format!("connect {}: {e}", route.node_addr)))?;
        stream.set_nodelay(true).ok();
        let mut out = BytesMut::new();
        resp::command(&mut out, &[b"AUTH", route.acl_user.as_bytes(), route.acl_password.as_bytes()]);
        resp::command(&mut out, &[b"SELECT", db.to_string().as_bytes()]);
        stream.write_all(&out).await.map_err(|e| GatewayError::Upstream(e.to_string()))?;
        let mut buf = BytesMut::with_capacity(256);
        let mut scanner = resp::reply::ReplyScanner::new();
        for _ in 0..2 {
            let reply = loop {
                if let Some(r) = scanner.next(&buf).map_err(|e| GatewayError::Upstream(e.to_string()))? {
                    break r;
                }
                if stream.read_buf(&mut buf).await.map_err(|e| GatewayError::Upstream(e.to_string()))? == 0 {
                    return Err(GatewayError::Upstream("closed during setup".into()));
                }
            };
            if reply.error {
                return Err(if buf.starts_with(b"-WRONGPASS") {
                    GatewayError::UpstreamAuth
                } else {
                    GatewayError::Upstream(String::from_utf8_lossy(&buf[..reply.len]).trim().to_string())
                });
            }
            let _ = buf.split_to(reply.len);
        }
        Ok(stream)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, setup)
        .await
        .map_err(|_| GatewayError::Upstream("setup timed out".into()))?
}

/// Reads from an upstream connection if there is one; never resolves otherwise (for
/// `select!` branches).
pub(crate) async fn read_opt(half: Option<&mut OwnedReadHalf>, buf: &mut BytesMut) -> std::io::Result<usize> {
    match half {
        Some(h) => h.read_buf(buf).await,
        None => std::future::pending().await,
    }
}

/// Writes to an upstream connection if there is one; never resolves otherwise.
pub(crate) async fn write_opt(half: Option<&mut OwnedWriteHalf>, buf: &[u8]) -> std::io::Result<usize> {
    match half {
        Some(h) => h.write(buf).await,
        None => std::future::pending().await,
    }
}
