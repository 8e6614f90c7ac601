-- Usage metered by the gateways. A batch is stored once: `usage_batches` remembers every
-- (gateway_id, seq) received, in the same transaction that adds its counters to
-- `usage_minutes`, one row per cache and minute (start of the minute, RFC 3339 UTC).

CREATE TABLE usage_batches (
    gateway_id   TEXT NOT NULL,
    seq          BIGINT NOT NULL,
    received_at  TEXT NOT NULL,
    PRIMARY KEY (gateway_id, seq)
);

CREATE TABLE usage_minutes (
    cache_id    TEXT NOT NULL,
    minute      TEXT NOT NULL,
    commands    BIGINT NOT NULL,
    ecpu_milli  BIGINT NOT NULL,
    bytes_in    BIGINT NOT NULL,
    bytes_out   BIGINT NOT NULL,
    hits        BIGINT NOT NULL,
    misses      BIGINT NOT NULL,
    throttled   BIGINT NOT NULL,
    errors      BIGINT NOT NULL,
    PRIMARY KEY (cache_id, minute)
);
