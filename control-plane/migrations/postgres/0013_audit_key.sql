-- The audit chain becomes keyed: `chain` 1 = SHA-256 of (prev_hash, fields) as before,
-- 2 = HMAC-SHA256 with the key in `audit_key_path` (outside the database). Older records
-- stay version 1; every record after the first keyed one must be keyed.
ALTER TABLE audit_log ADD COLUMN chain BIGINT NOT NULL DEFAULT 1;

-- Signed checkpoints of the chain's head: one per committed batch of records, signed with
-- the same key, so deleting the newest records shows.
CREATE TABLE audit_checkpoints (
    seq         BIGINT PRIMARY KEY,
    hash        TEXT NOT NULL,
    at          TEXT NOT NULL,
    signature   TEXT NOT NULL
);
CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE OR DELETE ON audit_checkpoints
FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
