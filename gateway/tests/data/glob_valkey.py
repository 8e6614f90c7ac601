#!/usr/bin/env python3
"""Writes glob_valkey.txt: which strings real Valkey matches against random glob patterns
(KEYS, i.e. stringmatchlen without nocase). Usage: glob_valkey.py <port of an empty valkey-server>.
Each line: hex(pattern) hex(bitmap over strings()), bit i = string i matches."""
import random, sys, valkey

ALPHABET = [b"a", b"b", b"]", b"-", b"\\", b"\xff"]
PATTERN_ALPHABET = [b"a", b"b", b"*", b"?", b"[", b"]", b"^", b"-", b"\\", b"\xff", b"\x80"]

def strings():
    out = [c for c in ALPHABET]
    out += [a + b for a in ALPHABET for b in ALPHABET]
    out += [a + b + c for a in ALPHABET for b in ALPHABET for c in ALPHABET]
    return out

def main():
    r = valkey.Valkey(port=int(sys.argv[1]))
    r.flushall()
    keys = strings()
    for k in keys:
        r.set(k, 1)
    rng = random.Random(15)
    seen = set()
    with open(sys.argv[2] if len(sys.argv) > 2 else "glob_valkey.txt", "w") as f:
        while len(seen) < 400:
            n = rng.randint(0, 7)
            p = b"".join(rng.choice(PATTERN_ALPHABET) for _ in range(n))
            if p in seen or p == b"*":
                continue
            seen.add(p)
            matched = set(r.keys(p))
            bits = 0
            for i, k in enumerate(keys):
                if k in matched:
                    bits |= 1 << i
            f.write(f"{p.hex()} {bits:x}\n")

main()
