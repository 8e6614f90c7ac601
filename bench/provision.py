#!/usr/bin/env python3
"""Provisioning benchmark: create N caches through the REST API, then delete them, one at a
time over a keep-alive connection, and print p50/p99/max of each (client-side wall time).

Usage: bench/provision.py [--caches N] [--binary PATH]
Starts its own `shoal dev` (release build by default) in a temporary directory with enough
databases for N caches. ElastiCache Serverless takes about a minute to create a cache.
"""
import argparse, http.client, json, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def pct(xs, p):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--caches", type=int, default=1000)
    ap.add_argument("--binary", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "shoal"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="shoal-provision-")
    rest, resp = free_port(), free_port()
    nodes = f"{free_port()},{free_port()}"
    per_node = args.caches // 2 + 16
    log = open(os.path.join(tmp, "shoal.log"), "w")
    proc = subprocess.Popen([args.binary, "dev", "--data-dir", os.path.join(tmp, ".shoal"), "--rest-port", str(rest),
                             "--resp-port", str(resp), "--tls-port", "0", "--reader-port", "0", "--node-ports", nodes,
                             "--internal-port", str(free_port()),
                             "--databases", str(per_node),
                             # Storage limits must fit the nodes: 1 MB each lets 1,000 caches in.
                             "--default-storage-mb", "1"], stdout=log, stderr=log)
    try:
        token = benchlib.wait_for_dev(proc, rest, os.path.join(tmp, ".shoal"))
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        conn = http.client.HTTPConnection("127.0.0.1", rest, timeout=30)

        def call(method, path, body=None):
            t0 = time.perf_counter()
            conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
            r = conn.getresponse(); data = r.read()
            return time.perf_counter() - t0, r.status, data

        created, ids = [], []
        for i in range(args.caches):
            dt, status, data = call("POST", "/v1/caches", {"name": f"bench-{i}", "limits": {"ecpu_per_second": 10000}})
            if status != 201: sys.exit(f"create {i}: HTTP {status} {data[:200]!r}")
            created.append(dt); ids.append(json.loads(data)["id"])
        deleted = []
        for cid in ids:
            dt, status, data = call("DELETE", f"/v1/caches/{cid}")
            if status != 204: sys.exit(f"delete {cid}: HTTP {status} {data[:200]!r}")
            deleted.append(dt)
        ms = lambda x: f"{x * 1000:7.2f} ms"
        print(f"{args.caches} caches, 2 nodes, SQLite store, sequential requests over one keep-alive connection")
        print(f"{'':8} {'p50':>10} {'p99':>10} {'max':>10} {'mean':>10}")
        for name, xs in (("create", created), ("delete", deleted)):
            print(f"{name:8} {ms(pct(xs, 50))} {ms(pct(xs, 99))} {ms(max(xs))} {ms(statistics.mean(xs))}")
        print(f"target: create p99 < 50 ms -> {'met' if pct(created, 99) < 0.050 else 'NOT met'}")
    finally:
        proc.send_signal(signal.SIGTERM); proc.wait(timeout=30); shutil.rmtree(tmp, ignore_errors=True)

if __name__ == "__main__":
    main()
