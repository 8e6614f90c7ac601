//! Accounts and their API keys.

use super::{now, Store, StoreError};
use shoal_types::AccountId;
use sqlx::{AnyConnection, Row};

#[derive(Clone, Debug)]
pub struct AccountRecord {
    pub id: AccountId,
    pub name: String,
    pub email: String,
    pub status: AccountStatus,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
}

/// An account row's `status`. Deleted accounts stay (their invoices and audit records name
/// them) but no query of live accounts returns them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccountStatus {
    Active,
    Deleted,
}

impl AccountStatus {
    /// As in the `status` column and the API's JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            AccountStatus::Active => "active",
            AccountStatus::Deleted => "deleted",
        }
    }

    pub fn parse(s: &str) -> Option<AccountStatus> {
        [AccountStatus::Active, AccountStatus::Deleted].into_iter().find(|v| v.as_str() == s)
    }
}

/// An API key as listed (never its secret, which is shown once and stored hashed).
#[derive(Clone, Debug)]
pub struct ApiKeyInfo {
    pub id: String,
    pub name: String,
    pub role: String,
    pub account_id: Option<String>,
    pub created_at: String,
}

fn account_from_row(r: &sqlx::any::AnyRow) -> Result<AccountRecord, StoreError> {
    Ok(AccountRecord {
        id: AccountId::parse(r.get::<&str, _>("id")).map_err(super::decode_err)?,
        name: r.get("name"),
        email: r.get("email"),
        status: super::decode_value("status", r.get("status"), AccountStatus::parse)?,
        version: r.get("version"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
    })
}

pub async fn insert_account(conn: &mut AnyConnection, a: &AccountRecord) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO accounts (id, name, email, status, version, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(a.id.as_str())
    .bind(&a.name)
    .bind(&a.email)
    .bind(a.status.as_str())
    .bind(a.version)
    .bind(&a.created_at)
    .bind(&a.updated_at)
    .execute(conn)
    .await
    .map(|_| ())
}

/// Writes name/email if the stored version is still `version`; false if it moved on.
pub async fn update_account(
    conn: &mut AnyConnection,
    a: &AccountRecord,
    version: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE accounts SET name = $1, email = $2, version = version + 1, updated_at = $3
         WHERE id = $4 AND version = $5 AND status <> 'deleted'",
    )
    .bind(&a.name)
    .bind(&a.email)
    .bind(now())
    .bind(a.id.as_str())
    .bind(version)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn mark_account_deleted(conn: &mut AnyConnection, id: &AccountId) -> Result<(), StoreError> {
    let at = now();
    sqlx::query("UPDATE accounts SET status = 'deleted', deleted_at = $1, updated_at = $1 WHERE id = $2")
        .bind(&at)
        .bind(id.as_str())
        .execute(&mut *conn)
        .await?;
    sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE account_id = $2 AND revoked_at IS NULL")
        .bind(&at)
        .bind(id.as_str())
        .execute(conn)
        .await
        .map(|_| ())
}

/// A new API key: an operator's key, the bootstrap admin token, or an LDAP session (which
/// expires).
pub struct NewApiKey<'a> {
    pub id: &'a str,
    pub token_hash: &'a str,
    pub role: &'a crate::role::Role,
    pub name: &'a str,
    pub expires_at: Option<&'a str>,
}

/// The one insert into `api_keys`. A token already stored is left as it is (the bootstrap
/// admin token is offered at every start).
pub async fn insert_api_key(conn: &mut AnyConnection, key: &NewApiKey<'_>) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO api_keys (id, token_hash, role, account_id, name, created_at, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (token_hash) DO NOTHING",
    )
    .bind(key.id)
    .bind(key.token_hash)
    .bind(key.role.name().as_str())
    .bind(key.role.account().map(|a| a.as_str()))
    .bind(key.name)
    .bind(now())
    .bind(key.expires_at)
    .execute(conn)
    .await
    .map(|_| ())
}

/// Revokes an account's key; false if there is no such live key.
pub async fn revoke_api_key(
    conn: &mut AnyConnection,
    account: &AccountId,
    id: &str,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND account_id = $3 AND revoked_at IS NULL",
    )
    .bind(now())
    .bind(id)
    .bind(account.as_str())
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Revokes a live key (an API key or an LDAP session) by id; false if there is none.
pub async fn revoke_key(conn: &mut AnyConnection, id: &str) -> Result<bool, StoreError> {
    let done = sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
        .bind(now())
        .bind(id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// The name of the admin key the control plane makes for its bootstrap token.
pub const BOOTSTRAP_KEY_NAME: &str = "bootstrap admin";

/// Revokes every live bootstrap admin key but `except`; how many.
pub async fn revoke_bootstrap_keys(conn: &mut AnyConnection, except: &str) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "UPDATE api_keys SET revoked_at = $1
         WHERE name = $2 AND role = 'admin' AND account_id IS NULL AND id <> $3 AND revoked_at IS NULL",
    )
    .bind(now())
    .bind(BOOTSTRAP_KEY_NAME)
    .bind(except)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// A key that works now (neither revoked nor expired): an API key, or an LDAP session
/// when `expires_at` is set.
#[derive(Clone, Debug)]
pub struct LiveKey {
    pub id: String,
    pub name: String,
    pub role: String,
    pub account_id: Option<String>,
    pub created_at: String,
    pub expires_at: Option<String>,
}

fn live_key_from_row(r: &sqlx::any::AnyRow) -> LiveKey {
    LiveKey {
        id: r.get("id"),
        name: r.get("name"),
        role: r.get("role"),
        account_id: r.get("account_id"),
        created_at: r.get("created_at"),
        expires_at: r.get("expires_at"),
    }
}

impl Store {
    /// A key that works now, by id.
    pub async fn live_key(&self, id: &str) -> Result<Option<LiveKey>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, role, account_id, created_at, expires_at FROM api_keys
             WHERE id = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $2)",
        )
        .bind(id)
        .bind(now())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(live_key_from_row))
    }

    /// LDAP sessions that work now, oldest first; of one account when `account` is set.
    pub async fn live_sessions(&self, account: Option<&AccountId>) -> Result<Vec<LiveKey>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, role, account_id, created_at, expires_at FROM api_keys
             WHERE revoked_at IS NULL AND expires_at IS NOT NULL AND expires_at > $1
               AND (CAST($2 AS TEXT) IS NULL OR account_id = $2)
             ORDER BY created_at, id",
        )
        .bind(now())
        .bind(account.map(|a| a.as_str()))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(live_key_from_row).collect())
    }

    /// A live account.
    pub async fn account(&self, id: &AccountId) -> Result<Option<AccountRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM accounts WHERE id = $1 AND status <> 'deleted'")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(account_from_row).transpose()
    }

    /// Live accounts ordered by id, after `after` (the pagination cursor).
    pub async fn accounts(
        &self,
        only: Option<&AccountId>,
        after: &str,
        limit: i64,
    ) -> Result<Vec<AccountRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM accounts WHERE status <> 'deleted' AND id > $1
               AND (CAST($2 AS TEXT) IS NULL OR id = $2)
             ORDER BY id LIMIT $3",
        )
        .bind(after)
        .bind(only.map(|a| a.as_str()))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(account_from_row).collect()
    }

    /// Live API keys of an account (or the platform-wide ones when `account` is None).
    pub async fn api_keys(&self, account: Option<&AccountId>) -> Result<Vec<ApiKeyInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, role, account_id, created_at FROM api_keys
             WHERE revoked_at IS NULL AND ((CAST($1 AS TEXT) IS NULL AND account_id IS NULL) OR account_id = $1)
             ORDER BY created_at, id",
        )
        .bind(account.map(|a| a.as_str()))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| ApiKeyInfo {
                id: r.get("id"),
                name: r.get("name"),
                role: r.get("role"),
                account_id: r.get("account_id"),
                created_at: r.get("created_at"),
            })
            .collect())
    }
}
