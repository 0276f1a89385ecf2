"""What the command-line modules share: consoles, options, error handling."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from scheduler.api.client import ApiError, ApiUnreachable, Client

out = Console()
err = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")

ApiOpt = Annotated[str, typer.Option("--api", envvar="JOBWORKER_API", help="API address.")]
HomeOpt = Annotated[Path, typer.Option("--home", envvar="JOBWORKER_HOME", help="State directory.")]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="JOBWORKER_TOKEN",
        help="API token (jw_…); default: the admin token `up` wrote under --home.",
        show_default=False,
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the API's JSON unchanged (for scripts, `jq`).")
]
ADMIN_TOKEN_FILE = "admin.token"  # under the home; scheduler.wiring.Settings.admin_token_file
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
STATE_STYLE = {
    "SUCCEEDED": "green",
    "READY": "green",
    "FAILED": "red",
    "CANCELLED": "yellow",
    "UPDATING": "yellow",
    "RUNNING": "cyan",
    "DEPLOYING": "cyan",
    "PENDING": "magenta",
}


def connect(api: str, token: str | None, home: Path) -> Client:
    """A client of ``api`` with the token given, else the one ``up`` wrote under ``home``."""
    if token is None:
        try:
            token = (home / ADMIN_TOKEN_FILE).read_text()
        except OSError:
            token = None
    return Client(api, token=token.strip() if token else None)


def guard(fn: Callable[[], T]) -> T:
    """Run an API call; turn refusals into readable messages and exit codes."""
    try:
        return fn()
    except ApiUnreachable as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(3) from exc
    except ApiError as exc:
        if exc.errors:
            err.print(f"[red]rejected ({exc.status}):[/]")
            for loc, msg in exc.errors:
                err.print(f"  [bold]{loc or '(config)'}[/]: {msg}")
        else:
            err.print(f"[red]error ({exc.status}):[/] {exc}")
        if exc.status == 401:
            err.print(
                "  give a token with --token or JOBWORKER_TOKEN "
                f"(`up` writes an admin one to <home>/{ADMIN_TOKEN_FILE})"
            )
        raise typer.Exit(2) from exc


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout, with no markup, for ``--json``."""
    typer.echo(json.dumps(data, indent=2))


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        err.print(f"[red]error:[/] cannot read {path}: {exc.strerror}")
        raise typer.Exit(2) from exc


def when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def state_text(state: str) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{state}[/]"
