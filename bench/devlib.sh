# Shell functions for the benchmarks that start `shoal dev` themselves (sourced, not run).

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf '\033[1;31mERROR: %s\033[0m\n' "$*" >&2; exit 1; }

# CPU ticks (user + system) process $1 has used so far.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# wait_dev PID REST_URL DATA_DIR LOG: until the platform answers /healthz and has written its
# admin token (or exits: then the tail of its log, and an error).
wait_dev() {
  local i
  for ((i = 0; ; i++)); do
    kill -0 "$1" 2>/dev/null || { tail -n 20 "$4" >&2; die "shoal dev ($3) exited"; }
    curl -sf "$2/healthz" >/dev/null 2>&1 && [[ -s "$3/admin.token" ]] && return 0
    ((i < 900)) || die "shoal dev ($3) did not start within 90 s"
    sleep 0.1
  done
}

# cache_token REST_URL DATA_DIR JSON: creates a cache (JSON: its fields) and prints a
# one-hour token for it.
cache_token() {
  local admin reply cache
  admin="Authorization: Bearer $(cat "$2/admin.token")"
  reply="$(curl -s -X POST -H "$admin" -d "$3" "$1/v1/caches")"
  cache="$(python3 bench/benchlib.py json-field id <<<"$reply")" || die "creating a cache ($3) failed: $reply"
  reply="$(curl -s -X POST -H "$admin" -d '{"ttl_seconds": 3600}' "$1/v1/caches/$cache/tokens")"
  python3 bench/benchlib.py json-field token <<<"$reply" || die "minting a token failed: $reply"
}

# wait_ping PORT TOKEN: until the gateway answers PING as that token's cache.
wait_ping() {
  local i
  for ((i = 0; i < 100; i++)); do
    [[ "$(redis-cli -p "$1" --no-auth-warning -a "$2" PING 2>/dev/null)" == PONG ]] && return 0
    sleep 0.1
  done
  die "the gateway on port $1 does not answer PING"
}
