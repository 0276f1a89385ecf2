"""``jobworker ui --print-url`` against a real control plane: the printed address logs a
browser in once (session cookie, then the GPU map) and is spent after that."""

from __future__ import annotations

from typing import Any

import httpx
from typer.testing import CliRunner

from scheduler.cli.main import app as cli
from tests.integration.conftest import Api


def test_ui_print_url_prints_a_one_time_login_address_for_a_valid_token(make_api: Any) -> None:
    api: Api = make_api()
    base = str(api.http.base_url).rstrip("/")
    runner = CliRunner(env={"JOBWORKER_TOKEN": api.admin_token})
    result = runner.invoke(cli, ["ui", "--print-url", "--api", base])
    assert result.exit_code == 0, result.output
    url = result.stdout.strip()
    assert url.startswith(f"{base}/ui/login?code=")
    assert "valid for 2 min" in result.output and "one login" in result.output

    with httpx.Client() as browser:  # no token: only the address logs it in
        first = browser.get(url)
        assert first.status_code == 303 and first.headers["location"] == "/ui/gpus"
        assert "jobworker_session" in first.cookies
        assert browser.get(f"{base}/ui/gpus").status_code == 200
    assert httpx.get(url).status_code == 400, "the address is spent after one login"

    wrong = CliRunner(env={"JOBWORKER_TOKEN": "jw_wrong"}).invoke(
        cli, ["ui", "--print-url", "--api", base]
    )
    assert wrong.exit_code == 2 and "--token" in wrong.output, "a refused token says what to do"
    assert "Traceback" not in wrong.output
