-- Each gateway's own credential for the internal API (replacing the one shared token):
-- only the SHA-256 of the credential is kept.
CREATE TABLE gateways (
    name TEXT PRIMARY KEY,
    credential_hash TEXT NOT NULL,
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL
);
