#!/usr/bin/env python3
"""Density benchmark: N caches on ONE Valkey node, created then deleted through the REST API
by 4 concurrent clients (keep-alive connections). Prints create and delete p50/p99 per band
(the first 1,000 and the last 1,000, and every tenth of the run), total times, and the ratio
p99(last 1,000) / p99(first 1,000) of creates; then, with every cache in place: the node's
restart time (kill -9 its valkey-server; until a cache created first answers through the
gateway again), `GET /v1/caches?limit=…` page latency, `/metrics` scrape time and size, and
the node's users.acl size.

Usage: bench/density.py [--caches N] [--creators 4] [--binary PATH] [--page-limit 100]
Starts its own `shoal dev` (release build by default) in a temporary directory.
"""
import argparse, http.client, json, os, shutil, signal, socket, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

GOALS = {"ratio": 1.5, "create_total_s": 600, "restart_s": 30, "page_p99_ms": 50}


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def pct(xs, p):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def ms(x):
    return f"{x * 1000:8.2f} ms"


class Api:
    def __init__(self, port, token):
        self.port, self.headers = port, {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, method, path, body=None):
        for attempt in range(2):
            try:
                t0 = time.perf_counter()
                self.conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=self.headers)
                r = self.conn.getresponse(); data = r.read()
                return time.perf_counter() - t0, r.status, data
            except (http.client.HTTPException, OSError):
                if attempt: raise
                self.conn.close(); self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)


def resp(*args):
    out = f"*{len(args)}\r\n".encode()
    for a in args:
        a = a.encode() if isinstance(a, str) else a
        out += f"${len(a)}\r\n".encode() + a + b"\r\n"
    return out


def gateway_get(port, token, key, timeout=1.0):
    """AUTH with a data-plane token, then GET key, on a fresh connection; the GET reply line."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(resp("AUTH", token) + resp("GET", key))
        buf = b""
        while True:
            lines = buf.split(b"\r\n")
            if len(lines) > 1 and not lines[0].startswith(b"+OK"): return None
            if len(lines) > 2 and not (lines[1].startswith(b"$") and lines[1] != b"$-1"): return lines[1].decode()
            if len(lines) > 3: return lines[2].decode()
            chunk = s.recv(4096)
            if not chunk: return None
            buf += chunk


def run_parallel(n, workers, rest, token, job):
    """job(api, i) -> (seconds, result) for i in 0..n, `workers` threads; returns per-i lists
    (latencies, results, wall-clock start times) and the total time."""
    lat, results, starts, errors = [None] * n, [None] * n, [None] * n, []
    counter, lock = iter(range(n)), threading.Lock()
    done, t_start = [0], time.perf_counter()

    def worker():
        api = Api(rest, token)
        while not errors:
            with lock:
                i = next(counter, None)
            if i is None: return
            try:
                starts[i] = time.time()
                lat[i], results[i] = job(api, i)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(f"{i}: {e}"); return
            with lock:
                done[0] += 1
                if done[0] % max(1, n // 10) == 0:
                    print(f"  {done[0]:>7} done, {time.perf_counter() - t_start:7.1f} s", flush=True)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads: t.start()
    for t in threads: t.join()
    if errors: sys.exit("failed: " + errors[0])
    return lat, results, starts, time.perf_counter() - t_start


def slowest(lat, starts, lo, hi, k=5):
    """The k slowest requests of lat[lo:hi] as 'HH:MM:SS.mmm (ms)' (to match with the log)."""
    worst = sorted(range(lo, hi), key=lambda i: lat[i], reverse=True)[:k]
    return ", ".join(time.strftime("%H:%M:%S", time.gmtime(starts[i])) + f".{int(starts[i] % 1 * 1000):03d} "
                     f"({lat[i] * 1000:.0f} ms)" for i in sorted(worst))


def bands(name, lat, starts, band=1000):
    """p50/p99 of the first and last `band` requests and of every tenth; for a band whose p99
    is over twice the first's, when its slowest requests started (UTC)."""
    n = len(lat); first, last = lat[:band], lat[-band:]
    limit = 2 * pct(first, 99)
    print(f"{name:7} first {len(first):>5}: p50 {ms(pct(first, 50))}  p99 {ms(pct(first, 99))}")
    step = max(band, n // 10)
    for start in range(step, n - band, step):
        b = lat[start:start + band]
        print(f"{name:7} at {start:>8}: p50 {ms(pct(b, 50))}  p99 {ms(pct(b, 99))}")
        if pct(b, 99) > limit: print(f"          slowest: {slowest(lat, starts, start, start + band)}")
    print(f"{name:7} last  {len(last):>5}: p50 {ms(pct(last, 50))}  p99 {ms(pct(last, 99))}")
    if pct(last, 99) > limit: print(f"          slowest: {slowest(lat, starts, n - len(last), n)}")
    return pct(last, 99) / pct(first, 99)


def databases_for(caches):
    """`databases` for a node to hold `caches`: database 0 and every 64th are the platform's."""
    databases = caches + 1
    while databases - 1 - (databases - 1) // 64 < caches:
        databases += 1
    return databases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--caches", type=int, default=100_000)
    ap.add_argument("--creators", type=int, default=4)
    ap.add_argument("--page-limit", type=int, default=100)
    ap.add_argument("--binary", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "shoal"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, node files)")
    args = ap.parse_args()
    n = args.caches
    tmp = tempfile.mkdtemp(prefix="shoal-density-")
    rest, resp_port, internal, node_port = free_port(), free_port(), free_port(), free_port()
    # 1 MB storage limit per cache; the node's maxmemory only has to let their sum in (75%).
    maxmemory_mb = max(1000, (n + 1) * 4 // 3 + 100)
    log = open(os.path.join(tmp, "shoal.log"), "w")
    proc = subprocess.Popen([args.binary, "dev", "--data-dir", os.path.join(tmp, ".shoal"), "--rest-port", str(rest),
                             "--resp-port", str(resp_port), "--internal-port", str(internal), "--tls-port", "0",
                             "--reader-port", "0", "--node-ports", str(node_port), "--lfu-nodes", "0", "--dedicated-nodes", "0",
                             "--databases", str(databases_for(n)), "--default-storage-mb", "1",
                             "--node-maxmemory-mb", str(maxmemory_mb)], stdout=log, stderr=log)
    node_dir = os.path.join(tmp, ".shoal", "valkey", "n0")
    try:
        token = benchlib.wait_for_dev(proc, rest, os.path.join(tmp, ".shoal"))
        api = Api(rest, token)

        print(f"{n} caches on one node, {args.creators} concurrent clients, SQLite store", flush=True)
        print("creating…", flush=True)

        def create(a, i):
            dt, status, data = a.call("POST", "/v1/caches", {"name": f"d-{i}"})
            if status != 201: raise RuntimeError(f"create: HTTP {status} {data[:300]!r}")
            return dt, json.loads(data)["id"]

        created, ids, created_at, create_total = run_parallel(n, args.creators, rest, token, create)
        ratio = bands("create", created, created_at)
        print(f"create total {create_total:8.1f} s ({n / create_total:.0f} caches/s)")
        acl_size = os.path.getsize(os.path.join(node_dir, "users.acl"))
        print(f"users.acl {acl_size / 1e6:.1f} MB")
        # What the node costs holding every cache, idle (Valkey's cron walks its databases).
        node_pid = int(open(os.path.join(node_dir, "valkey.pid")).read().strip())
        hz = next((l.split()[1] for l in open(os.path.join(node_dir, "valkey.conf")) if l.startswith("hz ")), "10")
        acl_file = os.path.join(node_dir, "users.acl")
        saved_before = os.path.getmtime(acl_file)
        before, t0 = benchlib.cpu_seconds(node_pid), time.perf_counter()
        time.sleep(10)
        idle = (benchlib.cpu_seconds(node_pid) - before) / (time.perf_counter() - t0)
        # The last creates' ACL changes are saved (paced) after them, maybe in this window.
        saved = " (includes an ACL SAVE of the last creates)" if os.path.getmtime(acl_file) != saved_before else ""
        print(f"node idle with {n} caches (hz {hz}): {idle * 100:.1f}% of a core{saved}")

        # A cache created first answers through the gateway; then the node is killed.
        _, status, data = api.call("POST", f"/v1/caches/{ids[0]}/tokens")
        if status != 201: sys.exit(f"token: HTTP {status} {data[:200]!r}")
        data_token = json.loads(data)["token"]
        deadline = time.time() + 30
        while gateway_get(resp_port, data_token, "nothing") != "$-1":
            if time.time() > deadline: sys.exit("the first cache does not answer through the gateway")
            time.sleep(0.1)
        pid = int(open(os.path.join(node_dir, "valkey.pid")).read().strip())
        os.kill(pid, signal.SIGKILL)
        killed = time.perf_counter()
        while True:
            try:
                if gateway_get(resp_port, data_token, "nothing") == "$-1": break
            except OSError:
                pass
            if time.perf_counter() - killed > 300: sys.exit("the node did not come back in 300 s")
            time.sleep(0.05)
        restart = time.perf_counter() - killed
        print(f"node restart (kill -9 → first cache answers through the gateway): {restart:.2f} s")

        # Pages of GET /v1/caches, walked with the cursor (every page up to 200).
        pages, cursor = [], None
        while len(pages) < 200:
            q = f"/v1/caches?limit={args.page_limit}" + (f"&cursor={cursor}" if cursor else "")
            dt, status, data = api.call("GET", q)
            if status != 200: sys.exit(f"list: HTTP {status} {data[:200]!r}")
            pages.append(dt)
            cursor = json.loads(data).get("next_cursor")
            if not cursor: break
        print(f"GET /v1/caches?limit={args.page_limit}: {len(pages)} pages, p50 {ms(pct(pages, 50))}, p99 {ms(pct(pages, 99))}")
        scrapes, size = [], 0
        for _ in range(5):
            dt, status, data = api.call("GET", "/metrics")
            if status != 200: sys.exit(f"/metrics: HTTP {status}")
            scrapes.append(dt); size = len(data)
        print(f"/metrics: {size / 1e3:.0f} kB, scrape p50 {ms(pct(scrapes, 50))}, max {ms(max(scrapes))}")

        print("deleting…", flush=True)

        def delete(a, i):
            dt, status, data = a.call("DELETE", f"/v1/caches/{ids[i]}")
            if status != 204: raise RuntimeError(f"delete {ids[i]}: HTTP {status} {data[:300]!r}")
            return dt, None

        deleted, _, deleted_at, delete_total = run_parallel(n, args.creators, rest, token, delete)
        bands("delete", deleted, deleted_at)
        print(f"delete total {delete_total:8.1f} s")

        page_p99 = pct(pages, 99) * 1000
        print()
        print(f"create p99 last/first 1,000: {ratio:.2f} (goal ≤ {GOALS['ratio']}) -> {'met' if ratio <= GOALS['ratio'] else 'NOT met'}")
        print(f"create total: {create_total:.0f} s (goal < {GOALS['create_total_s']} s) -> {'met' if create_total < GOALS['create_total_s'] else 'NOT met'}")
        print(f"node restart: {restart:.1f} s (goal < {GOALS['restart_s']} s) -> {'met' if restart < GOALS['restart_s'] else 'NOT met'}")
        print(f"page p99: {page_p99:.1f} ms (goal < {GOALS['page_p99_ms']} ms) -> {'met' if page_p99 < GOALS['page_p99_ms'] else 'NOT met'}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try: proc.wait(timeout=60)
        except subprocess.TimeoutExpired: proc.kill()
        if args.keep: print(f"kept {tmp}")
        else: shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
