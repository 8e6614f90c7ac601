#!/usr/bin/env python3
"""Helpers for bench/gateway.sh (standard library only).

    benchlib.py ports N              print N free loopback TCP ports, one per line
    benchlib.py cpu-busy SECONDS     print how busy the CPUs are (%, all cores) over SECONDS
    benchlib.py json-field KEY       read a JSON object on stdin, print its KEY
    benchlib.py report RAW_DIR META_JSON OUT_JSON
                                     parse redis-benchmark --csv outputs, print the
                                     table, write the JSON results
"""

import csv
import io
import json
import os
import re
import socket
import statistics
import sys

TARGETS = ("direct", "gateway", "tls", "twemproxy", "floor_epoll", "floor_uring")
# The targets of the ops/s table (tls, the gateway's TLS endpoint, is in the CPU table).
OPS_TARGETS = ("direct", "gateway", "twemproxy")
# BENCH_FLOOR=1: bench/floor's servers, canned replies and no upstream (what the client side's
# system calls and TCP work cost any proxy), with epoll and with io_uring.
FLOOR_TARGETS = ("floor_epoll", "floor_uring")
# Informational targets: gateway ops/s over twemproxy ops/s, by pipeline depth.
TWEMPROXY_TARGETS = {1: 1.0, 16: 2.0}
# Goals: the gateway's CPU time per request at most this share of twemproxy's.
CPU_GOALS = {1: 0.6, 16: 0.3}
CSV_FIELDS = ("rps", "avg_latency_ms", "min_latency_ms", "p50_latency_ms",
              "p95_latency_ms", "p99_latency_ms", "max_latency_ms")
RAW_NAME = re.compile(r"^(?P<cmd>[a-z]+)-p(?P<pipeline>\d+)-(?P<target>[a-z_]+)-r(?P<round>\d+)\.out$")


def free_ports(n):
    """Binds n sockets to port 0 at once (so the ports are distinct), then frees them."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for_dev(proc, rest_port, data_dir, tries=600):
    """Waits until a `shoal dev` started with `--data-dir data_dir` answers /readyz on
    `rest_port` (exits if it died); returns its bootstrap admin token. For the benchmarks
    that start their own platform (provision.py, density.py, idle_clients.py)."""
    import http.client, time
    token_path = os.path.join(data_dir, "admin.token")
    for _ in range(tries):
        if proc.poll() is not None:
            sys.exit(f"shoal dev exited with {proc.returncode}")
        if os.path.exists(token_path):
            try:
                c = http.client.HTTPConnection("127.0.0.1", rest_port, timeout=5)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    return open(token_path).read().strip()
            except OSError:
                pass
        time.sleep(0.1)
    sys.exit(f"shoal dev did not become ready on port {rest_port}")


def cpu_seconds(pid):
    """User + system CPU time of process `pid` (every thread), in seconds, from /proc/<pid>/stat."""
    import os

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_busy(seconds):
    """Percentage of CPU time (all cores) not idle over `seconds`, from /proc/stat."""
    import time

    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    total = total1 - total0
    return 100.0 * (total - (idle1 - idle0)) / total if total else 0.0


def parse_csv_output(text, test):
    """Finds the result row for `test` (e.g. "SET") in redis-benchmark --csv output.

    Anything else in the output (the "Could not fetch server CONFIG" warning, error
    messages, progress output) is ignored: only a row whose first field is the test name and whose
    other seven fields are numbers counts.
    """
    row = None
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith('"'):
            continue
        try:
            fields = next(csv.reader(io.StringIO(line)))
        except (csv.Error, StopIteration):
            continue
        if len(fields) != 8 or fields[0].upper() != test.upper():
            continue
        try:
            values = [float(v) for v in fields[1:]]
        except ValueError:
            continue  # the header line
        row = dict(zip(CSV_FIELDS, values))
    return row


def count_errors(text):
    """Lines where redis-benchmark reports an error reply (redis-benchmark 7 exits on the first)."""
    return sum(1 for line in text.splitlines()
               if line.startswith("Error from server") or "replied with error" in line)


def read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def collect(raw_dir):
    """{(cmd, pipeline): {target: [run, ...]}} from RAW_DIR/<cmd>-p<P>-<target>-r<R>.out (+ .err, .rc)."""
    cases = {}
    for name in sorted(os.listdir(raw_dir)):
        m = RAW_NAME.match(name)
        if not m:
            continue
        base = os.path.join(raw_dir, name[: -len(".out")])
        out, err = read(base + ".out"), read(base + ".err")
        rc = read(base + ".rc").strip()
        row = parse_csv_output(out, m["cmd"])
        run = {
            "round": int(m["round"]),
            "exit_code": int(rc) if rc.lstrip("-").isdigit() else None,
            "error_lines": count_errors(out) + count_errors(err),
            "result": row,
            "cpu_us_per_request": cpu_per_request(read(base + ".cpu")),
        }
        if row is None or rc != "0":
            run["output_tail"] = (out + err).strip().splitlines()[-10:]
        key = (m["cmd"].upper(), int(m["pipeline"]))
        cases.setdefault(key, {}).setdefault(m["target"], []).append(run)
    return cases


def cpu_per_request(text):
    """µs of CPU per request from a `.cpu` file, "<user ticks> <system ticks> <requests>
    <ticks per second>": {"total", "user", "system"}."""
    parts = text.split()
    if len(parts) != 4 or not all(p.isdigit() for p in parts) or int(parts[2]) == 0:
        return None
    user, system, requests, hz = map(int, parts)
    us = lambda ticks: ticks / hz * 1e6 / requests
    return {"total": us(user + system), "user": us(user), "system": us(system)}


def cpu_round_ratios(runs_a, runs_b):
    """a/b CPU per request of the runs of the same round, in round order."""
    ok = lambda runs: {r["round"]: r["cpu_us_per_request"]["total"] for r in runs if r.get("cpu_us_per_request")}
    a, b = ok(runs_a), ok(runs_b)
    return [a[k] / b[k] for k in sorted(a) if k in b]


def summarize(runs):
    """The run with the median ops/s (its own latencies), plus the spread of ops/s."""
    ok = [r for r in runs if r["result"] is not None and r["exit_code"] == 0]
    summary = {
        "runs": len(runs),
        "ok_runs": len(ok),
        "error_lines": sum(r["error_lines"] for r in runs),
    }
    if not ok:
        return summary
    ordered = sorted(ok, key=lambda r: r["result"]["rps"])
    median_run = ordered[(len(ordered) - 1) // 2]
    summary.update(median_run["result"])
    rps = [r["result"]["rps"] for r in ok]
    summary["rps_all"] = rps
    summary["rps_min"], summary["rps_max"] = min(rps), max(rps)
    summary["rps_median"] = statistics.median(rps)
    cpu = [r["cpu_us_per_request"] for r in ok if r.get("cpu_us_per_request")]
    if cpu:
        for part in ("total", "user", "system"):
            summary[f"cpu_{part}_us_per_request"] = statistics.median(c[part] for c in cpu)
        summary["cpu_us_per_request_all"] = [c["total"] for c in cpu]
    return summary


def ratio(a, b):
    if a and b and a.get("rps") and b.get("rps"):
        return a["rps"] / b["rps"]
    return None


def round_ratios(runs_a, runs_b):
    """a/b ops/s of the runs of the same round (they ran back to back, so a slow phase of
    the machine hits both): the ratios, in round order."""
    ok = lambda runs: {r["round"]: r["result"]["rps"] for r in runs
                       if r["result"] is not None and r["exit_code"] == 0 and r["result"]["rps"]}
    a, b = ok(runs_a), ok(runs_b)
    return [a[k] / b[k] for k in sorted(a) if k in b]


def fmt_rps(s):
    return f"{s['rps']:>10,.0f}" if s.get("rps") is not None else f"{'FAILED':>10}"


def fmt_ms(s, key):
    return f"{s[key]:>6.3f}" if s.get(key) is not None else f"{'-':>6}"


def fmt_cpu(s):
    """A target's CPU per request: total (user + kernel) µs."""
    if not s.get("cpu_total_us_per_request"):
        return "-"
    return (f"{s['cpu_total_us_per_request']:.2f} ({s['cpu_user_us_per_request']:.1f}+"
            f"{s['cpu_system_us_per_request']:.1f})")


def fmt_ratio(r):
    return f"{r:>5.2f}x" if r is not None else f"{'-':>6}"


def report(raw_dir, meta_path, out_path):
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    cases = collect(raw_dir)
    results = []
    failures = []
    for (cmd, pipeline) in sorted(cases, key=lambda k: (k[1], k[0] != "SET", k[0])):
        per_target = {t: summarize(cases[(cmd, pipeline)].get(t, [])) for t in TARGETS}
        for t in TARGETS:
            runs = cases[(cmd, pipeline)].get(t, [])
            for r in runs:
                if r["result"] is None or r["exit_code"] != 0:
                    failures.append((cmd, pipeline, t, r))
            per_target[t]["raw"] = runs
        want = TWEMPROXY_TARGETS.get(pipeline)
        gw_tw = ratio(per_target["gateway"], per_target["twemproxy"])
        runs = cases[(cmd, pipeline)]
        per_round = {
            "gateway_over_twemproxy": round_ratios(runs.get("gateway", []), runs.get("twemproxy", [])),
            # What Valkey alone reaches over twemproxy: a proxy that cost nothing would get
            # about this far (a higher goal asks the proxy to beat Valkey without a proxy).
            "direct_over_twemproxy": round_ratios(runs.get("direct", []), runs.get("twemproxy", [])),
        }
        cpu_rounds = cpu_round_ratios(runs.get("gateway", []), runs.get("twemproxy", []))
        cpu_ratio = statistics.median(cpu_rounds) if cpu_rounds else None
        cpu_goal = CPU_GOALS.get(pipeline)
        # The gateway with TLS on its RESP endpoint against twemproxy (which has no TLS).
        tls_rounds = cpu_round_ratios(runs.get("tls", []), runs.get("twemproxy", []))
        tls_ratio = statistics.median(tls_rounds) if tls_rounds else None
        floor = {t: cpu_round_ratios(runs.get(t, []), runs.get("twemproxy", [])) for t in FLOOR_TARGETS}
        results.append({
            "command": cmd,
            "cpu_per_round_floor_over_twemproxy": {t: v for t, v in floor.items() if v},
            "cpu_tls_over_twemproxy": tls_ratio,
            "cpu_per_round_tls_over_twemproxy": tls_rounds,
            "cpu_tls_goal_met": (tls_ratio <= cpu_goal) if (tls_ratio is not None and cpu_goal) else None,
            "cpu_gateway_over_twemproxy": cpu_ratio,
            "cpu_per_round_gateway_over_twemproxy": cpu_rounds,
            "cpu_goal": cpu_goal,
            "cpu_goal_met": (cpu_ratio <= cpu_goal) if (cpu_ratio is not None and cpu_goal) else None,
            "pipeline": pipeline,
            "requests": meta["requests"][str(pipeline)],
            "targets": per_target,
            "ratios": {
                "gateway_over_direct": ratio(per_target["gateway"], per_target["direct"]),
                "gateway_over_twemproxy": gw_tw,
            },
            "per_round_ratios": per_round,
            "median_round_ratios": {k: statistics.median(v) if v else None for k, v in per_round.items()},
            "goal_gateway_over_twemproxy": want,
            "goal_met": (gw_tw >= want) if (gw_tw is not None and want is not None) else None,
        })

    doc = dict(meta)
    doc["results"] = results
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")

    # The table.
    print()
    print(f"Gateway benchmark — {meta['timestamp']}, {meta['cpus']} CPUs, "
          f"{meta['clients']} connections, {meta['data_size']}-byte values, "
          f"{meta['keyspace']} random keys, persistence {meta['persistence']}, "
          f"median of {meta['rounds']} round(s)")
    head1 = (f"{'':<10}|{'direct':^28}|{'gateway':^28}|{'twemproxy':^28}|"
             f"{'gw/direct':^11}|{'gw/twemproxy':^25}")
    head2 = (f"{'cmd  P':<10}|" + f"{'ops/s':>10}{'p50 ms':>9}{'p99 ms':>9}|" * 3
             + f"{'ops/s':^11}|{'ops/s (goal)':^25}")
    print(head1)
    print(head2)
    print("-" * len(head2))
    for r in results:
        t = r["targets"]
        cells = []
        for name in OPS_TARGETS:
            s = t[name]
            cells.append(f"{fmt_rps(s)}  {fmt_ms(s, 'p50_latency_ms')}   {fmt_ms(s, 'p99_latency_ms')}|")
        goal = r["goal_gateway_over_twemproxy"]
        if goal is None or r["ratios"]["gateway_over_twemproxy"] is None:
            goal_txt = ""
        else:
            goal_txt = f"(>= {goal:.1f}x: {'met' if r['goal_met'] else 'NOT met'})"
        print(f"{r['command']:<4} P{r['pipeline']:<4}|" + "".join(cells)
              + f"{fmt_ratio(r['ratios']['gateway_over_direct']):^11}|"
              + f" {fmt_ratio(r['ratios']['gateway_over_twemproxy'])} {goal_txt:<17}")
    print()
    spread = []
    for r in results:
        parts = []
        for name in OPS_TARGETS:
            s = r["targets"][name]
            if s.get("rps_all") and len(s["rps_all"]) > 1:
                parts.append(f"{name} {(s['rps_max'] - s['rps_min']) / s['rps_median'] * 100:.0f}%")
        if parts:
            spread.append(f"  {r['command']} P{r['pipeline']}: " + ", ".join(parts))
    print("Per-round ratios (the targets of one round run back to back), median [min - max]:")
    for r in results:
        line = []
        for key, label in [("gateway_over_twemproxy", "gw/twemproxy"), ("direct_over_twemproxy", "direct/twemproxy")]:
            v = r["per_round_ratios"][key]
            if v:
                line.append(f"{label} {statistics.median(v):.2f}x [{min(v):.2f} - {max(v):.2f}]")
        print(f"  {r['command']} P{r['pipeline']}: " + ", ".join(line))
    print("  (direct/twemproxy is what Valkey with no proxy reaches: a goal above it asks the gateway\n"
          "   to serve more than Valkey does without a proxy.)")
    print()
    print("CPU time per request of the serving process (/proc/<pid>/stat utime+stime), median of the rounds,")
    print("as total (user + kernel); gateway/twemproxy is the median of the per-round ratios of the totals:")
    print(f"{'cmd  P':<10}{'direct µs':>17}{'gateway µs':>17}{'gateway TLS µs':>17}{'twemproxy µs':>17}  "
          f"{'gateway/twemproxy (goal)':<34}{'per round':<16}{'TLS/twemproxy'}")
    for r in results:
        t = r["targets"]
        us = lambda n: fmt_cpu(t[n])
        ratio_txt = "-"
        if r["cpu_gateway_over_twemproxy"] is not None:
            ratio_txt = (f"{r['cpu_gateway_over_twemproxy']:.2f} (<= {r['cpu_goal']}: "
                         f"{'met' if r['cpu_goal_met'] else 'NOT met'})")
        rounds = " ".join(f"{v:.2f}" for v in r["cpu_per_round_gateway_over_twemproxy"])
        tls_txt = "-"
        if r["cpu_tls_over_twemproxy"] is not None:
            tls_txt = (f"{r['cpu_tls_over_twemproxy']:.2f} ({'met' if r['cpu_tls_goal_met'] else 'NOT met'}; "
                       + " ".join(f"{v:.2f}" for v in r["cpu_per_round_tls_over_twemproxy"]) + ")")
        print(f"{r['command']:<4} P{r['pipeline']:<4}{us('direct'):>17}{us('gateway'):>17}{us('tls'):>17}"
              f"{us('twemproxy'):>17}  {ratio_txt:<34}{rounds:<16}{tls_txt}")
    print()
    if any(r["cpu_per_round_floor_over_twemproxy"] for r in results):
        print("Floor (bench/floor: canned replies, no upstream; the client side's system calls and TCP work")
        print("alone), CPU µs per request as total (user + kernel), and ÷ twemproxy per round:")
        print(f"{'cmd  P':<10}{'epoll µs':>17}{'io_uring µs':>17}  {'epoll/twemproxy':<22}{'io_uring/twemproxy'}")
        for r in results:
            floor = r["cpu_per_round_floor_over_twemproxy"]
            cells = "".join(f"{fmt_cpu(r['targets'][n]):>17}" for n in FLOOR_TARGETS)
            ratios = ["-" if not floor.get(n) else f"{statistics.median(floor[n]):.2f} ("
                      + " ".join(f"{v:.2f}" for v in floor[n]) + ")" for n in FLOOR_TARGETS]
            print(f"{r['command']:<4} P{r['pipeline']:<4}{cells}  {ratios[0]:<22}{ratios[1]}")
        print()
    if spread:
        print("Spread of ops/s across rounds ((max - min) / median):")
        print("\n".join(spread))
        print()
    errs = [(r["command"], r["pipeline"], n, r["targets"][n]["error_lines"])
            for r in results for n in TARGETS if r["targets"][n]["error_lines"]]
    for cmd, p, name, n in errs:
        print(f"WARNING: {cmd} P{p} {name}: {n} error reply line(s) in redis-benchmark's output")
    for cmd, p, name, run in failures:
        print(f"FAILED: {cmd} P{p} {name} round {run['round']}: exit code {run['exit_code']}, "
              f"result row {'found' if run['result'] else 'missing'}")
        for line in run.get("output_tail", []):
            print(f"    {line}")
    print(f"Results written to {out_path}")
    return 1 if failures else 0


def main(argv):
    if len(argv) >= 2 and argv[1] == "ports":
        print("\n".join(str(p) for p in free_ports(int(argv[2]))))
        return 0
    if len(argv) == 3 and argv[1] == "cpu-busy":
        print(f"{cpu_busy(float(argv[2])):.0f}")
        return 0
    if len(argv) == 3 and argv[1] == "json-field":
        value = json.load(sys.stdin).get(argv[2])
        if value is None:
            return 1
        print(value)
        return 0
    if len(argv) == 5 and argv[1] == "report":
        return report(argv[2], argv[3], argv[4])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
