-- Stored bytes per cache, sampled by the control plane (control-plane/src/storage.rs).

-- The latest sample of each cache and what the sampler decided from it. Each new sample
-- accrues from `sampled_at` (Unix milliseconds) on, so a sample is never counted twice.
CREATE TABLE cache_storage (
    cache_id      TEXT PRIMARY KEY REFERENCES caches (id),
    bytes         BIGINT NOT NULL,
    keys          BIGINT NOT NULL,
    sampled_at    BIGINT NOT NULL,
    -- 1 while the cache is over data_storage_mb after evicting what it could: writes refused.
    storage_full  BIGINT NOT NULL DEFAULT 0,
    -- Keys evicted for the storage limit since the cache was created.
    evicted_keys  BIGINT NOT NULL DEFAULT 0
);

-- Storage accrued per cache and minute (Unix seconds, a multiple of 60): byte-seconds stored
-- during the minute, the largest sample, and keys evicted. Billing turns byte-seconds into
-- GB-hours and applies the minimum of 100 MB per cache-hour itself.
CREATE TABLE storage_usage (
    cache_id      TEXT NOT NULL REFERENCES caches (id),
    minute        BIGINT NOT NULL,
    byte_seconds  BIGINT NOT NULL,
    max_bytes     BIGINT NOT NULL,
    evicted_keys  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (cache_id, minute)
);
