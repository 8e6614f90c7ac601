#!/usr/bin/env bash
# Resource-isolation soak (issue: one tenant cannot hurt another): 4 hostile caches (runaway
# script, big pipelines never read, pattern storm, connection flood) next to 4 well-behaved
# ones on one `shoal dev`, for SOAK_SECONDS (default 300). Prints the victims' errors and
# latencies and the RSS peaks of the gateway process and the Valkey nodes; writes
# bench/results/soak-<timestamp>.json. Not a test: it asserts nothing, it measures.
#
# Environment:
#   SOAK_SECONDS       how long the attack lasts (default 300)
#   SOAK_PROFILE       release (default) or debug: which build of shoal to run
#   SOAK_SCRIPT_LIMIT  the platform's script time limit in seconds (default: shoal's)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PROFILE="${SOAK_PROFILE:-release}"
log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

export SHOAL_VALKEY_SERVER="${SHOAL_VALKEY_SERVER:-$(scripts/setup.sh)}"
log "building shoal ($PROFILE)"
if [[ "$PROFILE" == release ]]; then cargo build --release --bin shoal; else cargo build --bin shoal; fi
BIN="${CARGO_TARGET_DIR:-target}/$PROFILE/shoal"

tmp="$(mktemp -d /tmp/shoal-soak.XXXXXX)"
read -r REST RESP TLS N0 N1 < <(python3 bench/benchlib.py ports 5 | paste -sd' ')
extra=()
[[ -n "${SOAK_SCRIPT_LIMIT:-}" ]] && extra+=(--script-time-limit "$SOAK_SCRIPT_LIMIT")
log "starting shoal dev in $tmp"
"$BIN" dev --data-dir "$tmp/.shoal" --rest-port "$REST" --resp-port "$RESP" --tls-port "$TLS" --reader-port 0 \
  --node-ports "$N0,$N1" --databases 64 "${extra[@]}" >"$tmp/shoal.log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 1 300); do
  [[ -s "$tmp/.shoal/admin.token" ]] && curl -sf "http://127.0.0.1:$REST/readyz" >/dev/null && break
  kill -0 $pid 2>/dev/null || { cat "$tmp/shoal.log" >&2; exit 1; }
  sleep 0.1
done
nodes="$(cat "$tmp"/.shoal/valkey/n*/valkey.pid | paste -sd,)"
mkdir -p bench/results
out="bench/results/soak-$(date -u +%Y%m%dT%H%M%SZ).json"
log "soak for ${SOAK_SECONDS:-300} s"
python3 bench/soak.py "$out" --rest "$REST" --resp "$RESP" --admin-token "$tmp/.shoal/admin.token" \
  --pid "$pid" --node-pids "$nodes"
grep -cE "script ran past the time limit|could not be killed|memory over its guard|scripts pause" "$tmp/shoal.log" | sed 's/^/shoal log lines about scripts ended or paused: /' || true
log "wrote $out"
