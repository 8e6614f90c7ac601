#!/usr/bin/env bash
# The README's first command: install what is missing, build, and run `shoal dev`.
# Extra arguments go to `shoal dev` (see `shoal dev --help`).
set -euo pipefail
cd "$(dirname "$0")/.."

export SHOAL_VALKEY_SERVER="${SHOAL_VALKEY_SERVER:-$(scripts/setup.sh)}"
echo "==> building shoal (release)" >&2
cargo build --release --bin shoal
exec "${CARGO_TARGET_DIR:-target}/release/shoal" dev "$@"
