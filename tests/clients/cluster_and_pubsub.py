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
    p.psubscribe("ord*", "inv[ao]ice?")
    confirmations = [p.get_message(timeout=1) for _ in range(3)]
    assert [c["channel"] for c in confirmations] == ["orders", "ord*", "inv[ao]ice?"], confirmations
    assert [c["data"] for c in confirmations] == [1, 2, 3], confirmations
    assert r.publish("orders", "o-1") == 2
    got = []
    deadline = time.time() + 2
    while len(got) < 2 and time.time() < deadline:
        m = p.get_message(timeout=0.5)
        if m:
            got.append(m)
    assert sorted(m["type"] for m in got) == ["message", "pmessage"], got
    assert all(m["channel"] == "orders" and m["data"] == "o-1" for m in got), got
    assert [m["pattern"] for m in got if m["type"] == "pmessage"] == ["ord*"], got
    assert r.publish("invoices", "i-1") == 1
    m = None
    while m is None:
        m = p.get_message(timeout=1)
    assert (m["type"], m["pattern"], m["channel"], m["data"]) == ("pmessage", "inv[ao]ice?", "invoices", "i-1"), m
    assert r.publish("other", "x") == 0
    p.unsubscribe()
    p.punsubscribe()
    p.close()
    # After unsubscribing, the connection answers ordinary commands again.
    assert r.ping()
    r.close()

print("cluster and pubsub ok")
