#!/usr/bin/env bash
# Failover under load: a cluster pool (3 shards x 1 replica, on loopback), one cache, and a
# checker that writes known keys across every shard (routed by slot, following MOVED) while
# the primary of one shard is killed with SIGKILL; afterwards every acknowledged key is read
# back. Once with plain writes (async replication) and once with `WAIT 1 <ms>` after each
# write, for each node timeout. Prints per run: writes acknowledged and failed, the seconds
# during which writes to the dead shard's slots failed, and the acknowledged writes lost.
# The checker is engine/tests/support/checker.rs, run by the ignored test
# `failover_figures` in engine/tests/cluster.rs. See docs/engine-cluster.md.
#
# Environment:
#   FAILOVER_NODE_TIMEOUTS  cluster-node-timeout values in ms (default "1000 5000")
#   FAILOVER_WAITS          WAIT timeouts in ms; 0 = plain writes (default "0 100")
#   FAILOVER_SECONDS        writing after the kill (default: 6 + 3 x node timeout, at least 10)
#   FAILOVER_WRITERS        concurrent writers, one connection per shard each (default 4)
#   BENCH_PROFILE           release (default) or debug (the figures are the cluster's timing;
#                           a debug client writes less per second, so loses fewer writes)
set -euo pipefail

case "${1:-}" in
  "") ;;
  -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: $0 [--help]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
TIMEOUTS="${FAILOVER_NODE_TIMEOUTS:-1000 5000}"
WAITS="${FAILOVER_WAITS:-0 100}"
WRITERS="${FAILOVER_WRITERS:-4}"
PROFILE="${BENCH_PROFILE:-release}"
case "$PROFILE" in
  release) PROFILE_FLAG=(--release) ;;
  debug) PROFILE_FLAG=() ;;
  *) echo "BENCH_PROFILE must be release or debug" >&2; exit 2 ;;
esac

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

export SHOAL_VALKEY_SERVER="${SHOAL_VALKEY_SERVER:-$(scripts/setup.sh)}"
log "building the engine's cluster tests ($PROFILE)"
nice cargo test -p shoal-engine --test cluster "${PROFILE_FLAG[@]}" --no-run

mkdir -p bench/results
OUT="bench/results/failover-$(date -u +%Y%m%dT%H%M%SZ).log"  # *.log: ignored by git
{
  echo "# bench/failover.sh $(date -u +%FT%TZ), $(nproc) CPUs, profile $PROFILE, $WRITERS writers"
  echo "# valkey-server $("$SHOAL_VALKEY_SERVER" --version | cut -d' ' -f3)"
} >"$OUT"
for timeout in $TIMEOUTS; do
  seconds="${FAILOVER_SECONDS:-$(( 6 + 3 * timeout / 1000 ))}"
  (( seconds < 10 )) && seconds=10
  for wait in $WAITS; do
    log "node timeout ${timeout} ms, WAIT ${wait} ms, ${seconds} s of writes after the kill"
    FAILOVER_NODE_TIMEOUT_MS="$timeout" FAILOVER_WAIT_MS="$wait" FAILOVER_SECONDS="$seconds" \
      FAILOVER_WRITERS="$WRITERS" \
      cargo test -q -p shoal-engine --test cluster "${PROFILE_FLAG[@]}" -- \
        --ignored --exact failover_figures --nocapture 2>&1 |
      grep '^FIGURE' | tee -a "$OUT"
  done
done
log "written to $OUT"
