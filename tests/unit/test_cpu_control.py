"""Training's cores, CPU share and throttle on a node (workers/cpu_control.py).

Real processes (a sleeping child) and real affinity; the cgroup v2 path writes
into a temporary directory laid out like cgroupfs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_until
from workers.cpu_control import (
    TRAINING_CPU_WEIGHT,
    CgroupV2,
    CoreClaims,
    JobCpu,
    node_cores,
    split_cores,
)


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True
    )
    yield proc
    proc.kill()
    proc.wait()


def state_of(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_claims_spread_over_the_least_claimed_cores(tmp_path: Path) -> None:
    claims = CoreClaims(tmp_path, training=[1, 2, 3])
    me = os.getpid()
    first = claims.claim("a", me, 2)
    second = claims.claim("b", me, 1)
    assert first == (1, 2) and second == (3,)
    third = claims.claim("c", me, 2)  # none free: the least claimed are shared
    assert len(third) == 2 and set(third) <= {1, 2, 3}
    claims.release("a")
    assert set(claims.claimed()) == {"b", "c"}
    assert claims.claim("d", me, 8) == (1, 2, 3)  # never more than the training cores


def test_a_claim_whose_process_is_gone_is_dropped(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    claims = CoreClaims(tmp_path, training=[1, 2])
    claims.claim("dead", child.pid, 2)
    child.kill()
    child.wait()
    assert claims.claim("alive", os.getpid(), 2) == (1, 2)
    assert set(claims.claimed()) == {"alive"}


def test_a_one_core_node_trains_and_serves_on_its_only_core() -> None:
    assert split_cores([0], 1) == ((0,), (0,))
    assert split_cores([0, 1], 1) == ((0,), (1,))
    assert split_cores([0, 1, 2, 3], 2) == ((0, 1), (2, 3))


def test_a_placed_job_process_is_pinned_off_the_serving_cores_at_a_lower_share(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    cores = node_cores()
    serving, training = split_cores(cores, 1)
    cpu = JobCpu(str(tmp_path), "job-1", cpus=1, serving_cores=1)
    cpu.place(child.pid)
    pinned = os.sched_getaffinity(child.pid)
    assert pinned == set(cpu.cores) and len(pinned) == 1
    if len(cores) > 1:
        assert not pinned & set(serving)
    assert pinned <= set(training)
    assert os.sched_getscheduler(child.pid) == os.SCHED_IDLE
    cpu.release()
    assert list((tmp_path / "cores").glob("*.json")) == []


def test_pausing_stops_the_process_group_and_releasing_resumes_it(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    cpu = JobCpu(None, "job-1", cpus=1, serving_cores=1)
    cpu.pause(child.pid, True)
    wait_until(lambda: state_of(child.pid) == "T", "the job process stopped")
    cpu.pause(child.pid, False)
    wait_until(lambda: state_of(child.pid) in ("S", "R"), "the job process running again")


def test_cgroup_v2_gives_training_a_low_weight_and_a_floor_when_throttled(
    tmp_path: Path,
) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    group = CgroupV2.find(tmp_path)
    assert group is not None
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu"
    base = tmp_path / "jobworker-training"
    group.place("job-1", 4242)
    assert (base / "job-1" / "cpu.weight").read_text() == str(TRAINING_CPU_WEIGHT)
    assert (base / "job-1" / "cgroup.procs").read_text() == "4242"
    group.limit("job-1", throttled=True)
    assert (base / "job-1" / "cpu.max").read_text() == "5000 100000"
    group.limit("job-1", throttled=False)
    assert (base / "job-1" / "cpu.max").read_text() == "max 100000"


def test_no_cgroup_v2_with_the_cpu_controller_means_the_fallback(tmp_path: Path) -> None:
    assert CgroupV2.find(tmp_path) is None  # no cgroup.controllers: cgroup v1
    (tmp_path / "cgroup.controllers").write_text("io memory\n")
    assert CgroupV2.find(tmp_path) is None
