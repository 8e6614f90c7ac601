-- The key patterns a data-plane token is limited to, as a JSON array of Valkey glob patterns
-- ('[]' = all keys; `permission` already holds read-write / read-only).
ALTER TABLE tokens ADD COLUMN key_patterns TEXT NOT NULL DEFAULT '[]';
