#!/usr/bin/env bash
# What metering costs: redis-benchmark SET/GET through two `shoal dev` gateways, one with
# metering on (the default) and one started with --no-metering, interleaved per case.
# Prints, per case, the median ops/s of each, the median of the per-round ratios on/off
# (goal: at least 0.97, i.e. at most 3% cost), the CPU time the shoal process spent per
# request with metering on and off (/proc/<pid>/stat; steadier than ops/s on a busy machine),
# and metering's share of all the CPU a request costs on the machine (/proc/stat): per round,
# (shoal CPU on - shoal CPU off) / all CPU on, per request. On a machine whose CPUs are the
# bottleneck that share is the throughput metering costs, with far less noise than ops/s.
#
# Environment:
#   BENCH_REQUESTS   requests per run at pipeline 1 (default 200000; pipeline 16 runs 5x that)
#   BENCH_ROUNDS     rounds; each case reports medians over rounds (default 3)
#   BENCH_KEEP_TMP   1 keeps the temporary directory (logs, raw outputs)
set -euo pipefail

case "${1:-}" in
  "") ;;
  -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: $0 [--help]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
REQUESTS="${BENCH_REQUESTS:-200000}"
ROUNDS="${BENCH_ROUNDS:-3}"
for v in REQUESTS ROUNDS; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "BENCH_$v must be a positive integer" >&2; exit 2; }
done
CLIENTS=50 DATA_SIZE=100 KEYSPACE=100000

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf '\033[1;31mERROR: %s\033[0m\n' "$*" >&2; exit 1; }

command -v redis-benchmark >/dev/null || die "redis-benchmark missing (Debian: apt-get install redis-tools)"
export SHOAL_VALKEY_SERVER="${SHOAL_VALKEY_SERVER:-$(scripts/setup.sh)}"

log "building shoal (release)"
cargo build --release --bin shoal
SHOAL="${CARGO_TARGET_DIR:-$PWD/target}/release/shoal"

TMP="$(mktemp -d -t shoal-metering.XXXXXX)"
PIDS=()
cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ "${BENCH_KEEP_TMP:-0}" == 1 ]]; then echo "kept $TMP" >&2; else rm -rf "$TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mapfile -t PORTS < <(python3 bench/benchlib.py ports 10)
declare -A RESP TOKEN

start() { # name rest resp node1 node2 internal [flags...]
  local name="$1" rest="$2" resp="$3" n1="$4" n2="$5" internal="$6" i reply cache
  shift 6
  NO_COLOR=1 SHOAL_TLS_PORT=0 SHOAL_READER_PORT=0 "$SHOAL" dev --data-dir "$TMP/$name" --rest-port "$rest" --resp-port "$resp" \
    --internal-port "$internal" --node-ports "$n1,$n2" "$@" </dev/null >"$TMP/$name.out" 2>"$TMP/$name.log" &
  PIDS+=($!)
  for ((i = 0; ; i++)); do
    if curl -sf "http://127.0.0.1:$rest/healthz" >/dev/null 2>&1 && [[ -s "$TMP/$name/admin.token" ]]; then break; fi
    ((i < 600)) || die "shoal dev ($name) did not become healthy within 60 s"
    sleep 0.1
  done
  local admin="Authorization: Bearer $(cat "$TMP/$name/admin.token")"
  reply="$(curl -s -X POST -H "$admin" -d '{"name":"bench"}' "http://127.0.0.1:$rest/v1/caches")"
  cache="$(python3 bench/benchlib.py json-field id <<<"$reply")" || die "creating a cache failed: $reply"
  reply="$(curl -s -X POST -H "$admin" -d '{"ttl_seconds": 3600}' "http://127.0.0.1:$rest/v1/caches/$cache/tokens")"
  TOKEN[$name]="$(python3 bench/benchlib.py json-field token <<<"$reply")" || die "minting a token failed: $reply"
  RESP[$name]="$resp"
}

log "starting shoal dev with metering on and off"
start on "${PORTS[0]}" "${PORTS[1]}" "${PORTS[2]}" "${PORTS[3]}" "${PORTS[8]}"
start off "${PORTS[4]}" "${PORTS[5]}" "${PORTS[6]}" "${PORTS[7]}" "${PORTS[9]}" --no-metering

declare -A PID
PID[on]="${PIDS[0]}" PID[off]="${PIDS[1]}"

cpu_seconds() { # pid -> utime + stime of every thread, in seconds
  python3 -c 'import os,sys; f=open(f"/proc/{sys.argv[1]}/stat").read().rsplit(")",1)[1].split(); print((int(f[11])+int(f[12]))/os.sysconf("SC_CLK_TCK"))' "$1"
}

machine_busy() { # CPU seconds all cores spent not idle (user, nice, system, irq, softirq)
  python3 -c 'import os; f=open("/proc/stat").readline().split(); print(sum(int(f[i]) for i in (1,2,3,6,7))/os.sysconf("SC_CLK_TCK"))'
}

run() { # target cmd pipeline requests -> "ops/s shoal-cpu-µs-per-request all-cpu-µs-per-request"
  local before after rps all_before all_after
  before="$(cpu_seconds "${PID[$1]}")"
  all_before="$(machine_busy)"
  rps="$(redis-benchmark -h 127.0.0.1 -p "${RESP[$1]}" -a "${TOKEN[$1]}" -c "$CLIENTS" -n "$4" -d "$DATA_SIZE" \
    -P "$3" -r "$KEYSPACE" -t "$2" --csv 2>/dev/null </dev/null | grep -ai "^\"$2\"," | tail -n 1 | cut -d, -f2 | tr -d '"')"
  after="$(cpu_seconds "${PID[$1]}")"
  all_after="$(machine_busy)"
  [[ -n "$rps" ]] || return 0
  python3 -c 'import sys; a = [float(x) for x in sys.argv[2:6]]; n = int(sys.argv[6])
print(sys.argv[1], (a[1] - a[0]) * 1e6 / n, (a[3] - a[2]) * 1e6 / n)' "$rps" "$before" "$after" "$all_before" "$all_after" "$4"
}

log "warming up"
for t in on off; do for c in set get; do run "$t" "$c" 16 50000 >/dev/null; done; done

declare -A RESULTS
for ((round = 1; round <= ROUNDS; round++)); do
  order=(on off)
  ((round % 2 == 0)) && order=(off on)
  for p in 1 16; do
    n=$REQUESTS
    ((p == 16)) && n=$((REQUESTS * 5))
    for c in set get; do
      for t in "${order[@]}"; do
        out="$(run "$t" "$c" "$p" "$n")"
        [[ -n "$out" ]] || die "redis-benchmark $c P$p against metering $t failed"
        read -r rps cpu all <<<"$out"
        RESULTS["$c P$p $t"]+="$rps "
        RESULTS["$c P$p $t cpu"]+="$cpu "
        RESULTS["$c P$p $t all"]+="$all "
        printf 'round %d  %-3s P%-2s metering %-3s %12s ops/s  %6.2f µs shoal CPU/request  %6.2f µs all CPU/request\n' \
          "$round" "${c^^}" "$p" "$t" "$rps" "$cpu" "$all" >&2
      done
    done
  done
done

echo
printf '%-8s %12s %12s %13s | %16s %16s %9s | %14s\n' case "on ops/s" "off ops/s" "on/off ops/s" "on µs CPU/req" "off µs CPU/req" "on/off" "metering/all"
for p in 1 16; do
  for c in set get; do
    python3 - "${c^^} P$p" "${RESULTS["$c P$p on"]}" "${RESULTS["$c P$p off"]}" \
      "${RESULTS["$c P$p on cpu"]}" "${RESULTS["$c P$p off cpu"]}" "${RESULTS["$c P$p on all"]}" <<'PY'
import statistics, sys
name = sys.argv[1]
on, off, cpu_on, cpu_off, all_on = ([float(x) for x in a.split()] for a in sys.argv[2:7])
# Metering's extra shoal CPU per request, as a share of all the CPU a request costs.
share = statistics.median((a - b) / t for a, b, t in zip(cpu_on, cpu_off, all_on))
# Runs of a round are back to back: their ratio cancels slow drifts of the machine.
ratio = statistics.median(a / b for a, b in zip(on, off))
c_on, c_off = statistics.median(cpu_on), statistics.median(cpu_off)
print(f"{name:<8} {statistics.median(on):>12,.0f} {statistics.median(off):>12,.0f} {ratio:>13.3f} |"
      f" {c_on:>16.2f} {c_off:>16.2f} {c_on / c_off:>9.3f} | {share * 100:>13.1f}%")
PY
  done
done
