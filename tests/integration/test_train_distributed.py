"""Data-parallel training: ``jobs.distributed`` and ``train()`` run as 2 ranks on CPU (gloo).

Each multi-rank test spawns two processes over loopback, each running
``train()`` against a :class:`RankContext`: rank 0 records like
:class:`RecordingContext` and writes its checkpoints to a shared directory,
rank 1 keeps nothing the run would see and reads rank 0's checkpoint from
there, as the runner's contexts do. Ranks report back through files in ``tmp_path``.
"""

from __future__ import annotations

import gc
import os
import random
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from jobs.context import JobContext, StopRequested
from jobs.distributed import DistributedInfo, agree, all_sum
from jobs.params import TrainParams
from jobs.train import epoch_batches, train
from tests.unit.test_jobs import RecordingContext, make_params

WORLD_SIZE = 2
HANG_GUARD_S = 120.0  # only ends a deadlocked run; no test asserts on time

# 256 samples in batches of 32: 8 batches per epoch, so 4 steps per epoch on 2 ranks.
PARAMS = make_params(max_steps=10, checkpoint_every_steps=4)


class RankContext(RecordingContext):
    """One rank's context: only the leader's checkpoints reach the shared directory.

    Every rank loads from that directory, as the runner's contexts return rank
    0's checkpoint on every rank. A non-leader's calls go nowhere a run would
    see, but they are still recorded in memory so a test can tell whether
    ``train()`` made any (it must not rely on the context dropping them).
    """

    def __init__(self, shared: Path, *, leader: bool, stop_after_steps: int | None = None) -> None:
        super().__init__(stop_after_steps=stop_after_steps)
        self.polls = 0
        self._file = shared / "checkpoint.pt"
        self._leader = leader

    def save_checkpoint(self, state: Mapping[str, Any], step: int) -> None:
        super().save_checkpoint(state, step)
        if self._leader:
            partial = self._file.with_suffix(".partial")
            torch.save((dict(state), step), partial)
            partial.replace(self._file)

    def load_checkpoint(self) -> tuple[dict[str, Any], int] | None:
        if not self._file.exists():
            return None
        state, step = torch.load(self._file)
        return state, step

    def should_stop(self) -> bool:
        self.polls += 1
        return super().should_stop()


class Phase(NamedTuple):
    """One 2-rank run: its name, params, shared checkpoint directory, and who stops when."""

    name: str
    params: TrainParams
    shared: str
    stop_rank: int = 1
    stop_after: int | None = None


def _rank_main(rank: int, out: str, phases: list[Phase], ports: list[int]) -> None:
    """Run each phase's ``train()`` as ``rank``; write what it saw to ``out/<phase>-<rank>.pt``.

    Each phase is a fresh run (its own process group, rendezvous port and
    contexts): only the shared checkpoint directory links a resumed run to
    the stopped one, as on a cluster.
    """
    torch.set_num_threads(1)
    for phase, port in zip(phases, ports, strict=True):
        os.environ |= {
            "JOBWORKER_RANK": str(rank),
            "JOBWORKER_WORLD_SIZE": str(WORLD_SIZE),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        stop_after = phase.stop_after if rank == phase.stop_rank else None
        ctx = RankContext(Path(phase.shared), leader=rank == 0, stop_after_steps=stop_after)
        _: JobContext = ctx
        report: dict[str, Any] = {"stopped": False}
        try:
            result = train(ctx, phase.params)
        except StopRequested:
            report["stopped"] = True
            # Still holding the exception: its traceback must not keep a DDP wrapper alive
            # (freed after the group, it would destroy the group under the GIL: a deadlock).
            report["ddp_alive"] = _live_ddp_wrappers()
        else:
            report |= {
                "steps": result.steps,
                "model": result.model.state_dict(),
                "training": result.model.training,
                "metrics": result.metrics,
            }
        report |= {
            "logged": ctx.metrics,
            "saved": sorted(ctx.checkpoints),
            "checkpoints": ctx.checkpoints,
            "polls": ctx.polls,
        }
        torch.save(report, Path(out) / f"{phase.name}-{rank}.pt")


def _live_ddp_wrappers() -> int:
    return sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())


def _rendezvous_ports(n: int) -> list[int]:
    """``n`` ports free now, below Linux's ephemeral range (32768+) and above Ray's worker
    ports (10002-19999), as the loop picks a gang's: a port picked by binding port 0 comes
    from the ephemeral range, where another process's outgoing connection may take it
    before rank 0 binds it."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(20000, 32000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def run_ranks(out: Path, phases: list[Phase]) -> dict[str, list[dict[str, Any]]]:
    """Run ``phases`` in order on 2 spawned ranks; each phase's reports, by rank.

    The phases share the two processes because starting one (importing torch)
    costs far more than these runs; each phase still forms its own group.
    """
    ports = _rendezvous_ports(len(phases))
    procs = mp.start_processes(
        _rank_main,
        args=(str(out), phases, ports),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + HANG_GUARD_S
    try:
        # join() re-raises a rank's exception; it returns False while ranks remain.
        while not procs.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                pytest.fail(f"ranks still running after {HANG_GUARD_S} s: deadlock?")
    finally:
        for process in procs.processes:
            if process.is_alive():
                process.kill()
    return {
        phase.name: [
            torch.load(out / f"{phase.name}-{rank}.pt", weights_only=False)
            for rank in range(WORLD_SIZE)
        ]
        for phase in phases
    }


def logged_steps(report: Mapping[str, Any]) -> list[int]:
    return [step for step, metrics in report["logged"] if "loss" in metrics]


def logged_losses(report: Mapping[str, Any]) -> list[float]:
    return [metrics["loss"] for _, metrics in report["logged"] if "loss" in metrics]


def assert_same_weights(
    first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]
) -> None:
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Three 2-rank runs of ``PARAMS``, by name, each a list of reports by rank.

    ``full`` runs uninterrupted; ``stopped`` is asked to stop by rank 1 only,
    after step 3; ``resumed`` then starts from the checkpoint ``stopped`` left.
    """
    out = tmp_path_factory.mktemp("ranks")
    full, resume = out / "full", out / "resume"
    full.mkdir()
    resume.mkdir()
    return run_ranks(
        out,
        [
            Phase("full", PARAMS, str(full)),
            Phase("stopped", PARAMS, str(resume), stop_rank=1, stop_after=3),
            Phase("resumed", PARAMS, str(resume)),
        ],
    )


@pytest.fixture(scope="module")
def full_run(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The uninterrupted run's reports, by rank."""
    return runs["full"]


# --- two ranks, one model ----------------------------------------------------


def test_ranks_finish_the_same_steps_with_identical_weights(
    full_run: list[dict[str, Any]],
) -> None:
    leader, follower = full_run
    assert leader["steps"] == follower["steps"] == 10
    for key, value in leader["model"].items():
        assert torch.equal(value, follower["model"][key]), key
    assert not leader["training"] and not follower["training"]
    assert not any(key.startswith("module.") for key in leader["model"])  # unwrapped
    assert leader["metrics"] == follower["metrics"]  # losses are reduced over both ranks


def test_only_the_leader_logs_and_checkpoints_every_step_once(
    full_run: list[dict[str, Any]],
) -> None:
    leader, follower = full_run
    assert logged_steps(leader) == list(range(1, 11))
    assert follower["logged"] == [] and follower["saved"] == []
    assert leader["saved"] == [4, 8, 10]
    epoch_ends = [(step, m["epoch"]) for step, m in leader["logged"] if "epoch" in m]
    assert epoch_ends == [(4, 1.0), (8, 2.0)]  # 8 batches shared by 2 ranks: 4 steps an epoch


def test_loss_goes_down(full_run: list[dict[str, Any]]) -> None:
    losses = logged_losses(full_run[0])
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_two_ranks_of_batch_b_train_like_one_process_of_batch_2b(
    full_run: list[dict[str, Any]],
) -> None:
    # Rank r takes batches 2k + r of the order; a 64-batch is batches 2k and 2k+1 of that
    # order, and DDP averages the two gradients: the same steps, up to float rounding.
    single = RecordingContext()
    result = train(single, make_params(max_steps=10, checkpoint_every_steps=4, batch_size=64))
    assert logged_losses(full_run[0]) == pytest.approx(single.losses(), rel=1e-4)
    assert_same_weights(full_run[0]["model"], result.model.state_dict())


# --- stopping together and resuming ------------------------------------------


def test_a_stop_on_one_rank_stops_both_at_the_same_step_with_a_leader_checkpoint(
    runs: dict[str, list[dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    stopped = runs["stopped"]
    assert [report["stopped"] for report in stopped] == [True, True]
    assert logged_steps(stopped[0]) == [1, 2, 3]
    assert stopped[0]["saved"] == [3] and stopped[1]["saved"] == []
    assert stopped[0]["polls"] == stopped[1]["polls"] == 3  # both asked, every step


def test_a_stopped_rank_frees_its_ddp_wrapper_before_leaving_the_group(
    runs: dict[str, list[dict[str, Any]]],
) -> None:
    """Freed after ``destroy_process_group``, the wrapper's reducer would own the group's last
    reference and destroy it with the GIL held, while a gloo thread waits for the GIL to
    free the last all-reduce's tensor: the rank hangs (seen under load, 4 runs in 30)."""
    assert [report["ddp_alive"] for report in runs["stopped"]] == [0, 0]


def test_the_stopped_run_resumes_on_both_ranks_from_the_leaders_checkpoint(
    runs: dict[str, list[dict[str, Any]]],
) -> None:
    leader, follower = runs["resumed"]
    assert leader["steps"] == follower["steps"] == 10
    assert logged_steps(leader) == list(range(4, 11))
    assert follower["logged"] == [] and follower["saved"] == []
    assert leader["saved"] == [4, 8, 10]
    # Resumed equals uninterrupted: same batches, same weights and optimizer state.
    full = runs["full"][0]
    assert logged_losses(leader) == pytest.approx(logged_losses(full)[3:], rel=1e-4)
    assert_same_weights(leader["model"], full["model"])
    assert_same_weights(follower["model"], full["model"])


def test_a_distributed_checkpoint_resumes_in_a_single_process(
    runs: dict[str, list[dict[str, Any]]],
) -> None:
    # The leader saved the unwrapped model, so the checkpoint also resumes without DDP.
    state = runs["stopped"][0]["checkpoints"][3]
    assert not any(key.startswith("module.") for key in state["model"])
    ctx = RecordingContext(checkpoint=(state, 3))
    assert train(ctx, make_params(max_steps=5)).steps == 5 and ctx.steps() == [4, 5]


# --- the pure parts ----------------------------------------------------------


@pytest.mark.parametrize(
    ("n_samples", "world_size", "expected"),
    [
        (256, 2, [[0, 2, 4, 6], [1, 3, 5, 7]]),
        (256, 3, [[0, 3, 6], [1, 4, 7], [2, 5, 0]]),  # the short last step wraps around
        (100, 3, [[0, 3], [1, 0], [2, 1]]),
        (32, 2, [[0], [0]]),  # fewer batches than ranks: every rank still steps
        (256, 1, [[0, 1, 2, 3, 4, 5, 6, 7]]),
    ],
)
def test_each_rank_takes_every_world_size_th_batch_of_the_epoch(
    n_samples: int, world_size: int, expected: list[list[int]]
) -> None:
    whole = epoch_batches(n_samples, 32, seed=5, epoch=2)
    for rank, indices in enumerate(expected):
        shard = epoch_batches(n_samples, 32, seed=5, epoch=2, rank=rank, world_size=world_size)
        assert len(shard) == len(indices)
        assert all(torch.equal(got, whole[i]) for got, i in zip(shard, indices, strict=True))


@pytest.mark.parametrize(
    ("epochs", "max_steps", "world_size", "expected"),
    [(3, None, 1, 24), (3, None, 2, 12), (3, None, 3, 9), (3, 10, 2, 10), (None, 7, 4, 7)],
)
def test_total_steps_count_synchronized_steps(
    epochs: int | None, max_steps: int | None, world_size: int, expected: int
) -> None:
    params = make_params(epochs=epochs, max_steps=max_steps)
    assert params.total_steps(256, world_size) == expected


ENV_OK = {"MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500"}


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, DistributedInfo(0, 1, None, None)),
        ({"JOBWORKER_WORLD_SIZE": "1"}, DistributedInfo(0, 1, None, None)),
        (
            {"JOBWORKER_RANK": "1", "JOBWORKER_WORLD_SIZE": "2"} | ENV_OK,
            DistributedInfo(1, 2, "10.0.0.5", 29500),
        ),
        (
            {"JOBWORKER_RANK": " 0 ", "JOBWORKER_WORLD_SIZE": "4"} | ENV_OK,
            DistributedInfo(0, 4, "10.0.0.5", 29500),
        ),
        # torch's own RANK/WORLD_SIZE are the runner's business, not the job's identity.
        ({"RANK": "3", "WORLD_SIZE": "8"}, DistributedInfo(0, 1, None, None)),
    ],
)
def test_from_env_reads_the_ranks_place(environ: dict[str, str], expected: DistributedInfo) -> None:
    assert DistributedInfo.from_env(environ) == expected


@pytest.mark.parametrize(
    ("environ", "names"),
    [
        ({"JOBWORKER_RANK": "one"}, ("JOBWORKER_RANK", "integer", "'one'")),
        ({"JOBWORKER_WORLD_SIZE": "2.0"}, ("JOBWORKER_WORLD_SIZE", "integer")),
        ({"JOBWORKER_WORLD_SIZE": "0"}, ("JOBWORKER_WORLD_SIZE", ">= 1")),
        ({"JOBWORKER_RANK": "-1"}, ("JOBWORKER_RANK", ">= 0")),
        (
            {"JOBWORKER_RANK": "2", "JOBWORKER_WORLD_SIZE": "2"} | ENV_OK,
            ("JOBWORKER_RANK=2", "JOBWORKER_WORLD_SIZE=2"),
        ),
        ({"JOBWORKER_RANK": "1"}, ("JOBWORKER_RANK=1", "JOBWORKER_WORLD_SIZE=1")),
        ({"JOBWORKER_WORLD_SIZE": "2"}, ("MASTER_ADDR", "MASTER_PORT")),
        (
            {"JOBWORKER_WORLD_SIZE": "2", "MASTER_ADDR": "h"},
            ("JOBWORKER_WORLD_SIZE=2", "MASTER_PORT"),
        ),
        ({"JOBWORKER_WORLD_SIZE": "2"} | ENV_OK | {"MASTER_PORT": "x"}, ("MASTER_PORT", "'x'")),
        ({"JOBWORKER_WORLD_SIZE": "2"} | ENV_OK | {"MASTER_PORT": "70000"}, ("MASTER_PORT",)),
        ({"JOBWORKER_WORLD_SIZE": "2"} | ENV_OK | {"MASTER_ADDR": " "}, ("MASTER_ADDR", "empty")),
    ],
)
def test_from_env_names_the_bad_variable(environ: dict[str, str], names: tuple[str, ...]) -> None:
    with pytest.raises(ValueError) as raised:
        DistributedInfo.from_env(environ)
    for name in names:
        assert name in str(raised.value)


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"rank": 2, "world_size": 2}, "rank=2"),
        ({"rank": 0, "world_size": 0}, "world_size"),
        ({"rank": 0, "world_size": 3, "master_port": None}, "master_port"),
    ],
)
def test_constructing_an_impossible_place_names_the_field(
    fields: dict[str, Any], name: str
) -> None:
    values: dict[str, Any] = {"master_addr": "h", "master_port": 1} | fields
    with pytest.raises(ValueError, match=name):
        DistributedInfo(**values)


def test_leader_and_enabled() -> None:
    assert DistributedInfo(0, 2, "h", 1).is_leader and DistributedInfo(0, 2, "h", 1).enabled
    assert not DistributedInfo(1, 2, "h", 1).is_leader
    assert not DistributedInfo(0, 1, None, None).enabled


def test_collectives_without_a_process_group_are_local() -> None:
    assert agree(True) is True and agree(False) is False
    values = torch.tensor([1.0, 2.0])
    assert all_sum(values) is values and values.tolist() == [1.0, 2.0]
