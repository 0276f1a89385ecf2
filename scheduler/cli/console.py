"""The operator console from the terminal: ``top`` (live GPU map and queue), ``ui`` (browser)."""

from __future__ import annotations

import time
import webbrowser
from pathlib import Path
from typing import Annotated

import typer
from rich.console import RenderableType
from rich.live import Live

from scheduler.api.client import Client
from scheduler.cli.cluster_view import frame
from scheduler.cli.common import (
    ApiOpt,
    HomeOpt,
    TokenOpt,
    connect,
    err,
    guard,
    out,
    print_json,
)
from scheduler.cli.estimates import span_text


def top(
    interval_s: Annotated[
        float, typer.Option("--interval", min=0.1, help="Seconds between refreshes.")
    ] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Draw one frame and exit.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one raw {cluster, queue} snapshot and exit.")
    ] = False,
    api: ApiOpt = "http://127.0.0.1:8000",
    token: TokenOpt = None,
    home: HomeOpt = Path(".jobworker"),
) -> None:
    """The GPUs (memory by job, replica and outside use) and the queue, live; Ctrl-C quits."""
    client = connect(api, token, home)
    if as_json:
        print_json({"cluster": guard(client.cluster), "queue": guard(client.queue)})
        return
    if once:
        out.print(_frame(client))
        return
    try:
        with Live(_frame(client), console=out, auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(interval_s)
                live.update(_frame(client), refresh=True)
    except KeyboardInterrupt:
        pass


def _frame(client: Client) -> RenderableType:
    cluster = guard(client.cluster)
    return frame(cluster, guard(client.queue), time.time())


def ui(
    print_url: Annotated[
        bool, typer.Option("--print-url", help="Only print the login address; open nothing.")
    ] = False,
    api: ApiOpt = "http://127.0.0.1:8000",
    token: TokenOpt = None,
    home: HomeOpt = Path(".jobworker"),
) -> None:
    """Open the web console, logged in by a one-time address (printed too)."""
    client = connect(api, token, home)
    link = guard(client.login_link)
    url = client.base_url + link["path"]
    typer.echo(url)
    valid = span_text(link["expires_at"] - time.time())
    err.print(f"one-time login address for {api}: valid for {valid}, for one login")
    if print_url:
        return
    try:
        opened = webbrowser.open(url)
    except webbrowser.Error:
        opened = False
    if not opened:
        err.print("no browser to open here: open the address above in yours")
