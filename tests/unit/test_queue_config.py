"""The queue config file: every example loads; bad fields are named."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from scheduler.batch.queue_config import QueueConfig, load_queue_config
from scheduler.cli.main import app as cli
from scheduler.sim.policies import POLICIES
from workers.interface.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[2] / "configs" / "queue").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_examples_load(path: Path) -> None:
    policy = load_queue_config(path)
    assert policy.quotas and policy.weights


def test_example_folder_is_not_empty() -> None:
    assert CONFIGS


@pytest.mark.parametrize(
    ("text", "loc"),
    [
        ("mode: random\n", "mode"),
        ("quotas: {vision: many}\n", "quotas.vision"),
        ("aging_s_per_priority: 0\n", "aging_s_per_priority"),
        ("min_run_s: -1\n", "min_run_s"),
        ("backfil: true\n", "backfil"),
        ("weights: {nlp: 0}\n", ""),
        ("quotas: {nlp: -2}\n", ""),
        ("aging_s_per_priority: .inf\n", "aging_s_per_priority"),
        ("weights: {nlp: .nan}\n", "weights.nlp"),
        ("min_run_s: 1.0e+999\n", "min_run_s"),
    ],
)
def test_bad_fields_are_named(tmp_path: Path, text: str, loc: str) -> None:
    path = tmp_path / "q.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_queue_config(path)
    assert loc in [where for where, _ in info.value.errors]


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_queue_config(tmp_path / "absent.yaml")


def test_the_live_default_is_the_simulators_predictive_policy(tmp_path: Path) -> None:
    live, sim = QueueConfig().policy(), POLICIES["predictive"].queue
    assert live.mode == sim.mode == "predictive"
    assert live.las_thresholds_gpu_s == sim.las_thresholds_gpu_s
    assert live.max_est_error == sim.max_est_error
    result = CliRunner().invoke(cli, ["up", "--home", str(tmp_path), "--queue-mode", "random"])
    assert result.exit_code == 2
    assert "--queue-mode 'random': expected one of fifo, sjf, las, srpt, predictive" in (
        result.output
    )


def test_thresholds_and_the_trust_bound_are_read_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "q.yaml"
    path.write_text("mode: predictive\nlas_thresholds_gpu_s: [600, 6000]\nmax_est_error: 0.25\n")
    policy = load_queue_config(path)
    assert (policy.las_thresholds_gpu_s, policy.max_est_error) == ((600.0, 6000.0), 0.25)
    path.write_text("las_thresholds_gpu_s: [6000, 600]\n")
    with pytest.raises(ConfigError, match="ascend"):
        load_queue_config(path)
