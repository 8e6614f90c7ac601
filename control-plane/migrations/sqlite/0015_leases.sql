-- Who holds each lease of the background jobs only one control plane may run (see
-- control-plane/src/lease.rs). On PostgreSQL the lease itself is a session-level advisory
-- lock; this row only shows it: the holder (a control plane instance: host/pid/random),
-- since when, its last heartbeat (every second while it holds the lock) and, for the
-- `limits` lease, the internal URL the others forward gateways' limit reports to.
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    url TEXT,
    since TEXT NOT NULL,
    heartbeat TEXT NOT NULL
);
