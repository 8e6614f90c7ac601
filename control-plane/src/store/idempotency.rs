//! `Idempotency-Key` on creates: the first response is kept and replayed for retries with
//! the same key and body; the same key with a different body is refused.

use super::{now, Store, StoreError};
use sqlx::Row;

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
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (principal, key, request_hash, status, body, created_at)
             VALUES ($1, $2, $3, 0, '', $4) ON CONFLICT (principal, key) DO NOTHING",
        )
        .bind(principal)
        .bind(key)
        .bind(request_hash)
        .bind(now())
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
        .fetch_one(&self.pool)
        .await?;
        let status: i64 = row.get("status");
        Ok(if row.get::<&str, _>("request_hash") != request_hash {
            Claim::Conflict("this Idempotency-Key was used with a different request")
        } else if status == 0 {
            Claim::Conflict("a request with this Idempotency-Key is still in progress")
        } else {
            Claim::Replay(status as u16, row.get("body"))
        })
    }

    /// Keeps a successful response for replays.
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
