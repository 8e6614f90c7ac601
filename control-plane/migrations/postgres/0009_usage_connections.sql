-- Peak concurrent client connections per cache, minute and gateway. Each gateway reports its
-- own peak about every second; the row keeps the largest of the minute. A cache's connections
-- in a minute are the sum over its gateways (each counts only its own clients). Kept apart
-- from `usage_minutes`, which is summed and billed, and is not keyed per gateway.

CREATE TABLE usage_connections (
    cache_id     TEXT NOT NULL,
    minute       TEXT NOT NULL,
    gateway_id   TEXT NOT NULL,
    connections  BIGINT NOT NULL,
    PRIMARY KEY (cache_id, minute, gateway_id)
);
