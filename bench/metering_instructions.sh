#!/usr/bin/env bash
# What metering costs, counted instead of timed: runs `shoal dev` under valgrind's
# callgrind twice (metering on, then --no-metering), sends the same GETs through the gateway
# (redis-benchmark, 10 connections, 100-byte values, pipeline 16 then 1), and prints the
# user-space instructions the gateway thread executed per request in each mode, their
# ratio, and the functions that account for the difference. Instruction counts do not
# depend on how busy the machine is; they leave out the kernel's share (socket I/O, most
# of a proxy's CPU time), so the ratio overstates metering's share of the CPU.
#
# Environment:
#   BENCH_REQUESTS   GETs at pipeline 16 (default 64000; pipeline 1 runs a quarter of that)
set -euo pipefail

case "${1:-}" in
  "") ;;
  -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: $0 [--help]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
P16="${BENCH_REQUESTS:-64000}"
[[ "$P16" =~ ^[1-9][0-9]*$ ]] || { echo "BENCH_REQUESTS must be a positive integer" >&2; exit 2; }
P1=$((P16 / 4))

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf '\033[1;31mERROR: %s\033[0m\n' "$*" >&2; exit 1; }

missing=()
command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
command -v redis-benchmark >/dev/null 2>&1 || missing+=(redis-tools)
if ((${#missing[@]})); then
  log "installing ${missing[*]} (Debian)"
  SUDO=()
  [[ "$(id -u)" == 0 ]] || SUDO=(sudo)
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
export SHOAL_VALKEY_SERVER="${SHOAL_VALKEY_SERVER:-$(scripts/setup.sh)}"

log "building shoal (release)"
cargo build --release --bin shoal
SHOAL="${CARGO_TARGET_DIR:-$PWD/target}/release/shoal"

TMP="$(mktemp -d -t shoal-instructions.XXXXXX)"
PID=""
cleanup() {
  local rc=$?
  [[ -n "$PID" ]] && kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT INT TERM

measure() { # mode -> callgrind dumps in $TMP/<mode>/: part 1 = pipeline 16, part 2 = pipeline 1
  local mode="$1" flags=() i admin cache token
  [[ "$mode" == off ]] && flags=(--no-metering)
  mkdir -p "$TMP/$mode"
  mapfile -t ports < <(python3 bench/benchlib.py ports 5)
  NO_COLOR=1 SHOAL_TLS_PORT=0 SHOAL_READER_PORT=0 valgrind --tool=callgrind --separate-threads=yes \
    --callgrind-out-file="$TMP/$mode/cg.out.%p" "$SHOAL" dev --data-dir "$TMP/$mode/.shoal" \
    --rest-port "${ports[0]}" --resp-port "${ports[1]}" --node-ports "${ports[2]},${ports[3]}" --internal-port "${ports[4]}" "${flags[@]}" \
    </dev/null >"$TMP/$mode/out" 2>"$TMP/$mode/log" &
  PID=$!
  local rest="http://127.0.0.1:${ports[0]}"
  for ((i = 0; ; i++)); do
    if curl -sf "$rest/healthz" >/dev/null 2>&1 && [[ -s "$TMP/$mode/.shoal/admin.token" ]]; then break; fi
    ((i < 1200)) || die "shoal dev under valgrind did not start"
    sleep 0.25
  done
  admin="Authorization: Bearer $(cat "$TMP/$mode/.shoal/admin.token")"
  cache="$(curl -s -X POST -H "$admin" -d '{"name":"bench"}' "$rest/v1/caches" | python3 bench/benchlib.py json-field id)"
  token="$(curl -s -X POST -H "$admin" -d '{"ttl_seconds": 3600}' "$rest/v1/caches/$cache/tokens" | python3 bench/benchlib.py json-field token)"
  run() { redis-benchmark -h 127.0.0.1 -p "${ports[1]}" -a "$token" -c 10 -d 100 -r 1000 --csv "$@" >/dev/null 2>&1 </dev/null; }
  run -n 20000 -P 16 -t set # every GET then hits
  callgrind_control -z "$PID" >/dev/null 2>&1
  run -n "$P16" -P 16 -t get
  callgrind_control -d "$PID" >/dev/null 2>&1
  callgrind_control -z "$PID" >/dev/null 2>&1
  run -n "$P1" -P 1 -t get
  callgrind_control -d "$PID" >/dev/null 2>&1
  kill -TERM "$PID"
  wait "$PID" 2>/dev/null || true
  PID=""
}

for mode in on off; do
  log "metering $mode: shoal dev under callgrind (slow)"
  measure "$mode"
done

python3 - "$TMP" "$P16" "$P1" <<'PY'
import collections, glob, re, sys
tmp, counts = sys.argv[1], {1: int(sys.argv[2]), 2: int(sys.argv[3])}

def names(mode):
    out = {}
    for f in glob.glob(f"{tmp}/{mode}/cg.out.*"):
        for line in open(f, errors="replace"):
            m = re.match(r"c?fn=\((\d+)\) (.*)", line.strip())
            if m:
                out[m.group(1)] = m.group(2)
    return out

def self_costs(path, table):
    cost, fn, after_call = collections.Counter(), None, False
    for line in open(path, errors="replace"):
        if line.startswith("fn="):
            m = re.match(r"fn=\((\d+)\)", line)
            fn = table.get(m.group(1), m.group(1)) if m else line[3:].strip()
        elif line.startswith("calls="):
            after_call = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            parts = line.split()
            if len(parts) >= 2:
                if after_call:
                    after_call = False  # the inclusive cost of a call, not this function's own
                else:
                    cost[fn] += int(parts[1])
    return cost

def busiest_thread(mode, part):
    # The gateway's client thread is the one that executed the most instructions.
    files = glob.glob(f"{tmp}/{mode}/cg.out.*.{part}-*")
    total = lambda f: int(next(l for l in open(f) if l.startswith("summary:")).split()[1])
    return max(files, key=total)

for part, label in [(1, "GET pipeline 16"), (2, "GET pipeline 1")]:
    n = counts[part]
    on = self_costs(busiest_thread("on", part), names("on"))
    off = self_costs(busiest_thread("off", part), names("off"))
    t_on, t_off = sum(on.values()) / n, sum(off.values()) / n
    print(f"{label}: {t_on:,.0f} instructions per request with metering, {t_off:,.0f} without"
          f" (+{t_on - t_off:,.0f}, {t_on / t_off:.3f}x)")
    diff = collections.Counter({k: on[k] - off[k] for k in set(on) | set(off)})
    for fn, d in diff.most_common(8):
        print(f"    {d / n:+8.1f}  {fn[:100]}")
PY
