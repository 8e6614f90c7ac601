-- Snapshots of caches: RDB files in the snapshot store (the control plane's `[snapshots]`
-- settings). A snapshot outlives its cache; `deleted_at_ms` is set when its file is removed
-- (the row stays: invoices bill snapshot storage by the time each file was kept). Times in
-- Unix milliseconds.
CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    cache_id TEXT NOT NULL,
    cache_name TEXT NOT NULL,
    name TEXT NOT NULL,
    -- manual, automatic (the cache's daily window) or final (taken as the cache was deleted)
    kind TEXT NOT NULL,
    -- creating, available or failed
    status TEXT NOT NULL,
    databases BIGINT NOT NULL,
    keys BIGINT NOT NULL DEFAULT 0,
    bytes BIGINT NOT NULL DEFAULT 0,
    sha256 TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    created_at_ms BIGINT NOT NULL,
    completed_at_ms BIGINT,
    deleted_at_ms BIGINT
);
CREATE UNIQUE INDEX snapshots_account_name ON snapshots (account_id, name) WHERE deleted_at_ms IS NULL;
CREATE INDEX snapshots_cache ON snapshots (cache_id, created_at_ms);

-- A cache's daily snapshot: the UTC start of its window ("HH:MM"; '' = off) and how many
-- automatic snapshots it keeps.
ALTER TABLE caches ADD COLUMN snapshot_window TEXT NOT NULL DEFAULT '';
ALTER TABLE caches ADD COLUMN snapshot_retention BIGINT NOT NULL DEFAULT 0;
