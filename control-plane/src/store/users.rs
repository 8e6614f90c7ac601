//! Cache users (ElastiCache RBAC users), LDAP REST sessions (expiring API keys) and
//! signing-key rotation.

use super::{now, SigningKeyRecord, Store, StoreError};
use shoal_types::CacheId;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

/// A cache user as stored. Holds password hashes and the upstream secret: never serialize it.
#[derive(Clone, Debug)]
pub struct CacheUserRecord {
    pub cache_id: CacheId,
    pub username: String,
    /// argon2id PHC strings (none for the no-password `default` user).
    pub password_hashes: Vec<String>,
    pub no_password: bool,
    pub access_string: String,
    /// Password of the upstream ACL user the gateway logs in as.
    pub upstream_secret: String,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
}

fn user_from_row(r: AnyRow) -> Result<CacheUserRecord, StoreError> {
    let hashes: String = r.get("password_hashes");
    Ok(CacheUserRecord {
        cache_id: CacheId::parse(r.get::<&str, _>("cache_id")).map_err(super::decode_err)?,
        username: r.get("username"),
        password_hashes: serde_json::from_str(&hashes).map_err(super::decode_err)?,
        no_password: r.get::<i64, _>("no_password") != 0,
        access_string: r.get("access_string"),
        upstream_secret: r.get("upstream_secret"),
        version: r.get("version"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
    })
}

impl Store {
    pub async fn cache_user(
        &self,
        cache: &CacheId,
        username: &str,
    ) -> Result<Option<CacheUserRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM cache_users WHERE cache_id = $1 AND username = $2")
            .bind(cache.as_str())
            .bind(username)
            .fetch_optional(&self.pool)
            .await?;
        row.map(user_from_row).transpose()
    }

    /// The cache users of the live caches on node `node` of pool `pool`.
    pub async fn cache_users_on(&self, pool: &str, node: &str) -> Result<Vec<CacheUserRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT u.* FROM cache_users u JOIN caches c ON c.id = u.cache_id
             WHERE c.pool = $1 AND c.node = $2 AND c.status <> $3 ORDER BY u.cache_id, u.username",
        )
        .bind(pool)
        .bind(node)
        .bind(super::CacheStatus::Deleted.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(user_from_row).collect()
    }

    /// A cache's users, by name.
    pub async fn cache_users(&self, cache: &CacheId) -> Result<Vec<CacheUserRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM cache_users WHERE cache_id = $1 ORDER BY username")
            .bind(cache.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(user_from_row).collect()
    }

    /// Every signing key with when it was retired (None = the one signing now, newest last).
    pub async fn signing_keys_with_retirement(
        &self,
    ) -> Result<Vec<(SigningKeyRecord, Option<String>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT kid, private_der, public_raw, retired_at FROM signing_keys ORDER BY created_at, kid",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    SigningKeyRecord {
                        kid: r.get("kid"),
                        private_der: r.get("private_der"),
                        public_raw: r.get("public_raw"),
                    },
                    r.get("retired_at"),
                )
            })
            .collect())
    }
}

pub async fn insert_cache_user(conn: &mut AnyConnection, u: &CacheUserRecord) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO cache_users (cache_id, username, password_hashes, no_password, access_string,
                                  upstream_secret, version, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(u.cache_id.as_str())
    .bind(&u.username)
    .bind(serde_json::to_string(&u.password_hashes).expect("strings serialize"))
    .bind(u.no_password as i64)
    .bind(&u.access_string)
    .bind(&u.upstream_secret)
    .bind(u.version)
    .bind(&u.created_at)
    .bind(&u.updated_at)
    .execute(conn)
    .await
    .map(|_| ())
}

/// Writes a user's passwords and access string if its version is still `version`.
pub async fn update_cache_user(
    conn: &mut AnyConnection,
    u: &CacheUserRecord,
    version: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE cache_users SET password_hashes = $1, no_password = $2, access_string = $3,
                version = version + 1, updated_at = $4
         WHERE cache_id = $5 AND username = $6 AND version = $7",
    )
    .bind(serde_json::to_string(&u.password_hashes).expect("strings serialize"))
    .bind(u.no_password as i64)
    .bind(&u.access_string)
    .bind(now())
    .bind(u.cache_id.as_str())
    .bind(&u.username)
    .bind(version)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn delete_cache_user(
    conn: &mut AnyConnection,
    cache: &CacheId,
    username: &str,
) -> Result<bool, StoreError> {
    let done = sqlx::query("DELETE FROM cache_users WHERE cache_id = $1 AND username = $2")
        .bind(cache.as_str())
        .bind(username)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Removes every user of a (deleted) cache.
pub async fn delete_cache_users(conn: &mut AnyConnection, cache: &CacheId) -> Result<u64, StoreError> {
    let done =
        sqlx::query("DELETE FROM cache_users WHERE cache_id = $1").bind(cache.as_str()).execute(conn).await?;
    Ok(done.rows_affected())
}

pub async fn insert_signing_key(conn: &mut AnyConnection, key: &SigningKeyRecord) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO signing_keys (kid, private_der, public_raw, created_at) VALUES ($1, $2, $3, $4)")
        .bind(&key.kid)
        .bind(&key.private_der)
        .bind(&key.public_raw)
        .bind(now())
        .execute(conn)
        .await
        .map(|_| ())
}

/// Marks every key but `except` retired (now), unless it already is.
pub async fn retire_signing_keys(conn: &mut AnyConnection, except: &str) -> Result<(), StoreError> {
    sqlx::query("UPDATE signing_keys SET retired_at = $1 WHERE kid <> $2 AND retired_at IS NULL")
        .bind(now())
        .bind(except)
        .execute(conn)
        .await
        .map(|_| ())
}
