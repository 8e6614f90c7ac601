-- Idempotency keys expire 24 h after their first use (purged on every claim and at start),
-- found by age. Rows kept before replays were redacted may hold an API key's token in
-- plaintext: drop them (a retry after this upgrade simply runs again).
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
DELETE FROM idempotency_keys WHERE body LIKE '%"token":%';
