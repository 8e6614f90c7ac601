#!/usr/bin/env bash
# Starts a throwaway PostgreSQL server for the Postgres test lane and prints its URL:
#   scripts/postgres.sh start <dir> [address]   → postgres://shoal@<address>:<port>/postgres
#   scripts/postgres.sh stop <dir>
# It listens on 127.0.0.1 unless given another address (the many-hosts tests run it in a
# network namespace on that namespace's address); it then also trusts clients of the
# subnets that address is on (pg_hba `samenet`), a throwaway server on a test network.
# Debian's postgresql package (installed by scripts/setup.sh --test) provides the binaries.
# PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user.
set -euo pipefail
cmd="$1" dir="$2" addr="${3:-127.0.0.1}"
bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
as_owner() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }

case "$cmd" in
start)
  mkdir -p "$dir"
  [[ $(id -u) == 0 ]] && chown postgres "$dir"
  port="$(python3 -c 'import socket, sys; s=socket.socket(); s.bind((sys.argv[1],0)); print(s.getsockname()[1])' "$addr")"
  as_owner "$bin/initdb" -D "$dir/data" -A trust -U shoal >"$dir/initdb.log" 2>&1
  if [[ "$addr" != 127.0.0.1 ]]; then
    echo "host all all samenet trust" | as_owner tee -a "$dir/data/pg_hba.conf" >/dev/null
  fi
  as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -o \
    "-p $port -k $dir -c listen_addresses=$addr -c fsync=off -c synchronous_commit=off -c max_connections=300" \
    start >/dev/null
  echo "postgres://shoal@$addr:$port/postgres"
  ;;
stop)
  as_owner "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true
  ;;
esac
