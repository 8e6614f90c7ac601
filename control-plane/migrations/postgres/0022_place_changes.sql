-- The placement version (placement_versions) of each cache's latest change of place or
-- storage limit (create, delete, limit change): the storage sampler reads only the caches
-- changed since the version it last saw, not every cache each round.
ALTER TABLE caches ADD COLUMN place_seq BIGINT NOT NULL DEFAULT 0;
CREATE INDEX caches_pool_place_seq ON caches (pool, place_seq);

-- The sampler asks every round which caches stored something or are full at their latest
-- sample: usually few of them, found without reading every cache's row.
CREATE INDEX cache_storage_nonempty ON cache_storage (cache_id) WHERE bytes <> 0 OR keys <> 0 OR storage_full <> 0;
CREATE INDEX cache_storage_full ON cache_storage (cache_id) WHERE storage_full <> 0;
