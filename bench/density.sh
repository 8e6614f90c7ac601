#!/usr/bin/env bash
# Density benchmark: N caches (default 100,000) on one node, created and deleted through the
# REST API by 4 concurrent clients; create/delete p50/p99 per band, node restart time, page
# and /metrics latency. Usage: bench/density.sh [--caches N] [--creators 4] [--keep]
set -euo pipefail
cd "$(dirname "$0")/.."
export SHOAL_VALKEY_SERVER="${SHOAL_VALKEY_SERVER:-$(scripts/setup.sh)}"
cargo build --release --quiet --bin shoal
exec python3 bench/density.py "$@"
