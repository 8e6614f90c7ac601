//! The store: sqlx's `Any` driver over SQLite (the embedded default) or PostgreSQL (for
//! production). Queries are written once in the SQL both understand (`$1` placeholders,
//! TEXT times in RFC 3339 UTC, BIGINT integers); the schema lives in
//! `control-plane/migrations/{sqlite,postgres}/`, one migration per backend with the same number.

pub mod accounts;
pub mod audit;
mod engine_nodes;
pub use engine_nodes::EngineNodeRecord;
mod billing;
pub mod gateways;
pub mod idempotency;
pub mod leases;
pub mod snapshots;
mod storage;
mod usage;
pub mod users;

pub use storage::{
    accrual, record_creation_sample, CacheStorage, StorageSampleRecord, StorageUsage, MAX_COVER_MS,
};
pub use usage::{minute_text, Granularity, UsageRow};

use shoal_engine::Placement;
use shoal_types::{AccountId, CacheId, CacheLimits};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool, Executor, Row};
use std::sync::Arc;

pub type StoreError = sqlx::Error;

/// A data-plane token as stored (the token itself never is).
#[derive(Clone, Debug)]
pub struct TokenRecord {
    pub jti: String,
    pub permission: shoal_types::Permission,
    /// Valkey glob patterns the token's keys are limited to; empty: all keys.
    pub key_patterns: Vec<String>,
    pub created_at: String,
    pub expires_at: String,
}

/// A cache row's `status`. Deleted rows stay (usage and the audit log name them) but no
/// query of live caches returns them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheStatus {
    Available,
    Deleted,
}

impl CacheStatus {
    /// As in the `status` column and the API's JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Available => "available",
            CacheStatus::Deleted => "deleted",
        }
    }

    pub fn parse(s: &str) -> Option<CacheStatus> {
        [CacheStatus::Available, CacheStatus::Deleted].into_iter().find(|v| v.as_str() == s)
    }
}

/// Where a live cache is: what the storage sampler and the token sweep follow of every cache
/// ([`crate::places`]).
#[derive(Clone, Debug)]
pub struct CachePlace {
    pub id: CacheId,
    pub pool: String,
    pub node: String,
    pub db: u32,
    pub databases: u32,
    pub created_at: String,
}

/// A change of a cache's place ([`Store::place_changes`]).
#[derive(Clone, Debug)]
pub struct PlaceChange {
    pub place: CachePlace,
    /// The cache is live (not deleted).
    pub live: bool,
    /// The placement version of the change.
    pub version: i64,
}

/// A cache row, including where it lives.
#[derive(Clone, Debug)]
pub struct CacheRecord {
    pub id: CacheId,
    pub account_id: AccountId,
    pub name: String,
    pub status: CacheStatus,
    /// The engine pool it is placed in ([`crate::pools`]).
    pub pool: String,
    /// A node of that pool, or its cluster's one placement target.
    pub node: String,
    pub db: u32,
    pub databases: u32,
    pub acl_password: String,
    pub created_at: String,
    /// Keyspace-notification flags ("" = off).
    pub keyspace_events: String,
    pub description: String,
    pub limits: CacheLimits,
    pub eviction_policy: String,
    /// JSON object of string tags.
    pub tags: String,
    /// Bumped by every change; the ETag.
    pub version: i64,
    pub updated_at: String,
    /// The daily snapshot: ("HH:MM" UTC start of the window, "" = off; automatic
    /// snapshots kept).
    pub snapshot_window: String,
    pub snapshot_retention: u32,
    /// A numbered database of a shared node, or a node of its own.
    pub placement: Placement,
}

impl CacheRecord {
    /// The cache's ACL user on its node, as the engine makes it.
    pub fn tenant_acl(&self) -> shoal_engine::TenantAcl {
        shoal_engine::TenantAcl {
            user: self.id.acl_user(),
            password: self.acl_password.clone(),
            db: self.db,
            databases: self.databases,
            placement: self.placement,
        }
    }
}

/// Filters and page of `GET /v1/caches`.
#[derive(Clone, Debug, Default)]
pub struct CacheFilter {
    pub account: Option<AccountId>,
    pub name: Option<String>,
    /// Only caches whose name starts with this.
    pub name_prefix: Option<String>,
    /// Only caches created after this (created_at, id) cursor.
    pub after: Option<(String, String)>,
    pub limit: i64,
}

/// An API key's identity as the store knows it.
#[derive(Clone, Debug)]
pub struct ApiKeyRecord {
    pub id: String,
    /// None when the row's `role` and `account_id` make no role (refused).
    pub role: Option<crate::role::Role>,
}

/// A signing key pair (Ed25519): PKCS#8 private key and raw public key.
#[derive(Clone, Debug)]
pub struct SigningKeyRecord {
    pub kid: String,
    pub private_der: Vec<u8>,
    pub public_raw: Vec<u8>,
}

/// Which database the store runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// Begins a transaction that writes. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`, waiting up to `busy_timeout` for it): a deferred transaction that
    /// reads first fails at its first write with `database is locked` (SQLITE_BUSY, or
    /// BUSY_SNAPSHOT in WAL mode) whenever another connection wrote meanwhile, without waiting.
    pub(crate) async fn begin_write(
        self,
        pool: &AnyPool,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        match self {
            Backend::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => pool.begin().await,
        }
    }
}

#[derive(Clone)]
pub struct Store {
    pub(crate) pool: AnyPool,
    pub backend: Backend,
    /// The URL it was opened with: leases take connections of their own
    /// ([`Store::dedicated_connection`]).
    url: Arc<str>,
    /// Serializes audit appends (the hash chain needs the previous record); on SQLite also
    /// the storage sampler's batches, so writers take turns ([`Store::record_storage_samples`]).
    audit_lock: Arc<tokio::sync::Mutex<()>>,
    audit_chain: Arc<audit::Chain>,
    /// The task that commits audit records in batches ([`Store::audit`]).
    audit_writer: tokio::sync::mpsc::Sender<audit::Job>,
}

/// A transaction whose change and audit record commit together.
pub struct Audited {
    _chain: tokio::sync::OwnedMutexGuard<()>,
    tx: sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    chain: Arc<audit::Chain>,
}

impl Audited {
    /// The connection to make the change on.
    pub fn conn(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }

    /// Records the change and commits both.
    pub async fn commit(mut self, event: &audit::AuditEvent) -> Result<audit::AuditRecord, StoreError> {
        let records =
            audit::append_all(&mut self.tx, self.backend, &self.chain, std::slice::from_ref(event)).await?;
        self.tx.commit().await?;
        self.chain.remember(&records);
        records.into_iter().next().ok_or(sqlx::Error::RowNotFound)
    }
}

impl Store {
    /// Opens the database at `url` (`sqlite://path` — created if missing — or
    /// `postgres://…`) and runs the migrations. Its audit records are chained without a key
    /// (as older installs did): for tests and tools; the control plane uses [`Store::open_audited`].
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        Store::open_with(url, None).await
    }

    /// Like [`Store::open`], with audit records keyed and checkpointed with `key`.
    pub async fn open_audited(url: &str, key: audit::AuditKey) -> Result<Store, StoreError> {
        Store::open_with(url, Some(key)).await
    }

    async fn open_with(url: &str, key: Option<audit::AuditKey>) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(sqlx::Error::Configuration(format!("unsupported database url {url:?}").into()));
        };
        let options = AnyPoolOptions::new().max_connections(8);
        let pool = match backend {
            Backend::Sqlite => {
                // The store holds signing keys and ACL passwords: created 0600.
                if let Some(file) = sqlite_file(url) {
                    create_private(&file).map_err(sqlx::Error::Io)?;
                }
                let url = if url.contains('?') { url.to_owned() } else { format!("{url}?mode=rwc") };
                options
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            conn.execute("PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;")
                                .await
                                .map(|_| ())
                        })
                    })
                    .connect(&url)
                    .await?
            }
            Backend::Postgres => options.connect(url).await?,
        };
        match backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite").run(&pool).await?,
            Backend::Postgres => sqlx::migrate!("./migrations/postgres").run(&pool).await?,
        }
        // Also repairs an older install: the database and its WAL and shared-memory files.
        if let Some(file) = sqlite_file(url) {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let mut path = file.clone().into_os_string();
                path.push(suffix);
                shoal_engine::private::tighten(std::path::Path::new(&path)).map_err(sqlx::Error::Io)?;
            }
        }
        let audit_chain = Arc::new(audit::Chain::new(key));
        audit::anchor_unkeyed_head(&pool, backend, &audit_chain).await?;
        let audit_lock = Arc::new(tokio::sync::Mutex::new(()));
        let (audit_writer, jobs) = tokio::sync::mpsc::channel(audit::QUEUE);
        let writer = audit::Writer {
            pool: pool.clone(),
            backend,
            lock: audit_lock.clone(),
            chain: audit_chain.clone(),
        };
        tokio::spawn(writer.run(jobs));
        Ok(Store { pool, backend, url: url.into(), audit_lock, audit_chain, audit_writer })
    }

    /// Starts a change that will be audited in the same transaction.
    pub async fn begin(&self) -> Result<Audited, StoreError> {
        let chain = self.audit_lock.clone().lock_owned().await;
        let tx = self.backend.begin_write(&self.pool).await?;
        Ok(Audited { _chain: chain, tx, backend: self.backend, chain: self.audit_chain.clone() })
    }

    /// A connection of its own, outside the pool, for as long as the caller keeps it: a
    /// lease's session (its advisory lock lives and dies with it, see [`crate::lease`]).
    pub async fn dedicated_connection(&self) -> Result<AnyConnection, StoreError> {
        use sqlx::Connection;
        AnyConnection::connect(&self.url).await
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ())
    }

    // --- API keys ---

    pub async fn api_key_by_hash(&self, token_hash: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        // Keys of a deleted account are revoked with it; the join also refuses one made in a
        // race with the deletion (an LDAP session).
        let row = sqlx::query(
            "SELECT k.id, k.role, k.account_id FROM api_keys k LEFT JOIN accounts a ON a.id = k.account_id
             WHERE k.token_hash = $1 AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > $2)
               AND (k.account_id IS NULL OR a.status <> 'deleted')",
        )
        .bind(token_hash)
        .bind(now())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| ApiKeyRecord {
            id: r.get("id"),
            role: crate::role::Role::from_store(r.get("role"), r.get("account_id")),
        }))
    }

    // --- signing keys ---

    pub async fn signing_keys(&self) -> Result<Vec<SigningKeyRecord>, StoreError> {
        let rows = sqlx::query("SELECT kid, private_der, public_raw FROM signing_keys ORDER BY created_at")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| SigningKeyRecord {
                kid: r.get("kid"),
                private_der: r.get("private_der"),
                public_raw: r.get("public_raw"),
            })
            .collect())
    }

    pub async fn insert_signing_key(&self, key: &SigningKeyRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO signing_keys (kid, private_der, public_raw, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&key.kid)
        .bind(&key.private_der)
        .bind(&key.public_raw)
        .bind(now())
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    // --- caches ---

    /// Every live cache of engine pool `pool`: `(node, db, databases, data_storage_mb)`.
    pub async fn placements(&self, pool: &str) -> Result<Vec<(String, u32, u32, Option<u64>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT node, db, databases, data_storage_mb FROM caches WHERE pool = $1 AND status <> 'deleted'",
        )
        .bind(pool)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let (db, n): (i64, i64) = (r.get("db"), r.get("databases"));
                let mb = r.get::<Option<i64>, _>("data_storage_mb").map(|v| v as u64);
                (r.get("node"), db as u32, n as u32, mb)
            })
            .collect())
    }

    /// Pool `pool`'s placement version ([`bump_placement`]); 0 before its first change.
    pub async fn placement_version(&self, pool: &str) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT version FROM placement_versions WHERE pool = $1")
            .bind(pool)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map_or(0, |r| r.get("version")))
    }

    /// The tenant ACL users node `node` of pool `pool` should have: those of its live
    /// caches, and the ids of its deleted ones.
    pub async fn tenants_on(
        &self,
        pool: &str,
        node: &str,
    ) -> Result<(Vec<shoal_engine::TenantAcl>, Vec<CacheId>), StoreError> {
        let rows = sqlx::query(
            "SELECT id, status, acl_password, db, databases, placement FROM caches WHERE pool = $1 AND node = $2",
        )
        .bind(pool)
        .bind(node)
        .fetch_all(&self.pool)
        .await?;
        let (mut live, mut gone) = (Vec::new(), Vec::new());
        for r in rows {
            let id = CacheId::parse(r.get::<&str, _>("id")).map_err(decode_err)?;
            if r.get::<&str, _>("status") == CacheStatus::Deleted.as_str() {
                gone.push(id);
            } else {
                let (db, n): (i64, i64) = (r.get("db"), r.get("databases"));
                live.push(shoal_engine::TenantAcl {
                    user: id.acl_user(),
                    password: r.get("acl_password"),
                    db: db as u32,
                    databases: n as u32,
                    placement: decode_value("placement", r.get("placement"), Placement::parse)?,
                });
            }
        }
        Ok((live, gone))
    }

    /// Whether a cache's clients use client-side caching (its node's keyspace events hold `KA`
    /// for it).
    pub async fn client_tracking(&self, id: &CacheId) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT id FROM caches WHERE id = $1 AND client_tracking = 1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// A live cache by id.
    pub async fn cache(&self, id: &CacheId) -> Result<Option<CacheRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM caches WHERE id = $1 AND status <> 'deleted'")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(cache_from_row).transpose()
    }

    /// The caches of pool `pool` whose place or storage limit changed after its placement
    /// version `after` ([`bump_placement`]), deleted ones too, in the order of their changes
    /// (a database let go comes before its next cache): an index lookup, O(changes).
    pub async fn place_changes(&self, pool: &str, after: i64) -> Result<Vec<PlaceChange>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, pool, node, db, databases, created_at, status, place_seq FROM caches
             WHERE pool = $1 AND place_seq > $2 ORDER BY place_seq",
        )
        .bind(pool)
        .bind(after)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(PlaceChange {
                    place: cache_place(r)?,
                    live: r.get::<&str, _>("status") != CacheStatus::Deleted.as_str(),
                    version: r.get("place_seq"),
                })
            })
            .collect()
    }

    /// Every live cache of pool `pool` (a first read, before following [`Self::place_changes`]).
    pub async fn pool_places(&self, pool: &str) -> Result<Vec<CachePlace>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, pool, node, db, databases, created_at FROM caches WHERE pool = $1 AND status <> 'deleted'",
        )
        .bind(pool)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(cache_place).collect()
    }

    /// Live caches with a daily snapshot window. Only those rows are read: the scheduler
    /// looks every minute, and most caches have no window.
    pub async fn caches_with_snapshot_window(&self) -> Result<Vec<CacheRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM caches WHERE status <> 'deleted' AND snapshot_window <> '' ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(cache_from_row).collect()
    }

    /// Live caches, oldest first, optionally of one account.
    pub async fn caches(&self, account: Option<&AccountId>) -> Result<Vec<CacheRecord>, StoreError> {
        self.caches_page(&CacheFilter { account: account.cloned(), limit: i64::MAX, ..Default::default() })
            .await
    }

    /// One page of live caches matching `f`, oldest first.
    pub async fn caches_page(&self, f: &CacheFilter) -> Result<Vec<CacheRecord>, StoreError> {
        // Only the filters given are in the SQL, so the planner uses an index (an account's
        // caches by name or by age, everyone's by age) rather than reading every cache.
        let mut sql =
            "SELECT * FROM caches WHERE status <> 'deleted' AND (created_at, id) > ($1, $2)".to_string();
        let mut n = 2;
        let mut filter = |column: &str| {
            n += 1;
            sql.push_str(&format!(" AND {column} = ${n}"));
        };
        if f.account.is_some() {
            filter("account_id");
        }
        if f.name.is_some() {
            filter("name");
        }
        if f.name_prefix.is_some() {
            // (Read in the walk by age: a page of matches, not an index range.)
            n += 1;
            sql.push_str(&format!(" AND substr(name, 1, length(${n})) = ${n}"));
        }
        sql.push_str(&format!(" ORDER BY created_at, id LIMIT ${}", n + 1));
        let (after_at, after_id) = f.after.clone().unwrap_or_default();
        let mut query = sqlx::query(&sql).bind(after_at).bind(after_id);
        if let Some(account) = &f.account {
            query = query.bind(account.as_str());
        }
        if let Some(name) = &f.name {
            query = query.bind(name.as_str());
        }
        if let Some(prefix) = &f.name_prefix {
            query = query.bind(prefix.as_str());
        }
        let rows = query.bind(f.limit).fetch_all(&self.pool).await?;
        rows.into_iter().map(cache_from_row).collect()
    }

    /// Keyspace-event flags the live caches on `node` of engine pool `pool` need: their own,
    /// plus `KA` for caches whose clients use client-side caching.
    pub async fn keyspace_events_on(&self, pool: &str, node: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT keyspace_events || CASE WHEN client_tracking = 1 THEN 'KA' ELSE '' END AS keyspace_events
             FROM caches WHERE pool = $1 AND node = $2 AND status <> 'deleted'",
        )
        .bind(pool)
        .bind(node)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| r.get("keyspace_events")).collect())
    }

    /// Records that a cache's clients use client-side caching.
    pub async fn enable_client_tracking(&self, id: &CacheId) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE caches SET client_tracking = 1 WHERE id = $1 AND client_tracking = 0")
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    // --- tokens ---

    /// The distinct scopes (permission, key patterns) of every token ever minted for a cache,
    /// revoked and expired ones included (rows are never deleted): which upstream ACL users
    /// its tokens may have left on its node.
    pub async fn token_scopes(
        &self,
        cache: &CacheId,
    ) -> Result<Vec<(shoal_types::Permission, Vec<String>)>, StoreError> {
        let rows = sqlx::query("SELECT DISTINCT permission, key_patterns FROM tokens WHERE cache_id = $1")
            .bind(cache.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(token_scope).collect()
    }

    /// The distinct scopes of the unexpired, unrevoked tokens of the live caches on node
    /// `node` of pool `pool`, with their caches: the upstream users those tokens log in as.
    pub async fn active_token_scopes_on(
        &self,
        pool: &str,
        node: &str,
    ) -> Result<Vec<(CacheId, shoal_types::Permission, Vec<String>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT DISTINCT t.cache_id, t.permission, t.key_patterns FROM tokens t
             JOIN caches c ON c.id = t.cache_id
             WHERE c.pool = $1 AND c.node = $2 AND c.status <> $3
               AND t.revoked_at IS NULL AND t.expires_at > $4",
        )
        .bind(pool)
        .bind(node)
        .bind(CacheStatus::Deleted.as_str())
        .bind(now_secs())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let (permission, patterns) = token_scope(r)?;
                Ok((CacheId::parse(r.get::<&str, _>("cache_id")).map_err(decode_err)?, permission, patterns))
            })
            .collect()
    }

    /// Tokens of a cache that are neither expired nor revoked.
    pub async fn active_tokens(&self, cache: &CacheId) -> Result<Vec<TokenRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT jti, permission, key_patterns, created_at, expires_at FROM tokens
             WHERE cache_id = $1 AND revoked_at IS NULL AND expires_at > $2 ORDER BY created_at, jti",
        )
        .bind(cache.as_str())
        .bind(now_secs())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let (permission, key_patterns) = token_scope(r)?;
                Ok(TokenRecord {
                    jti: r.get("jti"),
                    permission,
                    key_patterns,
                    created_at: r.get("created_at"),
                    expires_at: r.get("expires_at"),
                })
            })
            .collect()
    }

    /// Revoked tokens that have not expired yet (what gateways must refuse): (jti, expires_at).
    pub async fn revoked_tokens(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT jti, expires_at FROM tokens WHERE revoked_at IS NOT NULL AND expires_at > $1 ORDER BY jti",
        )
        .bind(now_secs())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| (r.get("jti"), r.get("expires_at"))).collect())
    }
}

/// Bumps pool `pool`'s placement version (in the transaction that changes `cache`'s
/// placement or storage limit) and marks the cache with it ([`Store::place_changes`]);
/// returns the new version.
pub async fn bump_placement(
    conn: &mut AnyConnection,
    pool: &str,
    cache: &CacheId,
) -> Result<i64, StoreError> {
    let row = sqlx::query(
        "INSERT INTO placement_versions (pool, version) VALUES ($1, 1)
         ON CONFLICT (pool) DO UPDATE SET version = placement_versions.version + 1 RETURNING version",
    )
    .bind(pool)
    .fetch_one(&mut *conn)
    .await?;
    let version: i64 = row.get("version");
    sqlx::query("UPDATE caches SET place_seq = $1 WHERE id = $2")
        .bind(version)
        .bind(cache.as_str())
        .execute(conn)
        .await?;
    Ok(version)
}

/// A token row's scope: its permission and key patterns.
fn token_scope(r: &AnyRow) -> Result<(shoal_types::Permission, Vec<String>), StoreError> {
    Ok((
        decode_value("permission", r.get("permission"), shoal_types::Permission::parse)?,
        serde_json::from_str(r.get::<&str, _>("key_patterns")).map_err(decode_err)?,
    ))
}

fn cache_place(r: &AnyRow) -> Result<CachePlace, StoreError> {
    Ok(CachePlace {
        id: CacheId::parse(r.get::<&str, _>("id")).map_err(decode_err)?,
        pool: r.get("pool"),
        node: r.get("node"),
        db: r.get::<i64, _>("db") as u32,
        databases: r.get::<i64, _>("databases") as u32,
        created_at: r.get("created_at"),
    })
}

pub async fn insert_cache(conn: &mut AnyConnection, c: &CacheRecord) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO caches (id, account_id, name, status, node, db, databases, acl_password, created_at,
                             keyspace_events, description, ecpu_per_second, data_storage_mb, max_connections,
                             eviction_policy, tags, version, updated_at, pool, snapshot_window,
                             snapshot_retention, placement)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20,
                 $21, $22)",
    )
    .bind(c.id.as_str())
    .bind(c.account_id.as_str())
    .bind(&c.name)
    .bind(c.status.as_str())
    .bind(&c.node)
    .bind(c.db as i64)
    .bind(c.databases as i64)
    .bind(&c.acl_password)
    .bind(&c.created_at)
    .bind(&c.keyspace_events)
    .bind(&c.description)
    .bind(c.limits.ecpu_per_second.map(|v| v as i64))
    .bind(c.limits.data_storage_mb.map(|v| v as i64))
    .bind(c.limits.max_connections.map(i64::from))
    .bind(&c.eviction_policy)
    .bind(&c.tags)
    .bind(c.version)
    .bind(&c.updated_at)
    .bind(&c.pool)
    .bind(&c.snapshot_window)
    .bind(i64::from(c.snapshot_retention))
    .bind(c.placement.as_str())
    .execute(conn)
    .await
    .map(|_| ())
}

/// Writes a cache's changeable fields if its version is still `version`; false if another
/// change came first.
pub async fn update_cache(
    conn: &mut AnyConnection,
    c: &CacheRecord,
    version: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE caches SET name = $1, description = $2, ecpu_per_second = $3, data_storage_mb = $4,
                max_connections = $5, eviction_policy = $6, tags = $7, keyspace_events = $8,
                version = version + 1, updated_at = $9, snapshot_window = $12, snapshot_retention = $13
         WHERE id = $10 AND version = $11 AND status <> 'deleted'",
    )
    .bind(&c.name)
    .bind(&c.description)
    .bind(c.limits.ecpu_per_second.map(|v| v as i64))
    .bind(c.limits.data_storage_mb.map(|v| v as i64))
    .bind(c.limits.max_connections.map(i64::from))
    .bind(&c.eviction_policy)
    .bind(&c.tags)
    .bind(&c.keyspace_events)
    .bind(now())
    .bind(c.id.as_str())
    .bind(version)
    .bind(&c.snapshot_window)
    .bind(i64::from(c.snapshot_retention))
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn mark_cache_deleted(conn: &mut AnyConnection, id: &CacheId) -> Result<(), StoreError> {
    sqlx::query("UPDATE caches SET status = 'deleted', deleted_at = $1 WHERE id = $2")
        .bind(now())
        .bind(id.as_str())
        .execute(conn)
        .await
        .map(|_| ())
}

pub async fn insert_token(
    conn: &mut AnyConnection,
    jti: &str,
    cache: &CacheId,
    permission: shoal_types::Permission,
    key_patterns: &[String],
    expires_at: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO tokens (jti, cache_id, permission, key_patterns, created_at, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(jti)
    .bind(cache.as_str())
    .bind(permission.as_str())
    .bind(serde_json::to_string(key_patterns).map_err(|e| sqlx::Error::Encode(Box::new(e)))?)
    .bind(now())
    .bind(expires_at)
    .execute(conn)
    .await
    .map(|_| ())
}

/// Revokes a cache's token; false if there is no such live token.
pub async fn revoke_token(conn: &mut AnyConnection, cache: &CacheId, jti: &str) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE tokens SET revoked_at = $1 WHERE cache_id = $2 AND jti = $3 AND revoked_at IS NULL",
    )
    .bind(now())
    .bind(cache.as_str())
    .bind(jti)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// A stored value that does not parse (an id, a JSON column) as sqlx's decode error.
/// A column's text as the typed value `parse` makes of it; a value it does not know is a
/// decode error.
pub(crate) fn decode_value<T>(
    column: &'static str,
    value: &str,
    parse: fn(&str) -> Option<T>,
) -> Result<T, StoreError> {
    parse(value).ok_or_else(|| decode_err(UnknownValue { column, value: value.to_string() }))
}

#[derive(Debug, thiserror::Error)]
#[error("unknown {column} {value:?}")]
pub(crate) struct UnknownValue {
    column: &'static str,
    value: String,
}

pub(crate) fn decode_err<E: std::error::Error + Send + Sync + 'static>(e: E) -> sqlx::Error {
    sqlx::Error::Decode(Box::new(e))
}

fn cache_from_row(r: AnyRow) -> Result<CacheRecord, StoreError> {
    Ok(CacheRecord {
        id: CacheId::parse(r.get::<&str, _>("id")).map_err(decode_err)?,
        account_id: AccountId::parse(r.get::<&str, _>("account_id")).map_err(decode_err)?,
        name: r.get("name"),
        status: decode_value("status", r.get("status"), CacheStatus::parse)?,
        pool: r.get("pool"),
        node: r.get("node"),
        db: r.get::<i64, _>("db") as u32,
        databases: r.get::<i64, _>("databases") as u32,
        acl_password: r.get("acl_password"),
        created_at: r.get("created_at"),
        keyspace_events: r.get("keyspace_events"),
        description: r.get("description"),
        limits: CacheLimits {
            ecpu_per_second: r.get::<Option<i64>, _>("ecpu_per_second").map(|v| v as u64),
            data_storage_mb: r.get::<Option<i64>, _>("data_storage_mb").map(|v| v as u64),
            max_connections: r.get::<Option<i64>, _>("max_connections").map(|v| v as u32),
        },
        eviction_policy: r.get("eviction_policy"),
        tags: r.get("tags"),
        version: r.get("version"),
        updated_at: r.get("updated_at"),
        snapshot_window: r.get("snapshot_window"),
        snapshot_retention: u32::try_from(r.get::<i64, _>("snapshot_retention")).unwrap_or(0),
        placement: decode_value("placement", r.get("placement"), Placement::parse)?,
    })
}

/// The current time as an RFC 3339 UTC string (what the store keeps).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The file of a `sqlite://path[?options]` URL (None for an in-memory database).
fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let file = rest.split('?').next().unwrap_or(rest);
    (!file.is_empty() && !file.starts_with(":memory:")).then(|| std::path::PathBuf::from(file))
}

/// Creates `path` empty with mode 0600 unless it exists (SQLite gives its -wal and -shm
/// files the database file's mode).
fn create_private(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        // A missing folder: let SQLite report it as before.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The current time as stored in `expires_at` (RFC 3339, whole seconds), for comparisons.
fn now_secs() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Whether an error is a unique-constraint violation (a conflict, not a failure).
pub fn is_unique_violation(e: &StoreError) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// A live cache row for tests: pool `main`, node `n0`, database 1.
#[cfg(test)]
pub(crate) fn test_cache_record(id: &CacheId) -> CacheRecord {
    CacheRecord {
        id: id.clone(),
        account_id: shoal_types::AccountId::generate(),
        name: "c".into(),
        status: CacheStatus::Available,
        pool: "main".into(),
        node: "n0".into(),
        db: 1,
        databases: 1,
        acl_password: "pw".into(),
        created_at: now(),
        keyspace_events: String::new(),
        description: String::new(),
        limits: Default::default(),
        eviction_policy: "volatile-lru".into(),
        tags: "{}".into(),
        version: 1,
        updated_at: now(),
        snapshot_window: String::new(),
        snapshot_retention: 0,
        placement: Default::default(),
    }
}

/// A new empty database `shoal_<prefix>_<random>` on the Postgres lane's server
/// (`SHOAL_TEST_POSTGRES_URL`, see scripts/test.sh), or None when the lane is not running.
#[cfg(test)]
pub(crate) fn fresh_postgres_database(prefix: &str) -> Option<String> {
    let server = std::env::var("SHOAL_TEST_POSTGRES_URL").ok().filter(|u| !u.is_empty())?;
    let name = format!("shoal_{prefix}_{:016x}", rand::random::<u64>());
    let out = std::process::Command::new("psql")
        .arg(&server)
        .args(["-v", "ON_ERROR_STOP=1", "-qc", &format!("CREATE DATABASE {name}")])
        .output()
        .expect("psql runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Some(format!("{}/{name}", server.rsplit_once('/').unwrap().0))
}
