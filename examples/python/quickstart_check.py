#!/usr/bin/env python3
"""Calling piiguard from Python, over mutual TLS.

This is the check CI runs against the README's quick start (`cargo run --release -- dev`), and a
small example of a piiguard client:

- mutual TLS from PEM files (by default the dev PKI in certs/dev/: CA, client certificate, key);
- a deadline on every call;
- Python stubs generated from proto/ at run time, into a temporary folder (no generated code in
  the repository);
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
import tempfile

import grpc
import grpc_tools
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[2]


def generate_stubs(proto_dir: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Compiles proto/ into Python modules under out_dir and makes them importable."""
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(proto_dir)) for p in proto_dir.rglob("*.proto"))
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            *protos,
        ]
    )
    if rc != 0:
        sys.exit(f"protoc failed ({rc}) on {proto_dir}")
    sys.path.insert(0, str(out_dir))


def mtls_channel(
    address: str, certs: pathlib.Path, client: str, server_name: str
) -> grpc.Channel:
    """A channel that presents a client certificate and verifies the server against the CA."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / f"client-{client}.key").read_bytes(),
        certificate_chain=(certs / f"client-{client}.pem").read_bytes(),
    )
    # Dial the address, but verify the name the server certificate carries (the dev one names
    # `localhost` and 127.0.0.1).
    options = [("grpc.ssl_target_name_override", server_name)]
    return grpc.secure_channel(address, credentials, options=options)


def explain(err: grpc.RpcError) -> tuple[str, str, str]:
    """The code, the stable ErrorInfo reason and the correlation id of a failed call."""
    reason, correlation_id = "", ""
    status = rpc_status.from_call(err)  # decodes the `grpc-status-details-bin` trailer
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
                correlation_id = info.metadata.get("correlation_id", "")
    return err.code().name, reason, correlation_id


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

    with tempfile.TemporaryDirectory(prefix="piiguard-stubs-") as tmp:
        generate_stubs(ROOT / "proto", pathlib.Path(tmp))
        from piiguard.v1 import crypto_pb2, crypto_pb2_grpc

        with mtls_channel(args.address, args.certs, args.client, args.server_name) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=args.deadline
            )
            serving = health.status == health_pb2.HealthCheckResponse.SERVING
            print(f"Health/Check: {health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)}")
            if not serving:
                return 1

            crypto = crypto_pb2_grpc.CryptoStub(channel)
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
