"""The README's Python session, run against a live gateway: python3 quickstart.py PORT TOKEN."""
import sys

import redis

port, token = int(sys.argv[1]), sys.argv[2]

for protocol in (2, 3):
    r = redis.Redis(host="127.0.0.1", port=port, password=token, protocol=protocol, decode_responses=True)
    assert r.ping()
    r.set("greeting", "hello", ex=60)
    assert r.get("greeting") == "hello"
    assert 0 < r.ttl("greeting") <= 60
    r.hset("user:1", mapping={"name": "ada", "lang": "en"})
    assert r.hgetall("user:1") == {"name": "ada", "lang": "en"}
    pipe = r.pipeline(transaction=False)
    for i in range(50):
        pipe.incr(f"hits:{protocol}")
    assert pipe.execute()[-1] == 50
    r.close()

print("python quickstart ok")
