"""The control plane never imports torch: not to start, not to validate a training config.

Checked in a fresh interpreter (this test process has torch loaded by other tests).
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

PROBE = """
import json, sys
import scheduler.api.app, scheduler.cli.main, scheduler.wiring
from typer.testing import CliRunner
from workers.interface.spec import load_spec
for name in ("mlp_synthetic", "cnn_images"):
    load_spec(open(f"configs/train/{name}.yaml").read())
validated = CliRunner().invoke(
    scheduler.cli.main.app, ["validate", "configs/train/mlp_synthetic.yaml"]
)
print(json.dumps({
    "validate_exit": validated.exit_code,
    "torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch"),
    "jobs": sorted(m for m in sys.modules if m.split(".")[0] == "jobs"),
}))
"""


def test_api_cli_and_wiring_import_and_validate_without_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["validate_exit"] == 0
    assert seen["torch"] == []
    assert seen["jobs"] == ["jobs", "jobs.params"]  # the torch-free catalogue, nothing else
