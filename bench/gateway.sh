#!/usr/bin/env bash
# Gateway benchmark: redis-benchmark SET/GET against
#   direct     a plain valkey-server (persisting as Shoal's nodes do: BENCH_PERSISTENCE),
#   gateway    the Shoal gateway (`shoal dev`, AUTH with a cache token),
#   twemproxy  nutcracker in front of the plain valkey-server,
# interleaved per case, all in one run. Prints ops/s, latencies and each serving process's
# CPU time per request (from /proc/<pid>/stat) with the gateway ÷ twemproxy ratios, and
# writes bench/results/gateway-<timestamp>.json. See bench/README.md.
#
# Environment:
#   BENCH_REQUESTS   requests per run at pipeline 1 (default 200000; pipeline 16 runs 5x that)
#   BENCH_ROUNDS     rounds; each case reports the run with the median ops/s (default 3)
#   BENCH_TIMEOUT    seconds before one redis-benchmark run counts as hung (default 300)
#   BENCH_WAIT_IDLE  seconds to wait, before measuring, for other work to leave the CPUs
#                    (under 20% busy); default 0: measure at once (with a warning if busy)
#   BENCH_KEEP_TMP   1 keeps the temporary directory (logs, raw outputs) after the run
#   BENCH_FLOOR      1 adds bench/floor's two servers (canned replies, no upstream: the least a
#                    RESP endpoint can spend per request here), one on epoll, one on io_uring
#   BENCH_PERSISTENCE  aof (default: AOF, fsync every second, on the plain valkey-server and
#                    on Shoal's nodes alike) or none (no AOF on either: Shoal's nodes are
#                    switched with CONFIG SET after start; what a pure cache would run)
set -euo pipefail

case "${1:-}" in
  "") ;;
  -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: $0 [--help]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
ROOT="$PWD"

REQUESTS="${BENCH_REQUESTS:-200000}"
ROUNDS="${BENCH_ROUNDS:-3}"
TIMEOUT="${BENCH_TIMEOUT:-300}"
WAIT_IDLE="${BENCH_WAIT_IDLE:-0}"
PERSISTENCE="${BENCH_PERSISTENCE:-aof}"
CLIENTS=50
DATA_SIZE=100
KEYSPACE=100000
PIPELINES=(1 16)
COMMANDS=(set get)
# tls: the gateway's RESP-over-TLS endpoint (redis-benchmark --tls), for the CPU table.
TARGETS=(direct gateway tls twemproxy)
FLOOR="${BENCH_FLOOR:-0}"
[[ "$FLOOR" == 0 || "$FLOOR" == 1 ]] || { echo "BENCH_FLOOR must be 0 or 1" >&2; exit 2; }
((FLOOR)) && TARGETS+=(floor_epoll floor_uring)
[[ "$WAIT_IDLE" =~ ^[0-9]+$ ]] || { echo "BENCH_WAIT_IDLE must be a number of seconds" >&2; exit 2; }
[[ "$PERSISTENCE" == aof || "$PERSISTENCE" == none ]] || { echo "BENCH_PERSISTENCE must be aof or none" >&2; exit 2; }
for v in REQUESTS ROUNDS TIMEOUT; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "BENCH_$v must be a positive integer" >&2; exit 2; }
done
requests_for() { if [[ "$1" == 1 ]]; then echo "$REQUESTS"; else echo $((REQUESTS * 5)); fi; }

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf '\033[1;31mERROR: %s\033[0m\n' "$*" >&2; exit 1; }

# --- 1. Install what is missing -------------------------------------------------------------
find_nutcracker() {
  command -v nutcracker 2>/dev/null || { [[ -x /usr/sbin/nutcracker ]] && echo /usr/sbin/nutcracker; } || true
}
missing=()
command -v redis-benchmark >/dev/null 2>&1 || missing+=(redis-tools)
command -v redis-cli >/dev/null 2>&1 || { [[ " ${missing[*]-} " == *" redis-tools "* ]] || missing+=(redis-tools); }
[[ -n "$(find_nutcracker)" ]] || missing+=(nutcracker)
if ((${#missing[@]})); then
  log "installing ${missing[*]} (Debian)"
  SUDO=()
  [[ "$(id -u)" == 0 ]] || SUDO=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -qq >&2
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
NUTCRACKER="$(find_nutcracker)"
[[ -n "$NUTCRACKER" ]] || die "nutcracker not found after installing it"
command -v redis-benchmark >/dev/null || die "redis-benchmark not found after installing redis-tools"

VALKEY_SERVER="${SHOAL_VALKEY_SERVER:-$(scripts/setup.sh)}"
[[ -x "$VALKEY_SERVER" ]] || die "valkey-server not found at '$VALKEY_SERVER'"
export SHOAL_VALKEY_SERVER="$VALKEY_SERVER"

# --- 2. Build shoal -------------------------------------------------------------------------
log "building shoal (release)"
cargo build --release --bin shoal
SHOAL="$ROOT/target/release/shoal"
if ((FLOOR)); then
  log "building bench/floor (release)"
  (cd bench/floor && CARGO_TARGET_DIR="$ROOT/target/bench-floor" cargo build --release)
  FLOOR_BIN="$ROOT/target/bench-floor/release/shoal-bench-floor"
fi

# --- 3. Start everything in a temporary directory ------------------------------------------
TMP="$(mktemp -d -t shoal-bench.XXXXXX)"
RAW="$TMP/raw"
mkdir -p "$RAW" "$TMP/valkey"
VALKEY_PID="" NUTCRACKER_PID="" SHOAL_PID="" SHOAL_CHILDREN="" EPOLL_PID="" URING_PID=""

alive() { [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null; }

stop_pid() { # pid [seconds]: SIGTERM, wait, then SIGKILL
  local pid="$1" i
  alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < ${2:-10} * 10; i++)); do alive "$pid" || break; sleep 0.1; done
  if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
  wait "$pid" 2>/dev/null || true
}

shoal_log_tail() {
  if [[ -s "$TMP/shoal.log" ]]; then
    echo "---- last 40 lines of the shoal log ($TMP/shoal.log; 'authenticated' lines left out) ----" >&2
    grep -v 'shoal_gateway::session: authenticated' "$TMP/shoal.log" | tail -n 40 >&2
    echo "----" >&2
  fi
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if ((rc != 0)); then shoal_log_tail; fi
  if [[ -n "$SHOAL_PID" ]]; then
    # shoal stops its own Valkey nodes on SIGTERM; remember them in case it cannot.
    local children c
    children="$SHOAL_CHILDREN $(pgrep -P "$SHOAL_PID" 2>/dev/null | tr '\n' ' ')"
    stop_pid "$SHOAL_PID" 20
    for c in $children; do
      if alive "$c" && grep -q valkey-server "/proc/$c/cmdline" 2>/dev/null; then
        kill -KILL "$c" 2>/dev/null
      fi
    done
  fi
  stop_pid "$NUTCRACKER_PID"
  stop_pid "$VALKEY_PID"
  stop_pid "$EPOLL_PID"
  stop_pid "$URING_PID"
  if [[ "${BENCH_KEEP_TMP:-0}" == 1 ]]; then
    echo "kept $TMP" >&2
  else
    rm -rf "$TMP"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mapfile -t PORTS < <(python3 bench/benchlib.py ports 11)
VALKEY_PORT=${PORTS[0]} TWEM_PORT=${PORTS[1]} TWEM_STATS_PORT=${PORTS[2]}
REST_PORT=${PORTS[3]} RESP_PORT=${PORTS[4]} NODE_PORT_1=${PORTS[5]} NODE_PORT_2=${PORTS[6]} TLS_PORT=${PORTS[7]}
EPOLL_PORT=${PORTS[8]} URING_PORT=${PORTS[9]} INTERNAL_PORT=${PORTS[10]}

wait_ping() { # port what pid [auth]
  local i auth=()
  [[ -n "${4:-}" ]] && auth=(--no-auth-warning -a "$4")
  for ((i = 0; i < 100; i++)); do
    alive "$3" || return 1
    [[ "$(redis-cli -h 127.0.0.1 -p "$1" "${auth[@]}" PING 2>/dev/null)" == PONG ]] && return 0
    sleep 0.1
  done
  return 1
}

log "starting valkey-server on 127.0.0.1:$VALKEY_PORT (persistence: $PERSISTENCE)"
# The same persistence as Shoal's nodes (AOF, fsync every second; or none on both), so that
# the ratios compare the proxies and not the Valkey configurations behind them.
if [[ "$PERSISTENCE" == aof ]]; then AOF_ARGS=(--appendonly yes --appendfsync everysec); else AOF_ARGS=(--appendonly no); fi
"$VALKEY_SERVER" --bind 127.0.0.1 --port "$VALKEY_PORT" --save "" "${AOF_ARGS[@]}" \
  --dir "$TMP/valkey" --logfile "$TMP/valkey.log" --daemonize no </dev/null >/dev/null 2>&1 &
VALKEY_PID=$!
wait_ping "$VALKEY_PORT" valkey "$VALKEY_PID" || { tail -n 20 "$TMP/valkey.log" >&2; die "valkey-server did not start"; }

log "starting nutcracker on 127.0.0.1:$TWEM_PORT (stats $TWEM_STATS_PORT)"
cat >"$TMP/nutcracker.yml" <<EOF
bench:
  listen: 127.0.0.1:$TWEM_PORT
  redis: true
  hash: fnv1a_64
  distribution: ketama
  servers:
   - 127.0.0.1:$VALKEY_PORT:1
EOF
"$NUTCRACKER" -c "$TMP/nutcracker.yml" -o "$TMP/nutcracker.log" -s "$TWEM_STATS_PORT" -a 127.0.0.1 \
  </dev/null >/dev/null 2>&1 &
NUTCRACKER_PID=$!
wait_ping "$TWEM_PORT" nutcracker "$NUTCRACKER_PID" || { tail -n 20 "$TMP/nutcracker.log" >&2; die "nutcracker did not start"; }

log "starting shoal dev (REST $REST_PORT, RESP $RESP_PORT, TLS $TLS_PORT, internal $INTERNAL_PORT, nodes $NODE_PORT_1,$NODE_PORT_2)"
# Free ports for every listener (the defaults are fixed ports); no reader endpoint, LFU or
# dedicated node; every client is 127.0.0.1, so room for its 50 TLS handshakes at once (the
# default, 20 per source, closes the others, and redis-benchmark waits for them forever);
# NO_COLOR: a plain-text log.
NO_COLOR=1 SHOAL_MAX_TLS_HANDSHAKES_PER_SOURCE=100 SHOAL_TLS_PORT="$TLS_PORT" SHOAL_READER_PORT=0 "$SHOAL" dev --data-dir "$TMP/.shoal" --rest-port "$REST_PORT" --resp-port "$RESP_PORT" \
  --internal-port "$INTERNAL_PORT" --node-ports "$NODE_PORT_1,$NODE_PORT_2" --lfu-nodes 0 --dedicated-nodes 0 </dev/null >"$TMP/shoal.out" 2>"$TMP/shoal.log" &
SHOAL_PID=$!
REST="http://127.0.0.1:$REST_PORT"
for ((i = 0; ; i++)); do
  alive "$SHOAL_PID" || die "shoal dev exited during startup"
  if curl -sf "$REST/healthz" >/dev/null 2>&1 && [[ -s "$TMP/.shoal/admin.token" ]]; then break; fi
  ((i < 600)) || die "shoal dev did not become healthy within 60 s"
  sleep 0.1
done
SHOAL_CHILDREN="$(pgrep -P "$SHOAL_PID" | tr '\n' ' ' || true)"
ADMIN="Authorization: Bearer $(cat "$TMP/.shoal/admin.token")"

reply="$(curl -s -X POST -H "$ADMIN" -d '{"name":"bench"}' "$REST/v1/caches")"
CACHE_ID="$(python3 bench/benchlib.py json-field id <<<"$reply" 2>/dev/null)" || die "creating the cache failed: $reply"
reply="$(curl -s -X POST -H "$ADMIN" -d '{"ttl_seconds": 3600}' "$REST/v1/caches/$CACHE_ID/tokens")"
TOKEN="$(python3 bench/benchlib.py json-field token <<<"$reply" 2>/dev/null)" || die "minting a token failed: $reply"
wait_ping "$RESP_PORT" gateway "$SHOAL_PID" "$TOKEN" || die "the gateway does not answer PING after AUTH"
if [[ "$PERSISTENCE" == none ]]; then
  # Shoal writes AOF into every node's config; turn it off at run time with the platform's
  # admin user (each node's directory holds its config, with the port, and admin.secret).
  for dir in "$TMP"/.shoal/valkey/*/; do
    port="$(awk '$1 == "port" {print $2}' "$dir/valkey.conf")"
    node_cli=(redis-cli -h 127.0.0.1 -p "$port" --user shoal --pass "$(cat "$dir/admin.secret")" --no-auth-warning)
    "${node_cli[@]}" CONFIG SET appendonly no >/dev/null
    [[ "$("${node_cli[@]}" CONFIG GET appendonly | tail -n 1)" == no ]] || die "could not turn AOF off on the node at port $port"
  done
  log "AOF turned off on Shoal's nodes"
fi
log "cache $CACHE_ID ready behind the gateway"
if ((FLOOR)); then
  log "starting the floor servers (epoll $EPOLL_PORT, io_uring $URING_PORT)"
  "$FLOOR_BIN" epoll "$EPOLL_PORT" </dev/null >"$TMP/floor-epoll.log" 2>&1 &
  EPOLL_PID=$!
  "$FLOOR_BIN" uring "$URING_PORT" </dev/null >"$TMP/floor-uring.log" 2>&1 &
  URING_PID=$!
  wait_ping "$EPOLL_PORT" floor-epoll "$EPOLL_PID" || die "the epoll floor server did not start: $(cat "$TMP/floor-epoll.log")"
  wait_ping "$URING_PORT" floor-uring "$URING_PID" || die "the io_uring floor server did not start: $(cat "$TMP/floor-uring.log")"
fi

# --- 4. Benchmark ---------------------------------------------------------------------------
port_of() { case "$1" in direct) echo "$VALKEY_PORT" ;; gateway) echo "$RESP_PORT" ;; tls) echo "$TLS_PORT" ;; twemproxy) echo "$TWEM_PORT" ;;
  floor_epoll) echo "$EPOLL_PORT" ;; floor_uring) echo "$URING_PORT" ;; esac; }

# The process that serves a target: its CPU time per request is the yardstick (throughput
# ratios do not resolve on a noisy machine; CPU time does). For the gateway, `shoal dev`'s
# process: the gateway and an idle control plane (the Valkey nodes are its children).
pid_of() { case "$1" in direct) echo "$VALKEY_PID" ;; gateway | tls) echo "$SHOAL_PID" ;; twemproxy) echo "$NUTCRACKER_PID" ;;
  floor_epoll) echo "$EPOLL_PID" ;; floor_uring) echo "$URING_PID" ;; esac; }
# utime and stime of a process, in clock ticks (/proc/<pid>/stat fields 14 and 15).
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12, $13 }' "/proc/$1/stat"; }

bench() { # target cmd pipeline requests outbase
  local auth=() rc=0 pid before after
  [[ "$1" == gateway ]] && auth=(-a "$TOKEN")
  # The dev certificate is self-signed: encrypted, not verified (as `redis-cli --insecure`).
  [[ "$1" == tls ]] && auth=(-a "$TOKEN" --tls --insecure)
  pid="$(pid_of "$1")"
  read -ra before <<<"$(cpu_ticks "$pid")"
  timeout --kill-after=10 "$TIMEOUT" redis-benchmark -h 127.0.0.1 -p "$(port_of "$1")" "${auth[@]}" \
    -c "$CLIENTS" -n "$4" -d "$DATA_SIZE" -P "$3" -r "$KEYSPACE" -t "$2" --csv \
    </dev/null >"$5.out" 2>"$5.err" || rc=$?
  # CPU ticks the serving process spent in user space and in the kernel, the requests, and
  # the clock's ticks per second.
  read -ra after <<<"$(cpu_ticks "$pid")"
  echo "$((after[0] - before[0])) $((after[1] - before[1])) $4 $(getconf CLK_TCK)" >"$5.cpu"
  echo "$rc" >"$5.rc"
  return "$rc"
}

# Is something else using the CPUs? (Everything this script started is idle now.)
LOADAVG_START="$(cut -d' ' -f1-3 /proc/loadavg)"
CPU_BUSY_BEFORE="$(python3 bench/benchlib.py cpu-busy 3)"
if ((CPU_BUSY_BEFORE >= 20 && WAIT_IDLE > 0)); then
  log "the CPUs are ${CPU_BUSY_BEFORE}% busy with other work; waiting up to ${WAIT_IDLE}s for them to calm down"
  deadline=$((SECONDS + WAIT_IDLE))
  while ((CPU_BUSY_BEFORE >= 20 && SECONDS < deadline)); do
    CPU_BUSY_BEFORE="$(python3 bench/benchlib.py cpu-busy 5)"
  done
fi
if ((CPU_BUSY_BEFORE >= 20)); then
  log "WARNING: the CPUs are ${CPU_BUSY_BEFORE}% busy with other work before the benchmark; expect noisy numbers"
fi
log "warming up (not recorded)"
mkdir -p "$TMP/warmup"
for target in "${TARGETS[@]}"; do
  for cmd in "${COMMANDS[@]}"; do
    bench "$target" "$cmd" 16 50000 "$TMP/warmup/$cmd-$target" || die "warm-up $cmd against $target failed (exit $?): $(tail -n 5 "$TMP/warmup/$cmd-$target".{out,err})"
  done
done

total=$((ROUNDS * ${#PIPELINES[@]} * ${#COMMANDS[@]} * ${#TARGETS[@]}))
run=0
for ((round = 1; round <= ROUNDS; round++)); do
  # Rotate the target order each round so no target always runs first (or last).
  order=()
  for ((k = 0; k < ${#TARGETS[@]}; k++)); do order+=("${TARGETS[(k + round - 1) % ${#TARGETS[@]}]}"); done
  for p in "${PIPELINES[@]}"; do
    n="$(requests_for "$p")"
    for cmd in "${COMMANDS[@]}"; do
      for target in "${order[@]}"; do
        run=$((run + 1))
        base="$RAW/$cmd-p$p-$target-r$round"
        start=$SECONDS
        rc=0
        bench "$target" "$cmd" "$p" "$n" "$base" || rc=$?
        rps="$( (grep -ai "^\"$cmd\"," "$base.out" || true) | tail -n 1 | cut -d, -f2 | tr -d '"')"
        printf '[%2d/%d] round %d  %-3s P%-2s %-9s %18s  (%ds%s)\n' "$run" "$total" "$round" \
          "${cmd^^}" "$p" "$target" "$([[ -n "$rps" ]] && echo "$rps ops/s" || echo FAILED)" $((SECONDS - start)) \
          "$( ((rc == 0)) || echo ", exit $rc")" >&2
        alive "$SHOAL_PID" || die "shoal dev died during the benchmark"
      done
    done
  done
done

LOADAVG_END="$(cut -d' ' -f1-3 /proc/loadavg)"

# Sanity: the SETs really landed (the gateway's cache and the plain valkey both hold keys).
DBSIZE_DIRECT="$(redis-cli -h 127.0.0.1 -p "$VALKEY_PORT" DBSIZE 2>/dev/null || true)"
DBSIZE_GATEWAY="$(redis-cli -h 127.0.0.1 -p "$RESP_PORT" --no-auth-warning -a "$TOKEN" DBSIZE 2>/dev/null || true)"

# --- 5. Report ------------------------------------------------------------------------------
TIMESTAMP="$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p bench/results
OUT="bench/results/gateway-$TIMESTAMP.json"
export PERSISTENCE TIMESTAMP ROUNDS CLIENTS DATA_SIZE KEYSPACE REQUESTS VALKEY_SERVER NUTCRACKER \
  DBSIZE_DIRECT DBSIZE_GATEWAY CACHE_ID LOADAVG_START LOADAVG_END CPU_BUSY_BEFORE
export GIT_COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
export GIT_DIRTY="$([[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]] && echo true || echo false)"
export VALKEY_VERSION="$("$VALKEY_SERVER" --version 2>&1 | head -n 1)"
export NUTCRACKER_VERSION="$("$NUTCRACKER" --version 2>&1 | head -n 1)"
export BENCHMARK_VERSION="$(redis-benchmark --version 2>&1 | head -n 1)"
export CPUS="$(nproc)"
python3 - "$TMP/meta.json" <<'PY'
import json, os, sys
e = os.environ
intval = lambda v: int(v) if v.strip().isdigit() else None
meta = {
    "benchmark": "gateway",
    "timestamp": e["TIMESTAMP"],
    "git_commit": e["GIT_COMMIT"],
    "git_dirty": e["GIT_DIRTY"] == "true",
    "cpus": int(e["CPUS"]),
    "rounds": int(e["ROUNDS"]),
    "clients": int(e["CLIENTS"]),
    "data_size": int(e["DATA_SIZE"]),
    "keyspace": int(e["KEYSPACE"]),
    "requests": {"1": int(e["REQUESTS"]), "16": int(e["REQUESTS"]) * 5},
    "versions": {
        "valkey_server": e["VALKEY_VERSION"],
        "nutcracker": e["NUTCRACKER_VERSION"],
        "redis_benchmark": e["BENCHMARK_VERSION"],
    },
    "persistence": e["PERSISTENCE"],
    "notes": "direct and twemproxy share one plain valkey-server; the gateway's cache lives on "
             "a shoal dev Valkey node; both with the persistence above (aof: appendfsync everysec)",
    "cpu_busy_before_pct": int(e["CPU_BUSY_BEFORE"]),
    "loadavg": {"before": e["LOADAVG_START"], "after": e["LOADAVG_END"]},
    "dbsize_after": {"direct_and_twemproxy": intval(e["DBSIZE_DIRECT"]),
                     "gateway_cache": intval(e["DBSIZE_GATEWAY"])},
}
with open(sys.argv[1], "w") as f:
    json.dump(meta, f)
PY
report_rc=0
python3 bench/benchlib.py report "$RAW" "$TMP/meta.json" "$OUT" || report_rc=$?
echo "keys after the run: plain valkey ${DBSIZE_DIRECT:-?}, gateway cache ${DBSIZE_GATEWAY:-?}"
exit "$report_rc"  # non-zero when a run failed; the EXIT trap then prints the shoal log's tail
