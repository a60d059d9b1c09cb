"""A small piiguard client for Python services: mutual TLS, deadlines, retries, typed errors.

    from piiguard_client import Piiguard
    pg = Piiguard.from_files("127.0.0.1:7443", ca="ca.pem", cert="client.pem", key="client.key")
    ct = pg.encrypt("orders", "customer-1", "email", b"alice@example.com")
    assert pg.decrypt("email", ct) == b"alice@example.com"

- Stubs are generated from the repository's proto/ at import time into a temporary folder (no
  generated code in the repository); a service of yours would generate them in its build.
- Every call has a deadline (the whole call, retries included: each attempt gets what is left).
- Retries, with exponential backoff and full jitter, only where piiguard says a retry can help:
  UNAVAILABLE (Vault, store or audit log down; a replica stopping; a dropped connection),
  RESOURCE_EXHAUSTED / RATE_LIMITED and RESOURCE_EXHAUSTED / VAULT_OVERLOADED. Every other error is final and raised at once as a
  `PiiguardError` whose `reason` is the stable ErrorInfo reason (docs/OPERATIONS.md, Errors):
  match on the reason, never on the message. `correlation_id` names the server's log line and
  audit record.
- Retrying these calls is safe: Encrypt makes a new ciphertext per attempt and stores nothing;
  Decrypt, Detokenize, BlindIndex, deterministic Tokenize and Shred (same request_id) change
  nothing on a repeat. A random Tokenize stores a token row per call, so an attempt whose
  answer was lost may have stored one: it is retried only on RATE_LIMITED (refused before any
  work), as the Rust client (`client/`) does.
"""

from __future__ import annotations

import atexit
import pathlib
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import grpc
import grpc_tools
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[2]

# (gRPC code, reason or None for any reason) that a retry may fix.
RETRYABLE = {
    (grpc.StatusCode.UNAVAILABLE, None),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "VAULT_OVERLOADED"),
}


def _generate_stubs(proto_dir: pathlib.Path) -> None:
    out = pathlib.Path(tempfile.mkdtemp(prefix="piiguard-stubs-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(proto_dir)) for p in proto_dir.rglob("*.proto"))
    rc = protoc.main(["grpc_tools.protoc", f"-I{proto_dir}", f"-I{well_known}",
                      f"--python_out={out}", f"--grpc_python_out={out}", *protos])
    if rc != 0:
        raise RuntimeError(f"protoc failed ({rc}) on {proto_dir}")
    sys.path.insert(0, str(out))


_generate_stubs(ROOT / "proto")
from piiguard.v1 import crypto_pb2, crypto_pb2_grpc  # noqa: E402
from piiguard.v1 import erasure_pb2, erasure_pb2_grpc  # noqa: E402
from piiguard.v1 import tokens_pb2, tokens_pb2_grpc  # noqa: E402


@dataclass
class PiiguardError(Exception):
    """A call that failed for good: the gRPC code, the stable reason, the correlation id."""

    code: grpc.StatusCode
    reason: str
    message: str
    correlation_id: str
    attempts: int = 1

    def __str__(self) -> str:
        return (f"{self.code.name} {self.reason or '-'}: {self.message} "
                f"(correlation_id {self.correlation_id or '-'}, {self.attempts} attempt(s))")

    @staticmethod
    def of(err: grpc.RpcError, attempts: int) -> "PiiguardError":
        reason, correlation_id = "", ""
        status = rpc_status.from_call(err)  # the google.rpc.Status trailer, if any
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason = info.reason
                    correlation_id = info.metadata.get("correlation_id", "")
        return PiiguardError(err.code(), reason, err.details() or "", correlation_id, attempts)

    @property
    def retryable(self) -> bool:
        return (self.code, None) in RETRYABLE or (self.code, self.reason) in RETRYABLE

    @property
    def refused_before_work(self) -> bool:
        """A rate limit is decided before any work: even a call that stores something (a
        random Tokenize) can be sent again."""
        return (self.code, self.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")


class Piiguard:
    """One channel (connections are reused), the stubs, and the retry policy."""

    def __init__(self, channel: grpc.Channel, deadline: float = 10.0, attempts: int = 4,
                 backoff: float = 0.05, backoff_cap: float = 2.0):
        self.channel = channel
        self.deadline, self.attempts = deadline, attempts
        self.backoff, self.backoff_cap = backoff, backoff_cap
        self.crypto = crypto_pb2_grpc.CryptoStub(channel)
        self.tokens = tokens_pb2_grpc.TokensStub(channel)
        self.erasure = erasure_pb2_grpc.ErasureStub(channel)
        self.retries = 0  # how many retries were made, for tests and metrics

    @classmethod
    def from_files(cls, address: str, ca: str | pathlib.Path, cert: str | pathlib.Path,
                   key: str | pathlib.Path, server_name: str | None = None, **kw) -> "Piiguard":
        """mTLS from PEM files (a SPIFFE SVID bundle is the same three files)."""
        creds = grpc.ssl_channel_credentials(
            root_certificates=pathlib.Path(ca).read_bytes(),
            private_key=pathlib.Path(key).read_bytes(),
            certificate_chain=pathlib.Path(cert).read_bytes())
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        return cls(grpc.secure_channel(address, creds, options=options), **kw)

    def close(self) -> None:
        self.channel.close()

    def call(self, method, request, deadline: float | None = None, idempotent: bool = True):
        """Calls `method` with retries on retryable errors, all within `deadline` seconds. A
        call that is not idempotent is retried only when the server refused it before doing
        anything (RATE_LIMITED)."""
        end = time.monotonic() + (deadline or self.deadline)
        for attempt in range(1, self.attempts + 1):
            left = end - time.monotonic()
            try:
                return method(request, timeout=max(left, 0.001))
            except grpc.RpcError as err:
                e = PiiguardError.of(err, attempt)
                pause = random.uniform(0, min(self.backoff_cap, self.backoff * 2 ** attempt))
                again = e.retryable if idempotent else e.refused_before_work
                if not again or attempt == self.attempts or time.monotonic() + pause >= end:
                    raise e from None
                self.retries += 1
                time.sleep(pause)
        raise AssertionError("unreachable")

    # --- Crypto ------------------------------------------------------------------------------
    def encrypt(self, keyspace: str, subject: str, field: str, plaintext: bytes,
                context: dict[str, str] | None = None, text: bool = True,
                blind_index: bool = False):
        """The ciphertext (text form by default); with `blind_index`, (ciphertext, index)."""
        r = self.call(self.crypto.Encrypt, crypto_pb2.EncryptRequest(
            keyspace=keyspace, subject=subject, field=field, plaintext=plaintext,
            context=context or {}, blind_index=blind_index,
            encoding=crypto_pb2.CIPHERTEXT_ENCODING_TEXT if text else 0))
        return (r.ciphertext, r.blind_index) if blind_index else r.ciphertext

    def decrypt(self, field: str, ciphertext: bytes, context: dict[str, str] | None = None,
                masked: bool = False) -> bytes:
        r = self.call(self.crypto.Decrypt, crypto_pb2.DecryptRequest(
            field=field, ciphertext=ciphertext, context=context or {},
            reveal=crypto_pb2.REVEAL_MODE_MASKED if masked else 0))
        return r.plaintext

    def blind_indexes(self, keyspace: str, field: str, value: bytes) -> list[str]:
        """Every index to query with (all queryable index key versions, newest first)."""
        r = self.call(self.crypto.BlindIndex, crypto_pb2.BlindIndexRequest(
            keyspace=keyspace, field=field, value=value))
        return [v.index for v in r.all] or [r.index]

    # --- Tokens ------------------------------------------------------------------------------
    def tokenize(self, keyspace: str, subject: str, field: str, value: str,
                 deterministic: bool = False) -> str:
        r = self.call(self.tokens.Tokenize, tokens_pb2.TokenizeRequest(
            keyspace=keyspace, subject=subject, field=field, value=value,
            mode=tokens_pb2.TOKEN_MODE_DETERMINISTIC if deterministic else 0),
            idempotent=deterministic)
        return r.token

    def detokenize(self, keyspace: str, token: str) -> str:
        return self.call(self.tokens.Detokenize,
                         tokens_pb2.DetokenizeRequest(keyspace=keyspace, token=token)).value

    # --- Erasure -----------------------------------------------------------------------------
    def shred(self, subject: str, keyspace: str, request_id: str, reason: str = "erasure request"):
        """Shreds a subject (idempotent: resend with the same request_id after any failure)."""
        return self.call(self.erasure.Shred, erasure_pb2.ShredRequest(
            subject=subject, keyspace=keyspace, request_id=request_id, reason=reason))
