#!/usr/bin/env python3
"""piiguard from a Python service: encrypt with a blind index, search, decrypt, tokenise, shred.

Runs against the README's quick start (`cargo run --release -- dev`, dev certificates in
certs/dev/); CI runs it there. Each step prints what it did; any surprise exits non-zero.

    .venv/bin/pip install -r examples/python/requirements.txt
    .venv/bin/python examples/python/client_demo.py [--address 127.0.0.1:7443]
"""

import argparse
import pathlib
import sys
import uuid

from piiguard_client import ROOT, Piiguard, PiiguardError


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--address", default="127.0.0.1:7443")
    ap.add_argument("--server-name", default="localhost")
    ap.add_argument("--certs", type=pathlib.Path, default=ROOT / "certs" / "dev")
    ap.add_argument("--deadline", type=float, default=10.0)
    a = ap.parse_args()

    def connect(who: str) -> Piiguard:
        return Piiguard.from_files(a.address, a.certs / "ca.pem", a.certs / f"client-{who}.pem",
                                   a.certs / f"client-{who}.key", a.server_name,
                                   deadline=a.deadline)

    orders, erasure = connect("orders"), connect("erasure")
    run = uuid.uuid4().hex[:8]  # fresh subjects on every run

    # An "orders" table of the calling service: id -> (email ciphertext, email blind index).
    table: dict[str, tuple[bytes, str]] = {}
    people = {f"cust-{run}-1": "Alice@Example.com", f"cust-{run}-2": "bob@example.com",
              f"cust-{run}-3": "carol@example.com"}
    for subject, email in people.items():
        ct, index = orders.encrypt("orders", subject, "email", email.encode(), blind_index=True)
        table[subject] = (ct, index)
    print(f"encrypted {len(table)} emails, each with a blind index")

    # Search by email without decrypting the table: the index of the normalised value.
    wanted = "  alice@EXAMPLE.com "
    indexes = set(orders.blind_indexes("orders", "email", wanted.encode()))
    candidates = [s for s, (_, i) in table.items() if i in indexes]
    # A short index may give false positives: decrypt the candidates and compare.
    hits = [s for s in candidates
            if orders.decrypt("email", table[s][0]).decode().lower() == wanted.strip().lower()]
    print(f"search {wanted.strip()!r}: {len(candidates)} candidate(s), {len(hits)} hit(s)")
    if hits != [f"cust-{run}-1"]:
        print(f"expected exactly cust-{run}-1, got {hits}", file=sys.stderr)
        return 1

    # A support screen: the masked form only.
    masked = orders.decrypt("email", table[hits[0]][0], masked=True).decode()
    print(f"masked reveal: {masked}")
    if "lice" in masked:
        print("the masked form shows the value", file=sys.stderr)
        return 1

    # Tokens for an analytics export.
    token = orders.tokenize("orders", f"cust-{run}-2", "email", "bob@example.com")
    if orders.detokenize("orders", token) != "bob@example.com":
        print("detokenize returned another value", file=sys.stderr)
        return 1
    print("tokenize / detokenize: ok")

    # Erasure (another identity: the deletion workflow may shred, never decrypt).
    r = erasure.shred(f"cust-{run}-1", "orders", request_id=f"gdpr-{run}")
    print(f"shred: {[k.outcome for k in r.keyspaces]} (certificate {len(r.keyspaces[0].certificate)} bytes)")
    try:
        orders.decrypt("email", table[f"cust-{run}-1"][0])
        print("a shredded subject's ciphertext still decrypts", file=sys.stderr)
        return 1
    except PiiguardError as e:
        print(f"decrypt after shred: {e.code.name} {e.reason} (final, not retried: {not e.retryable})")
        if e.reason != "SUBJECT_SHREDDED" or e.retryable:
            return 1

    # A final error is raised at once, without retries.
    try:
        orders.encrypt("payroll", "x", "email", b"x")
        return 1
    except PiiguardError as e:
        print(f"unknown keyspace: {e.code.name} {e.reason} after {e.attempts} attempt(s)")
        if e.reason != "UNKNOWN_KEYSPACE" or e.attempts != 1:
            return 1
    print(f"retries made: {orders.retries + erasure.retries}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
