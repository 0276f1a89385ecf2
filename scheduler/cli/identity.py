"""Commands of identity: ``token create|list|revoke`` (admin) and ``audit``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from scheduler.cli.common import (
    ApiOpt,
    HomeOpt,
    JsonOpt,
    TokenOpt,
    connect,
    guard,
    out,
    print_json,
    when,
)

token_app = typer.Typer(help="Create, list and revoke API tokens (admin).", no_args_is_help=True)
_API = "http://127.0.0.1:8000"
_HOME = Path(".jobworker")


@token_app.command("create")
def create(
    team: Annotated[str, typer.Option(help="The team the token acts for.")],
    role: Annotated[str, typer.Option(help="admin, member or viewer.")] = "member",
    name: Annotated[str | None, typer.Option(help="What the token is for.")] = None,
    api: ApiOpt = _API,
    token: TokenOpt = None,
    home: HomeOpt = _HOME,
) -> None:
    """Create a token; it is printed this once (keep it: it is stored only hashed)."""
    made = guard(lambda: connect(api, token, home).create_token(team, role, name))
    out.print(
        f"created token [bold]{made['id']}[/] ({made['name']}): team {made['team']}, "
        f"role {made['role']}"
    )
    out.print("the token (shown once):")
    typer.echo(made["token"])


@token_app.command("list")
def list_tokens(
    as_json: JsonOpt = False, api: ApiOpt = _API, token: TokenOpt = None, home: HomeOpt = _HOME
) -> None:
    """Every token, revoked ones too; never a secret."""
    tokens = guard(connect(api, token, home).tokens)
    if as_json:
        print_json(tokens)
        return
    table = Table("id", "name", "team", "role", "created", "revoked")
    for t in tokens:
        table.add_row(
            t["id"],
            t["name"],
            t["team"],
            t["role"],
            when(t["created_at"]),
            f"[red]{when(t['revoked_at'])}[/]" if t["revoked_at"] else "",
        )
    out.print(table)


@token_app.command("revoke")
def revoke(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="The token's id (see list).")],
    api: ApiOpt = _API,
    token: TokenOpt = None,
    home: HomeOpt = _HOME,
) -> None:
    """Revoke a token: the API refuses it from now on."""
    revoked = guard(lambda: connect(api, token, home).revoke_token(token_id))
    out.print(f"revoked token [bold]{revoked['id']}[/] ({revoked['name']}, team {revoked['team']})")


def audit(
    team: Annotated[str | None, typer.Option(help="Only this team's requests.")] = None,
    token_id: Annotated[str | None, typer.Option("--token-id", help="Only this token's.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    as_json: JsonOpt = False,
    api: ApiOpt = _API,
    token: TokenOpt = None,
    home: HomeOpt = _HOME,
) -> None:
    """Mutating requests: who, team, what, when, and the answer (refusals too)."""
    events = guard(
        lambda: connect(api, token, home).audit(team=team, token_id=token_id, limit=limit)
    )
    if as_json:
        print_json(events)
        return
    table = Table("at", "token", "team", "role", "request", "target", "status")
    for e in events:
        status = e["status"]
        table.add_row(
            when(e["at"]),
            f"{e['token_id']} ({e['token_name']})" if e["token_id"] else "[red]no valid token[/]",
            e["team"] or "-",
            e["role"] or "-",
            f"{e['method']} {e['path']}",
            e["target"] or "",
            f"[{'green' if status < 400 else 'red'}]{status}[/]",
        )
    out.print(table if events else "no audited requests")
