#!/usr/bin/env bash
# The README's second command (and CI's): install what the tests need, check formatting and
# lints, build once, and run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
# Each step says when it starts (seconds since the script began): where the time goes.
step() { echo "==> $* (at ${SECONDS} s)" >&2; }
trap 'echo "==> done in ${SECONDS} s" >&2' EXIT
# A CI run builds from scratch once: incremental compilation only adds work there.
if [[ "${CI:-}" == true ]]; then export CARGO_INCREMENTAL=0; fi
# The many-hosts tests (tests/it/hosts.rs: network namespaces, a PostgreSQL each, started by
# scripts/postgres.sh) skip, saying why, where namespaces cannot be made (not root); CI runs
# as root, so there they must run: a skip fails.
if [[ "${CI:-}" == true ]]; then export SHOAL_TEST_HOSTS=required; fi

# Setup always runs (it installs what the tests need); a preset SHOAL_VALKEY_SERVER wins.
valkey_server="$(scripts/setup.sh --test)"
export SHOAL_VALKEY_SERVER="${SHOAL_VALKEY_SERVER:-$valkey_server}"
echo "==> valkey-server: $SHOAL_VALKEY_SERVER ($("$SHOAL_VALKEY_SERVER" --version | cut -d' ' -f3))" >&2

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  # nextest does not run doctests; run them first so nextest's summary closes the log.
  cargo test --workspace --doc --quiet
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi

# The cluster lane: the command, client, gateway, reader and isolation suites again, with
# every platform's caches on a small Valkey cluster pool (2 shards × 1 replica); see
# docs/engine-cluster.md, "Tests". On failure, the tail of its shared platform's log.
step "tests on a cluster pool"
lane_log=target/tmp/shared-platform-cluster.log
rm -f "$lane_log"
show_lane_log() {
  for _ in $(seq 20); do [[ -f "$lane_log" ]] && break; sleep 1; done
  echo "==> the cluster lane's shared platform, last lines of its log:" >&2
  tail -n 60 "$lane_log" >&2 || true
  exit 1
}
if cargo nextest --version >/dev/null 2>&1; then
  SHOAL_TEST_ENGINE=cluster cargo nextest run --workspace --no-fail-fast -E "$(cat scripts/cluster-lane.filter)" ||
    show_lane_log
else
  SHOAL_TEST_ENGINE=cluster cargo test --no-fail-fast --test it -- commands:: clients:: gateway:: reader:: isolation:: \
    snapshots::every_data_type snapshots::a_snapshot_under_writes modules::json_and_bloom ||
    show_lane_log
fi

# The Postgres lane: the store and REST API tests again, on a real PostgreSQL server.
step "tests on PostgreSQL"
pg_dir="$(mktemp -d /tmp/shoal-pg.XXXXXX)"
trap 'scripts/postgres.sh stop "$pg_dir"; rm -rf "$pg_dir"; echo "==> done in ${SECONDS} s" >&2' EXIT
export SHOAL_TEST_POSTGRES_URL="$(scripts/postgres.sh start "$pg_dir")"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast -E "$(cat scripts/postgres-lane.filter)"
else
  # The same tests as the filter, as cargo test's name filters.
  mapfile -t lane < <(grep -oE '\^[a-z_]+::[a-z_]*' scripts/postgres-lane.filter | tr -d '^')
  cargo test --no-fail-fast --test it -- "${lane[@]}"
  cargo test --no-fail-fast -p shoal-control-plane
fi

