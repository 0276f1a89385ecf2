"""``jobworker up`` with its token check replaced by a fixed admin identity.

Only for ``bench/serving.py``'s ``jobworker-noauth`` server, which measures what checking
the bearer token costs on the predict path: the same server, the same middleware stack,
but :class:`scheduler.api.auth.Authenticate` hands every request the admin identity
instead of reading and verifying its ``Authorization`` header. Never a way to run
jobworker: anyone reaching it is an admin.

    .venv/bin/python bench/serving_noauth.py up --home … --port …   # as `jobworker up …`
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from starlette.types import Receive, Scope, Send  # noqa: E402

from scheduler.api.auth import Authenticate  # noqa: E402
from scheduler.auth.identity import Identity, Role  # noqa: E402
from scheduler.cli.main import app  # noqa: E402

BENCH_ADMIN = Identity(
    token_id="bench", name="bench (no token check)", team="default", role=Role.ADMIN
)


async def _trust_everyone(self: Authenticate, scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        scope.setdefault("state", {})["identity"] = BENCH_ADMIN
    await self._app(scope, receive, send)


if __name__ == "__main__":
    Authenticate.__call__ = _trust_everyone  # type: ignore[method-assign]
    app(prog_name="jobworker")
