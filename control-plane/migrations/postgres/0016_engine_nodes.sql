-- What the engine agents (`shoal engine`) last reported of each node they run: the host,
-- the credential it reported with, the valkey-server's pid (NULL while it restarts), its
-- restarts, and when (Unix milliseconds, the receiving control plane's clock). Any control
-- plane shows it, whichever one the agent reported to.
CREATE TABLE engine_nodes (
    node TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    credential TEXT NOT NULL,
    pid BIGINT,
    restarts BIGINT NOT NULL,
    reported_at_ms BIGINT NOT NULL
);
