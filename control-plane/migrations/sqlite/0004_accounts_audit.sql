-- Accounts own caches and API keys; caches get limits, tags and a version (ETag); creates
-- are idempotent per Idempotency-Key; every security-relevant act goes to the audit log.

CREATE TABLE accounts (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    email       TEXT NOT NULL DEFAULT '',
    status      TEXT NOT NULL,
    version     BIGINT NOT NULL DEFAULT 1,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    deleted_at  TEXT
);
CREATE UNIQUE INDEX accounts_live_name ON accounts (name) WHERE status <> 'deleted';
-- What the platform admin creates without naming an account belongs here.
INSERT INTO accounts (id, name, status, created_at, updated_at)
VALUES ('a000000000000', 'platform', 'active', '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z');

CREATE INDEX api_keys_account ON api_keys (account_id);

ALTER TABLE caches ADD COLUMN description TEXT NOT NULL DEFAULT '';
ALTER TABLE caches ADD COLUMN ecpu_per_second BIGINT;
ALTER TABLE caches ADD COLUMN data_storage_mb BIGINT;
ALTER TABLE caches ADD COLUMN max_connections BIGINT;
ALTER TABLE caches ADD COLUMN eviction_policy TEXT NOT NULL DEFAULT 'volatile-lru';
ALTER TABLE caches ADD COLUMN tags TEXT NOT NULL DEFAULT '{}';
ALTER TABLE caches ADD COLUMN version BIGINT NOT NULL DEFAULT 1;
ALTER TABLE caches ADD COLUMN updated_at TEXT NOT NULL DEFAULT '';
CREATE INDEX caches_account ON caches (account_id, created_at, id);

-- The first response to a create with an Idempotency-Key, replayed for retries.
-- status 0 = the first request is still running.
CREATE TABLE idempotency_keys (
    principal     TEXT NOT NULL,
    key           TEXT NOT NULL,
    request_hash  TEXT NOT NULL,
    status        BIGINT NOT NULL,
    body          TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    PRIMARY KEY (principal, key)
);

-- Append-only, hash-chained: hash = sha256(prev_hash, the record's fields).
CREATE TABLE audit_log (
    seq         BIGINT PRIMARY KEY,
    at          TEXT NOT NULL,
    actor       TEXT NOT NULL,
    account_id  TEXT,
    source      TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    cache_id    TEXT,
    outcome     TEXT NOT NULL,
    reason      TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    details     TEXT NOT NULL,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_account ON audit_log (account_id, seq);
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
