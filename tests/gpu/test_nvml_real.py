"""The GPU backend contract on real NVML. Skips cleanly where NVML cannot start.

Run on a GPU machine: ``python -m pytest -q tests/gpu -m gpu``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.gpu_backend_helpers import assert_reading_contract
from workers.interface.errors import NvmlUnavailable
from workers.nvml_backend import NvmlBackend
from workers.sim_backend import select_backend

pytestmark = pytest.mark.gpu


@pytest.fixture
def backend() -> Iterator[NvmlBackend]:
    """The real NVML backend, or a skip saying why NVML is not usable here."""
    pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed")
    real = NvmlBackend()
    try:
        count = real.device_count()
    except NvmlUnavailable as exc:
        pytest.skip(f"NVML cannot start here: {exc}")
    if count == 0:
        real.close()
        pytest.skip("NVML started but sees no GPU")
    yield real
    real.close()


def test_real_readings_keep_the_contract(backend: NvmlBackend) -> None:
    readings = backend.read()
    assert_reading_contract(readings, backend.device_count())
    for gpu in readings:
        assert gpu.available
        assert gpu.uuid.startswith(("GPU-", "MIG-"))
        assert gpu.name and gpu.memory_total_bytes and gpu.memory_total_bytes > 0
        assert gpu.temperature_c is None or 0 < gpu.temperature_c < 130


def test_real_uuids_survive_close_and_reinit(backend: NvmlBackend) -> None:
    first = [gpu.uuid for gpu in backend.read()]
    backend.close()
    assert [gpu.uuid for gpu in backend.read()] == first


def test_real_util_stays_in_range_over_the_window(backend: NvmlBackend) -> None:
    for _ in range(7):  # more samples than the default window of 5
        for gpu in backend.read():
            assert gpu.util_pct is None or 0.0 <= gpu.util_pct <= 100.0


def test_auto_selects_nvml_on_a_gpu_machine(backend: NvmlBackend) -> None:
    chosen = select_backend("auto", None, None)
    try:
        assert chosen.name == "nvml"
        assert [g.uuid for g in chosen.read()] == [g.uuid for g in backend.read()]
    finally:
        chosen.close()
