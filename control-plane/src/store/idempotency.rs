//! `Idempotency-Key` on creates: the first response is kept and replayed for retries with
//! the same key and body; the same key with a different body is refused. A key lives
//! [`IDEMPOTENCY_TTL`] (24 h, like Stripe's) after its first use: then it is purged and may
//! be used again. Callers keep a response with its secrets taken out (see
//! `routes::page::idempotent`).

use super::{Store, StoreError};
use chrono::{DateTime, Utc};
use sqlx::Row;

/// How long a key is remembered after its first use.
pub const IDEMPOTENCY_TTL: chrono::Duration = chrono::Duration::hours(24);

/// A time as stored in `created_at` (RFC 3339, milliseconds, UTC: compares as text).
fn stamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// What a create with an idempotency key should do.
pub enum Claim {
    /// First time: go ahead, then [`Store::finish_idempotent`].
    Fresh,
    /// Done before with the same body: send this (status, JSON body) again.
    Replay(u16, String),
    /// The key was used with another body, or its first request is still running.
    Conflict(&'static str),
}

impl Store {
    pub async fn claim_idempotency_key(
        &self,
        principal: &str,
        key: &str,
        request_hash: &str,
    ) -> Result<Claim, StoreError> {
        self.claim_idempotency_key_at(principal, key, request_hash, Utc::now()).await
    }

    /// [`claim_idempotency_key`](Self::claim_idempotency_key) as if it were `now`: first
    /// purges every key older than [`IDEMPOTENCY_TTL`].
    pub async fn claim_idempotency_key_at(
        &self,
        principal: &str,
        key: &str,
        request_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<Claim, StoreError> {
        self.purge_idempotency_keys(now).await?;
        // The key's row can go between the insert that finds it and the read: its request
        // failed and let it go. Then the key is free: claim it again.
        loop {
            let inserted = sqlx::query(
                "INSERT INTO idempotency_keys (principal, key, request_hash, status, body, created_at)
                 VALUES ($1, $2, $3, 0, '', $4) ON CONFLICT (principal, key) DO NOTHING",
            )
            .bind(principal)
            .bind(key)
            .bind(request_hash)
            .bind(stamp(now))
            .execute(&self.pool)
            .await?;
            if inserted.rows_affected() == 1 {
                return Ok(Claim::Fresh);
            }
            let row = sqlx::query(
                "SELECT request_hash, status, body FROM idempotency_keys WHERE principal = $1 AND key = $2",
            )
            .bind(principal)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
            let Some(row) = row else { continue };
            let status: i64 = row.get("status");
            return Ok(if row.get::<&str, _>("request_hash") != request_hash {
                Claim::Conflict("this Idempotency-Key was used with a different request")
            } else if status == 0 {
                Claim::Conflict("a request with this Idempotency-Key is still in progress")
            } else {
                Claim::Replay(status as u16, row.get("body"))
            });
        }
    }

    /// Deletes the keys first used more than [`IDEMPOTENCY_TTL`] before `now` (also ones
    /// whose request never finished); returns how many.
    pub async fn purge_idempotency_keys(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
            .bind(stamp(now - IDEMPOTENCY_TTL))
            .execute(&self.pool)
            .await
            .map(|r| r.rows_affected())
    }

    /// Keeps a successful response for replays (the caller has taken its secrets out).
    pub async fn finish_idempotent(
        &self,
        principal: &str,
        key: &str,
        status: u16,
        body: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE idempotency_keys SET status = $1, body = $2 WHERE principal = $3 AND key = $4")
            .bind(status as i64)
            .bind(body)
            .bind(principal)
            .bind(key)
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    /// Forgets a key whose request failed, so the client may retry with it.
    pub async fn release_idempotency_key(&self, principal: &str, key: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM idempotency_keys WHERE principal = $1 AND key = $2 AND status = 0")
            .bind(principal)
            .bind(key)
            .execute(&self.pool)
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}", dir.path().join("s.db").display())).await.unwrap();
        (store, dir)
    }

    /// SQLite, or the Postgres lane's server when it runs.
    async fn any_store() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = crate::store::fresh_postgres_database("idempotency")
            .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("s.db").display()));
        (Store::open(&url).await.unwrap(), dir)
    }

    /// A claim that meets the key taken (its insert conflicts) while the request holding
    /// it fails and lets it go (its row deleted before the claim reads it) still answers:
    /// it takes the key, or is told the key is busy; never a store error (CI saw a 500 on
    /// `POST /v1/api-keys` from this race: schemathesis sends one key from two workers).
    #[tokio::test]
    async fn a_key_let_go_while_another_request_claims_it_is_no_error() {
        let (store, _dir) = any_store().await;
        let mut tasks = Vec::new();
        for worker in 0..4 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for round in 0..150 {
                    let hash = format!("h{worker}-{round}");
                    match store.claim_idempotency_key("p", "k", &hash).await? {
                        // The request failed: the key goes back.
                        Claim::Fresh => store.release_idempotency_key("p", "k").await?,
                        Claim::Conflict(_) => {}
                        Claim::Replay(..) => panic!("nothing finished"),
                    }
                }
                Ok::<_, StoreError>(())
            }));
        }
        for t in tasks {
            t.await.unwrap().expect("a claim never fails on a key let go meanwhile");
        }
    }

    #[tokio::test]
    async fn a_key_expires_24_hours_after_its_first_use() {
        let (store, _dir) = store().await;
        let t0 = Utc::now();
        assert!(matches!(store.claim_idempotency_key_at("p", "k", "h1", t0).await.unwrap(), Claim::Fresh));
        store.finish_idempotent("p", "k", 201, "{}").await.unwrap();
        let almost = t0 + IDEMPOTENCY_TTL - chrono::Duration::seconds(1);
        assert!(matches!(
            store.claim_idempotency_key_at("p", "k", "h1", almost).await.unwrap(),
            Claim::Replay(201, _)
        ));
        assert!(matches!(
            store.claim_idempotency_key_at("p", "k", "h2", almost).await.unwrap(),
            Claim::Conflict(_)
        ));
        let later = t0 + IDEMPOTENCY_TTL + chrono::Duration::seconds(1);
        assert!(matches!(store.claim_idempotency_key_at("p", "k", "h2", later).await.unwrap(), Claim::Fresh));
    }

    #[tokio::test]
    async fn expired_keys_are_purged_including_unfinished_ones() {
        let (store, _dir) = store().await;
        let t0 = Utc::now();
        store.claim_idempotency_key_at("p", "done", "h", t0).await.unwrap();
        store.finish_idempotent("p", "done", 201, "{}").await.unwrap();
        store.claim_idempotency_key_at("p", "stuck", "h", t0).await.unwrap();
        let fresh = t0 + chrono::Duration::hours(23);
        store.claim_idempotency_key_at("q", "fresh", "h", fresh).await.unwrap();
        assert_eq!(store.purge_idempotency_keys(t0 + chrono::Duration::hours(25)).await.unwrap(), 2);
        let left: Vec<String> =
            sqlx::query_scalar("SELECT key FROM idempotency_keys").fetch_all(&store.pool).await.unwrap();
        assert_eq!(left, vec!["fresh".to_string()]);
    }
}
