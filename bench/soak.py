#!/usr/bin/env python3
"""Resource-isolation soak: hostile tenants next to well-behaved ones (standard library only).

Run by bench/soak.sh against a `shoal dev` it started. Creates 4 hostile and 4 well-behaved
caches through the REST API, then for SOAK_SECONDS runs:

  script     a runaway Lua script (`while true do end`), again as soon as it is ended
  pipeline   connections that pipeline GETs of a 4 MB value and never read a byte
  patterns   1,024 costly patterns per subscriber, a publisher on long channel names
  flood      unauthenticated connections from one source, over its cap, held open

and each victim does SET+GET round trips (one every 5 ms) on its own connection. Every
second it samples the RSS of the shoal process (gateway, control plane and engine) and of
each Valkey node. Prints one line per victim (errors, p50/p99/max latency), the RSS peaks and
what happened to the attackers, and writes the figures as JSON (argv[1]).

    soak.py OUT_JSON --rest PORT --resp PORT --admin-token FILE --pid PID --node-pids P,P
"""

import argparse
import json
import os
import socket
import threading
import time
import urllib.request

from slow_subscribers import cmd, rss_mb as rss_mib

SECONDS = float(os.environ.get("SOAK_SECONDS", "300"))


class Conn:
    """A blocking RESP connection that reads exactly one reply at a time."""

    def __init__(self, port, token=None, timeout=10.0, source="127.0.0.1"):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
        self.buf = b""
        if token:
            self.s.sendall(cmd("AUTH", token))
            reply = self.reply()
            if reply != b"+OK\r\n":
                raise RuntimeError(f"AUTH: {reply[:200]!r}")

    def _fill(self):
        chunk = self.s.recv(1 << 16)
        if not chunk:
            raise ConnectionError("closed")
        self.buf += chunk

    def _line(self, at):
        while True:
            i = self.buf.find(b"\r\n", at)
            if i >= 0:
                return i
            self._fill()

    def _end(self, at):
        i = self._line(at)
        kind = self.buf[at:at + 1]
        if kind in (b"$",):
            n = int(self.buf[at + 1:i])
            end = i + 2 + (n + 2 if n >= 0 else 0)
            while len(self.buf) < end:
                self._fill()
            return end
        if kind in (b"*", b">"):
            n = int(self.buf[at + 1:i])
            pos = i + 2
            for _ in range(max(n, 0)):
                pos = self._end(pos)
            return pos
        return i + 2

    def reply(self):
        end = self._end(0)
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def call(self, *args):
        self.s.sendall(cmd(*args))
        return self.reply()

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def api(rest, token, method, path, body=None):
    req = urllib.request.Request(
        f"http://127.0.0.1:{rest}{path}", method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def cache(rest, admin, name):
    c = api(rest, admin, "POST", "/v1/caches", {"name": name})
    token = api(rest, admin, "POST", f"/v1/caches/{c['id']}/tokens", {"ttl_seconds": 43200})["token"]
    return c["id"], c["allocation"]["node"], token


def victim(resp, token, stop, out):
    lat, errors, samples = [], 0, []
    conn, i = None, 0
    while not stop.is_set():
        try:
            if conn is None:
                conn = Conn(resp, token)
            t0 = time.monotonic()
            a = conn.call("SET", f"k{i % 100}", str(i))
            b = conn.call("GET", f"k{i % 100}")
            took = time.monotonic() - t0
            if a != b"+OK\r\n" or b != b"$%d\r\n%d\r\n" % (len(str(i)), i):
                errors += 1
                samples.append((a + b)[:120].decode(errors="replace"))
            else:
                lat.append(took)
        except Exception as e:  # noqa: BLE001 - every failure is a victim error
            errors += 1
            samples.append(repr(e)[:120])
            if conn:
                conn.close()
            conn = None
        i += 1
        time.sleep(0.005)
    lat.sort()
    pick = lambda q: lat[min(len(lat) - 1, int(len(lat) * q))] * 1000 if lat else None
    out.update(ops=len(lat), errors=errors, p50_ms=pick(0.5), p99_ms=pick(0.99),
               max_ms=lat[-1] * 1000 if lat else None, error_samples=samples[:5])


def script_attacker(resp, token, stop, out):
    ended, errors = 0, []
    while not stop.is_set():
        try:
            c = Conn(resp, token, timeout=120)
            reply = c.call("EVAL", "while true do end", "0")
            ended += 1
            errors.append(reply[:100].decode(errors="replace"))
            c.close()
        except Exception as e:  # noqa: BLE001
            ended += 1
            errors.append(repr(e)[:100])
            time.sleep(0.5)
    out.update(scripts_ended=ended, how=sorted(set(errors))[:5])


def pipeline_attacker(resp, token, stop, out):
    c = Conn(resp, token)
    c.call("SET", "big", b"x" * (4 << 20))
    c.close()
    opened, closed_by_gateway = 0, 0
    while not stop.is_set():
        socks = []
        for _ in range(5):
            try:
                s = socket.create_connection(("127.0.0.1", resp), timeout=5)
                s.sendall(cmd("AUTH", token) + cmd("GET", "big") * 250)
                socks.append(s)
                opened += 1
            except OSError:
                pass
        stop.wait(10)
        for s in socks:
            s.setblocking(False)
            try:
                if s.recv(1, socket.MSG_PEEK) == b"":
                    closed_by_gateway += 1
            except BlockingIOError:
                pass
            except OSError:
                closed_by_gateway += 1
            s.close()
    out.update(connections=opened, closed_by_gateway=closed_by_gateway)


def pattern_attacker(resp, token, stop, out):
    subs = []
    for k in range(4):
        try:
            c = Conn(resp, token)
            for j in range(256):
                c.s.sendall(cmd("PSUBSCRIBE", "*a*b*c*d*e*f*g*h*" + "?" * 40 + f"{k}{j}" + "*[x-z]"))
            subs.append(c)
        except Exception:  # noqa: BLE001
            pass
    pub, published, refused, why = Conn(resp, token), 0, 0, set()
    channel = ("ab" * 4096).encode()
    while not stop.is_set():
        try:
            r = pub.call("PUBLISH", channel, "m")
            published += 1
            if r.startswith(b"-"):
                refused += 1
                why.add(r[:100].decode(errors="replace").strip())
        except Exception:  # noqa: BLE001
            pub = Conn(resp, token)
    for c in subs:
        c.close()
    out.update(subscribers=len(subs), published=published, refused=refused, why=sorted(why)[:3])


def flood_attacker(resp, stop, out):
    held, refused = [], 0
    while not stop.is_set() and len(held) < 2000:
        try:
            s = socket.create_connection(("127.0.0.1", resp), timeout=5, source_address=("127.0.0.3", 0))
            s.setblocking(False)
            time.sleep(0.002)
            try:
                if s.recv(256).startswith(b"-ERR max number"):
                    refused += 1
                    s.close()
                    continue
            except BlockingIOError:
                pass
            held.append(s)
        except OSError:
            refused += 1
            time.sleep(0.01)
    stop.wait()
    for s in held:
        s.close()
    out.update(held=len(held), refused=refused)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--rest", type=int, required=True)
    p.add_argument("--resp", type=int, required=True)
    p.add_argument("--admin-token", required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--node-pids", required=True)
    a = p.parse_args()
    admin = open(a.admin_token).read().strip()
    node_pids = [int(x) for x in a.node_pids.split(",") if x]

    hostile = {name: cache(a.rest, admin, f"hostile-{name}") for name in ("script", "pipeline", "patterns", "flood")}
    victims = {f"victim-{i}": cache(a.rest, admin, f"victim-{i}") for i in range(4)}
    stop = threading.Event()
    results = {name: {} for name in list(hostile) + list(victims)}
    threads = [
        threading.Thread(target=script_attacker, args=(a.resp, hostile["script"][2], stop, results["script"])),
        threading.Thread(target=pipeline_attacker, args=(a.resp, hostile["pipeline"][2], stop, results["pipeline"])),
        threading.Thread(target=pattern_attacker, args=(a.resp, hostile["patterns"][2], stop, results["patterns"])),
        threading.Thread(target=flood_attacker, args=(a.resp, stop, results["flood"])),
    ] + [threading.Thread(target=victim, args=(a.resp, v[2], stop, results[name])) for name, v in victims.items()]
    for t in threads:
        t.start()
    peak = {"shoal": 0.0, **{f"node-{pid}": 0.0 for pid in node_pids}}
    end = time.monotonic() + SECONDS
    while time.monotonic() < end:
        peak["shoal"] = max(peak["shoal"], rss_mib(a.pid))
        for pid in node_pids:
            peak[f"node-{pid}"] = max(peak[f"node-{pid}"], rss_mib(pid))
        time.sleep(1)
    stop.set()
    for t in threads:
        t.join(timeout=130)

    script_node = hostile["script"][1]
    print(f"\nsoak: {SECONDS:.0f} s, 4 hostile caches, 4 victims (runaway script on node {script_node})")
    print(f"{'victim':10} {'node':5} {'ops':>7} {'errors':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>8}")
    for name, (_, node, _) in victims.items():
        r = results[name]
        fmt = lambda v: f"{v:.1f}" if v is not None else "-"
        print(f"{name:10} {node:5} {r['ops']:>7} {r['errors']:>6} {fmt(r['p50_ms']):>7} {fmt(r['p99_ms']):>7} "
              f"{fmt(r['max_ms']):>8}")
        for sample in r["error_samples"]:
            print(f"    error: {sample}")
    print("RSS peak (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()))
    for name in hostile:
        print(f"hostile {name}: {results[name]}")
    with open(a.out, "w") as f:
        json.dump({"seconds": SECONDS, "script_node": script_node, "rss_peak_mib": peak,
                   "victims": {n: {**results[n], "node": victims[n][1]} for n in victims},
                   "hostile": {n: results[n] for n in hostile}}, f, indent=2)


if __name__ == "__main__":
    main()
