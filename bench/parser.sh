#!/usr/bin/env bash
# Request framing: Shoal's incremental parser vs the redis-protocol crate, 16 KiB reads.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet --release -p shoal-gateway --example parse_bench
