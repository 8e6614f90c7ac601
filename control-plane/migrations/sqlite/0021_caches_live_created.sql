-- Lists every account's live caches oldest first (an admin's `GET /v1/caches`, a page at a
-- time) without reading and sorting every cache.
CREATE INDEX caches_live_created ON caches (created_at, id) WHERE status <> 'deleted';
