"""How long to wait before trying again after a failure: one formula for the whole control plane.

Used by the batch lane (a lost worker is retried) and the real-time lane (a
replica that fails to start is started again).
"""

from __future__ import annotations


def backoff_s(failures: int, base_s: float, max_s: float) -> float:
    """``base_s`` doubled per consecutive failure after the first, at most ``max_s``.

    >>> [backoff_s(n, 2.0, 60.0) for n in (1, 2, 3, 6, 7)]
    [2.0, 4.0, 8.0, 60.0, 60.0]
    """
    if failures < 1:
        raise ValueError(f"failures must be at least 1, got {failures}")
    return min(max_s, base_s * 2.0 ** min(failures - 1, 62))
