"""Helpers for the GPU backend tests, and the reading contract shared with tests/gpu."""

from __future__ import annotations

from typing import Any

from tests.fakes.fake_pynvml import FakeGpu, FakePynvml
from workers.interface.telemetry import GpuReading


def assert_reading_contract(readings: tuple[GpuReading, ...], expected_count: int) -> None:
    """What every backend's ``read()`` promises, whatever the hardware."""
    assert isinstance(readings, tuple)
    assert len(readings) == expected_count
    assert [r.index for r in readings] == list(range(expected_count))
    uuids = [r.uuid for r in readings]
    assert len(set(uuids)) == len(uuids), "UUIDs must be unique"
    for r in readings:
        assert isinstance(r, GpuReading)
        assert isinstance(r.uuid, str) and r.uuid
        memory = (r.memory_total_bytes, r.memory_used_bytes, r.memory_free_bytes)
        if None not in memory:
            total, used, free = memory
            assert total is not None and used is not None and free is not None
            assert total > 0 and used >= 0 and free >= 0
            assert used + free == total
        for pct in (r.util_pct, r.memory_util_pct):
            assert pct is None or 0.0 <= pct <= 100.0
        assert r.power_w is None or r.power_w >= 0
        assert len({p.pid for p in r.processes}) == len(r.processes)
        assert r.uuid not in r.nvlink_peers
        assert set(r.nvlink_peers) <= set(uuids)
    by_uuid = {r.uuid: r for r in readings}
    for r in readings:  # an NVLink is a link between two GPUs: both ends see it
        assert all(r.uuid in by_uuid[peer].nvlink_peers for peer in r.nvlink_peers)


def make_fake(count: int = 2, **gpu: Any) -> FakePynvml:
    """A fake driver with ``count`` devices on distinct PCI buses; ``gpu`` sets their fields."""
    return FakePynvml(
        [
            FakeGpu(uuid=f"GPU-{i:04d}", bus_id=f"00000000:{i + 1:02X}:00.0", **gpu)
            for i in range(count)
        ]
    )
