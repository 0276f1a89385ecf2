"""A job process outlives a five-minute MLflow outage: nothing lost, nothing doubled."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.job_process import outage_scenario


@pytest.mark.timeout(900)
def test_job_survives_a_five_minute_mlflow_outage(tmp_path: Path) -> None:
    outage_scenario(tmp_path, down_for_s=300)
