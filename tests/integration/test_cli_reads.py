"""The CLI's read commands against a real control plane over HTTP: ``--json`` prints
exactly what the API answers, ``top --once`` draws the GPU map and the queue, and a
refused or unreachable API reads as one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from scheduler.cli.main import app as cli
from scheduler.core.states import JobState
from tests.conftest import REPO
from tests.integration.conftest import Api, entrypoint_yaml, free_port


def _submit(api: Api, text: str) -> str:
    r = api.http.post("/jobs", content=text, headers={"content-type": "application/yaml"})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_json_of_every_read_command_is_the_apis_answer(make_api: Any) -> None:
    api: Api = make_api()
    runner = CliRunner(env={"JOBWORKER_TOKEN": api.admin_token, "COLUMNS": "250"})
    url = ["--api", str(api.http.base_url)]
    failed = _submit(api, entrypoint_yaml("boom", "explode"))
    api.wait_for(failed, {JobState.FAILED})

    def json_of(*args: str) -> Any:
        result = runner.invoke(cli, [*args, "--json", *url])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    assert json_of("status", failed) == api.http.get(f"/jobs/{failed}").json()
    assert json_of("status") == api.http.get("/jobs").json()
    logs = api.http.get(f"/jobs/{failed}/logs").json()
    assert "Traceback" in logs["text"]
    assert json_of("logs", failed) == logs
    assert json_of("logs", failed, "--offset", str(logs["next_offset"])) == {
        "text": "",
        "next_offset": logs["next_offset"],
    }
    assert json_of("queue") == api.http.get("/queue").json()
    assert json_of("deployments") == api.http.get("/deployments").json() == []
    assert json_of("token", "list") == api.http.get("/tokens").json()
    assert json_of("audit") == api.http.get("/audit", params={"limit": 50}).json()
    cluster = json_of("cluster")
    assert [(n["hostname"], [g["uuid"] for g in n["gpus"]]) for n in cluster["nodes"]] == [
        (n["hostname"], [g["uuid"] for g in n["gpus"]])
        for n in api.http.get("/cluster").json()["nodes"]
    ]
    config = REPO / "configs" / "train" / "mlp_synthetic.yaml"
    validated = runner.invoke(cli, ["validate", str(config), "--json"])
    assert validated.exit_code == 0, validated.output
    answered = api.http.post(
        "/jobs/validate", content=config.read_text(), headers={"content-type": "application/yaml"}
    )
    assert json.loads(validated.stdout) == answered.json()


def test_top_once_draws_the_gpus_with_their_holder_and_the_queue(make_api: Any) -> None:
    api: Api = make_api()
    runner = CliRunner(env={"JOBWORKER_TOKEN": api.admin_token, "COLUMNS": "250"})
    url = ["--api", str(api.http.base_url)]
    holder = _submit(api, entrypoint_yaml("hold", "run_until_stopped", gpus=1, gpu_memory_gb=4))
    api.wait_for(holder, {JobState.RUNNING})
    try:
        drawn = runner.invoke(cli, ["top", "--once", *url])
        assert drawn.exit_code == 0, drawn.output
        nodes = api.http.get("/cluster").json()["nodes"]
        for node in nodes:
            assert node["hostname"] in drawn.output
        held = [g for n in nodes for g in n["gpus"] if holder in g["jobs"]]
        assert len(held) == 1
        row = next(line for line in drawn.output.splitlines() if holder in line)
        assert held[0]["name"].removeprefix("NVIDIA ") in row and "█" in row
        assert "no pending jobs" in drawn.output

        snapshot = runner.invoke(cli, ["top", "--json", *url])
        assert snapshot.exit_code == 0, snapshot.output
        both = json.loads(snapshot.stdout)
        assert set(both) == {"cluster", "queue"} and both["queue"] == []
        assert any(holder in g["jobs"] for n in both["cluster"]["nodes"] for g in n["gpus"])

        listed = runner.invoke(cli, ["cluster", *url])
        assert listed.exit_code == 0 and holder in listed.output
    finally:
        api.http.post(f"/jobs/{holder}/cancel")
        api.wait_for(holder, {JobState.CANCELLED})


def test_an_unreachable_api_reads_as_one_line_with_the_address(tmp_path: Path) -> None:
    address = f"http://127.0.0.1:{free_port()}"
    runner = CliRunner(env={"JOBWORKER_TOKEN": None})
    for args in (["status"], ["top", "--once"], ["queue", "--json"], ["ui", "--print-url"]):
        result = runner.invoke(cli, [*args, "--api", address, "--home", str(tmp_path)])
        assert result.exit_code == 3, (args, result.output)
        assert "Traceback" not in result.output
        (line,) = [line for line in result.output.splitlines() if line.strip()]
        assert address in line and "jobworker up" in line
