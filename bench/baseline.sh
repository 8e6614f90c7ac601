#!/usr/bin/env bash
# The gateway now against the gateway at another commit, side by side in one run: builds
# both in release mode, starts a `shoal dev` of each (its own nodes, one cache, a token),
# and sends them the same redis-benchmark SET/GET runs (50 connections, 100-byte values,
# pipeline 1 and 16), alternating which goes first each round. For every run it reads the
# CPU time the shoal process (gateway, control plane, engine) used from /proc/<pid>/stat,
# and prints CPU microseconds per request of each and their ratio, with ops/s beside. CPU
# per request hardly depends on how busy the machine is; ops/s does.
#
# usage: bench/baseline.sh [REV]     the baseline commit (default HEAD~1)
#
# Environment:
#   BENCH_REQUESTS      requests per run at pipeline 1 (default 100000; pipeline 16 runs 5x)
#   BENCH_ROUNDS        rounds (default 3); each case reports its median
#   BENCH_BASELINE_BIN  an already built baseline `shoal` binary (skips building REV)
set -euo pipefail

case "${1:-}" in
  -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
cd "$(dirname "$0")/.."
ROOT="$PWD"
REV="${1:-HEAD~1}"
REQUESTS="${BENCH_REQUESTS:-100000}"
ROUNDS="${BENCH_ROUNDS:-3}"
for v in REQUESTS ROUNDS; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "BENCH_$v must be a positive integer" >&2; exit 2; }
done

source bench/devlib.sh

command -v redis-benchmark >/dev/null || die "redis-benchmark not found (Debian: redis-tools; bench/gateway.sh installs it)"
VALKEY_SERVER="${SHOAL_VALKEY_SERVER:-$(scripts/setup.sh)}"
export SHOAL_VALKEY_SERVER="$VALKEY_SERVER"

log "building shoal (release) at the working tree"
cargo build --release --bin shoal
CURRENT="${CARGO_TARGET_DIR:-$ROOT/target}/release/shoal"
if [[ -n "${BENCH_BASELINE_BIN:-}" ]]; then
  BASELINE="$BENCH_BASELINE_BIN"
  BASE_DESC="$BASELINE"
else
  commit="$(git rev-parse --verify "$REV^{commit}")" || die "no commit $REV"
  BASE_DESC="$REV ($commit)"
  tree="$ROOT/target/bench-baseline/$commit"
  if [[ ! -d "$tree" ]]; then
    git worktree add --detach "$tree" "$commit" >&2
  fi
  log "building shoal (release) at $BASE_DESC in $tree"
  # Its own target directory: two checkouts must never share one.
  (cd "$tree" && CARGO_TARGET_DIR="$tree/target" cargo build --release --bin shoal)
  BASELINE="$tree/target/release/shoal"
fi
[[ -x "$BASELINE" ]] || die "no baseline binary at $BASELINE"

TMP="$(mktemp -d -t shoal-baseline.XXXXXX)"
declare -A PID PORT TOKEN
cleanup() {
  local rc=$? p
  trap - EXIT
  for p in "${PID[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PID[@]}"; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT

start() { # name binary
  local name="$1" bin="$2" ports args rest
  mapfile -t ports < <(python3 bench/benchlib.py ports 5)
  args=(dev --data-dir "$TMP/$name" --rest-port "${ports[0]}" --resp-port "${ports[1]}"
    --node-ports "${ports[2]},${ports[3]}")
  # Older builds have no separate internal API listener.
  if "$bin" dev --help 2>/dev/null | grep -q -- --internal-port; then args+=(--internal-port "${ports[4]}"); fi
  NO_COLOR=1 SHOAL_TLS_PORT=0 SHOAL_READER_PORT=0 "$bin" "${args[@]}" </dev/null >/dev/null 2>"$TMP/$name.log" &
  PID[$name]=$!
  PORT[$name]=${ports[1]}
  rest="http://127.0.0.1:${ports[0]}"
  wait_dev "${PID[$name]}" "$rest" "$TMP/$name" "$TMP/$name.log"
  TOKEN[$name]="$(cache_token "$rest" "$TMP/$name" '{"name":"bench"}')"
  wait_ping "${PORT[$name]}" "${TOKEN[$name]}"
}

log "starting baseline ($BASE_DESC) and current"
start baseline "$BASELINE"
start current "$CURRENT"

RESULTS="$TMP/results.tsv"
run() { # name cmd pipeline requests round
  local before after out
  before="$(ticks "${PID[$1]}")"
  out="$(redis-benchmark -p "${PORT[$1]}" -a "${TOKEN[$1]}" -c 50 -n "$4" -d 100 -P "$3" -r 100000 -t "$2" --csv 2>/dev/null)" \
    || die "redis-benchmark against $1 failed"
  after="$(ticks "${PID[$1]}")"
  rps="$(grep -ai "^\"$2\"," <<<"$out" | tail -n 1 | cut -d, -f2 | tr -d '"')"
  [[ -n "$rps" ]] || die "no result from redis-benchmark against $1: $out"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$((after - before))" "$rps" >>"$RESULTS"
  printf '  round %s  %-3s P%-2s %-8s %12s ops/s  %5s ticks\n' "$5" "${2^^}" "$3" "$1" "$rps" "$((after - before))" >&2
}

log "warming up"
for name in baseline current; do for cmd in set get; do
  redis-benchmark -p "${PORT[$name]}" -a "${TOKEN[$name]}" -c 50 -n 50000 -d 100 -P 16 -r 100000 -t "$cmd" -q >/dev/null 2>&1
done; done

for ((round = 1; round <= ROUNDS; round++)); do
  if ((round % 2)); then order=(baseline current); else order=(current baseline); fi
  for p in 1 16; do
    n=$REQUESTS
    ((p == 1)) || n=$((REQUESTS * 5))
    for cmd in set get; do
      for name in "${order[@]}"; do run "$name" "$cmd" "$p" "$n" "$round"; done
    done
  done
done

python3 - "$RESULTS" "$(getconf CLK_TCK)" "$BASE_DESC" <<'PY'
import statistics, sys
path, hz, base = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = [l.rstrip("\n").split("\t") for l in open(path)]
cases = {}
for name, cmd, p, n, rnd, ticks, rps in rows:
    c = cases.setdefault((cmd.upper(), int(p)), {}).setdefault(name, [])
    c.append((int(ticks) / hz * 1e6 / int(n), float(rps)))
print(f"\nbaseline: {base}\ncurrent:  the working tree\n")
print(f"{'cmd  P':<9}| {'CPU us/request':^34} | {'ops/s':^34}")
print(f"{'':<9}| {'baseline':>10} {'current':>10} {'cur/base':>10} | {'baseline':>10} {'current':>10} {'cur/base':>10}")
print("-" * 83)
for (cmd, p), t in sorted(cases.items(), key=lambda k: (k[0][1], k[0][0] != "SET")):
    cb = statistics.median(x[0] for x in t["baseline"]); cc = statistics.median(x[0] for x in t["current"])
    rb = statistics.median(x[1] for x in t["baseline"]); rc = statistics.median(x[1] for x in t["current"])
    print(f"{cmd:<4} P{p:<3}| {cb:>10.2f} {cc:>10.2f} {cc / cb:>9.2f}x | {rb:>10,.0f} {rc:>10,.0f} {rc / rb:>9.2f}x")
print("\nCPU us/request: the shoal process's user + system time over the run's requests (median of rounds);\n"
      "below 1.00x the current build spends less CPU per request.")
PY
