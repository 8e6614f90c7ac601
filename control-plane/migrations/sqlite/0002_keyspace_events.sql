-- Keyspace notifications a cache asked for (Valkey's notify-keyspace-events flags; '' = off).
ALTER TABLE caches ADD COLUMN keyspace_events TEXT NOT NULL DEFAULT '';
