"""Fixtures shared by the placement rule modules (test_placement_rules, test_placement_choice)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from scheduler.core.model import Demand
from tests.unit.placement_factories import _demand, _gpu, _node
from workers.interface.telemetry import GpuReading, NodeReading


@pytest.fixture
def make_gpu() -> Callable[..., GpuReading]:
    """Factory: one GPU reading; ``free_gib``, ``util``, ``peers`` (indices), ..."""
    return _gpu


@pytest.fixture
def make_node() -> Callable[..., NodeReading]:
    """Factory: one node; ``gpus`` is a count or a list of ``make_gpu`` readings."""
    return _node


@pytest.fixture
def make_demand() -> Callable[..., Demand]:
    """Factory: one demand (1 GPU, 10 GiB, 4 CPUs, 16 GiB); ``gpu_gib`` sets GPU memory."""
    return _demand
