#!/bin/sh
# Seal a short value for piiguard with openssl alone (docs/FORMAT.md, "Sealed envelope v1",
# direct kind): RSA-OAEP-SHA256 of SHA-256(AAD) || value, at most 158 bytes. `openssl enc` has
# no AES-GCM, so the hybrid kind needs piiguard seal or examples/python/seal.py.
#
#   sh seal.sh sealing.pem KEY_VERSION KEYSPACE FIELD [KEY=VALUE ...] < value > envelope.txt
#
# Context entries must be given sorted by key (byte order). Prints the text form (ps1.…).
set -eu
[ $# -ge 4 ] || { echo "usage: $0 PUBLIC_KEY_PEM KEY_VERSION KEYSPACE FIELD [KEY=VALUE ...]" >&2; exit 2; }
pem=$1 version=$2 keyspace=$3 field=$4
shift 4
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Writes the bytes of an unsigned integer of $2 bytes, big-endian.
be() {
  hex=$(printf "%0$(( $2 * 2 ))x" "$1")
  while [ -n "$hex" ]; do
    rest=${hex#??}
    printf "\\$(printf '%03o' "0x${hex%"$rest"}")"
    hex=$rest
  done
}
# Length-prefixed string: $1 = width of the length, $2 = the string.
lp() { be "$(printf %s "$2" | wc -c)" "$1"; printf %s "$2"; }

{ printf '\001\002'; be "$version" 4; } > "$tmp/header"
{
  printf 'piiguard/sealed/v1'
  cat "$tmp/header"
  lp 2 "$keyspace"
  lp 2 "$field"
  be $# 2
  for kv in "$@"; do
    lp 2 "${kv%%=*}"
    lp 4 "${kv#*=}"
  done
} > "$tmp/aad"
openssl dgst -sha256 -binary "$tmp/aad" > "$tmp/msg"
cat >> "$tmp/msg"
[ "$(wc -c < "$tmp/msg")" -le 190 ] || { echo "value too long for the direct kind (158 bytes at most)" >&2; exit 1; }
openssl pkeyutl -encrypt -pubin -inkey "$pem" -in "$tmp/msg" -out "$tmp/rsa" \
  -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 -pkeyopt rsa_mgf1_md:sha256
printf 'ps1.'
cat "$tmp/header" "$tmp/rsa" | openssl base64 -A | tr '+/' '-_' | tr -d '='
echo
