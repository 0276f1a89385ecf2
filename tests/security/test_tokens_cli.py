"""`jobworker token create|list|revoke` and `jobworker audit` against a real server."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from scheduler.cli.main import app as cli
from tests.security.conftest import SecureApi


def test_token_commands_end_to_end(secure_api: SecureApi, tmp_path: Path) -> None:
    runner = CliRunner(env={"COLUMNS": "200", "JOBWORKER_HOME": str(tmp_path / "nohome")})
    admin = ["--api", secure_api.url, "--token", secure_api.admin_token]

    made = runner.invoke(cli, ["token", "create", "--team", "vision", "--name", "ci", *admin])
    assert made.exit_code == 0, made.output
    token = made.output.strip().splitlines()[-1]
    assert token.startswith("jw_") and "team vision, role member" in made.output
    token_id = token.split("_")[1]
    assert secure_api.client(token).get("/jobs").status_code == 200

    listed = runner.invoke(cli, ["token", "list", *admin])
    assert listed.exit_code == 0 and token_id in listed.output and "vision" in listed.output
    assert token.split("_", 2)[2] not in listed.output

    as_member = ["--api", secure_api.url, "--token", token]
    refused = runner.invoke(cli, ["token", "create", "--team", "vision", *as_member])
    assert refused.exit_code == 2 and "error (403)" in refused.output
    assert "only an admin may create tokens" in refused.output

    revoked = runner.invoke(cli, ["token", "revoke", token_id, *admin])
    assert revoked.exit_code == 0 and f"revoked token {token_id}" in revoked.output
    after = runner.invoke(cli, ["status", *as_member])
    assert after.exit_code == 2 and "error (401)" in after.output
    unknown = runner.invoke(cli, ["token", "revoke", "nope", *admin])
    assert unknown.exit_code == 2 and "no token 'nope'" in unknown.output

    audit = runner.invoke(cli, ["audit", *admin])
    assert audit.exit_code == 0, audit.output
    assert f"DELETE /tokens/{token_id}" in audit.output and "403" in audit.output


def test_the_cli_finds_the_admin_token_under_its_home(
    secure_api: SecureApi, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "admin.token").write_text(secure_api.admin_token + "\n")
    runner = CliRunner(env={"COLUMNS": "200", "JOBWORKER_TOKEN": None})
    found = runner.invoke(cli, ["token", "list", "--api", secure_api.url, "--home", str(home)])
    assert found.exit_code == 0 and "test admin" in found.output
    missing = runner.invoke(cli, ["queue", "--api", secure_api.url, "--home", str(tmp_path)])
    assert missing.exit_code == 2 and "--token or JOBWORKER_TOKEN" in missing.output
