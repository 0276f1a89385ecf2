"""The training loop: a zoo model on a built-in dataset, reporting through a JobContext.

The loop knows nothing of Ray or MLflow. It logs per-step metrics, saves
resumable checkpoints, honours stop requests (cancel, preemption) and resumes
from the context's last checkpoint at the next step. Batch order is a pure
function of ``(seed, epoch)``, so a resumed run replays the same batches an
uninterrupted one would have seen.

Launched as several processes (``JOBWORKER_WORLD_SIZE`` > 1, see
:mod:`jobs.distributed`), the same loop trains data-parallel: each rank takes
its share of every epoch's batches and DistributedDataParallel averages the
gradients, so one step is one optimizer step taken by all ranks together.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from jobs.context import JobContext, StopRequested
from jobs.data import build_dataset
from jobs.distributed import DistributedInfo, agree, all_sum, init_process_group, shutdown
from jobs.params import TrainParams, steps_per_epoch
from jobs.progress import ProgressLog
from jobs.zoo import build_model, example_input

_SGD_MOMENTUM = 0.9  # plain SGD without momentum crawls on these problems
_EVAL_BATCH = 1024  # full-dataset accuracy is computed in chunks to bound memory


@dataclass
class TrainResult:
    """What a finished run hands back to its runner for logging/registering.

    ``model`` is on CPU in eval mode; ``example_input`` is a CPU batch it
    accepts; ``metrics`` holds the last step's ``loss`` and ``accuracy`` and
    the full-dataset ``train_accuracy``; ``steps`` is the last global step.

    Example::

        result = train(ctx, params)
        result.model(result.example_input).shape   # (2, num_classes)
    """

    model: nn.Module
    example_input: torch.Tensor
    metrics: dict[str, float]
    steps: int


def train(ctx: JobContext, params: TrainParams) -> TrainResult:
    """Train ``params.model`` on ``params.data`` on ``ctx.device``, resuming if a checkpoint exists.

    Steps are 1-based global steps. Each step logs ``loss`` and batch
    ``accuracy``; the last step of each epoch adds ``epoch`` (epochs completed)
    and ``train_accuracy``. Rank 0 prints progress lines (step, loss, samples/s)
    to the job's log now and then (:class:`~jobs.progress.ProgressLog`). Checkpoints are saved every
    ``checkpoint_every_steps`` steps, on a stop request and at the end. When
    ``ctx.should_stop()`` is true after a step that is not the last, the loop
    checkpoints that step and raises :class:`StopRequested`.

    When the environment describes several ranks (:meth:`DistributedInfo.from_env`),
    every rank runs this function on its own context: the ranks join a process
    group on ``ctx.device`` and train one model with DistributedDataParallel.
    A step is one optimizer step taken by all ranks together, on the batches
    ``i`` with ``i % world_size == rank`` of the epoch's order (see
    :func:`epoch_batches`), so an epoch takes ``ceil(batches / world_size)``
    steps. Logged ``loss``/``accuracy`` are over all ranks' batches. Stop
    requests are agreed every step: one rank's request stops every rank after
    the same step. Only rank 0 logs metrics and saves checkpoints (of the
    unwrapped model, so they resume with or without data parallelism); every
    rank restores from its ``ctx.load_checkpoint()``, which must return rank
    0's checkpoint. A checkpoint resumes at its step count; resumed with
    another world size, that count is read in the new size's steps per epoch.
    """
    info = DistributedInfo.from_env()
    if not info.enabled:
        return _train(ctx, params, info)
    init_process_group(info, ctx.device)
    try:
        return _train(ctx, params, info)
    except BaseException as error:
        # The traceback holds _train's frame and so its DDP wrapper: free it now, before
        # shutdown() destroys the group, not later when the caller drops the exception
        # (see shutdown() for the deadlock that order avoids).
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        shutdown()


def _train(ctx: JobContext, params: TrainParams, info: DistributedInfo) -> TrainResult:
    """:func:`train` as rank ``info.rank`` of ``info.world_size`` (inside its process group)."""
    torch.manual_seed(params.seed)  # model init is the only draw from the global RNG
    dataset = build_dataset(params.data, params.data_options, params.seed)
    model = build_model(params.model, params.model_options)
    device = torch.device(ctx.device)
    model.to(device)
    optimizer = _make_optimizer(params, model.parameters())
    per_epoch = steps_per_epoch(len(dataset), params.batch_size, info.world_size)
    total_steps = params.total_steps(len(dataset), info.world_size)
    step, last_metrics = _restore(ctx, params, model, optimizer)
    # Restored before wrapping: every rank loaded the same checkpoint, and DDP
    # broadcasts rank 0's weights anyway. Checkpoints and evaluation use `model`.
    forward = _data_parallel(model, device) if info.enabled else model
    saved_step = step if step > 0 else None
    loss_fn = nn.CrossEntropyLoss()
    train_accuracy: float | None = None

    def checkpoint() -> None:
        nonlocal saved_step
        if info.is_leader:
            state = {
                "model": _to_cpu(model.state_dict()),
                "optimizer": _to_cpu(optimizer.state_dict()),
                "step": step,
                "epoch": step // per_epoch,  # epochs completed
                "metrics": dict(last_metrics),
            }
            ctx.save_checkpoint(state, step)
        saved_step = step

    progress = ProgressLog(total_steps) if info.is_leader else None
    model.train()
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, per_epoch)
        loader = _epoch_loader(dataset, params, epoch, done_in_epoch, device, info)
        for features, labels in loader:
            step += 1
            features = features.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            logits = forward(features)
            loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                hits = (logits.argmax(dim=1) == labels).float().mean()
                if info.enabled:
                    loss_value, accuracy = _mean_over_ranks(loss.detach(), hits, len(labels))
                else:
                    # One host sync for both values rather than one per .item().
                    loss_value, accuracy = torch.stack((loss.detach(), hits)).tolist()
            last_metrics = {"loss": loss_value, "accuracy": accuracy}
            metrics = dict(last_metrics)
            train_accuracy = None
            if step % per_epoch == 0:
                train_accuracy = _dataset_accuracy(model, dataset, device)
                metrics |= {
                    "epoch": float(step // per_epoch),
                    "train_accuracy": train_accuracy,
                }
            if info.is_leader:
                ctx.log_metrics(metrics, step=step)
            if progress is not None:
                progress.step(step, loss_value, len(labels) * info.world_size)

            # A stop request on the last step is moot: the run is complete.
            # Ranks agree every step (same step count on all), so none is left
            # waiting in a gradient all-reduce that the others never join.
            stop = step < total_steps and (
                agree(ctx.should_stop()) if info.enabled else ctx.should_stop()
            )
            every = params.checkpoint_every_steps
            if stop or (every is not None and step % every == 0):
                checkpoint()
            if stop:
                raise StopRequested(f"stop requested; checkpointed at step {step}")
            if step >= total_steps:
                break

    if saved_step != step:
        checkpoint()
    if train_accuracy is None:
        train_accuracy = _dataset_accuracy(model, dataset, device)
    return TrainResult(
        model=model.cpu().eval(),
        example_input=example_input(params.model, params.model_options),
        metrics={**last_metrics, "train_accuracy": train_accuracy},
        steps=step,
    )


def epoch_batches(
    n_samples: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> list[torch.Tensor]:
    """The index batches rank ``rank`` of ``world_size`` trains on in 0-based ``epoch``, in order.

    The epoch's order is a permutation seeded by ``(seed, epoch)`` alone, cut
    into batches of ``batch_size`` (the last may be short). A rank takes the
    batches ``i`` with ``i % world_size == rank``; its ``k``-th batch is the
    one trained in the epoch's ``k``-th step. When the batches do not divide
    evenly, the last step's missing ones wrap around to the epoch's first
    batches (as ``DistributedSampler`` pads), so every rank takes
    ``ceil(batches / world_size)`` and all ranks step together.

    Example::

        epoch_batches(100, 32, seed=0, epoch=0)                  # 4 batches: 32, 32, 32, 4
        epoch_batches(100, 32, 0, 0, rank=1, world_size=3)       # batches 1 and 0 (wrapped)
    """
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    order = torch.randperm(n_samples, generator=generator)
    batches = list(torch.split(order, batch_size))
    if world_size == 1:
        return batches
    steps = math.ceil(len(batches) / world_size)
    return [batches[(k * world_size + rank) % len(batches)] for k in range(steps)]


def _data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel (``device_ids`` only for CUDA)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return DistributedDataParallel(model, device_ids=[index])
    return DistributedDataParallel(model)


def _mean_over_ranks(loss: torch.Tensor, hits: torch.Tensor, n_samples: int) -> list[float]:
    """``[loss, accuracy]`` over every rank's batch, weighted by batch size (one all-reduce)."""
    weight = torch.tensor(float(n_samples), device=loss.device)
    totals = all_sum(torch.stack((loss * weight, hits * weight, weight)))
    means: list[float] = (totals[:2] / totals[2]).tolist()
    return means


def _make_optimizer(params: TrainParams, weights: Any) -> torch.optim.Optimizer:
    """The optimizer ``params.optimizer`` over ``weights`` at ``params.lr``."""
    if params.optimizer == "sgd":
        return torch.optim.SGD(weights, lr=params.lr, momentum=_SGD_MOMENTUM)
    return torch.optim.Adam(weights, lr=params.lr)


def _restore(
    ctx: JobContext, params: TrainParams, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, dict[str, float]]:
    """Load the context's checkpoint into ``model``/``optimizer``.

    Returns ``(last completed step, last step's metrics)``; ``(0, {})`` when
    starting fresh. ``ValueError`` when the checkpoint was made by a different
    model, so the runner reports a config problem rather than a torch trace.
    """
    restored = ctx.load_checkpoint()
    if restored is None:
        return 0, {}
    state, step = restored
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ValueError(
            f"checkpoint at step {step} does not fit model {params.model!r} with options "
            f"{dict(params.model_options)} and optimizer {params.optimizer!r}: {exc}"
        ) from exc
    return step, dict(state.get("metrics", {}))


def _epoch_loader(
    dataset: TensorDataset,
    params: TrainParams,
    epoch: int,
    skip_batches: int,
    device: torch.device,
    info: DistributedInfo,
) -> DataLoader[Any]:
    """This rank's shuffled batches of 0-based ``epoch``, less the first ``skip_batches``.

    The order comes from :func:`epoch_batches`, a function of ``(seed, epoch)``
    alone, so a resumed run can skip exactly the batches already trained on.
    The loader is handed whole index batches: one tensor gather per step
    instead of ``batch_size`` ``__getitem__`` calls and a collate.
    """
    batches = epoch_batches(
        len(dataset), params.batch_size, params.seed, epoch, info.rank, info.world_size
    )[skip_batches:]
    return DataLoader(
        dataset,
        sampler=batches,
        batch_size=None,
        num_workers=0,
        pin_memory=device.type == "cuda",
    )


@torch.no_grad()
def _dataset_accuracy(model: nn.Module, dataset: TensorDataset, device: torch.device) -> float:
    """Fraction of ``dataset`` that ``model`` classifies correctly, in eval mode."""
    features, labels = dataset.tensors
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, len(labels), _EVAL_BATCH):
        chunk = slice(start, start + _EVAL_BATCH)
        predicted = model(features[chunk].to(device)).argmax(dim=1)
        correct += (predicted == labels[chunk].to(device)).sum()
    model.train()
    return correct.item() / len(labels)


def _to_cpu(value: Any) -> Any:
    """A deep copy of a (nested) state dict with every tensor detached onto the CPU.

    ``state_dict()`` returns live references; the runner may store or
    serialise a checkpoint later, so it must not change as training goes on.
    CPU copies also resume on any device.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(item) for item in value)
    return value
