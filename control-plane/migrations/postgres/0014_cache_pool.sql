-- Caches are placed in named engine pools (standalone nodes or a Valkey cluster): the
-- pool's name. Caches made before pools existed are in the one pool of the time, "main";
-- `node` is a node of that pool (or "cluster", a cluster pool's one placement target).
ALTER TABLE caches ADD COLUMN pool TEXT NOT NULL DEFAULT 'main';
