//! Upstream connections: one per session, to the cache's node, logged in as the cache's
//! ACL user and `SELECT`ed to its database. On a cluster pool the session's upstream is a
//! [`crate::cluster_link`] instead, which looks the same to it.

use crate::resp;
use crate::GatewayError;
use bytes::BytesMut;
use shoal_types::TenantRoute;
use std::time::Duration;
use tokio::io::DuplexStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{tcp, TcpStream};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long what the gateway sent a node may stay unacknowledged before the connection is
/// given up (`TCP_USER_TIMEOUT`). A node whose host is cut off or gone then fails the
/// requests waiting on it (`-ERR cache connection lost, try again`) within seconds, and the
/// next request connects afresh (failing fast while the node is unreachable, working as soon
/// as it is back), instead of every request of the cache's shared connection waiting until
/// the network returns — and then for TCP's next retransmission, or about 15 minutes until
/// TCP gives up. A node that is merely busy (a long script) still acknowledges what it is
/// sent, so this never ends a slow command.
pub const UNACKNOWLEDGED_LIMIT: Duration = Duration::from_secs(5);

/// A session's (or the mux's) upstream: a node, or a cluster link.
pub enum Upstream {
    Node(TcpStream),
    /// An in-memory pipe to the cluster link's task (same thread: no system call).
    Cluster(DuplexStream),
}

pub enum ReadHalf {
    Node(tcp::OwnedReadHalf),
    Cluster(tokio::io::ReadHalf<DuplexStream>),
}

pub enum WriteHalf {
    Node(tcp::OwnedWriteHalf),
    Cluster(tokio::io::WriteHalf<DuplexStream>),
}

impl Upstream {
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Upstream::Node(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Node(r), WriteHalf::Node(w))
            }
            Upstream::Cluster(s) => {
                let (r, w) = tokio::io::split(s);
                (ReadHalf::Cluster(r), WriteHalf::Cluster(w))
            }
        }
    }
}

impl ReadHalf {
    pub async fn read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            ReadHalf::Node(h) => h.read_buf(buf).await,
            ReadHalf::Cluster(h) => h.read_buf(buf).await,
        }
    }
}

impl WriteHalf {
    pub async fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            WriteHalf::Node(h) => h.write(buf).await,
            WriteHalf::Cluster(h) => h.write(buf).await,
        }
    }

    pub fn try_write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            WriteHalf::Node(h) => h.try_write(buf),
            // What the pipe takes now (it never blocks); full: try later.
            WriteHalf::Cluster(h) => {
                use futures_util::FutureExt;
                h.write(buf).now_or_never().unwrap_or(Err(std::io::ErrorKind::WouldBlock.into()))
            }
        }
    }
}

/// Opens a connection to the cache's node and prepares it: AUTH, then SELECT `db`; on a
/// cluster pool, a cluster link (`reader`: one that reads from replicas).
pub async fn connect(route: &TenantRoute, db: u32, reader: bool) -> Result<Upstream, GatewayError> {
    if route.cluster_nodes.is_empty() {
        let stream = connect_to(&route.node_addr, &route.acl_user, &route.acl_password, db, false).await?;
        Ok(Upstream::Node(stream))
    } else {
        Ok(Upstream::Cluster(crate::cluster_link::open(route, db, reader).await?))
    }
}

/// Opens a connection to one node as `user`, `SELECT`ed to `db`; `readonly`: a replica's,
/// which then serves reads (`READONLY`).
pub async fn connect_to(
    addr: &str,
    user: &str,
    password: &str,
    db: u32,
    readonly: bool,
) -> Result<TcpStream, GatewayError> {
    let setup = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| GatewayError::Upstream(format!("connect {addr}: {e}")))?;
        stream.set_nodelay(true).ok();
        give_up_when_unacknowledged(&stream);
        let mut out = BytesMut::new();
        resp::command(&mut out, &[b"AUTH", user.as_bytes(), password.as_bytes()]);
        resp::command(&mut out, &[b"SELECT", db.to_string().as_bytes()]);
        let mut replies = 2;
        if readonly {
            resp::command(&mut out, &[b"READONLY"]);
            replies += 1;
        }
        stream.write_all(&out).await.map_err(|e| GatewayError::Upstream(e.to_string()))?;
        let mut buf = BytesMut::with_capacity(256);
        let mut scanner = resp::reply::ReplyScanner::new();
        for _ in 0..replies {
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

/// Sets [`UNACKNOWLEDGED_LIMIT`] on a connection to a node.
fn give_up_when_unacknowledged(stream: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_user_timeout(Some(UNACKNOWLEDGED_LIMIT)) {
        tracing::warn!(error = %e, "TCP_USER_TIMEOUT not set on an upstream connection");
    }
}

/// Reads from an upstream connection if there is one; never resolves otherwise (for
/// `select!` branches).
pub(crate) async fn read_opt(half: Option<&mut ReadHalf>, buf: &mut BytesMut) -> std::io::Result<usize> {
    match half {
        Some(h) => h.read_buf(buf).await,
        None => std::future::pending().await,
    }
}

/// Writes to an upstream connection if there is one; never resolves otherwise.
pub(crate) async fn write_opt(half: Option<&mut WriteHalf>, buf: &[u8]) -> std::io::Result<usize> {
    match half {
        Some(h) => h.write(buf).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn upstream_connections_give_up_on_a_node_that_acknowledges_nothing_within_5_s() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        give_up_when_unacknowledged(&stream);
        let set = socket2::SockRef::from(&stream).tcp_user_timeout().unwrap();
        assert_eq!(set, Some(UNACKNOWLEDGED_LIMIT));
    }
}
