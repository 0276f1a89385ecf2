"""The simulated GPU backend, backend selection, and the cluster config files.

Usage files of live, dead and recycled pids; ``select_backend`` falling back from
NVML (faked with tests/fakes/fake_pynvml.py); parsing and errors of configs/cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes import fake_pynvml
from tests.fakes.fake_pynvml import GIB, FakePynvml
from tests.unit.gpu_backend_helpers import assert_reading_contract, make_fake
from workers.interface.errors import ClusterConfigError, NvmlUnavailable
from workers.nvml_backend import NvmlBackend
from workers.sim_backend import (
    JOB_UTIL_INCREMENT_PCT,
    SimClusterSpec,
    SimGpuSpec,
    SimNodeSpec,
    SimulatedBackend,
    load_cluster_config,
    parse_cluster_config,
    remove_usage,
    select_backend,
    simulated_backend_for,
    write_usage,
)

CLUSTER_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "cluster"


# -- simulated backend --------------------------------------------------------------------


def make_node(*gpus: SimGpuSpec, name: str = "n") -> SimNodeSpec:
    return SimNodeSpec(name=name, cpus=2, memory_gb=8, gpus=list(gpus))


def _reaped_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_sim_reports_declared_gpus_in_order_with_stable_uuids() -> None:
    node = make_node(
        SimGpuSpec(type="T4", memory_gb=16, count=2), SimGpuSpec(type="A100", memory_gb=80)
    )
    readings = SimulatedBackend(node).read()
    assert [r.name for r in readings] == ["T4", "T4", "A100"]
    assert [r.memory_total_bytes for r in readings] == [16 * GIB, 16 * GIB, 80 * GIB]
    assert [r.uuid for r in SimulatedBackend(node).read()] == [r.uuid for r in readings]
    assert all(r.uuid.startswith("GPU-sim-") for r in readings)
    other = SimulatedBackend(node, node_seed="cluster-2").read()
    assert not {r.uuid for r in other} & {r.uuid for r in readings}
    renamed = SimulatedBackend(make_node(*node.gpus, name="m")).read()
    assert not {r.uuid for r in renamed} & {r.uuid for r in readings}


def test_sim_external_memory_and_background_util() -> None:
    node = make_node(
        SimGpuSpec(type="A100", memory_gb=40, external_memory_gb=8, background_util_pct=20)
    )
    (gpu,) = SimulatedBackend(node).read()
    assert (gpu.memory_used_bytes, gpu.memory_free_bytes) == (8 * GIB, 32 * GIB)
    assert gpu.util_pct == 20.0 and gpu.processes == ()


def test_sim_usage_of_a_live_process_counts_until_removed(tmp_path: Path) -> None:
    backend = SimulatedBackend(make_node(SimGpuSpec(type="T4", memory_gb=16, count=2)), tmp_path)
    write_usage(tmp_path, "job-1", os.getpid(), [0, 1], 3 * GIB)
    for gpu in backend.read():
        assert gpu.memory_used_bytes == 3 * GIB
        assert [(p.pid, p.used_memory_bytes) for p in gpu.processes] == [(os.getpid(), 3 * GIB)]
        assert gpu.util_pct == JOB_UTIL_INCREMENT_PCT
    assert remove_usage(tmp_path, "job-1") == 1
    assert all(g.memory_used_bytes == 0 and g.processes == () for g in backend.read())


def test_sim_usage_of_a_dead_process_is_ignored(tmp_path: Path) -> None:
    backend = SimulatedBackend(make_node(SimGpuSpec(type="T4", memory_gb=16)), tmp_path)
    write_usage(tmp_path, "job-dead", _reaped_pid(), [0], 3 * GIB)
    (gpu,) = backend.read()
    assert (gpu.memory_used_bytes, gpu.processes, gpu.util_pct) == (0, (), 0.0)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_sim_usage_of_a_zombie_or_recycled_pid_is_ignored(tmp_path: Path) -> None:
    backend = SimulatedBackend(make_node(SimGpuSpec(type="T4", memory_gb=16)), tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().split(")")[-1].split()[0] != "Z":
            assert time.monotonic() < deadline, "child did not exit"
            time.sleep(0.02)
        write_usage(tmp_path, "job-zombie", child.pid, [0], GIB)
        assert backend.read()[0].processes == ()
    finally:
        child.wait()
    # Our own pid, but recorded with another process's start time: a recycled pid.
    path = write_usage(tmp_path, "job-old", os.getpid(), [0], GIB)
    record = json.loads(path.read_text())
    record["pid_start_ticks"] = (record["pid_start_ticks"] or 0) + 1
    path.write_text(json.dumps(record))
    assert backend.read()[0].processes == ()


def test_sim_counts_jobs_not_processes_for_util_and_caps_at_100(tmp_path: Path) -> None:
    node = make_node(SimGpuSpec(type="T4", memory_gb=16, background_util_pct=5, count=2))
    backend = SimulatedBackend(node, tmp_path)
    write_usage(tmp_path, "ddp", os.getpid(), [0], GIB)
    write_usage(tmp_path, "ddp", os.getppid(), [0], GIB)  # a second process of the same job
    assert backend.read()[0].util_pct == 5 + JOB_UTIL_INCREMENT_PCT
    for job in ("a", "b", "c", "d"):
        write_usage(tmp_path, job, os.getpid(), [1], GIB)
    gpu1 = backend.read()[1]
    assert gpu1.util_pct == 100.0
    assert gpu1.processes[0].used_memory_bytes == 4 * GIB  # one pid, four jobs: summed
    assert remove_usage(tmp_path, "ddp") == 2


def test_sim_overcommit_shows_a_full_gpu_not_negative_free(tmp_path: Path) -> None:
    backend = SimulatedBackend(
        make_node(SimGpuSpec(type="T4", memory_gb=16, external_memory_gb=12)), tmp_path
    )
    write_usage(tmp_path, "big", os.getpid(), [0], 8 * GIB)
    (gpu,) = backend.read()
    assert (gpu.memory_used_bytes, gpu.memory_free_bytes) == (16 * GIB, 0)


def test_sim_skips_bad_usage_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    backend = SimulatedBackend(make_node(SimGpuSpec(type="T4", memory_gb=16)), tmp_path)
    (tmp_path / "broken@1.json").write_text("{not json")
    (tmp_path / "typo@1.json").write_text(json.dumps({"job_id": "x", "pid": 1, "gpus": [0]}))
    (tmp_path / ".half.json.123.tmp").write_text("{")
    write_usage(tmp_path, "far", os.getpid(), [7], GIB)  # no GPU 7 on this node
    (gpu,) = backend.read()
    assert gpu.memory_used_bytes == 0
    assert "broken@1.json" in caplog.text and "typo@1.json" in caplog.text
    caplog.clear()
    backend.read()
    assert caplog.text == ""  # each problem is logged once, not on every sample


@pytest.mark.parametrize("job_id", ["", "a/b", "a@b", "../x", ".hidden"])
def test_usage_refuses_job_ids_that_cannot_name_a_file(tmp_path: Path, job_id: str) -> None:
    with pytest.raises(ValueError, match="job id"):
        write_usage(tmp_path, job_id, os.getpid(), [0], GIB)


def test_sim_without_usage_dir_or_with_a_missing_one(tmp_path: Path) -> None:
    node = make_node(SimGpuSpec(type="T4", memory_gb=16))
    assert SimulatedBackend(node).read()[0].memory_used_bytes == 0
    assert SimulatedBackend(node, tmp_path / "absent").read()[0].memory_used_bytes == 0
    assert remove_usage(tmp_path / "absent", "job") == 0


@settings(max_examples=40, deadline=None)
@given(
    gpus=st.lists(
        st.tuples(st.floats(1, 96), st.floats(0, 1), st.floats(0, 100)), min_size=1, max_size=4
    ),
    jobs=st.lists(
        st.tuples(st.lists(st.integers(0, 5), max_size=3), st.integers(0, 64 * GIB)), max_size=5
    ),
)
def test_sim_readings_keep_the_contract_whatever_jobs_declare(
    gpus: list[tuple[float, float, float]], jobs: list[tuple[list[int], int]]
) -> None:
    node = make_node(
        *(
            SimGpuSpec(type="X", memory_gb=m, external_memory_gb=m * e, background_util_pct=u)
            for m, e, u in gpus
        )
    )
    with tempfile.TemporaryDirectory() as usage_dir:
        for i, (indices, used) in enumerate(jobs):
            write_usage(usage_dir, f"j{i}", os.getpid(), indices, used)
        assert_reading_contract(SimulatedBackend(node, Path(usage_dir)).read(), len(gpus))


# -- backend selection -------------------------------------------------------------------


def test_auto_falls_back_to_simulated_without_nvml(tmp_path: Path) -> None:
    node = make_node(SimGpuSpec(type="T4", memory_gb=16))
    broken = FakePynvml(init_error=fake_pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    backend = select_backend("auto", node, tmp_path, nvml_module=broken)
    assert isinstance(backend, SimulatedBackend) and len(backend.read()) == 1
    assert isinstance(
        select_backend("auto", node, tmp_path, nvml_module=make_fake(0)), SimulatedBackend
    )


def test_auto_on_this_machine_falls_back_to_simulated(tmp_path: Path) -> None:
    probe = NvmlBackend()
    try:
        if probe.device_count() > 0:
            pytest.skip("this machine has a GPU")
    except NvmlUnavailable:
        pass
    finally:
        probe.close()
    backend = select_backend("auto", None, tmp_path)
    assert backend.name == "simulated" and backend.read() == ()


def test_auto_and_nvml_use_nvml_when_it_works(tmp_path: Path) -> None:
    for mode in ("auto", "nvml"):
        backend = select_backend(mode, None, tmp_path, nvml_module=make_fake(2))
        assert isinstance(backend, NvmlBackend) and len(backend.read()) == 2


def test_nvml_mode_without_nvml_says_why(tmp_path: Path) -> None:
    broken = FakePynvml(init_error=fake_pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    with pytest.raises(NvmlUnavailable, match=r"'nvml' was requested.*nvmlInit"):
        select_backend("nvml", None, tmp_path, nvml_module=broken)


def test_simulated_mode_and_bad_modes(tmp_path: Path) -> None:
    assert select_backend("simulated", None, tmp_path, nvml_module=make_fake(2)).read() == ()
    with pytest.raises(ValueError, match="'auto', 'nvml' or 'simulated'"):
        select_backend("gpu", None, tmp_path)


# -- cluster configs ---------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CLUSTER_CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_cluster_config_loads_and_reads(path: Path, tmp_path: Path) -> None:
    cluster = load_cluster_config(path)
    for node in cluster.nodes:
        backend = simulated_backend_for(cluster, node.name, tmp_path)
        assert_reading_contract(backend.read(), len(node.expand_gpus()))


def test_local_sim_config_is_what_the_demo_expects() -> None:
    (gpu0, gpu1) = simulated_backend_for(
        load_cluster_config(CLUSTER_CONFIGS / "local_sim.yaml"), "local", None
    ).read()
    assert (gpu0.name, gpu0.memory_free_bytes, gpu0.util_pct) == ("A100", 40 * GIB, 0.0)
    assert (gpu1.memory_free_bytes, gpu1.util_pct) == (32 * GIB, 20.0)


def test_two_nodes_sim_config_is_what_placement_tests_expect() -> None:
    cluster = load_cluster_config(CLUSTER_CONFIGS / "two_nodes_sim.yaml")
    a0, a1 = simulated_backend_for(cluster, "node-a", None).read()
    assert a0.memory_total_bytes == 80 * GIB and a0.nvlink_peers == (a1.uuid,)
    node_b = simulated_backend_for(cluster, "node-b", None).read()
    assert [g.name for g in node_b] == ["T4"] * 4
    assert sorted(g.memory_free_bytes or 0 for g in node_b) == [4 * GIB] + [16 * GIB] * 3
    assert max(g.util_pct or 0 for g in node_b) == 95.0


_VALID_NODE = "  - name: a\n    cpus: 1\n    memory_gb: 1\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "nodes:\n" + _VALID_NODE + "  - name: b\n    cpus: 1\n    memory_gb: 2\n    gpus:\n"
            "      - type: T4\n        memory_gb: 0\n",
            "x.yaml:10: nodes.1.gpus.0.memory_gb: Input should be greater than 0",
        ),
        (
            "nodes:\n" + _VALID_NODE + "    colour: red\n",
            "x.yaml:5: nodes.0.colour: Extra inputs are not permitted",
        ),
        ("nodes:\n  - name: a\n    memory_gb: 1\n", "x.yaml:2: nodes.0.cpus: Field required"),
        (
            "nodes:\n  - name: a\n    cpus: 0\n    memory_gb: 1\n",
            "x.yaml:3: nodes.0.cpus: Input should be greater than or equal to 1",
        ),
        (
            "nodes:\n"
            + _VALID_NODE
            + "    gpus: [{type: T4, memory_gb: 16, external_memory_gb: 20}]\n",
            "nodes.0.gpus.0.external_memory_gb: must not exceed memory_gb (16)",
        ),
        (
            "nodes:\n"
            + _VALID_NODE
            + "    gpus: [{type: T4, memory_gb: 16, background_util_pct: 101}]\n",
            "nodes.0.gpus.0.background_util_pct: Input should be less than or equal to 100",
        ),
        (
            "nodes:\n" + _VALID_NODE + _VALID_NODE,
            "x.yaml:1: nodes: duplicate node name 'a' (nodes 0 and 1)",
        ),
        ("nodes: []\n", "nodes: List should have at least 1 item"),
        ("", "x.yaml: (top level): Input should be a valid dictionary"),
        ("nodes:\n  - name: a\n   cpus: [1\n", "x.yaml:3:4: YAML syntax error"),
    ],
    ids=[
        "memory",
        "unknown-key",
        "missing",
        "cpus",
        "external",
        "util",
        "duplicate",
        "empty-list",
        "empty-file",
        "syntax",
    ],
)
def test_config_errors_name_the_line_and_field(text: str, expected: str) -> None:
    with pytest.raises(ClusterConfigError) as info:
        parse_cluster_config(text, "x.yaml")
    assert expected in str(info.value)
    assert isinstance(info.value, ValueError)


def test_load_cluster_config_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n  - name: a\n    cpus: 1\n    memory_gb: -1\n")
    with pytest.raises(ClusterConfigError, match=r"bad\.yaml:4: nodes\.0\.memory_gb"):
        load_cluster_config(bad)
    with pytest.raises(ClusterConfigError, match="cannot read"):
        load_cluster_config(tmp_path / "absent.yaml")


def test_unknown_node_names_the_known_ones() -> None:
    cluster = SimClusterSpec(nodes=[make_node(name="a"), make_node(name="b")])
    with pytest.raises(ClusterConfigError, match=r"'c'.*nodes: a, b"):
        simulated_backend_for(cluster, "c", None)
