"""``jobworker ui --print-url`` against a small real HTTP server that answers
``POST /ui/links`` as the console does (``{"path", "expires_at"}``)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from scheduler.cli.main import app as cli

TOKEN = "jw_test"
LIFETIME_S = 120


class _Links(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        authorized = self.headers.get("Authorization") == f"Bearer {TOKEN}"
        if self.path != "/ui/links" or not authorized:
            status, body = 401, {"detail": "missing or invalid token"}
        else:
            status = 200
            body = {"path": "/ui/login?code=abc123", "expires_at": time.time() + LIFETIME_S}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def links_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Links)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()
    server.server_close()


def test_ui_print_url_prints_the_one_time_login_address(links_url: str) -> None:
    runner = CliRunner(env={"JOBWORKER_TOKEN": TOKEN})
    result = runner.invoke(cli, ["ui", "--print-url", "--api", links_url])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{links_url}/ui/login?code=abc123"
    assert "valid for 2 min" in result.output and "one login" in result.output


def test_ui_without_a_valid_token_says_how_to_give_one(links_url: str) -> None:
    result = CliRunner(env={"JOBWORKER_TOKEN": "jw_wrong"}).invoke(
        cli, ["ui", "--print-url", "--api", links_url]
    )
    assert result.exit_code == 2
    assert "missing or invalid token" in result.output and "--token" in result.output
    assert "Traceback" not in result.output
