"""Unit tests of the client's retry policy (no server): run with
`.venv/bin/python -m unittest discover -s examples/python -p 'test_*.py'`."""

import unittest

import grpc

from piiguard_client import Piiguard


class FakeError(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "fake"

    def trailing_metadata(self):
        return ()


class Flaky:
    """Fails with the given codes in turn, then answers."""

    def __init__(self, *codes):
        self.codes, self.calls, self.timeouts = list(codes), 0, []

    def __call__(self, request, timeout):
        self.calls += 1
        self.timeouts.append(timeout)
        if self.codes:
            raise FakeError(self.codes.pop(0))
        return "answer"


class RetryPolicy(unittest.TestCase):
    def client(self, **kw):
        return Piiguard(grpc.insecure_channel("127.0.0.1:9"), backoff=0.001, **kw)

    def test_unavailable_is_retried_then_answered(self):
        pg, m = self.client(), Flaky(grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(pg.call(m, None), "answer")
        self.assertEqual((m.calls, pg.retries), (3, 2))
        # Each attempt gets what is left of the one deadline, never more.
        self.assertTrue(all(b <= a for a, b in zip(m.timeouts, m.timeouts[1:])))

    def test_final_errors_are_not_retried(self):
        for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                     grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED):
            pg, m = self.client(), Flaky(code)
            with self.assertRaises(Exception) as cm:
                pg.call(m, None)
            self.assertEqual((m.calls, cm.exception.code, cm.exception.attempts), (1, code, 1))

    def test_attempts_are_bounded(self):
        pg, m = self.client(attempts=3), Flaky(*[grpc.StatusCode.UNAVAILABLE] * 10)
        with self.assertRaises(Exception) as cm:
            pg.call(m, None)
        self.assertEqual((m.calls, cm.exception.attempts), (3, 3))

    def test_a_call_that_stores_is_not_retried_on_unavailable(self):
        # A random Tokenize whose answer was lost may have stored a token row.
        pg, m = self.client(), Flaky(grpc.StatusCode.UNAVAILABLE)
        with self.assertRaises(Exception) as cm:
            pg.call(m, None, idempotent=False)
        self.assertEqual((m.calls, cm.exception.attempts, pg.retries), (1, 1, 0))


if __name__ == "__main__":
    unittest.main()
