-- Shoal's store. Times are RFC 3339 UTC strings.

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    token_hash  TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL,
    account_id  TEXT,
    name        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);

CREATE TABLE signing_keys (
    kid          TEXT PRIMARY KEY,
    private_der  BLOB NOT NULL,
    public_raw   BLOB NOT NULL,
    created_at   TEXT NOT NULL
);

-- A cache and its allocation: databases db .. db+databases-1 of node.
CREATE TABLE caches (
    id            TEXT PRIMARY KEY,
    account_id    TEXT NOT NULL,
    name          TEXT NOT NULL,
    status        TEXT NOT NULL,
    node          TEXT NOT NULL,
    db            INTEGER NOT NULL,
    databases     INTEGER NOT NULL,
    acl_password  TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    deleted_at    TEXT
);
CREATE UNIQUE INDEX caches_live_name ON caches (account_id, name) WHERE status <> 'deleted';
CREATE INDEX caches_live_node ON caches (node) WHERE status <> 'deleted';

CREATE TABLE tokens (
    jti         TEXT PRIMARY KEY,
    cache_id    TEXT NOT NULL REFERENCES caches (id),
    permission  TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    revoked_at  TEXT
);
CREATE INDEX tokens_cache ON tokens (cache_id);
