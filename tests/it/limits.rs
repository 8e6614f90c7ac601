//! Limits and bad input at the RESP endpoint: each refused with a clear error, nothing else
//! disturbed.

use crate::support::{auth_command, raw, ShoalDev};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn read_some(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

#[tokio::test]
async fn connection_limits_and_timeouts() {
    let dev = ShoalDev::start_with(&[
        "--max-connections-per-cache",
        "2",
        "--max-unauthenticated",
        "3",
        "--auth-timeout",
        "1",
        "--idle-timeout",
        "1",
        "--max-bulk-bytes",
        "1048576",
    ])
    .await;
    let cache = dev.create_cache("limited").await;
    let token = dev.mint_token(cache["id"].as_str().unwrap()).await;

    // Per-cache connection cap: the third connection of the cache is refused.
    let c1 = dev.client(&token).await.unwrap();
    let c2 = dev.client(&token).await.unwrap();
    let out = raw(dev.resp_port, &auth_command(&token)).await;
    assert_eq!(out, b"-ERR max number of clients reached for this cache\r\n");
    drop((c1, c2));
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Unauthenticated connections: at most 3 at once; a fourth is refused at the door.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tokio::net::TcpStream::connect(("127.0.0.1", dev.resp_port)).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let out = raw(dev.resp_port, b"PING\r\n").await;
    assert_eq!(out, b"-ERR max number of unauthenticated clients reached\r\n");
    // ...and they are closed when they do not authenticate in time.
    let out = read_some(&mut idle[0]).await;
    let out = if out.is_empty() { read_some(&mut idle[0]).await } else { out };
    assert_eq!(out, b"-ERR authentication timed out\r\n");
    drop(idle);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Idle timeout: an authenticated connection that sends nothing is closed.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", dev.resp_port)).await.unwrap();
    s.write_all(&auth_command(&token)).await.unwrap();
    assert_eq!(read_some(&mut s).await, b"+OK\r\n");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "idle connection still open");

    // A bulk string above the configured maximum is a protocol error, checked before the
    // payload arrives; the connection closes and nothing is stored.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", dev.resp_port)).await.unwrap();
    s.write_all(&auth_command(&token)).await.unwrap();
    s.write_all(b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$2097152\r\n").await.unwrap();
    let out = read_some(&mut s).await;
    assert_eq!(out, b"+OK\r\n-ERR Protocol error: invalid bulk length\r\n");
    let mut c = dev.client(&token).await.unwrap();
    let got: Option<String> = redis::cmd("GET").arg("big").query_async(&mut c).await.unwrap();
    assert_eq!(got, None);
}

#[tokio::test]
async fn malformed_resp_gets_valkeys_protocol_error_and_the_connection_closes() {
    let dev = ShoalDev::start().await;
    let cache = dev.create_cache("bad-input").await;
    let token = dev.mint_token(cache["id"].as_str().unwrap()).await;
    let auth = auth_command(&token);
    for (input, expected) in [
        (&b"*1\r\n+PING\r\n"[..], "-ERR Protocol error: expected '$', got '+'\r\n"),
        (b"*2\r\n$3\r\nGET\r\n$-7\r\n", "-ERR Protocol error: invalid bulk length\r\n"),
        (b"*abc\r\n", "-ERR Protocol error: invalid multibulk length\r\n"),
        (b"*1\r\n$4\r\nPINGxx\r\n", "-ERR Protocol error: invalid bulk format\r\n"),
        (b"SET k \"unterminated\r\n", "-ERR Protocol error: unbalanced quotes in request\r\n"),
    ] {
        let out = raw(dev.resp_port, &[auth.as_slice(), input, b"PING\r\n"].concat()).await;
        assert_eq!(
            String::from_utf8_lossy(&out),
            format!("+OK\r\n{expected}"),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
    // Inline commands with quotes and escapes work like valkey-cli's.
    let out = raw(dev.resp_port, &[auth.as_slice(), b"SET q \"a\\x41 b\"\r\nGET q\r\n"].concat()).await;
    assert_eq!(out, b"+OK\r\n+OK\r\n$4\r\naA b\r\n");
}
