//! Snapshots: one cache's databases read from a node's replication stream and written as a
//! standard RDB file; and the writes that put such a file's keys into a cache.
//!
//! A snapshot asks the node for a full synchronisation as a replica would (`SYNC`, with
//! `REPLCONF rdb-only 1`, as `valkey-cli --rdb` does): the node forks and streams an RDB of
//! its whole dataset at that instant, a consistent point, blocked only for the fork. The
//! stream is read as it arrives and only the cache's databases are kept, renumbered from 0:
//! the node's other data is never stored, on disk or in memory. On a cluster pool each
//! shard's primary streams its part (one consistent point per shard, as ElastiCache's
//! per-shard snapshots).

use crate::cluster::Ranges;
use crate::node::Node;
use crate::pool::admin_conn;
use crate::{EngineError, Pool};
use shoal_rdb::{Header, Reader, Writer};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Longest a node may stay silent while it streams a snapshot (its fork and the first
/// bytes included; while it prepares it sends keep-alive newlines).
const STREAM_SILENCE: Duration = Duration::from_secs(60);
/// AUX fields a snapshot keeps from the node's RDB: what wrote it and when, nothing about
/// the node (its replication ids, memory, AOF state).
const KEPT_AUX: [&str; 4] = ["valkey-ver", "redis-ver", "redis-bits", "ctime"];

/// What a snapshot file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotFile {
    pub keys: u64,
    /// Bytes of the keys' serialized values (about what they take in memory, less overhead).
    pub value_bytes: u64,
}

/// One key to write into a cache.
pub struct RestoreKey {
    /// The cache's own database number (0 = its first).
    pub db: u32,
    pub key: Vec<u8>,
    /// Milliseconds to live; 0: no expiry.
    pub ttl_ms: u64,
    /// A `DUMP` payload ([`shoal_rdb::dump_payload`]).
    pub payload: Vec<u8>,
    pub idle_seconds: Option<u64>,
    pub freq: Option<u8>,
}

impl Pool {
    /// Writes an RDB file of the cache at `db..db + databases` on `target` to `out`, its
    /// databases numbered from 0 as the cache sees them.
    pub async fn snapshot(
        &self,
        target: &str,
        db: u32,
        databases: u32,
        out: &Path,
    ) -> Result<SnapshotFile, EngineError> {
        let sources: Vec<Arc<Node>> = match self.cluster() {
            Some(cluster) => cluster.primaries().await?,
            None => vec![Arc::clone(self.node(target)?)],
        };
        let logins: Vec<_> = sources.iter().map(|n| n.admin_login()).collect();
        let out = out.to_path_buf();
        tokio::task::spawn_blocking(move || write_snapshot(&logins, db..db + databases, &out))
            .await
            .map_err(|e| EngineError::Snapshot(format!("the snapshot's thread failed: {e}")))?
    }

    /// Writes `keys` into the cache whose first database is `db` on `target`
    /// (`RESTORE … REPLACE`). On a cluster pool each key goes to its slot's primary.
    pub async fn restore_keys(&self, target: &str, db: u32, keys: &[RestoreKey]) -> Result<(), EngineError> {
        let owners = self.owners(target).await?;
        for (node, indices) in group(&owners, keys.iter().map(|k| k.key.as_slice())) {
            let mut pipe = redis::pipe();
            let mut selected = None;
            for &i in &indices {
                let k = &keys[i];
                if selected != Some(k.db) {
                    pipe.cmd("SELECT").arg(db + k.db).ignore();
                    selected = Some(k.db);
                }
                let restore = pipe.cmd("RESTORE").arg(&k.key).arg(k.ttl_ms).arg(&k.payload).arg("REPLACE");
                if let Some(idle) = k.idle_seconds {
                    restore.arg("IDLETIME").arg(idle);
                }
                if let Some(freq) = k.freq {
                    restore.arg("FREQ").arg(freq);
                }
                restore.ignore();
            }
            let mut conn = admin_conn(&node).await?;
            pipe.query_async::<()>(&mut conn).await.map_err(|e| node.valkey_err(e))?;
        }
        Ok(())
    }

    /// Which of `keys` (cache database, key) exist in the cache whose first database is `db`.
    pub async fn existing_keys(
        &self,
        target: &str,
        db: u32,
        keys: &[(u32, Vec<u8>)],
    ) -> Result<Vec<bool>, EngineError> {
        let owners = self.owners(target).await?;
        let mut exists = vec![false; keys.len()];
        for (node, indices) in group(&owners, keys.iter().map(|(_, k)| k.as_slice())) {
            let mut pipe = redis::pipe();
            for &i in &indices {
                pipe.cmd("SELECT").arg(db + keys[i].0).ignore().cmd("EXISTS").arg(&keys[i].1);
            }
            let mut conn = admin_conn(&node).await?;
            let found: Vec<i64> = pipe.query_async(&mut conn).await.map_err(|e| node.valkey_err(e))?;
            for (&i, n) in indices.iter().zip(found) {
                exists[i] = n > 0;
            }
        }
        Ok(exists)
    }

    /// Deletes `keys` (cache database, key) from the cache whose first database is `db`.
    pub async fn delete_keys(
        &self,
        target: &str,
        db: u32,
        keys: &[(u32, Vec<u8>)],
    ) -> Result<(), EngineError> {
        let owners = self.owners(target).await?;
        for (node, indices) in group(&owners, keys.iter().map(|(_, k)| k.as_slice())) {
            let mut pipe = redis::pipe();
            for &i in &indices {
                pipe.cmd("SELECT").arg(db + keys[i].0).ignore().cmd("UNLINK").arg(&keys[i].1).ignore();
            }
            let mut conn = admin_conn(&node).await?;
            pipe.query_async::<()>(&mut conn).await.map_err(|e| node.valkey_err(e))?;
        }
        Ok(())
    }

    /// Where keys go: the node (standalone), or each shard's slots and primary.
    async fn owners(&self, target: &str) -> Result<Vec<(Ranges, Arc<Node>)>, EngineError> {
        match self.cluster() {
            Some(cluster) => cluster.slot_owners().await,
            None => Ok(vec![(vec![(0, shoal_commands::SLOTS - 1)], Arc::clone(self.node(target)?))]),
        }
    }
}

/// Indices of `keys` grouped by the node that owns their slot.
fn group<'a>(
    owners: &[(Ranges, Arc<Node>)],
    keys: impl Iterator<Item = &'a [u8]>,
) -> Vec<(Arc<Node>, Vec<usize>)> {
    let mut groups: Vec<(Arc<Node>, Vec<usize>)> =
        owners.iter().map(|(_, node)| (Arc::clone(node), Vec::new())).collect();
    for (i, key) in keys.enumerate() {
        let slot = if owners.len() == 1 { 0 } else { shoal_commands::key_slot(key) };
        // A slot no shard owns (mid-failover): the first shard answers with an error.
        let at = owners.iter().position(|(ranges, _)| ranges.iter().any(|&(a, b)| (a..=b).contains(&slot)));
        groups[at.unwrap_or(0)].1.push(i);
    }
    groups.retain(|(_, indices)| !indices.is_empty());
    groups
}

type Login = (String, u16, String, String);
/// An RDB's AUX fields (name, value).
type Aux = Vec<(Vec<u8>, Vec<u8>)>;

fn write_snapshot(
    logins: &[Login],
    dbs: std::ops::Range<u32>,
    out: &PathBuf,
) -> Result<SnapshotFile, EngineError> {
    let io = |e: std::io::Error| EngineError::Snapshot(format!("writing {}: {e}", out.display()));
    let mut file = Some(BufWriter::new(std::fs::File::create(out).map_err(io)?));
    let mut writer: Option<Writer<BufWriter<std::fs::File>>> = None;
    let mut stats = SnapshotFile { keys: 0, value_bytes: 0 };
    let mut last: Option<(Header, Aux)> = None;
    for login in logins {
        let node = format!("{}:{}", login.0, login.1);
        let rdb_err = |e: shoal_rdb::Error| EngineError::Snapshot(format!("the RDB stream of {node}: {e}"));
        let mut reader = Reader::new(sync_stream(login)?).map_err(rdb_err)?;
        while let Some(mut entry) = reader.next_entry().map_err(rdb_err)? {
            if !dbs.contains(&entry.db) {
                continue;
            }
            entry.db -= dbs.start;
            if writer.is_none() {
                let aux = kept_aux(reader.aux());
                let file = file.take().expect("the file goes to the first writer");
                writer = Some(Writer::new(file, reader.header(), &aux).map_err(rdb_err)?);
            }
            writer.as_mut().expect("made above").entry(&entry).map_err(rdb_err)?;
            stats.keys += 1;
            stats.value_bytes += (entry.key.len() + entry.value.len()) as u64;
        }
        last = Some((reader.header().clone(), kept_aux(reader.aux())));
    }
    let writer = match writer {
        Some(w) => w,
        // No keys: an empty RDB, as the node would write it.
        None => {
            let (header, aux) = last.ok_or_else(|| EngineError::Snapshot("no node to read from".into()))?;
            let file = file.take().expect("unused");
            Writer::new(file, &header, &aux).map_err(|e| EngineError::Snapshot(e.to_string()))?
        }
    };
    let mut file = writer.finish().map_err(|e| EngineError::Snapshot(e.to_string()))?;
    file.flush().map_err(io)?;
    file.get_ref().sync_all().map_err(io)?;
    Ok(stats)
}

fn kept_aux(aux: &[(Vec<u8>, Vec<u8>)]) -> Aux {
    aux.iter().filter(|(k, _)| KEPT_AUX.iter().any(|kept| k.as_slice() == kept.as_bytes())).cloned().collect()
}

/// A connection to the node, logged in as the admin, positioned at the first byte of the
/// RDB that `SYNC` makes it stream.
fn sync_stream(login: &Login) -> Result<BufReader<TcpStream>, EngineError> {
    let (host, port, user, password) = login;
    let node = format!("{host}:{port}");
    let err = |what: &str, e: &dyn std::fmt::Display| EngineError::Snapshot(format!("{what} {node}: {e}"));
    let addr = (host.as_str(), *port)
        .to_socket_addrs()
        .map_err(|e| err("resolving", &e))?
        .next()
        .ok_or_else(|| err("resolving", &"no address"))?;
    let stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| err("connecting to", &e))?;
    stream.set_read_timeout(Some(STREAM_SILENCE)).map_err(|e| err("connecting to", &e))?;
    let mut out = stream.try_clone().map_err(|e| err("connecting to", &e))?;
    let mut input = BufReader::with_capacity(1 << 16, stream);
    let send = |out: &mut TcpStream, command: &[&str]| {
        let mut bytes = format!("*{}\r\n", command.len()).into_bytes();
        for arg in command {
            bytes.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
        }
        out.write_all(&bytes).map_err(|e| err("writing to", &e))
    };
    let expect_ok = |input: &mut BufReader<TcpStream>, what: &str| {
        let line = read_line(input).map_err(|e| err("reading from", &e))?;
        if line.starts_with('+') {
            Ok(())
        } else {
            Err(err(&format!("{what} refused by"), &line))
        }
    };
    send(&mut out, &["AUTH", user, password])?;
    expect_ok(&mut input, "AUTH")?;
    // A replica that says which version it runs gets the RDB in that version's own format
    // (VALKEY080 and its types); one that does not, the format older replicas read, which
    // Valkey 9.1 fails to write for a hash with field TTLs (the fork exits with an error).
    send(&mut out, &["INFO", "server"])?;
    let info = read_bulk(&mut input).map_err(|e| err("reading INFO from", &e))?;
    // (`redis_version` is what Valkey tells Redis clients: 7.2.4.)
    let field = |name: &str| info.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string());
    let version = field("valkey_version:").or_else(|| field("redis_version:")).unwrap_or_default();
    if !version.is_empty() {
        send(&mut out, &["REPLCONF", "version", &version])?;
        expect_ok(&mut input, "REPLCONF version")?;
    }
    // Only the RDB: no replication stream after it, no replica registered for long.
    send(&mut out, &["REPLCONF", "rdb-only", "1"])?;
    expect_ok(&mut input, "REPLCONF rdb-only")?;
    // The RDB may come as the node writes it (diskless), ended by a marker.
    send(&mut out, &["REPLCONF", "capa", "eof"])?;
    expect_ok(&mut input, "REPLCONF capa")?;
    send(&mut out, &["SYNC"])?;
    loop {
        let line = read_line(&mut input).map_err(|e| err("reading from", &e))?;
        match line.as_bytes().first() {
            // Keep-alive newlines while the node forks and starts writing.
            None => continue,
            Some(b'$') => return Ok(input),
            _ => return Err(err("SYNC refused by", &line)),
        }
    }
}

/// A RESP bulk string reply, as text.
fn read_bulk(input: &mut impl BufRead) -> std::io::Result<String> {
    let line = read_line(input)?;
    let len: usize = line
        .strip_prefix('$')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not a bulk reply: {line}")))?;
    let mut body = vec![0; len + 2];
    input.read_exact(&mut body)?;
    body.truncate(len);
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn read_line(input: &mut impl BufRead) -> std::io::Result<String> {
    let mut line = Vec::new();
    input.read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_string())
}
