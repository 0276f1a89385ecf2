"""User code the integration tests submit (entrypoints) or serve (models)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from jobs.context import JobContext, StopRequested
from jobs.train import TrainResult


def explode(ctx: JobContext, config: dict[str, Any]) -> None:
    ctx.log_metrics({"loss": 1.0}, step=1)
    raise RuntimeError(f"boom from user code ({config.get('why', 'no reason')})")


def report_environment(ctx: JobContext, config: dict[str, Any]) -> None:
    """Print what the job process sees, for the tests to read from its log."""
    print(f"torch_threads={torch.get_num_threads()}")
    print(f"omp_threads={os.environ.get('OMP_NUM_THREADS')}")
    print(f"cuda_visible_devices={os.environ.get('CUDA_VISIBLE_DEVICES')}")
    print(f"ctx_gpu_ids={','.join(map(str, ctx.gpu_ids))}")
    print(f"ctx_cpus={ctx.cpus}")
    print(f"ray_node_id={os.environ.get('JOBWORKER_RAY_NODE_ID')}")
    print(f"pid={os.getpid()}", flush=True)
    ctx.log_metrics({"threads": float(torch.get_num_threads())}, step=1)


def report_and_hold(ctx: JobContext, config: dict[str, Any]) -> None:
    """Report the environment, then keep the GPUs for ``hold_s`` (or until stopped)."""
    report_environment(ctx, config)
    deadline = time.monotonic() + float(config.get("hold_s", 5))
    step = 1
    while time.monotonic() < deadline and not ctx.should_stop():
        step += 1
        ctx.log_metrics({"loss": 1.0 / step}, step=step)
        time.sleep(0.1)


def hold_until_system_metrics(ctx: JobContext, config: dict[str, Any]) -> None:
    """Log steps until the job's own MLflow run shows a system metric (CPU, memory...)."""
    import mlflow

    active = mlflow.active_run()
    assert active is not None, "the runner starts the job's run before the user code"
    client = mlflow.MlflowClient()
    deadline = time.monotonic() + float(config.get("timeout_s", 60))
    step = 0
    while time.monotonic() < deadline:
        step += 1
        ctx.log_metrics({"loss": 1.0 / step}, step=step)
        metrics = client.get_run(active.info.run_id).data.metrics
        if any(k.startswith("system/") for k in metrics):
            return
        time.sleep(0.2)
    raise RuntimeError("no system metrics in the run within the timeout")


def run_until_stopped(ctx: JobContext, config: dict[str, Any]) -> None:
    """Train "forever", checkpointing and stopping when asked (cooperative); with
    ``print_steps`` it prints ``step N`` to its log at each step."""
    step = 0
    while True:
        step += 1
        ctx.log_metrics({"loss": 1.0 / step}, step=step)
        if config.get("print_steps"):
            print(f"step {step}", flush=True)
        if ctx.should_stop():
            ctx.save_checkpoint({"step": step}, step=step)
            raise StopRequested
        time.sleep(config.get("step_s", 0.05))


def ignore_stop(ctx: JobContext, config: dict[str, Any]) -> None:
    """Never looks at should_stop: only the kill after the grace period ends it."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    step = 0
    while True:
        step += 1
        ctx.log_metrics({"loss": 1.0}, step=step)
        time.sleep(0.05)


class SlowModel(torch.nn.Module):
    """A 64 -> 10 linear model that takes ``delay_s`` per batch: capacity is easy to exceed.

    Logged with pickle serialization (a traced program would drop the sleep).
    """

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.linear = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)
        return self.linear(x)


def count_steps(ctx: JobContext, config: dict[str, Any]) -> None:
    """Count to ``steps`` at ``step_s`` a step, checkpointing every ``checkpoint_every``.

    Resumes from its last checkpoint and stops cooperatively (checkpoint first), so
    a preempted or retried job shows its step metric continuing, not restarting. With
    ``gate`` (a file path) it waits after step ``gate_step`` until that file exists,
    still stopping when asked: a test opens the gate once it has done what had to happen
    while the job ran, so the job cannot finish early on a slow machine.
    """
    restored = ctx.load_checkpoint()
    start = restored[1] + 1 if restored else 1
    every = int(config.get("checkpoint_every", 5))
    gate, gate_step = config.get("gate"), int(config.get("gate_step", 0))
    print(f"count_steps: starting at step {start}", flush=True)
    for step in range(start, int(config["steps"]) + 1):
        ctx.log_metrics({"counted": float(step)}, step=step)
        if step % every == 0:
            ctx.save_checkpoint({"step": step}, step=step)
        while gate and step >= gate_step and not os.path.exists(gate) and not ctx.should_stop():
            time.sleep(0.05)
        if ctx.should_stop():
            ctx.save_checkpoint({"step": step}, step=step)
            raise StopRequested
        time.sleep(float(config.get("step_s", 0.1)))


def gang_allreduce(ctx: JobContext, config: dict[str, Any]) -> None:
    """One rank of a multi-node job: report the environment, then all-reduce rank + 1."""
    import torch.distributed as dist

    report_environment(ctx, config)
    rank, world = int(os.environ["JOBWORKER_RANK"]), int(os.environ["JOBWORKER_WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        value = torch.tensor([float(rank + 1)])
        dist.all_reduce(value)
    finally:
        dist.destroy_process_group()
    print(f"rank={rank} world={world} allreduce={value.item():g}", flush=True)
    ctx.log_metrics({"allreduce": value.item()}, step=1)


class _Gated:
    """``ctx`` whose ``log_metrics`` waits, from step ``gate_step`` on, until the file ``gate``
    exists (or a stop is asked), saying so; it prints the first step it logs (a resume
    redoes the steps after its checkpoint)."""

    def __init__(self, ctx: JobContext, gate: str | None, gate_step: int) -> None:
        self._ctx = ctx
        self._gate = gate
        self._gate_step = gate_step
        self._first_step: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self._first_step is None:
            self._first_step = step
            print(f"train_example: first step {step}", flush=True)
        self._ctx.log_metrics(metrics, step)
        if self._gate and step >= self._gate_step and not os.path.exists(self._gate):
            print(f"train_example: waiting at the gate after step {step}", flush=True)
            while not os.path.exists(self._gate) and not self._ctx.should_stop():
                time.sleep(0.05)


def train_example(ctx: JobContext, config: dict[str, Any]) -> TrainResult:
    """The example config's model (configs/train/mlp_synthetic.yaml) trained by ``jobs.train``
    for ``max_steps``, checkpointing every ``checkpoint_every_steps``; with ``gate`` (a file
    path) the loop waits after logging step ``gate_step`` until that file exists."""
    from jobs.train import train
    from workers.interface.spec import load_spec

    example = Path(__file__).resolve().parents[2] / "configs" / "train" / "mlp_synthetic.yaml"
    params = dataclasses.replace(
        load_spec(example.read_text()).train_params(),
        max_steps=int(config["max_steps"]),
        checkpoint_every_steps=int(config["checkpoint_every_steps"]),
    )
    gated = _Gated(ctx, config.get("gate"), int(config.get("gate_step", 0)))
    return train(gated, params)


def exceed_gpu_memory(ctx: JobContext, config: dict[str, Any]) -> None:
    """Hold more GPU memory than asked for: on simulated GPUs, declare it (as NVML would
    show a real allocation), then train on until the node agent stops the process."""
    from workers.gpu_caps import SIM_USAGE_DIR_ENV
    from workers.sim_backend import write_usage

    held = int(float(config["hold_gib"]) * 2**30)
    job_id = os.environ["JOBWORKER_JOB_ID"]
    write_usage(os.environ[SIM_USAGE_DIR_ENV], job_id, os.getpid(), ctx.gpu_ids, held)
    step = 0
    while not ctx.should_stop():
        step += 1
        ctx.log_metrics({"loss": 1.0 / step}, step=step)
        time.sleep(0.2)
