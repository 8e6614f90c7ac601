#!/usr/bin/env python3
"""Snapshot and restore of a large cache on a node shared with other caches (run by
bench/snapshot.sh, which builds shoal in release mode first).

Starts `shoal dev` with one Valkey node, makes a cache of BENCH_SNAPSHOT_MB (default 1000)
MB of 1 KiB random string values through the gateway and a neighbour cache on the same node, then:
takes a snapshot, restores it into a new cache, and exports it; meanwhile a neighbour's
client sends GETs one after the other and records each one's latency. Prints:
  - snapshot time and restore time (and MB/s);
  - peak extra memory: the shoal process's RSS above its level before (the control plane
    streams the RDB, so this stays small), and the node's fork child (the copy-on-write pages
    it held, `Private_Dirty` of /proc/<child>/smaps_rollup, peak);
  - the neighbour's longest GET before (a baseline of the same length), during the snapshot
    and during the restore.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
import benchlib  # noqa: E402
import redis  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOAL = os.path.join(ROOT, "target", "release", "shoal")
SIZE_MB = int(os.environ.get("BENCH_SNAPSHOT_MB", "1000"))
# Values that do not compress (an RDB compresses each string with LZF): random bytes, a pool
# of them used in turn.
VALUES = [os.urandom(1024) for _ in range(1000)]


def api(rest, token, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(rest + path, data=data, method=method)
    req.add_header("Authorization", "Bearer " + token)
    if data:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw[:1] in (b"{", b"[") else raw)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def private_dirty_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Private_Dirty:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    """Peaks of the shoal process's RSS and of the node's fork child's private pages."""

    def __init__(self, shoal_pid, node_pid):
        super().__init__(daemon=True)
        self.shoal_pid, self.node_pid = shoal_pid, node_pid
        self.running = True
        self.reset()

    def reset(self):
        self.peak_rss = 0
        self.peak_child = 0

    def run(self):
        while self.running:
            self.peak_rss = max(self.peak_rss, rss_kib(self.shoal_pid))
            for child in children(self.node_pid):
                self.peak_child = max(self.peak_child, private_dirty_kib(child))
            time.sleep(0.02)


class Prober(threading.Thread):
    """A neighbour's client: one GET at a time, the longest latency since the last reset."""

    def __init__(self, port, token):
        super().__init__(daemon=True)
        self.client = redis.Redis(port=port, password=token, socket_timeout=30)
        self.client.set("probe", "x")
        self.running = True
        self.reset()

    def reset(self):
        self.longest = 0.0
        self.count = 0

    def run(self):
        while self.running:
            began = time.perf_counter()
            self.client.get("probe")
            took = time.perf_counter() - began
            self.longest = max(self.longest, took)
            self.count += 1


def main():
    data = tempfile.mkdtemp(prefix="shoal-bench-snapshot-")
    ports = benchlib.free_ports(7)
    rest = f"http://127.0.0.1:{ports[0]}"
    log = open(os.path.join(data, "shoal.log"), "w")
    dev = subprocess.Popen(
        [SHOAL, "dev", "--data-dir", data, "--rest-port", str(ports[0]), "--resp-port", str(ports[1]),
         "--internal-port", str(ports[2]), "--tls-port", str(ports[3]), "--reader-port", str(ports[4]),
         "--nodes", "1", "--node-ports", str(ports[5]), "--node-maxmemory-mb", str(SIZE_MB * 6 + 1000)],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(900):
            try:
                urllib.request.urlopen(rest + "/healthz", timeout=1)
                if os.path.getsize(os.path.join(data, "admin.token")) > 0:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        admin = open(os.path.join(data, "admin.token")).read().strip()

        def cache(name, mb, snapshot=None):
            body = {"name": name, "limits": {"data_storage_mb": mb}}
            if snapshot:
                body["from_snapshot"] = snapshot
            began = time.perf_counter()
            status, c = api(rest, admin, "POST", "/v1/caches", body)
            took = time.perf_counter() - began
            assert status == 201, c
            status, t = api(rest, admin, "POST", f"/v1/caches/{c['id']}/tokens", {"ttl_seconds": 3600})
            assert status == 201, t
            return c["id"], t["token"], took

        big, big_token, _ = cache("big", SIZE_MB * 3 // 2)
        _, neighbour_token, _ = cache("neighbour", 100)
        client = redis.Redis(port=ports[1], password=big_token)
        keys = SIZE_MB * 1000 * 1000 // (1024 + 64)
        print(f"# filling {keys:,} keys of 1 KiB ({SIZE_MB} MB)", file=sys.stderr)
        for start in range(0, keys, 2000):
            pipe = client.pipeline(transaction=False)
            for i in range(start, min(keys, start + 2000)):
                pipe.set(f"key:{i}", VALUES[i % len(VALUES)])
            pipe.execute()
        node = redis.Redis(port=ports[5], username="shoal",
                           password=open(os.path.join(data, "valkey", "node-0", "admin.secret")).read().strip()
                           if os.path.exists(os.path.join(data, "valkey", "node-0", "admin.secret")) else None)
        node_pid = int(open(next(os.path.join(r, f) for r, _, fs in os.walk(os.path.join(data, "valkey"))
                                 for f in fs if f == "valkey.pid")).read())
        used = None
        try:
            used = node.info("memory")["used_memory"]
        except Exception:
            pass

        sampler = Sampler(dev.pid, node_pid)
        sampler.start()
        prober = Prober(ports[1], neighbour_token)
        prober.start()
        time.sleep(1)
        rss_before = rss_kib(dev.pid)

        # Baseline: the neighbour's longest GET over a quiet period as long as the snapshot.
        prober.reset()
        time.sleep(5)
        baseline = (prober.longest, prober.count)

        prober.reset()
        sampler.reset()
        began = time.perf_counter()
        status, snap = api(rest, admin, "POST", f"/v1/caches/{big}/snapshots", {"name": "bench"})
        assert status == 202, snap
        while True:
            status, snap = api(rest, admin, "GET", f"/v1/snapshots/{snap['id']}")
            if snap["status"] != "creating":
                break
            time.sleep(0.05)
        snapshot_s = time.perf_counter() - began
        assert snap["status"] == "available", snap
        during_snapshot = (prober.longest, prober.count)
        snapshot_rss, snapshot_child = sampler.peak_rss, sampler.peak_child

        prober.reset()
        sampler.reset()
        _, _, restore_s = cache("restored", SIZE_MB * 3 // 2, snapshot=snap["id"])
        during_restore = (prober.longest, prober.count)
        restore_rss = sampler.peak_rss

        began = time.perf_counter()
        status, rdb = api(rest, admin, "GET", f"/v1/snapshots/{snap['id']}/rdb")
        export_s = time.perf_counter() - began
        assert status == 200 and len(rdb) == snap["bytes"], (status, len(rdb))

        prober.running = sampler.running = False
        mb = snap["bytes"] / 1e6
        print(f"cache: {keys:,} keys, {SIZE_MB} MB of values"
              + (f", node used_memory {used / 1e6:.0f} MB" if used else "") + f"; RDB {mb:.0f} MB")
        print(f"snapshot: {snapshot_s:.1f} s ({mb / snapshot_s:.0f} MB/s of RDB)")
        print(f"restore into a new cache: {restore_s:.1f} s ({mb / restore_s:.0f} MB/s of RDB)")
        print(f"export (download): {export_s:.1f} s")
        print(f"peak extra memory, snapshot: shoal process +{(snapshot_rss - rss_before) / 1024:.0f} MiB, "
              f"node's fork child {snapshot_child / 1024:.0f} MiB copied on write")
        print(f"peak extra memory, restore: shoal process +{(restore_rss - rss_before) / 1024:.0f} MiB")
        print(f"neighbour's longest GET: quiet {baseline[0] * 1000:.1f} ms ({baseline[1]:,} GETs), "
              f"during the snapshot {during_snapshot[0] * 1000:.1f} ms ({during_snapshot[1]:,}), "
              f"during the restore {during_restore[0] * 1000:.1f} ms ({during_restore[1]:,})")
    finally:
        dev.terminate()
        try:
            dev.wait(timeout=30)
        except subprocess.TimeoutExpired:
            dev.kill()
        subprocess.run(["rm", "-rf", data])


if __name__ == "__main__":
    main()
