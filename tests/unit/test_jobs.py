"""Unit tests for ``jobs/``: model zoo, datasets and the training loop, on CPU.

The loop runs against :class:`RecordingContext`, an in-memory JobContext;
models and datasets are kept tiny so each test takes well under a second.
"""

from __future__ import annotations

import ast
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from jobs.context import JobContext, StopRequested
from jobs.data import build_dataset
from jobs.params import (
    DATASET_NAMES,
    MODEL_NAMES,
    TrainParams,
    dataset_options,
    model_options,
    sample_shape,
)
from jobs.train import TrainResult, train
from jobs.zoo import build_model, example_input

JOBS_DIR = Path(__file__).resolve().parents[2] / "jobs"


class RecordingContext:
    """An in-memory :class:`JobContext` that records what the loop reports.

    ``checkpoint`` is what ``load_checkpoint`` returns before anything was
    saved; ``stop_after_steps`` makes ``should_stop`` true from its Nth call on
    (the loop polls once per step).
    """

    def __init__(
        self,
        *,
        checkpoint: tuple[dict[str, Any], int] | None = None,
        stop_after_steps: int | None = None,
    ) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.checkpoints: dict[int, dict[str, Any]] = {}
        self._initial = checkpoint
        self._stop_after_steps = stop_after_steps
        self._stop_polls = 0

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def gpu_ids(self) -> tuple[int, ...]:
        return ()

    @property
    def cpus(self) -> int:
        return 1

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def save_checkpoint(self, state: Mapping[str, Any], step: int) -> None:
        self.checkpoints[step] = dict(state)

    def load_checkpoint(self) -> tuple[dict[str, Any], int] | None:
        if self.checkpoints:
            step = max(self.checkpoints)
            return self.checkpoints[step], step
        return self._initial

    def should_stop(self) -> bool:
        self._stop_polls += 1
        return self._stop_after_steps is not None and self._stop_polls >= self._stop_after_steps

    def steps(self) -> list[int]:
        """Steps that logged a loss, in logging order."""
        return [step for step, metrics in self.metrics if "loss" in metrics]

    def losses(self) -> list[float]:
        return [metrics["loss"] for _, metrics in self.metrics if "loss" in metrics]


def make_params(**overrides: Any) -> TrainParams:
    """A tiny MLP run: 256 samples of width 8, batches of 32 (8 steps per epoch)."""
    fields: dict[str, Any] = {
        "model": "mlp",
        "model_options": {"input_dim": 8, "hidden": [16], "num_classes": 4},
        "data": "synthetic_classification",
        "data_options": {"n_samples": 256, "input_dim": 8, "num_classes": 4},
        "batch_size": 32,
        "lr": 1e-2,
        "max_steps": 20,
    }
    return TrainParams(**(fields | overrides))


def tiny_cnn_params(**overrides: Any) -> TrainParams:
    """A tiny CNN run on 12x12 images, 4 classes."""
    shape = {"in_channels": 1, "image_size": 12, "num_classes": 4}
    return make_params(
        model="cnn",
        model_options=shape | {"channels": [4, 8]},
        data="synthetic_images",
        data_options=shape | {"n_samples": 256},
        **overrides,
    )


def run(
    params: TrainParams, ctx: RecordingContext | None = None
) -> tuple[RecordingContext, TrainResult]:
    ctx = ctx or RecordingContext()
    _: JobContext = ctx  # the double must satisfy the protocol the loop is typed against
    return ctx, train(ctx, params)


# --- model zoo ---------------------------------------------------------------


def test_mlp_defaults_are_64_256_256_10_with_relu_between() -> None:
    model = build_model("mlp", {})
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 256), (256, 256), (256, 10)]
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 2
    assert isinstance(list(model.children())[-1], nn.Linear)  # raw logits out


def test_model_options_are_defaults_and_a_fresh_copy() -> None:
    assert model_options("mlp") == {"input_dim": 64, "hidden": [256, 256], "num_classes": 10}
    assert {"in_channels", "image_size", "num_classes"} <= set(model_options("cnn"))
    model_options("mlp")["hidden"].append(1)
    assert model_options("mlp")["hidden"] == [256, 256]


@pytest.mark.parametrize(
    ("name", "options", "num_classes"),
    [
        ("mlp", {}, 10),
        ("mlp", {"input_dim": 5, "hidden": [], "num_classes": 3}, 3),
        ("cnn", {}, 10),
        ("cnn", {"in_channels": 3, "image_size": 17, "channels": [4, 4, 4], "num_classes": 2}, 2),
    ],
)
def test_example_input_is_accepted_by_the_model(
    name: str, options: dict[str, Any], num_classes: int
) -> None:
    model = build_model(name, options)
    sample = example_input(name, options, batch=3)
    assert sample.dtype == torch.float32
    assert model(sample).shape == (3, num_classes)
    assert torch.equal(sample, example_input(name, options, batch=3))


def test_every_listed_model_builds_with_defaults() -> None:
    for name in MODEL_NAMES:
        assert build_model(name, {})(example_input(name, {})).shape == (2, 10)


# --- datasets ----------------------------------------------------------------


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_dataset_is_deterministic_in_seed(name: str) -> None:
    options = {"n_samples": 64}
    first = build_dataset(name, options, seed=3).tensors
    again = build_dataset(name, options, seed=3).tensors
    other = build_dataset(name, options, seed=4).tensors
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    features, labels = first
    assert features.dtype == torch.float32 and labels.dtype == torch.int64
    assert features.shape == (64, *sample_shape(name, options))
    assert int(labels.min()) >= 0 and int(labels.max()) < dataset_options(name)["num_classes"]


def test_datasets_leave_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for name in DATASET_NAMES:
        build_dataset(name, {"n_samples": 16}, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_synthetic_images_classes_are_balanced() -> None:
    _, labels = build_dataset("synthetic_images", {"n_samples": 40, "num_classes": 4}, 0).tensors
    assert torch.bincount(labels).tolist() == [10, 10, 10, 10]


# --- refusals name the bad thing ---------------------------------------------

REFUSALS: list[tuple[str, Callable[[], object], tuple[str, ...]]] = [
    ("unknown model", lambda: build_model("resnet", {}), ("resnet", "cnn", "mlp")),
    ("unknown model defaults", lambda: model_options("vit"), ("vit",)),
    (
        "unknown model option",
        lambda: build_model("mlp", {"hiden": [8]}),
        ("mlp", "hiden", "hidden"),
    ),
    ("bad hidden", lambda: build_model("mlp", {"hidden": [0]}), ("mlp", "hidden")),
    ("bool is not int", lambda: build_model("mlp", {"input_dim": True}), ("input_dim",)),
    (
        "cnn too small",
        lambda: build_model("cnn", {"image_size": 3, "channels": [4, 4]}),
        ("cnn", "image_size"),
    ),
    ("unknown dataset", lambda: build_dataset("mnist", {}, 0), ("mnist", "synthetic_images")),
    ("unknown dataset defaults", lambda: dataset_options("cifar"), ("cifar",)),
    (
        "unknown dataset option",
        lambda: build_dataset("synthetic_classification", {"n_sample": 3}, 0),
        ("n_sample", "n_samples"),
    ),
    ("negative noise", lambda: build_dataset("synthetic_images", {"noise": -1}, 0), ("noise",)),
    ("train unknown model", lambda: make_params(model="transformer"), ("transformer",)),
    ("train optimizer", lambda: make_params(optimizer="rmsprop"), ("rmsprop", "adam", "sgd")),
    ("no length", lambda: make_params(max_steps=None), ("epochs", "max_steps")),
    ("batch size", lambda: make_params(batch_size=0), ("batch_size",)),
    ("learning rate", lambda: make_params(lr=-1.0), ("lr",)),
    (
        "checkpoint every",
        lambda: make_params(checkpoint_every_steps=0),
        ("checkpoint_every_steps",),
    ),
    (
        "shape mismatch",
        lambda: make_params(data_options={"input_dim": 9, "num_classes": 4}),
        ("shape", "(8,)", "(9,)"),
    ),
    (
        "class mismatch",
        lambda: make_params(data_options={"input_dim": 8, "num_classes": 5}),
        ("num_classes",),
    ),
]


@pytest.mark.parametrize(("call", "names"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusal_names_the_bad_thing(call: Callable[[], object], names: tuple[str, ...]) -> None:
    with pytest.raises(ValueError) as raised:
        call()
    for name in names:
        assert name in str(raised.value)


# --- training loop -----------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        make_params(max_steps=60),
        make_params(max_steps=60, optimizer="sgd", lr=5e-2),
        tiny_cnn_params(max_steps=60),
    ],
    ids=["mlp-adam", "mlp-sgd", "cnn-adam"],
)
def test_loss_falls(params: TrainParams) -> None:
    ctx, result = run(params)
    losses = ctx.losses()
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10
    assert result.metrics["train_accuracy"] > 1 / 4 + 0.2  # well above chance (4 classes)


def test_max_steps_is_honoured_exactly() -> None:
    ctx, result = run(make_params(max_steps=7))
    assert ctx.steps() == list(range(1, 8))
    assert result.steps == 7
    assert list(ctx.checkpoints) == [7]  # the final checkpoint


def test_epochs_run_ceil_n_over_batch_steps_each() -> None:
    # 100 samples in batches of 32: 4 steps per epoch, the last one short.
    params = make_params(data_options={"n_samples": 100, "input_dim": 8, "num_classes": 4})
    ctx, result = run(TrainParams(**(vars(params) | {"epochs": 3, "max_steps": None})))
    assert ctx.steps() == list(range(1, 13)) and result.steps == 12
    epoch_ends = [(step, m["epoch"]) for step, m in ctx.metrics if "epoch" in m]
    assert epoch_ends == [(4, 1.0), (8, 2.0), (12, 3.0)]
    assert all(0.0 <= m["train_accuracy"] <= 1.0 for _, m in ctx.metrics if "epoch" in m)


@pytest.mark.parametrize(("epochs", "max_steps", "expected"), [(3, 5, 5), (1, 50, 8)])
def test_epochs_and_max_steps_stop_at_whichever_first(
    epochs: int, max_steps: int, expected: int
) -> None:
    ctx, result = run(make_params(epochs=epochs, max_steps=max_steps))
    assert ctx.steps()[-1] == result.steps == expected


def test_checkpoints_every_n_steps_and_at_the_end() -> None:
    ctx, _ = run(make_params(max_steps=10, checkpoint_every_steps=3))
    assert sorted(ctx.checkpoints) == [3, 6, 9, 10]
    state = ctx.checkpoints[9]
    assert state["step"] == 9 and state["epoch"] == 1  # 8 steps per epoch
    assert {"model", "optimizer"} <= set(state)


def test_checkpoints_are_snapshots_not_live_weights() -> None:
    ctx, result = run(make_params(max_steps=10, checkpoint_every_steps=5))
    early, final = ctx.checkpoints[5]["model"], ctx.checkpoints[10]["model"]
    assert any(not torch.equal(early[k], final[k]) for k in early)
    assert all(torch.equal(final[k], v) for k, v in result.model.state_dict().items())


@pytest.mark.parametrize("resume_step", [4, 8, 11])  # mid-epoch, epoch end, next epoch
def test_resume_continues_at_the_next_step_and_replays_the_same_batches(resume_step: int) -> None:
    params = make_params(max_steps=14, checkpoint_every_steps=1)
    full, _ = run(params)
    ctx, result = run(
        params, RecordingContext(checkpoint=(full.checkpoints[resume_step], resume_step))
    )
    assert ctx.steps() == list(range(resume_step + 1, 15))
    assert result.steps == 14
    assert ctx.losses() == pytest.approx(full.losses()[resume_step:], rel=1e-5)


def test_resume_from_the_final_checkpoint_trains_nothing() -> None:
    params = make_params(max_steps=5)
    first, done = run(params)
    ctx, result = run(params, RecordingContext(checkpoint=(first.checkpoints[5], 5)))
    assert ctx.metrics == [] and ctx.checkpoints == {}
    assert result.steps == 5 and result.metrics["loss"] == done.metrics["loss"]


def test_resume_into_a_different_model_is_refused() -> None:
    first, _ = run(make_params(max_steps=2))
    other = make_params(model_options={"input_dim": 8, "hidden": [32], "num_classes": 4})
    with pytest.raises(ValueError, match="does not fit model 'mlp'"):
        run(other, RecordingContext(checkpoint=(first.checkpoints[2], 2)))


def test_stop_request_checkpoints_the_current_step_then_raises() -> None:
    params = make_params(max_steps=10)
    ctx = RecordingContext(stop_after_steps=3)
    with pytest.raises(StopRequested):
        train(ctx, params)
    assert ctx.steps() == [1, 2, 3]
    assert list(ctx.checkpoints) == [3] and ctx.checkpoints[3]["step"] == 3
    resumed, result = run(params, RecordingContext(checkpoint=(ctx.checkpoints[3], 3)))
    assert resumed.steps() == list(range(4, 11)) and result.steps == 10


def test_stop_request_on_the_last_step_finishes_normally() -> None:
    # The request would come true on the third poll, i.e. after step 3: the run is complete.
    ctx, result = run(make_params(max_steps=3), RecordingContext(stop_after_steps=3))
    assert ctx.steps() == [1, 2, 3] and result.steps == 3
    assert list(ctx.checkpoints) == [3]


def test_same_seed_same_first_loss_other_seed_differs() -> None:
    first = [run(make_params(max_steps=1, seed=seed))[0].losses()[0] for seed in (0, 0, 1)]
    assert first[0] == first[1] != first[2]


def test_result_is_ready_to_log() -> None:
    ctx, result = run(tiny_cnn_params(max_steps=3))
    assert next(result.model.parameters()).device.type == "cpu" and not result.model.training
    assert result.example_input.shape == (2, 1, 12, 12)
    assert result.model(result.example_input).shape == (2, 4)
    assert set(result.metrics) == {"loss", "accuracy", "train_accuracy"}
    assert result.metrics["loss"] == ctx.losses()[-1]
    metric_values = [v for _, m in ctx.metrics for v in m.values()]
    assert all(isinstance(v, float) and math.isfinite(v) for v in metric_values)


def test_jobs_imports_only_torch_stdlib_and_itself() -> None:
    allowed = set(sys.stdlib_module_names) | {"torch", "jobs"}
    for path in JOBS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"
