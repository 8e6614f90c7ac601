"""A TLS client session: python3 tls.py PORT TOKEN CAFILE. Exits 3 if verification fails."""
import ssl
import sys

import redis

port, token, cafile = int(sys.argv[1]), sys.argv[2], sys.argv[3]
r = redis.Redis(host="127.0.0.1", port=port, password=token, ssl=True, ssl_ca_certs=cafile,
                ssl_cert_reqs="required", decode_responses=True)
try:
    r.set("over-tls", "yes")
except redis.exceptions.ConnectionError as e:
    if isinstance(e.__cause__, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(e):
        sys.exit(3)
    raise
assert r.get("over-tls") == "yes"
print("tls ok")
