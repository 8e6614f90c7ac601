#!/usr/bin/env python3
"""Idle clients: what an authenticated client that sends nothing costs the gateway.

Starts its own `shoal dev` (release build) with one shared node, creates CACHES caches
(default 1,000) and opens CLIENTS connections (default 10,000) spread evenly over them; each
logs in with `AUTH <token>` and sends one `PING` (what a pooled client does before it idles).
Then it prints the gateway process's resident memory per idle client (RSS after the clients
minus RSS before them, divided by their number; before them, one client of a cache of its
own has logged in and left, so what a first login costs once is not counted), and the connections to the node (its
`connected_clients`) before the clients, right after them, and once they have idled SETTLE
seconds (default 125: a cache's shared upstream connection closes after 60 to 120 s unused).
Goals (issue 22): at most 16 KiB per idle client; upstream connections that grow with active
requests, not with clients.

Usage: bench/idle_clients.py [--caches N] [--clients N] [--settle S] [--binary PATH]
"""
import argparse, http.client, json, os, shutil, signal, socket, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def rss_kib(pid, field="VmRSS"):
    """Resident memory (KiB): all of it (VmRSS), or its anonymous part (RssAnon: heap,
    stacks) or file-backed part (RssFile: the binary's code pages as they are first run)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def idle_client(port, token):
    """A connected client that logged in and sent one PING."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(resp("AUTH", token) + resp("PING"))
    got = b""
    while got.count(b"\r\n") < 2:
        chunk = s.recv(4096)
        if not chunk:
            sys.exit(f"closed after {got!r}")
        got += chunk
    if got != b"+OK\r\n+PONG\r\n":
        sys.exit(f"unexpected replies {got!r}")
    return s


def resp(*args):
    out = f"*{len(args)}\r\n".encode()
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += f"${len(a)}\r\n".encode() + a + b"\r\n"
    return out


def node_clients(port, password):
    """connected_clients of the node, as its admin sees it."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(resp("AUTH", "shoal", password) + resp("INFO", "clients"))
    data = b""
    while b"connected_clients:" not in data or not data.endswith(b"\r\n\r\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("connected_clients:"):
            return int(line.split(":")[1])
    raise RuntimeError(f"no connected_clients in {data[:200]!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--caches", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=10000)
    ap.add_argument("--settle", type=int, default=125)
    ap.add_argument("--binary", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "shoal"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="shoal-idle-")
    rest, resp_port, internal, node = free_port(), free_port(), free_port(), free_port()
    log = open(os.path.join(tmp, "shoal.log"), "w")
    proc = subprocess.Popen(
        [args.binary, "dev", "--data-dir", os.path.join(tmp, ".shoal"), "--rest-port", str(rest),
         "--resp-port", str(resp_port), "--internal-port", str(internal), "--tls-port", "0", "--reader-port", "0", "--node-ports", str(node),
         "--lfu-nodes", "0", "--dedicated-nodes", "0", "--databases", str(args.caches + 2),
         "--default-storage-mb", "1"],
        stdout=log, stderr=log)
    clients = []
    try:
        token = benchlib.wait_for_dev(proc, rest, os.path.join(tmp, ".shoal"))
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        conn = http.client.HTTPConnection("127.0.0.1", rest, timeout=60)

        def call(method, path, body):
            conn.request(method, path, body=json.dumps(body), headers=headers)
            r = conn.getresponse(); data = r.read()
            if r.status not in (200, 201):
                sys.exit(f"{method} {path}: HTTP {r.status} {data[:200]!r}")
            return json.loads(data)

        tokens = []
        for i in range(args.caches):
            cache = call("POST", "/v1/caches", {"name": f"idle-{i}"})
            tokens.append(call("POST", f"/v1/caches/{cache['id']}/tokens", {"ttl_seconds": 3600})["token"])
        admin = open(os.path.join(tmp, ".shoal", "valkey", "n0", "admin.secret")).read().strip()
        # One client of a cache of its own first, then gone: what the first login costs once
        # (code paths run for the first time, TLS roots, pools) is not any idle client's.
        warm = call("POST", "/v1/caches", {"name": "idle-warm-up"})
        idle_client(resp_port, call("POST", f"/v1/caches/{warm['id']}/tokens", {"ttl_seconds": 3600})["token"]).close()
        time.sleep(2)
        upstream_before = node_clients(node, admin)
        before = {f: rss_kib(proc.pid, f) for f in ("VmRSS", "RssAnon", "RssFile")}
        started = time.monotonic()
        for i in range(args.clients):
            clients.append(idle_client(resp_port, tokens[i % len(tokens)]))
        opened = time.monotonic() - started
        time.sleep(3)  # let buffers settle
        after = {f: rss_kib(proc.pid, f) for f in ("VmRSS", "RssAnon", "RssFile")}
        rss_before, rss_after = before["VmRSS"], after["VmRSS"]
        upstream_after = node_clients(node, admin)
        time.sleep(args.settle)
        upstream_idle = node_clients(node, admin)
        per_client = (rss_after - rss_before) / args.clients
        print(f"{args.clients} idle clients over {args.caches} caches (AUTH + PING each, opened in {opened:.1f} s)")
        print(f"gateway RSS: {rss_before / 1024:.1f} MiB before, {rss_after / 1024:.1f} MiB after: "
              f"{per_client:.1f} KiB per idle client (goal <= 16 KiB: {'met' if per_client <= 16 else 'NOT met'})")
        print("  of which anonymous (heap, stacks): "
              f"{(after['RssAnon'] - before['RssAnon']) / args.clients:.1f} KiB per client; file-backed (code "
              f"pages first run, the usage journal): {(after['RssFile'] - before['RssFile']) / args.clients:.1f} KiB")
        print(f"node connections: {upstream_before} before the clients, {upstream_after} just after them "
              f"(one shared per cache that sent a command), {upstream_idle} after {args.settle} s idle "
              f"(goal: not growing with idle clients: {'met' if upstream_idle - upstream_before <= 0 else 'NOT met'})")
        print("(shoal dev runs the gateway and the control plane in one process: RSS is theirs together)")
    finally:
        for s in clients:
            s.close()
        proc.send_signal(signal.SIGTERM); proc.wait(timeout=60); shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
