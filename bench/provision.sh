#!/usr/bin/env bash
# Provisioning benchmark: 1,000 caches created then deleted through the REST API; prints
# p50/p99 of both. Usage: bench/provision.sh [--caches N]
set -euo pipefail
cd "$(dirname "$0")/.."
export SHOAL_VALKEY_SERVER="${SHOAL_VALKEY_SERVER:-$(scripts/setup.sh)}"
cargo build --release --quiet
exec python3 bench/provision.py "$@"
