-- Bumped in the transaction of every change to where a pool's caches are or to their storage
-- limits (create, delete, limit change): a control plane keeps each pool's occupancy in
-- memory and reloads it from `caches` only when the version is not the one it last saw.
CREATE TABLE placement_versions (
    pool     TEXT PRIMARY KEY,
    version  BIGINT NOT NULL
);
