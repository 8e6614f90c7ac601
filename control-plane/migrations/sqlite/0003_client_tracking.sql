-- Whether a cache's clients use client-side caching (CLIENT TRACKING): its node then
-- publishes keyspace events, from which gateways build invalidations.
ALTER TABLE caches ADD COLUMN client_tracking INTEGER NOT NULL DEFAULT 0;
