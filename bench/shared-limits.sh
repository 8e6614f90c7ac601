#!/usr/bin/env bash
# The README's figure for limits shared by gateways: a cache limited to 5,000 ECPU/s, driven
# flat out through 3 gateways (`shoal gateway` processes in front of one `shoal
# control-plane`), measured over 30 s. Runs the integration test
# `limits::an_ecpu_limit_holds_across_three_gateways` in a release build with those figures
# (the test suite runs it at 300 ECPU/s for 8 s) and prints its FIGURE line.
set -euo pipefail
cd "$(dirname "$0")/.."
valkey_server="$(scripts/setup.sh --test)"
export SHOAL_VALKEY_SERVER="${SHOAL_VALKEY_SERVER:-$valkey_server}"
export SHOAL_SHARED_LIMIT="${SHOAL_SHARED_LIMIT:-5000,30}"
cargo nextest run --release --test it --no-capture \
  -E 'test(=limits::an_ecpu_limit_holds_across_three_gateways)' 2>&1 | grep -E '^FIGURE|PASS|FAIL'
