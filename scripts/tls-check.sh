#!/usr/bin/env bash
# TLS from outside, as a scanner and a stranger see it (issue 13): sslyze and openssl s_client
# against a running piiguard. Passes only if
#   - sslyze: TLS 1.2 and 1.3 are accepted, SSL 2/3 and TLS 1.0/1.1 are not; the client
#     certificate is REQUIRED; every accepted suite has forward secrecy and an AEAD cipher;
#   - openssl: a client WITH the right certificate completes a handshake and reads (the control,
#     so that the refusals below mean something); without a certificate, with a certificate of
#     another CA, and with TLS 1.1, the server refuses.
# Usage: scripts/tls-check.sh HOST:PORT CA.pem CLIENT.pem CLIENT.key
# Needs openssl, and a Python with sslyze: $PIIGUARD_SSLYZE_PYTHON (default .venv-tls/bin/python;
# `.ci/run` makes it with `python3 -m venv .venv-tls && .venv-tls/bin/pip install sslyze`).
set -euo pipefail
addr=$1 ca=$2 cert=$3 key=$4
py=${PIIGUARD_SSLYZE_PYTHON:-.venv-tls/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0
ok() { echo "tls-check: ok: $*"; }
bad() { echo "tls-check: FAIL: $*" >&2; fail=1; }

# --- sslyze -------------------------------------------------------------------------------
timeout 120 "$py" -m sslyze "$addr" --sslv2 --sslv3 --tlsv1 --tlsv1_1 --tlsv1_2 --tlsv1_3 \
  --json_out="$tmp/scan.json" >"$tmp/sslyze.log" 2>&1 || { cat "$tmp/sslyze.log" >&2; bad "sslyze did not run"; }
if [ -s "$tmp/scan.json" ]; then
  if "$py" - "$tmp/scan.json" <<'PY'; then ok "sslyze: TLS 1.2 + 1.3 only, client certificate REQUIRED, ECDHE + AEAD suites only"; else bad "sslyze findings above"; fi
import json, sys
r = json.load(open(sys.argv[1]))["server_scan_results"][0]
errors = []
if r["scan_status"] != "COMPLETED":
    errors.append(f"scan status {r['scan_status']}")
else:
    if r["connectivity_result"]["client_auth_requirement"] != "REQUIRED":
        errors.append(f"client auth is {r['connectivity_result']['client_auth_requirement']}, not REQUIRED")
    s = r["scan_result"]
    def suites(k):
        v = s[k]
        if v["status"] != "COMPLETED":
            errors.append(f"{k}: {v['status']}")
            return []
        return [c["cipher_suite"]["name"] for c in v["result"]["accepted_cipher_suites"]]
    for k in ["ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites", "tls_1_1_cipher_suites"]:
        if suites(k):
            errors.append(f"{k} accepted: {suites(k)}")
    t12, t13 = suites("tls_1_2_cipher_suites"), suites("tls_1_3_cipher_suites")
    if not t12 or not t13:
        errors.append(f"TLS 1.2 ({len(t12)} suites) and TLS 1.3 ({len(t13)} suites) must both be served")
    for name in t12:
        if "_ECDHE_" not in name or not ("_GCM_" in name or "CHACHA20_POLY1305" in name):
            errors.append(f"weak TLS 1.2 suite {name} (no forward secrecy or no AEAD)")
    print("accepted:", t12 + t13)
for e in errors:
    print("sslyze:", e, file=sys.stderr)
sys.exit(1 if errors else 0)
PY
fi

# --- openssl s_client ---------------------------------------------------------------------
# A stranger's certificate: its own CA, a SPIFFE id that the policy would otherwise accept.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=other-ca \
  -keyout "$tmp/oca.key" -out "$tmp/oca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=intruder \
  -keyout "$tmp/o.key" -out "$tmp/o.csr" 2>/dev/null
spiffe=$(openssl x509 -in "$cert" -noout -ext subjectAltName 2>/dev/null | grep -o 'URI:[^, ]*' | head -1 || true)
printf 'subjectAltName=%s\n' "${spiffe:-URI:spiffe://shop.local/orders}" >"$tmp/ext"
openssl x509 -req -in "$tmp/o.csr" -CA "$tmp/oca.pem" -CAkey "$tmp/oca.key" -CAcreateserial \
  -days 1 -extfile "$tmp/ext" -out "$tmp/o.pem" 2>/dev/null

# A refused handshake shows as a non-zero exit and a TLS alert (with TLS 1.3 the client learns
# of the refusal at its first read, after its side of the handshake is done: stdin stays open
# for 2 s so that s_client is still reading when the alert comes).
s_client() { sleep 2 | timeout 15 openssl s_client -connect "$addr" -servername localhost -CAfile "$ca" "$@" >"$tmp/s.log" 2>&1; }
if s_client -cert "$cert" -key "$key" && grep -q "Verify return code: 0" "$tmp/s.log" && ! grep -qi "alert" "$tmp/s.log"; then
  ok "openssl with the right client certificate: handshake and read"
else
  cat "$tmp/s.log" >&2; bad "openssl with the right client certificate did not connect (the control)"
fi
for case in none other-ca tls1.1 tls1.2-none; do
  case $case in
    none) args=() ;;
    other-ca) args=(-cert "$tmp/o.pem" -key "$tmp/o.key") ;;
    tls1.1) args=(-tls1_1 -cipher 'DEFAULT:@SECLEVEL=0' -cert "$cert" -key "$key") ;;
    tls1.2-none) args=(-tls1_2) ;;
  esac
  if s_client "${args[@]}"; then
    cat "$tmp/s.log" >&2; bad "openssl ($case) was not refused"
  elif alert=$(grep -oiE "alert [a-z ]+" "$tmp/s.log" | head -1) && [ -n "$alert" ]; then
    ok "openssl ($case) refused: $alert"
  else
    cat "$tmp/s.log" >&2; bad "openssl ($case) failed without a TLS alert"
  fi
done
exit $fail
