"""Many Ray calls awaited together, under one deadline.

Awaiting remote calls one by one, each with its own timeout, makes every dead
node or hung actor cost the whole timeout in turn: five dead nodes, five
timeouts. :func:`gather` waits for all of them at once, so a pass waits at
most one timeout however many are dead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import ray
from ray.exceptions import GetTimeoutError

K = TypeVar("K")


def gather(refs: Mapping[K, Any], timeout_s: float) -> dict[K, Any]:
    """Each call's result, or the exception it raised (``GetTimeoutError`` if unanswered).

    Example::

        answers = gather({node: agent.reading.remote() for ...}, timeout_s=5)
        for node, answer in answers.items():
            if isinstance(answer, Exception): ...
    """
    if not refs:
        return {}
    pending = list(refs.values())
    ready, _ = ray.wait(pending, num_returns=len(pending), timeout=timeout_s)
    done = set(ready)
    answers: dict[K, Any] = {}
    for key, ref in refs.items():
        if ref not in done:
            answers[key] = GetTimeoutError(f"no answer within {timeout_s:g} s")
            continue
        try:
            answers[key] = ray.get(ref)
        except Exception as exc:
            answers[key] = exc
    return answers
