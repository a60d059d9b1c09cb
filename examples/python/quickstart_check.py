#!/usr/bin/env python3
"""Calling piiguard from Python, over mutual TLS.

This is the check CI runs against the README's quick start (`cargo run --release -- dev`), and a
small example of a piiguard client:

- mutual TLS from PEM files (by default the dev PKI in certs/dev/: CA, client certificate, key);
- a deadline on every call;
- Python stubs generated from proto/ at run time, into a temporary folder (no generated code in
  the repository), by the client module beside it (`piiguard_client.py`);
- errors: the gRPC code, plus the google.rpc.ErrorInfo piiguard attaches to every error, whose
  `reason` is stable (match on it, not on the message) and whose metadata holds the
  `correlation_id` that also names the server's log line and audit record.

    python3 -m venv .venv && .venv/bin/pip install -r examples/python/requirements.txt
    cargo run --release -- dev                                  # in another terminal
    .venv/bin/python examples/python/quickstart_check.py

Exit status 0 when Health is SERVING, an Encrypt/Decrypt round trip returns the plaintext and an
Encrypt into an unconfigured keyspace fails with INVALID_ARGUMENT / UNKNOWN_KEYSPACE.
"""

import argparse
import pathlib
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# Generates the stubs from proto/ (once, at import) and knows how to read piiguard's errors.
from piiguard_client import ROOT, Piiguard, PiiguardError, crypto_pb2


def explain(err: grpc.RpcError) -> tuple[str, str, str]:
    """The code, the stable ErrorInfo reason and the correlation id of a failed call."""
    e = PiiguardError.of(err, attempts=1)
    return e.code.name, e.reason, e.correlation_id


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--address", default="127.0.0.1:7443", help="piiguard's mTLS listener")
    ap.add_argument("--server-name", default="localhost", help="name to verify in its certificate")
    ap.add_argument("--certs", type=pathlib.Path, default=ROOT / "certs" / "dev",
                    help="folder with ca.pem and client-NAME.{pem,key}")
    ap.add_argument("--client", default="orders",
                    help="client certificate to present (orders: spiffe://shop.local/orders)")
    ap.add_argument("--deadline", type=float, default=10.0, help="seconds per call")
    args = ap.parse_args()

    client = Piiguard.from_files(
        args.address,
        ca=args.certs / "ca.pem",
        cert=args.certs / f"client-{args.client}.pem",
        key=args.certs / f"client-{args.client}.key",
        server_name=args.server_name,
    )
    with client.channel as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=args.deadline
        )
        serving = health.status == health_pb2.HealthCheckResponse.SERVING
        print(f"Health/Check: {health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)}")
        if not serving:
            return 1

        crypto = client.crypto
        plaintext = b"alice@example.com"
        context = {"table": "orders.customer_email"}
        encrypted = crypto.Encrypt(
            crypto_pb2.EncryptRequest(
                keyspace="orders",
                subject="customer-1",
                field="email",
                plaintext=plaintext,
                context=context,
                encoding=crypto_pb2.CIPHERTEXT_ENCODING_TEXT,
            ),
            timeout=args.deadline,
        )
        print(f"Crypto/Encrypt: {encrypted.ciphertext.decode('ascii')}")
        decrypted = crypto.Decrypt(
            crypto_pb2.DecryptRequest(
                field="email", ciphertext=encrypted.ciphertext, context=context
            ),
            timeout=args.deadline,
        )
        if decrypted.plaintext != plaintext:
            print("Crypto/Decrypt: round trip returned another value", file=sys.stderr)
            return 1
        print("Crypto/Decrypt: round trip ok")

        # An error on purpose, to show what a caller gets: a keyspace the server lacks.
        try:
            crypto.Encrypt(
                crypto_pb2.EncryptRequest(
                    keyspace="payroll", subject="customer-1", field="email", plaintext=b"x"
                ),
                timeout=args.deadline,
            )
        except grpc.RpcError as err:
            code, reason, correlation_id = explain(err)
            print(f"Crypto/Encrypt into 'payroll': {code} {reason} "
                  f"(correlation_id {correlation_id}): {err.details()}")
            if (code, reason) != ("INVALID_ARGUMENT", "UNKNOWN_KEYSPACE") or not correlation_id:
                return 1
        else:
            print("Crypto/Encrypt into 'payroll' succeeded; expected UNKNOWN_KEYSPACE",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except grpc.RpcError as err:
        code, reason, correlation_id = explain(err)
        sys.exit(f"piiguard call failed: {code} {reason or '-'} "
                 f"(correlation_id {correlation_id or '-'}): {err.details()}")
