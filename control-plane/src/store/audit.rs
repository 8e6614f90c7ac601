//! The audit log: append-only (triggers refuse UPDATE and DELETE on both backends) and
//! chained — each record's hash covers the previous record's hash and its own fields, so an
//! edit anywhere breaks the chain and `verify` names the records that do not fit.
//!
//! Someone who can write the database can drop the triggers, so the chain is keyed: records
//! are hashed with HMAC-SHA256 under a key kept outside the database ([`AuditKey`], the
//! `audit_key_path` file; chain version 2). Records of older installs (version 1, plain
//! SHA-256) still verify, but only before the first keyed record. Each commit also writes a
//! signed checkpoint of the new head, and the control plane remembers the newest head it
//! wrote (in memory and in a small file next to the key), so deleting the newest records —
//! with or without their checkpoints — shows too.
//!
//! Writes go through one task ([`Store::audit`]) that commits many events per transaction,
//! so a flood of records cannot keep REST changes (which append their own record in their
//! own transaction, [`super::Audited`]) waiting for long.

use super::{Backend, Store, StoreError};
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::{Digest, Sha256};
use shoal_auth::aggregate::{Aggregator, Fold, Folded};
use sqlx::{AnyConnection, AnyPool, Row};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Text as it can be stored and shown: control characters (a NUL in a user name an
/// attacker typed) are written as escapes, which PostgreSQL's TEXT would refuse.
pub fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    text.chars()
        .map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() })
        .collect()
}
/// The hash before the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One security-relevant act, as recorded.
#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
pub struct AuditEvent {
    /// Who acted: an API key id, `ldap:<user>`, `token:<jti>`, a cache user, or `anonymous`.
    pub actor: String,
    /// The account the act concerns (owners and auditors of it can read the record).
    pub account_id: Option<String>,
    /// The client's address.
    pub source: String,
    /// What was done, e.g. `cache.create`, `auth.login`.
    pub action: String,
    /// What it was done to, e.g. a cache id.
    pub target: String,
    pub cache_id: Option<String>,
    /// `success`, `failure` or `lockout`.
    pub outcome: String,
    /// Why it failed (never a secret).
    pub reason: String,
    pub request_id: String,
    /// Extra JSON facts (mechanism, changed fields…).
    pub details: serde_json::Value,
}

/// A stored record: the event plus its place in the chain.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct AuditRecord {
    pub seq: i64,
    pub at: String,
    #[serde(flatten)]
    pub event: AuditEvent,
    pub prev_hash: String,
    pub hash: String,
}

/// Filters of `GET /v1/audit`.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub account_id: Option<String>,
    pub actor: Option<String>,
    pub action: Option<String>,
    pub cache_id: Option<String>,
    pub outcome: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    /// Only records with `seq` above this (the pagination cursor).
    pub after_seq: i64,
    pub limit: i64,
}

/// What `GET /v1/audit/verify` found.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ChainReport {
    /// True when no problem was found.
    pub ok: bool,
    /// Records present.
    pub records: i64,
    /// Seq of the first problem, when `ok` is false.
    pub first_broken_seq: Option<i64>,
    /// What the first problem is.
    pub reason: Option<String>,
    /// Every problem found (at most [`MAX_PROBLEMS`]), by seq.
    pub problems: Vec<ChainProblem>,
    /// The newest valid signed checkpoint.
    pub checkpoint: Option<Checkpoint>,
}

/// Most problems one report lists.
pub const MAX_PROBLEMS: usize = 100;

/// One record that does not fit.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ChainProblem {
    pub seq: i64,
    /// `changed` (its contents or link do not match its keyed hash, or a checkpoint),
    /// `missing` (deleted from the middle), `truncated` (the newest records are gone; `seq`
    /// is the first missing one), or `bad_checkpoint` (a checkpoint is forged or gone).
    pub kind: String,
    pub detail: String,
}

/// A signed checkpoint of the chain's head.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Checkpoint {
    pub seq: i64,
    pub hash: String,
    pub at: String,
}

type HmacSha256 = Hmac<Sha256>;

/// The key of the audit chain: 32 random bytes, hex, in a file outside the database.
pub struct AuditKey {
    key: [u8; 32],
    /// Where the newest head this control plane wrote is remembered.
    head_path: PathBuf,
}

impl AuditKey {
    /// Reads the key at `path`, creating it (0600, in a folder made if needed) if missing.
    pub fn load_or_create(path: &Path) -> std::io::Result<AuditKey> {
        use std::io::{Error, ErrorKind};
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        shoal_engine::private::tighten(path)?;
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut key);
                let text = format!("{}\n", hex::encode(key));
                let mut file =
                    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
                std::io::Write::write_all(&mut file, text.as_bytes())?;
                file.sync_all()?;
                text
            }
            Err(e) => return Err(e),
        };
        let key =
            hex::decode(text.trim()).ok().and_then(|b| <[u8; 32]>::try_from(b).ok()).ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidData,
                    format!("{}: not an audit key (64 hex digits)", path.display()),
                )
            })?;
        Ok(AuditKey { key, head_path: path.with_extension("head") })
    }

    fn mac(&self, parts: &[&[u8]]) -> String {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("any key length");
        for p in parts {
            mac.update(p);
        }
        hex::encode(mac.finalize().into_bytes())
    }

    fn record_hash(&self, prev_hash: &str, fields: &str) -> String {
        self.mac(&[b"shoal-audit-v2\n", prev_hash.as_bytes(), b"\n", fields.as_bytes()])
    }

    fn checkpoint_signature(&self, seq: i64, hash: &str, at: &str) -> String {
        self.mac(&[
            b"shoal-audit-checkpoint\n",
            seq.to_string().as_bytes(),
            b"\n",
            hash.as_bytes(),
            b"\n",
            at.as_bytes(),
        ])
    }

    fn head_signature(&self, seq: i64, hash: &str) -> String {
        self.mac(&[b"shoal-audit-head\n", seq.to_string().as_bytes(), b"\n", hash.as_bytes()])
    }

    /// The head in the file next to the key: None if there is none, Err if it is forged.
    fn read_head(&self) -> Option<Result<(i64, String), String>> {
        let text = std::fs::read_to_string(&self.head_path).ok()?;
        let mut parts = text.split_whitespace();
        let (seq, hash, sig) = (parts.next()?, parts.next()?, parts.next()?);
        let Ok(seq) = seq.parse::<i64>() else { return Some(Err("the head file does not parse".into())) };
        if self.head_signature(seq, hash) != sig {
            return Some(Err(format!(
                "the head file ({}) is not signed with the key",
                self.head_path.display()
            )));
        }
        Some(Ok((seq, hash.to_string())))
    }

    fn write_head(&self, seq: i64, hash: &str) -> std::io::Result<()> {
        // Several control planes may share the folder: each writes its own temporary file.
        let tmp = self.head_path.with_extension(format!("head.{}", std::process::id()));
        std::fs::write(&tmp, format!("{seq} {hash} {}\n", self.head_signature(seq, hash)))?;
        std::fs::rename(&tmp, &self.head_path)
    }
}

/// A record's fields as hashed.
fn fields(seq: i64, at: &str, e: &AuditEvent) -> String {
    // A fixed field order (a JSON array) so the hash does not depend on map ordering.
    serde_json::json!([
        seq,
        at,
        e.actor,
        e.account_id,
        e.source,
        e.action,
        e.target,
        e.cache_id,
        e.outcome,
        e.reason,
        e.request_id,
        e.details.to_string(),
    ])
    .to_string()
}

/// The unkeyed hash of chain version 1 (older installs).
fn unkeyed_hash(prev_hash: &str, fields: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(fields.as_bytes());
    hex::encode(h.finalize())
}

/// Failed unauthenticated requests per source recorded alone in each window; the rest are
/// counted in one record per source and window.
const INDIVIDUAL: u32 = 20;
const WINDOW: Duration = Duration::from_secs(5);
const MAX_SOURCES: usize = 10_000;
/// Most events one transaction of the writer commits.
const MAX_BATCH: usize = 1000;

/// The chain's state shared by a store's clones: the key, the newest head this process
/// wrote, and the counts of unauthenticated failures not yet written.
pub(crate) struct Chain {
    key: Option<AuditKey>,
    head: Mutex<Option<(i64, String)>>,
    folds: Mutex<Aggregator<AuditEvent>>,
}

impl Chain {
    pub(crate) fn new(key: Option<AuditKey>) -> Chain {
        let head = key.as_ref().and_then(|k| k.read_head()).and_then(Result::ok);
        Chain {
            key,
            head: Mutex::new(head),
            folds: Mutex::new(Aggregator::new(WINDOW, INDIVIDUAL, MAX_SOURCES)),
        }
    }

    /// Notes a committed head (memory, then the file next to the key).
    pub(crate) fn remember(&self, records: &[AuditRecord]) {
        let (Some(key), Some(last)) = (&self.key, records.last()) else { return };
        let mut head = self.head.lock().unwrap();
        if head.as_ref().is_some_and(|(seq, _)| *seq >= last.seq) {
            return;
        }
        *head = Some((last.seq, last.hash.clone()));
        if let Err(e) = key.write_head(last.seq, &last.hash) {
            tracing::warn!(error = %e, path = %key.head_path.display(), "could not write the audit head file");
        }
    }

    /// The aggregates of unauthenticated failures whose window ended (all with `all`).
    fn take_folds(&self, all: bool) -> Vec<AuditEvent> {
        self.folds.lock().unwrap().take(Instant::now(), all).into_iter().map(folded_event).collect()
    }
}

/// An aggregate of refused requests as the record written.
fn folded_event(f: Folded<AuditEvent>) -> AuditEvent {
    let mut e = f.template;
    if f.count == 1 {
        return e;
    }
    let targets: Vec<String> = f.names.into_iter().collect();
    if targets.len() != 1 {
        e.target = "(several)".into();
    }
    e.reason = format!("{} refused requests from {}", f.count, e.source);
    e.request_id = String::new();
    e.details = serde_json::json!({ "count": f.count, "first_at": f.first_at, "last_at": f.last_at,
                                    "reasons": f.reasons, "targets": targets });
    e
}

/// Appends `events` inside the caller's transaction (so they commit with the change they
/// record) and a signed checkpoint of the new head. The caller holds [`Store::audit_lock`];
/// on PostgreSQL an advisory lock also serializes appends from several control-plane
/// processes.
pub(crate) async fn append_all(
    conn: &mut AnyConnection,
    backend: Backend,
    chain: &Chain,
    events: &[AuditEvent],
) -> Result<Vec<AuditRecord>, StoreError> {
    if backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock(7310027)").execute(&mut *conn).await?;
    }
    let last = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut *conn)
        .await?;
    let (mut seq, mut prev_hash) = match last {
        Some(r) => (r.get::<i64, _>("seq"), r.get::<String, _>("hash")),
        None => (0, GENESIS.to_string()),
    };
    // Never reuse the seq of a deleted record (a checkpoint or this process's memory names
    // it): the gap stays visible and the checkpoint insert cannot collide.
    let checkpointed: Option<i64> =
        sqlx::query("SELECT MAX(seq) AS seq FROM audit_checkpoints").fetch_one(&mut *conn).await?.get("seq");
    let remembered = chain.head.lock().unwrap().as_ref().map(|h| h.0);
    seq = seq.max(checkpointed.unwrap_or(0)).max(remembered.unwrap_or(0));
    let mut records = Vec::with_capacity(events.len());
    for event in events {
        seq += 1;
        let at = super::now();
        let fields = fields(seq, &at, event);
        let (version, hash) = match &chain.key {
            Some(key) => (2, key.record_hash(&prev_hash, &fields)),
            None => (1, unkeyed_hash(&prev_hash, &fields)),
        };
        sqlx::query(
            "INSERT INTO audit_log (seq, at, actor, account_id, source, action, target, cache_id, outcome, reason,
                                    request_id, details, prev_hash, hash, chain)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(seq)
        .bind(&at)
        .bind(&event.actor)
        .bind(event.account_id.as_deref())
        .bind(&event.source)
        .bind(&event.action)
        .bind(&event.target)
        .bind(event.cache_id.as_deref())
        .bind(&event.outcome)
        .bind(&event.reason)
        .bind(&event.request_id)
        .bind(event.details.to_string())
        .bind(&prev_hash)
        .bind(&hash)
        .bind(version)
        .execute(&mut *conn)
        .await?;
        records.push(AuditRecord { seq, at, event: event.clone(), prev_hash, hash: hash.clone() });
        prev_hash = hash;
    }
    if let (Some(key), Some(last)) = (&chain.key, records.last()) {
        insert_checkpoint(conn, key, last.seq, &last.hash).await?;
    }
    Ok(records)
}

async fn insert_checkpoint(
    conn: &mut AnyConnection,
    key: &AuditKey,
    seq: i64,
    hash: &str,
) -> Result<(), StoreError> {
    let at = super::now();
    sqlx::query(
        "INSERT INTO audit_checkpoints (seq, hash, at, signature) VALUES ($1, $2, $3, $4)
         ON CONFLICT (seq) DO NOTHING",
    )
    .bind(seq)
    .bind(hash)
    .bind(&at)
    .bind(key.checkpoint_signature(seq, hash, &at))
    .execute(conn)
    .await
    .map(|_| ())
}

/// Anchors the records of an older install (unkeyed, never checkpointed) with a checkpoint
/// of their head, the first time a key is used.
pub(crate) async fn anchor_unkeyed_head(
    pool: &AnyPool,
    backend: Backend,
    chain: &Chain,
) -> Result<(), StoreError> {
    let Some(key) = &chain.key else { return Ok(()) };
    let mut tx = backend.begin_write(pool).await?;
    let keyed: i64 = sqlx::query("SELECT COUNT(*) AS n FROM audit_log WHERE chain <> 1")
        .fetch_one(&mut *tx)
        .await?
        .get("n");
    let checkpoints: i64 =
        sqlx::query("SELECT COUNT(*) AS n FROM audit_checkpoints").fetch_one(&mut *tx).await?.get("n");
    let head = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut *tx)
        .await?;
    if let (0, 0, Some(head)) = (keyed, checkpoints, head) {
        let (seq, hash): (i64, String) = (head.get("seq"), head.get("hash"));
        insert_checkpoint(&mut tx, key, seq, &hash).await?;
        tracing::info!(
            seq,
            "anchored the unkeyed audit records of an older install with a signed checkpoint"
        );
    }
    tx.commit().await
}

/// Events on their way to the writer, and where to answer.
pub(crate) struct Job {
    events: Vec<AuditEvent>,
    done: Option<oneshot::Sender<Result<Vec<AuditRecord>, String>>>,
}

/// What the writer task needs (not a [`Store`]: its channel would keep the task alive).
pub(crate) struct Writer {
    pub(crate) pool: AnyPool,
    pub(crate) backend: Backend,
    pub(crate) lock: Arc<tokio::sync::Mutex<()>>,
    pub(crate) chain: Arc<Chain>,
}

impl Writer {
    /// Commits queued events, many per transaction, until every store clone is gone; also
    /// writes aggregates whose window ended.
    pub(crate) async fn run(self, mut rx: mpsc::Receiver<Job>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let mut jobs = Vec::new();
            tokio::select! {
                job = rx.recv() => match job {
                    Some(job) => jobs.push(job),
                    None => {
                        let events = self.chain.take_folds(true);
                        self.commit(vec![Job { events, done: None }]).await;
                        return;
                    }
                },
                _ = tick.tick() => {}
            }
            let events = self.chain.take_folds(false);
            if !events.is_empty() {
                jobs.push(Job { events, done: None });
            }
            let mut n: usize = jobs.iter().map(|j| j.events.len()).sum();
            while n < MAX_BATCH {
                let Ok(job) = rx.try_recv() else { break };
                n += job.events.len();
                jobs.push(job);
            }
            self.commit(jobs).await;
        }
    }

    async fn commit(&self, jobs: Vec<Job>) {
        let events: Vec<AuditEvent> = jobs.iter().flat_map(|j| j.events.iter().cloned()).collect();
        if events.is_empty() {
            return;
        }
        let result = async {
            let _chain = self.lock.lock().await;
            let mut tx = self.backend.begin_write(&self.pool).await?;
            let records = append_all(&mut tx, self.backend, &self.chain, &events).await?;
            tx.commit().await?;
            self.chain.remember(&records);
            Ok::<_, StoreError>(records)
        }
        .await;
        match result {
            Ok(records) => {
                let mut records = records.into_iter();
                for job in jobs {
                    let mine: Vec<AuditRecord> = records.by_ref().take(job.events.len()).collect();
                    if let Some(done) = job.done {
                        let _ = done.send(Ok(mine));
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, events = events.len(), "could not write audit records");
                for done in jobs.into_iter().filter_map(|j| j.done) {
                    let _ = done.send(Err(e.to_string()));
                }
            }
        }
    }
}

/// Most queued jobs before senders wait.
pub(crate) const QUEUE: usize = 10_000;

fn record_from_row(r: &sqlx::any::AnyRow) -> AuditRecord {
    AuditRecord {
        seq: r.get("seq"),
        at: r.get("at"),
        event: AuditEvent {
            actor: r.get("actor"),
            account_id: r.get("account_id"),
            source: r.get("source"),
            action: r.get("action"),
            target: r.get("target"),
            cache_id: r.get("cache_id"),
            outcome: r.get("outcome"),
            reason: r.get("reason"),
            request_id: r.get("request_id"),
            details: serde_json::from_str(r.get::<&str, _>("details")).unwrap_or(serde_json::Value::Null),
        },
        prev_hash: r.get("prev_hash"),
        hash: r.get("hash"),
    }
}

fn closed() -> StoreError {
    sqlx::Error::PoolClosed
}

impl Store {
    /// Records an event on its own (for acts that change nothing else: failures, logins),
    /// in the writer's next batch; answers once it is committed.
    pub async fn audit(&self, event: &AuditEvent) -> Result<AuditRecord, StoreError> {
        let mut records = self.audit_all(vec![event.clone()]).await?;
        records.pop().ok_or_else(closed)
    }

    /// Records several events (one batch, in order); answers once they are committed.
    pub async fn audit_all(&self, events: Vec<AuditEvent>) -> Result<Vec<AuditRecord>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let (done, answer) = oneshot::channel();
        self.audit_writer.send(Job { events, done: Some(done) }).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?.map_err(sqlx::Error::Protocol)
    }

    /// Records a refused unauthenticated request: the first few per source and window alone,
    /// the rest counted in one record per source and window (written when it ends).
    pub async fn audit_unauthenticated(&self, event: AuditEvent) -> Result<(), StoreError> {
        let alone = {
            let now = Instant::now();
            let mut folds = self.audit_chain.folds.lock().unwrap();
            let alone = folds.individual(now, &event.source);
            if !alone {
                let fold = Fold {
                    template: &event,
                    count: 1,
                    first_at: &super::now(),
                    last_at: &super::now(),
                    reasons: vec![(event.reason.clone(), 1)],
                    names: vec![event.target.clone()],
                };
                folds.fold(now, &event.source.clone(), "*", fold);
            }
            alone
        };
        if alone {
            self.audit(&event).await?;
        }
        Ok(())
    }

    /// Writes every pending aggregate now (before the process exits).
    pub async fn flush_audit(&self) -> Result<(), StoreError> {
        self.audit_all(self.audit_chain.take_folds(true)).await.map(|_| ())
    }

    /// Records matching `f`, oldest first.
    pub async fn audit_records(&self, f: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM audit_log
             WHERE seq > $1
               AND (CAST($2 AS TEXT) IS NULL OR account_id = $2)
               AND (CAST($3 AS TEXT) IS NULL OR actor = $3)
               AND (CAST($4 AS TEXT) IS NULL OR action = $4)
               AND (CAST($5 AS TEXT) IS NULL OR cache_id = $5)
               AND (CAST($6 AS TEXT) IS NULL OR outcome = $6)
               AND (CAST($7 AS TEXT) IS NULL OR at >= $7)
               AND (CAST($8 AS TEXT) IS NULL OR at < $8)
             ORDER BY seq LIMIT $9",
        )
        .bind(f.after_seq)
        .bind(f.account_id.as_deref())
        .bind(f.actor.as_deref())
        .bind(f.action.as_deref())
        .bind(f.cache_id.as_deref())
        .bind(f.outcome.as_deref())
        .bind(f.from.as_deref())
        .bind(f.to.as_deref())
        .bind(f.limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(record_from_row).collect())
    }

    /// Walks the whole chain and its checkpoints and reports every record that does not fit.
    pub async fn verify_audit_chain(&self) -> Result<ChainReport, StoreError> {
        let key = self.audit_chain.key.as_ref();
        let mut problems = Vec::new();
        let mut problem = |seq: i64, kind: &str, detail: String| {
            problems.push(ChainProblem { seq, kind: kind.into(), detail })
        };

        // Checkpoints whose signature holds, by seq.
        let mut checkpoints = BTreeMap::new();
        let rows = sqlx::query("SELECT seq, hash, at, signature FROM audit_checkpoints ORDER BY seq")
            .fetch_all(&self.pool)
            .await?;
        for r in rows {
            let cp = Checkpoint { seq: r.get("seq"), hash: r.get("hash"), at: r.get("at") };
            let signature: String = r.get("signature");
            match key {
                Some(k) if k.checkpoint_signature(cp.seq, &cp.hash, &cp.at) == signature => {
                    checkpoints.insert(cp.seq, cp);
                }
                Some(_) => problem(cp.seq, "bad_checkpoint", "its signature does not match (forged)".into()),
                None => {}
            }
        }
        // Heads this control plane remembers (memory, and the file other processes share).
        let mut heads: Vec<(i64, String, &str)> = Vec::new();
        if let Some((seq, hash)) = self.audit_chain.head.lock().unwrap().clone() {
            heads.push((seq, hash, "this control plane wrote"));
        }
        match key.and_then(AuditKey::read_head) {
            Some(Ok((seq, hash))) if !heads.iter().any(|h| h.0 == seq) => {
                heads.push((seq, hash, "the head file next to the audit key names"))
            }
            Some(Err(detail)) => problem(0, "bad_checkpoint", detail),
            _ => {}
        }
        let mut head_hashes: HashMap<i64, String> = HashMap::new();

        let (mut prev, mut expected, mut count, mut last_seq) = (GENESIS.to_string(), 1, 0, 0);
        let (mut keyed_seen, mut prev_ok) = (false, true);
        loop {
            let rows = sqlx::query("SELECT * FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT 1000")
                .bind(last_seq)
                .fetch_all(&self.pool)
                .await?;
            if rows.is_empty() {
                break;
            }
            for row in &rows {
                let r = record_from_row(row);
                let version: i64 = row.get("chain");
                let linked = r.seq == expected;
                if !linked {
                    let range = if r.seq - 1 == expected {
                        format!("record {expected} is")
                    } else {
                        format!("records {expected}–{} are", r.seq - 1)
                    };
                    problem(expected, "missing", format!("{range} missing (deleted)"));
                }
                let fields = fields(r.seq, &r.at, &r.event);
                let own = match (version, key) {
                    (2, Some(k)) if k.record_hash(&r.prev_hash, &fields) == r.hash => None,
                    (2, Some(_)) => Some("its contents do not match its keyed hash"),
                    (2, None) => Some("a keyed record, but no audit key is configured"),
                    (_, _) if keyed_seen => {
                        Some("an unkeyed record after keyed ones (rewritten without the key)")
                    }
                    _ if unkeyed_hash(&r.prev_hash, &fields) == r.hash => None,
                    _ => Some("its contents do not match its hash"),
                };
                let broken = if let Some(detail) = own {
                    Some(detail.to_string())
                } else if linked && prev_ok && r.prev_hash != prev {
                    Some(format!("its link to record {} was rewritten", r.seq - 1))
                } else {
                    checkpoints
                        .get(&r.seq)
                        .filter(|cp| cp.hash != r.hash)
                        .map(|cp| format!("it does not match the signed checkpoint of {}", cp.at))
                };
                if let Some(detail) = &broken {
                    problem(r.seq, "changed", detail.clone());
                }
                if heads.iter().any(|h| h.0 == r.seq) {
                    head_hashes.insert(r.seq, r.hash.clone());
                }
                keyed_seen |= version == 2;
                prev_ok = broken.is_none();
                prev = r.hash;
                expected = r.seq + 1;
                last_seq = r.seq;
                count += 1;
            }
        }

        if let Some(cp) = checkpoints.values().next_back().filter(|cp| cp.seq > last_seq) {
            problem(
                last_seq + 1,
                "truncated",
                format!(
                    "records {}–{} are gone: the signed checkpoint of {} names record {}",
                    last_seq + 1,
                    cp.seq,
                    cp.at,
                    cp.seq
                ),
            );
        }
        if key.is_some() && count > 0 && checkpoints.is_empty() {
            problem(last_seq, "bad_checkpoint", "no signed checkpoint of the log is left (deleted)".into());
        }
        for (seq, hash, whence) in &heads {
            if *seq > last_seq {
                problem(
                    last_seq + 1,
                    "truncated",
                    format!("the log ends at record {last_seq}, but {whence} record {seq}"),
                );
            } else if head_hashes.get(seq).is_some_and(|h| h != hash) {
                problem(*seq, "changed", format!("it differs from the record {whence}"));
            }
        }

        problems.sort_by_key(|p| p.seq);
        problems.dedup_by(|a, b| a.seq == b.seq && a.kind == b.kind);
        problems.truncate(MAX_PROBLEMS);
        Ok(ChainReport {
            ok: problems.is_empty(),
            records: count,
            first_broken_seq: problems.first().map(|p| p.seq),
            reason: problems.first().map(|p| format!("{}: {}", p.kind, p.detail)),
            problems,
            checkpoint: checkpoints.into_values().next_back(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(action: &str) -> AuditEvent {
        AuditEvent {
            actor: "test".into(),
            action: action.into(),
            outcome: "success".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn records_of_an_older_install_still_verify_and_are_anchored_when_a_key_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("s.db").display());
        let old = Store::open(&url).await.unwrap();
        for i in 0..3 {
            old.audit(&event(&format!("old.{i}"))).await.unwrap();
        }
        drop(old);
        let key_path = dir.path().join("keys/audit.key");
        let store = Store::open_audited(&url, AuditKey::load_or_create(&key_path).unwrap()).await.unwrap();
        let report = store.verify_audit_chain().await.unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!(report.checkpoint.as_ref().map(|c| c.seq), Some(3), "the unkeyed head is anchored");
        store.audit_all(vec![event("new.1"), event("new.2")]).await.unwrap();
        let report = store.verify_audit_chain().await.unwrap();
        assert!(report.ok && report.records == 5, "{report:?}");
        // The same key file opens again; a damaged one is refused.
        AuditKey::load_or_create(&key_path).unwrap();
        std::fs::write(&key_path, "short\n").unwrap();
        assert!(AuditKey::load_or_create(&key_path).is_err());
    }

    #[tokio::test]
    async fn control_planes_sharing_a_store_and_key_do_not_raise_false_alarms() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("s.db").display());
        let key_path = dir.path().join("audit.key");
        let a = Store::open_audited(&url, AuditKey::load_or_create(&key_path).unwrap()).await.unwrap();
        let b = Store::open_audited(&url, AuditKey::load_or_create(&key_path).unwrap()).await.unwrap();
        for i in 0..5 {
            a.audit(&event(&format!("a.{i}"))).await.unwrap();
            b.audit(&event(&format!("b.{i}"))).await.unwrap();
        }
        for store in [&a, &b] {
            let report = store.verify_audit_chain().await.unwrap();
            assert!(report.ok && report.records == 10, "{report:?}");
        }
    }
}
