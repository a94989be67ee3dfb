"""Retries of the HTTP transports, by tenacity: exponential backoff (50 ms doubling to 2 s)
with jitter for up to ``retry_for`` seconds. The jitter draws from the transport's own
``random.Random``, never the global one, so a run's RNG state stays the run's."""
from __future__ import annotations

import random

import tenacity


def retrying(retry_for: float, jitter: random.Random, retry_on) -> tenacity.Retrying:
    """A tenacity ``Retrying`` that retries exceptions matched by ``retry_on`` (a type or a
    tuple of types), then re-raises the last one."""
    def wait(state: tenacity.RetryCallState) -> float:
        return min(2.0, 0.05 * 2 ** (state.attempt_number - 1)) * (0.5 + jitter.random())

    return tenacity.Retrying(retry=tenacity.retry_if_exception_type(retry_on), wait=wait,
                             stop=tenacity.stop_after_delay(retry_for), reraise=True)
