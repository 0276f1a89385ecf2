"""The in-process cap (workers.gpu_caps) where there is no GPU: nothing is limited, and a job
on simulated GPUs learns where to declare what it holds."""

from __future__ import annotations

import os

import pytest
import torch

from workers.gpu_caps import SIM_USAGE_DIR_ENV, cap_job_process, limit_gpu_memory
from workers.interface.executor import LaunchRequest, NodeAssignment
from workers.interface.spec import load_spec
from workers.interface.telemetry import GIB

SPEC = """
name: capped
experiment: it
model: {name: mlp}
data: {name: synthetic_classification}
train: {max_steps: 1}
resources: {gpus: 1, gpu_memory_gb: 8, cpus: 1, memory_gb: 1}
"""


def test_a_job_on_whole_gpus_gets_no_fraction() -> None:
    assert limit_gpu_memory(None) == [] and limit_gpu_memory(0) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="bench/gpu_check.py checks a real GPU")
def test_without_cuda_nothing_is_limited() -> None:
    assert limit_gpu_memory(8 * GIB) == []


def test_a_job_on_simulated_gpus_is_told_where_to_declare_its_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(SIM_USAGE_DIR_ENV, raising=False)
    launch = LaunchRequest(
        job_id="j-1",
        attempt=1,
        node=NodeAssignment(node_id="n", hostname="h", gpu_indices=(1,)),
        spec=load_spec(SPEC),
        source_text="",
        tracking_uri="sqlite:///x.db",
        simulated_usage_dir="/tmp/usage",
    )
    cap_job_process(launch)
    assert os.environ[SIM_USAGE_DIR_ENV] == "/tmp/usage"
