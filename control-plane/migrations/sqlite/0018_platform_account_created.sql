-- The platform account was created with a fixed date (2026-01-01), so a new install listed
-- invoices for months before it existed. It dates from the install (this migration runs at
-- the first start), or from its first cache on an older install.
UPDATE accounts
SET created_at = COALESCE(
        (SELECT MIN(created_at) FROM caches WHERE account_id = 'a000000000000'),
        strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
WHERE id = 'a000000000000' AND created_at = '2026-01-01T00:00:00.000Z';
