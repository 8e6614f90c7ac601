-- Final invoices, frozen once their month (plus a grace period for late usage) has ended.
-- Drafts are computed on request from the usage tables and never stored.
CREATE TABLE invoices (
    id          TEXT PRIMARY KEY,
    account_id  TEXT NOT NULL,
    month       TEXT NOT NULL,
    body        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    UNIQUE (account_id, month)
);
