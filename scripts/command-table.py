#!/usr/bin/env python3
"""Refreshes commands/data/commands.tsv from a real valkey-server's COMMAND output.

The table is Shoal's one place for what it knows about each command: name (with
`|` for subcommands), arity, flags, key positions (first, last, step), ACL categories —
all from Valkey — and Shoal's own columns: treatment (pass, deny, virtual) and ECPU weight
(milli-ECPU), hits and Shoal flags. Existing values of those columns are kept; new commands get `deny` if
Valkey files them under @admin or @dangerous, else `pass`, and weight 1000.

Usage: scripts/command-table.py [path/to/valkey-server]
"""
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TABLE = os.path.join(HERE, "..", "commands", "data", "commands.tsv")
COLUMNS = ["name", "arity", "flags", "first_key", "last_key", "step", "acl_categories", "treatment", "weight", "per_element", "hits", "shoal"]
# Shoal's columns: kept from the current table, by header name.
OURS = ["treatment", "weight", "per_element", "hits", "shoal"]


def read_reply(f):
    line = f.readline()
    kind, rest = line[:1], line[1:-2]
    if kind in (b"+", b"-", b":"):
        return rest.decode() if kind != b":" else int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2].decode()
    if kind in (b"*", b"~", b">"):
        return [read_reply(f) for _ in range(int(rest))]
    if kind == b"%":
        return [read_reply(f) for _ in range(2 * int(rest))]
    raise ValueError(f"unexpected reply {line!r}")


def valkey_commands(binary):
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "v.sock")
        proc = subprocess.Popen([binary, "--port", "0", "--unixsocket", sock, "--save", "", "--dir", tmp],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                if os.path.exists(sock):
                    break
                time.sleep(0.05)
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            s.sendall(b"COMMAND\r\n")
            return read_reply(s.makefile("rb"))
        finally:
            proc.terminate()
            proc.wait()


def rows(entries):
    for e in entries:
        name, arity, flags, first, last, step, cats = e[0], e[1], e[2], e[3], e[4], e[5], e[6]
        subs = e[9] if len(e) > 9 else []
        yield {
            "name": name.lower(), "arity": str(arity), "flags": ",".join(flags) or "-",
            "first_key": str(first), "last_key": str(last), "step": str(step),
            "acl_categories": ",".join(c.lstrip("@") for c in cats) or "-",
        }
        yield from rows(subs)


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("SHOAL_VALKEY_SERVER") or subprocess.check_output(
        [os.path.join(HERE, "setup.sh")], text=True).strip()
    ours, header = {}, None
    if os.path.exists(TABLE):
        with open(TABLE) as f:
            for line in f:
                if line.startswith("#") or not line.strip():
                    continue
                cells = line.rstrip("\n").split("\t")
                if header is None:
                    header = cells
                    continue
                row = dict(zip(header, cells))
                ours[row["name"]] = tuple(row.get(c, "-") for c in OURS)
    out = []
    for row in sorted(rows(valkey_commands(binary)), key=lambda r: r["name"]):
        cats = row["acl_categories"].split(",")
        default = "deny" if ("admin" in cats or "dangerous" in cats) else "pass"
        row.update(zip(OURS, ours.get(row["name"], (default, "1000", "0", "-", "-"))))
        out.append(row)
    # The table's own header comments are kept as they are.
    comments = "".join(l for l in open(TABLE) if l.startswith("#")) if os.path.exists(TABLE) else ""
    with open(TABLE, "w") as f:
        f.write(comments)
        f.write("\t".join(COLUMNS) + "\n")
        for row in out:
            f.write("\t".join(row[c] for c in COLUMNS) + "\n")
    print(f"{len(out)} commands written to {os.path.relpath(TABLE)}")


if __name__ == "__main__":
    main()
