#!/usr/bin/env bash
# One cache on a cluster pool of 1, 2 and 3 shards, through the gateway, side by side in
# one run, next to one on a standalone pool: builds shoal in release mode, starts three
# `shoal dev --engine cluster` (1, 2, 3 shards, no replica: this is about spreading one
# cache's keys, not about failover), makes one cache and a token on each (and on the first,
# one more cache in its standalone pool `main`), and sends them the same redis-benchmark SET/GET runs
# (50 connections, 100-byte values, 100,000 random keys, pipeline 1 and 16), rotating
# which goes first each round. For every run it prints ops/s and the CPU the shoal process
# (gateway, control plane, engine supervisor) and the cluster's valkey-servers used per
# request (user + system time from /proc/<pid>/stat), and the ratios to 1 shard and of 1
# shard to the standalone pool (what routing through a cluster link costs).
#
# On a 2-core machine more shards cannot add throughput (the benchmark client, the gateway
# and the nodes already share two cores): the point is that it works and what a shard costs.
#
# usage: bench/shards.sh
#
# Environment:
#   BENCH_REQUESTS   requests per run at pipeline 1 (default 100000; pipeline 16 runs 5x)
#   BENCH_ROUNDS     rounds (default 3); each case reports its median
set -euo pipefail

case "${1:-}" in
  -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
cd "$(dirname "$0")/.."
ROOT="$PWD"
REQUESTS="${BENCH_REQUESTS:-100000}"
ROUNDS="${BENCH_ROUNDS:-3}"
for v in REQUESTS ROUNDS; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "BENCH_$v must be a positive integer" >&2; exit 2; }
done

source bench/devlib.sh

command -v redis-benchmark >/dev/null || die "redis-benchmark not found (Debian: redis-tools; bench/gateway.sh installs it)"
export SHOAL_VALKEY_SERVER="${SHOAL_VALKEY_SERVER:-$(scripts/setup.sh)}"

log "building shoal (release)"
cargo build --release --bin shoal
SHOAL="${CARGO_TARGET_DIR:-$ROOT/target}/release/shoal"

TMP="$(mktemp -d -t shoal-shards.XXXXXX)"
declare -A PID PORT TOKEN
cleanup() {
  local rc=$? p
  trap - EXIT
  for p in "${PID[1]:-}" "${PID[2]:-}" "${PID[3]:-}"; do [[ -n "$p" ]] && kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PID[@]}"; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT

start() { # shards cluster-base-port
  local name="$1" ports rest
  mapfile -t ports < <(python3 bench/benchlib.py ports 5)
  NO_COLOR=1 SHOAL_TLS_PORT=0 SHOAL_READER_PORT=0 "$SHOAL" dev --data-dir "$TMP/$name" \
    --rest-port "${ports[0]}" --resp-port "${ports[1]}" --node-ports "${ports[2]},${ports[3]}" \
    --internal-port "${ports[4]}" --engine cluster --shards "$name" --replicas 0 \
    --cluster-base-port "$2" </dev/null >/dev/null 2>"$TMP/$name.log" &
  PID[$name]=$!
  PORT[$name]=${ports[1]}
  rest="http://127.0.0.1:${ports[0]}"
  wait_dev "${PID[$name]}" "$rest" "$TMP/$name" "$TMP/$name.log"
  TOKEN[$name]="$(cache_token "$rest" "$TMP/$name" '{"name":"bench"}')"
  wait_ping "${PORT[$name]}" "${TOKEN[$name]}"
  if [[ "$name" == 1 ]]; then
    TOKEN[standalone]="$(cache_token "$rest" "$TMP/$name" '{"name":"bench-standalone","pool":"main"}')"
    PID[standalone]=${PID[1]}
    PORT[standalone]=${PORT[1]}
  fi
}

# CPU ticks used so far by the cache's valkey-servers.
node_ticks() { # name: the cluster's nodes (standalone: the main pool's), by their pidfiles
  local total=0 f pids=("$TMP/$1"/valkey-cluster/node-*/valkey.pid)
  [[ "$1" == standalone ]] && pids=("$TMP/1"/valkey/*/valkey.pid)
  for f in "${pids[@]}"; do
    [[ -s "$f" ]] && total=$((total + $(ticks "$(cat "$f")")))
  done
  echo "$total"
}

log "starting three platforms: clusters of 1, 2 and 3 shards"
start 1 24100
start 2 24200
start 3 24300
for name in 1 2 3; do
  n=$(ls "$TMP/$name"/valkey-cluster/node-*/valkey.pid 2>/dev/null | wc -l)
  ((n == name)) || die "found $n nodes in the $name-shard cluster's folder (its CPU would be miscounted)"
done

RESULTS="$TMP/results.tsv"
run() { # name cmd pipeline requests round
  local before nbefore after nafter out rps
  before="$(ticks "${PID[$1]}")"
  nbefore="$(node_ticks "$1")"
  out="$(redis-benchmark -p "${PORT[$1]}" -a "${TOKEN[$1]}" -c 50 -n "$4" -d 100 -P "$3" -r 100000 -t "$2" --csv 2>/dev/null)" \
    || die "redis-benchmark against $1 shard(s) failed"
  after="$(ticks "${PID[$1]}")"
  nafter="$(node_ticks "$1")"
  rps="$(grep -ai "^\"$2\"," <<<"$out" | tail -n 1 | cut -d, -f2 | tr -d '"')"
  [[ -n "$rps" ]] || die "no result from redis-benchmark against $1 shard(s): $out"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$((after - before))" "$((nafter - nbefore))" "$rps" >>"$RESULTS"
  printf '  round %s  %-3s P%-2s %-10s %12s ops/s\n' "$5" "${2^^}" "$3" "$1" "$rps" >&2
}

log "warming up"
for name in standalone 1 2 3; do for cmd in set get; do
  redis-benchmark -p "${PORT[$name]}" -a "${TOKEN[$name]}" -c 50 -n 50000 -d 100 -P 16 -r 100000 -t "$cmd" -q >/dev/null 2>&1
done; done

orders=("standalone 1 2 3" "1 2 3 standalone" "2 3 standalone 1" "3 standalone 1 2")
for ((round = 1; round <= ROUNDS; round++)); do
  read -ra order <<<"${orders[$(((round - 1) % 4))]}"
  for p in 1 16; do
    n=$REQUESTS
    ((p == 1)) || n=$((REQUESTS * 5))
    for cmd in set get; do
      for name in "${order[@]}"; do run "$name" "$cmd" "$p" "$n" "$round"; done
    done
  done
done

python3 - "$RESULTS" "$(getconf CLK_TCK)" "$(nproc)" <<'PY'
import statistics, sys
path, hz, cores = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cases = {}
for line in open(path):
    target, cmd, p, n, ticks, nticks, rps = line.rstrip("\n").split("\t")
    runs = cases.setdefault((cmd.upper(), int(p)), {}).setdefault(target, [])
    per = 1e6 / hz / int(n)
    runs.append((float(rps), int(ticks) * per, int(nticks) * per))
T = ("standalone", "1", "2", "3")
print(f"\nOne cache through the gateway: a standalone pool, a cluster of 1, 2 and 3 shards ({cores} cores; medians)\n")
print(f"{'cmd  P':<9}| {'ops/s':^53} | {'shoal CPU us/request':^34} | {'nodes CPU us/request':^27}")
print(f"{'':<9}| {'standalone':>10} {'1':>8} {'2':>8} {'3':>8} {'1/st':>5} {'2/1':>5} {'3/1':>5}"
      f" | {'st':>5} {'1':>5} {'2':>5} {'3':>5} {'1/st':>5} | {'st':>5} {'1':>5} {'2':>5} {'3':>5}")
print("-" * 125)
for (cmd, p), by in sorted(cases.items(), key=lambda k: (k[0][1], k[0][0] != "SET")):
    m = {t: [statistics.median(r[i] for r in by[t]) for i in range(3)] for t in T}
    ops = [m[t][0] for t in T]
    cpu = [m[t][1] for t in T]
    nodes = [m[t][2] for t in T]
    print(f"{cmd:<4} P{p:<3}| {ops[0]:>10,.0f} {ops[1]:>8,.0f} {ops[2]:>8,.0f} {ops[3]:>8,.0f}"
          f" {ops[1] / ops[0]:>5.2f} {ops[2] / ops[1]:>5.2f} {ops[3] / ops[1]:>5.2f}"
          f" | {cpu[0]:>5.1f} {cpu[1]:>5.1f} {cpu[2]:>5.1f} {cpu[3]:>5.1f} {cpu[1] / cpu[0]:>5.2f}"
          f" | {nodes[0]:>5.1f} {nodes[1]:>5.1f} {nodes[2]:>5.1f} {nodes[3]:>5.1f}")
print("\nshoal CPU: the shoal process (the gateway routes); nodes CPU: the cache's valkey-servers.\n"
      "1/st: a 1-shard cluster over the standalone pool, what the cluster link costs.\n"
      "On 2 cores more shards cannot add throughput: the client, gateway and nodes share them.")
PY
