-- Cache users (ElastiCache RBAC users): one or two argon2id password hashes (a JSON array;
-- empty for the no-password `default` user), an access string, and the secret of the
-- upstream Valkey ACL user `t<cache>.user.<name>` that enforces it.
CREATE TABLE cache_users (
    cache_id         TEXT NOT NULL REFERENCES caches (id),
    username         TEXT NOT NULL,
    password_hashes  TEXT NOT NULL,
    no_password      BIGINT NOT NULL DEFAULT 0,
    access_string    TEXT NOT NULL,
    upstream_secret  TEXT NOT NULL,
    version          BIGINT NOT NULL DEFAULT 1,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    PRIMARY KEY (cache_id, username)
);

-- REST sessions from `POST /v1/auth/login` (LDAP) are API keys that expire.
ALTER TABLE api_keys ADD COLUMN expires_at TEXT;

-- Rotated-out signing keys keep verifying until tokens they signed have expired.
ALTER TABLE signing_keys ADD COLUMN retired_at TEXT;
