#!/usr/bin/env python3
"""Seal a value for piiguard with its sealing public key only (docs/FORMAT.md, "Sealed envelope v1").

A producer outside the trust boundary (a partner's batch job, an edge function) runs this; it can
encrypt for piiguard but never decrypt. Crypto.Unseal opens the envelope through Vault.

    python seal.py --public-key sealing.pem --key-version 1 \
        --keyspace orders --field email --context order_id=o-77 < value.txt

Prints the text form (ps1. + base64url). Needs the `cryptography` package.
"""
import argparse
import base64
import hashlib
import os
import struct
import sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = 1
KIND_HYBRID = 1
KIND_DIRECT = 2
DIRECT_MAX_VALUE = 158


def aad(header, keyspace, field, context):
    """The associated data: label, header, keyspace, field, context sorted by key (bytes)."""
    out = b"piiguard/sealed/v1" + header
    for s in (keyspace.encode(), field.encode()):
        out += struct.pack(">H", len(s)) + s
    items = sorted((k.encode(), v.encode()) for k, v in context.items())
    out += struct.pack(">H", len(items))
    for k, v in items:
        out += struct.pack(">H", len(k)) + k + struct.pack(">I", len(v)) + v
    return out


def seal(public_key_pem, key_version, keyspace, field, context, value, direct=False):
    """The binary sealed envelope of `value`."""
    key = serialization.load_pem_public_key(public_key_pem)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    kind = KIND_DIRECT if direct else KIND_HYBRID
    header = struct.pack(">BBI", VERSION, kind, key_version)
    a = aad(header, keyspace, field, context)
    if direct:
        if len(value) > DIRECT_MAX_VALUE:
            raise ValueError(f"the direct kind carries at most {DIRECT_MAX_VALUE} bytes")
        return header + key.encrypt(hashlib.sha256(a).digest() + value, oaep)
    aes_key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(12)
    return header + key.encrypt(aes_key, oaep) + nonce + AESGCM(aes_key).encrypt(nonce, value, a)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--public-key", required=True, help="sealing public key, PEM")
    p.add_argument("--key-version", required=True, type=int)
    p.add_argument("--keyspace", required=True)
    p.add_argument("--field", required=True)
    p.add_argument("--context", action="append", default=[], help="KEY=VALUE, repeatable")
    p.add_argument("--direct", action="store_true", help="direct kind (at most 158 bytes)")
    args = p.parse_args()
    context = dict(c.split("=", 1) for c in args.context)
    with open(args.public_key, "rb") as f:
        pem = f.read()
    env = seal(pem, args.key_version, args.keyspace, args.field, context,
               sys.stdin.buffer.read(), args.direct)
    print("ps1." + base64.urlsafe_b64encode(env).decode().rstrip("="))


if __name__ == "__main__":
    main()
