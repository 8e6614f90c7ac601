#!/usr/bin/env bash
# Snapshot and restore of a 1 GB cache on a node shared with other caches: builds shoal in
# release mode and runs bench/snapshot.py (its docstring says what it measures). Prints
# snapshot, restore and export time, the peak extra memory of the shoal process and of the
# node's fork child, and a neighbour cache's longest GET before, during the snapshot and
# during the restore. See docs/snapshots.md.
#
# usage: bench/snapshot.sh
#
# Environment:
#   BENCH_SNAPSHOT_MB   size of the cache's values in MB (default 1000)
set -euo pipefail

case "${1:-}" in
  -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
cd "$(dirname "$0")/.."
source bench/devlib.sh
export SHOAL_VALKEY_SERVER="${SHOAL_VALKEY_SERVER:-$(scripts/setup.sh)}"
python3 -c 'import redis' 2>/dev/null || die "redis-py not found (scripts/setup.sh --test installs it)"
log "building shoal (release)"
cargo build --release --bin shoal
mkdir -p bench/results
OUT="bench/results/snapshot-$(date -u +%Y%m%dT%H%M%SZ).log"  # *.log: ignored by git
{
  echo "# bench/snapshot.sh $(date -u +%FT%TZ), $(nproc) CPUs"
  python3 bench/snapshot.py
} | tee "$OUT"
