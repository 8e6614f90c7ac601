#!/usr/bin/env bash
# Makes the secrets deploy/docker/compose.yaml mounts, once, before the first `up`:
#   deploy/docker/make-secrets.sh [DIR]      (default: deploy/docker/secrets, never committed)
# - node.secret: the node secret of the control planes and engine agents;
# - postgres-password, and pgpass (the control planes' PGPASSFILE);
# - internal-ca.pem (with internal-ca-key.pem, which stays here), internal-cert.pem and
#   internal-key.pem: the internal API's certificate, for shoal-internal, control-plane-1
#   and control-plane-2 (so the alias can move without a new certificate);
# - tls-cert.pem and tls-key.pem: the gateways' RESP over TLS, for localhost, gateway-1 and
#   gateway-2 (signed by the same CA: clients trust internal-ca.pem).
# Files already there are kept. The folder is 0700; the files the containers read are 0644
# inside it (a bind-mounted secret keeps its mode, and the containers' user is not yours).
set -euo pipefail
dir="${1:-$(cd "$(dirname "$0")" && pwd)/secrets}"
mkdir -p "$dir"
chmod 0700 "$dir"
cd "$dir"
umask 077

[[ -s node.secret ]] || openssl rand -hex 32 > node.secret
[[ -s postgres-password ]] || openssl rand -hex 24 > postgres-password
[[ -s pgpass ]] || printf 'postgres:5432:shoal:shoal:%s\n' "$(cat postgres-password)" > pgpass

ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
if [[ ! -s internal-ca.pem ]]; then
  openssl req -x509 "${ec[@]}" -keyout internal-ca-key.pem -out internal-ca.pem -days 3650 \
    -subj "/CN=Shoal internal CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
# A leaf certificate signed by the CA: leaf NAME CN SANS
leaf() {
  [[ -s "$1-cert.pem" ]] && return
  openssl req "${ec[@]}" -keyout "$1-key.pem" -out "$1.csr" -subj "/CN=$2" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA internal-ca.pem -CAkey internal-ca-key.pem -CAcreateserial \
    -days 825 -out "$1-cert.pem" -extfile <(printf '%s\n' "subjectAltName=$3" \
      "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
      "extendedKeyUsage=serverAuth") 2>/dev/null
  rm -f "$1.csr"
}
leaf internal shoal-internal "DNS:shoal-internal,DNS:control-plane-1,DNS:control-plane-2"
leaf tls localhost "DNS:localhost,IP:127.0.0.1,DNS:gateway-1,DNS:gateway-2"

chmod 0644 node.secret postgres-password pgpass internal-ca.pem internal-cert.pem internal-key.pem \
  tls-cert.pem tls-key.pem
echo "secrets in $dir" >&2
