//! The audit log: append-only (triggers refuse UPDATE and DELETE on both backends) and
//! hash-chained — each record's hash covers the previous record's hash and its own fields,
//! so an edit anywhere breaks every later link and `verify` finds the first broken one.

use super::{Backend, Store, StoreError};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{AnyConnection, Row};

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

/// The first record whose hash does not match, if any.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ChainReport {
    pub ok: bool,
    pub records: i64,
    /// Seq of the first record that does not chain, when `ok` is false.
    pub first_broken_seq: Option<i64>,
    pub reason: Option<String>,
}

fn record_hash(prev_hash: &str, seq: i64, at: &str, e: &AuditEvent) -> String {
    // A fixed field order (a JSON array) so the hash does not depend on map ordering.
    let fields = serde_json::json!([
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
    ]);
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(fields.to_string().as_bytes());
    hex::encode(h.finalize())
}

/// Appends `event` inside the caller's transaction (so it commits with the change it
/// records). The caller holds [`Store::audit_lock`]; on PostgreSQL an advisory lock also
/// serializes appends from several control-plane processes.
pub async fn append(
    conn: &mut AnyConnection,
    backend: Backend,
    event: &AuditEvent,
) -> Result<AuditRecord, StoreError> {
    if backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock(7310027)").execute(&mut *conn).await?;
    }
    let last = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut *conn)
        .await?;
    let (seq, prev_hash) = match last {
        Some(r) => (r.get::<i64, _>("seq") + 1, r.get::<String, _>("hash")),
        None => (1, GENESIS.to_string()),
    };
    let at = super::now();
    let hash = record_hash(&prev_hash, seq, &at, event);
    sqlx::query(
        "INSERT INTO audit_log (seq, at, actor, account_id, source, action, target, cache_id, outcome, reason,
                                request_id, details, prev_hash, hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
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
    .execute(&mut *conn)
    .await?;
    Ok(AuditRecord { seq, at, event: event.clone(), prev_hash, hash })
}

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

impl Store {
    /// Records an event on its own (for acts that change nothing else: failures, logins).
    pub async fn audit(&self, event: &AuditEvent) -> Result<AuditRecord, StoreError> {
        let _chain = self.audit_lock.lock().await;
        let mut tx = self.pool.begin().await?;
        let record = append(&mut tx, self.backend, event).await?;
        tx.commit().await?;
        Ok(record)
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

    /// Walks the whole chain and reports the first record that does not link up.
    pub async fn verify_audit_chain(&self) -> Result<ChainReport, StoreError> {
        let mut prev = GENESIS.to_string();
        let mut expected_seq = 1;
        let mut count = 0;
        let mut after = 0;
        loop {
            let page = self
                .audit_records(&AuditFilter { after_seq: after, limit: 1000, ..Default::default() })
                .await?;
            if page.is_empty() {
                break;
            }
            for r in &page {
                let broken = if r.seq != expected_seq {
                    Some(format!("record {expected_seq} is missing"))
                } else if r.prev_hash != prev {
                    Some("prev_hash does not match the previous record's hash".to_string())
                } else if record_hash(&prev, r.seq, &r.at, &r.event) != r.hash {
                    Some("the record's contents do not match its hash".to_string())
                } else {
                    None
                };
                if let Some(reason) = broken {
                    return Ok(ChainReport {
                        ok: false,
                        records: count,
                        first_broken_seq: Some(expected_seq.min(r.seq)),
                        reason: Some(reason),
                    });
                }
                prev = r.hash.clone();
                expected_seq += 1;
                count += 1;
                after = r.seq;
            }
        }
        Ok(ChainReport { ok: true, records: count, first_broken_seq: None, reason: None })
    }
}
