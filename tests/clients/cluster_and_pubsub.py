"""Cluster-mode and RESP3 pub/sub clients against the gateway: python3 … PORT TOKEN."""
import sys
import time

import redis
from redis.cluster import RedisCluster

port, token = int(sys.argv[1]), sys.argv[2]

# redis-py's cluster client discovers the "cluster" (the gateway itself) and works.
rc = RedisCluster(host="127.0.0.1", port=port, password=token, decode_responses=True)
rc.set("{user:1}:name", "ada")
rc.set("{user:1}:lang", "en")
assert rc.mget("{user:1}:name", "{user:1}:lang") == ["ada", "en"]
assert rc.get_node(host="127.0.0.1", port=port) is not None
rc.close()

# RESP3 pub/sub: pushes arrive with the cache's channel names.
for protocol in (2, 3):
    r = redis.Redis(host="127.0.0.1", port=port, password=token, protocol=protocol, decode_responses=True)
    p = r.pubsub()
    p.subscribe("orders")
    # Patterns: `*` (every channel of the cache). Narrower patterns are not supported yet.
    p.psubscribe("*")
    confirmations = [p.get_message(timeout=1) for _ in range(2)]
    assert [c["channel"] for c in confirmations] == ["orders", "*"], confirmations
    assert r.publish("orders", "o-1") == 2
    got = []
    deadline = time.time() + 2
    while len(got) < 2 and time.time() < deadline:
        m = p.get_message(timeout=0.5)
        if m:
            got.append(m)
    assert sorted(m["type"] for m in got) == ["message", "pmessage"], got
    assert all(m["channel"] == "orders" and m["data"] == "o-1" for m in got), got
    assert [m["pattern"] for m in got if m["type"] == "pmessage"] == ["*"], got
    p.unsubscribe()
    p.punsubscribe()
    p.close()
    # After unsubscribing, the connection answers ordinary commands again.
    assert r.ping()
    r.close()

print("cluster and pubsub ok")
