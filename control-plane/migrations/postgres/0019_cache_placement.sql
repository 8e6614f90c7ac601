-- A cache is `shared` (a numbered database of a node it shares) or `dedicated` (a node of
-- its own, from database 0: functions and Search indexes are its alone). Earlier caches
-- were all shared.
ALTER TABLE caches ADD COLUMN placement TEXT NOT NULL DEFAULT 'shared';
