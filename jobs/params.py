"""What a training run is, checked without torch: the built-in models and datasets, their
options and shapes, and :class:`TrainParams`.

Torch-free on purpose: the control plane validates training configs with this
module and never imports torch. ``jobs.zoo``, ``jobs.data`` and ``jobs.train``
build what it describes.

A registry maps a name (``"mlp"``) to its options, each a default plus a check.
Resolving merges user options over the defaults and fails with a
:class:`ValueError` that names the registry entry, the bad option and the
valid ones, so a config error is actionable without reading the source.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Check = Callable[[Any], Any]
"""Returns the value, normalised, or raises ``ValueError`` with a short reason."""


@dataclass(frozen=True)
class Option:
    """One option: its default and the check a user value must pass.

    Example::

        Option(64, int_at_least(1))
    """

    default: Any
    check: Check


Registry = Mapping[str, Mapping[str, Option]]


def int_at_least(minimum: int) -> Check:
    """A check accepting an ``int`` (not a ``bool``) that is ``>= minimum``."""

    def check(value: Any) -> int:
        # bool is an int subclass; ``hidden: true`` in YAML is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"must be an integer >= {minimum}, got {value!r}")
        return value

    return check


def non_negative_float(value: Any) -> float:
    """Check: a finite real number ``>= 0`` (ints accepted), returned as ``float``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"must be a finite number >= 0, got {value!r}")
    return float(value)


def int_list(min_len: int) -> Check:
    """A check accepting a list/tuple of at least ``min_len`` positive ints, returned as a list."""
    item = int_at_least(1)

    def check(value: Any) -> list[int]:
        if not isinstance(value, list | tuple) or len(value) < min_len:
            raise ValueError(
                f"must be a list of at least {min_len} positive integers, got {value!r}"
            )
        try:
            return [item(v) for v in value]
        except ValueError:
            raise ValueError(f"must contain only positive integers, got {value!r}") from None

    return check


def unknown_name(kind: str, name: str, registry: Registry) -> ValueError:
    """The error for a name not in ``registry``; ``kind`` is e.g. ``"model"``."""
    return ValueError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(registry))}")


def defaults(kind: str, name: str, registry: Registry) -> dict[str, Any]:
    """A fresh copy of the default options of ``name`` (safe for callers to mutate)."""
    if name not in registry:
        raise unknown_name(kind, name, registry)
    return {key: copy.deepcopy(opt.default) for key, opt in registry[name].items()}


def resolve(kind: str, name: str, registry: Registry, given: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults of ``name`` overlaid with ``given``, every value checked.

    Raises ``ValueError`` for an unknown name, an unknown option, or a value
    that fails its check; the message names the option and lists the valid ones.
    """
    resolved = defaults(kind, name, registry)
    specs = registry[name]
    valid = ", ".join(sorted(specs))
    for key, value in given.items():
        if key not in specs:
            raise ValueError(f"{kind} {name!r}: unknown option {key!r}; valid options: {valid}")
        try:
            resolved[key] = specs[key].check(value)
        except ValueError as exc:
            raise ValueError(f"{kind} {name!r}: option {key!r} {exc}") from None
    return resolved


# -- the built-in models -----------------------------------------------------------------

_MODELS: Registry = {
    "mlp": {
        "input_dim": Option(64, int_at_least(1)),
        # An empty list is allowed: a single linear layer (logistic regression).
        "hidden": Option([256, 256], int_list(min_len=0)),
        "num_classes": Option(10, int_at_least(2)),
    },
    "cnn": {
        "in_channels": Option(1, int_at_least(1)),
        "image_size": Option(28, int_at_least(1)),
        "num_classes": Option(10, int_at_least(2)),
        # One conv+pool block per entry; each block halves the image side.
        "channels": Option([16, 32], int_list(min_len=1)),
    },
}

MODEL_NAMES: tuple[str, ...] = tuple(sorted(_MODELS))
"""Every model ``jobs.zoo.build_model`` knows."""


def model_options(name: str) -> dict[str, Any]:
    """The default options of model ``name``; ``ValueError`` if the name is unknown.

    Example: ``model_options("mlp")["hidden"] == [256, 256]``.
    """
    return defaults("model", name, _MODELS)


def resolve_model_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults of ``name`` overlaid with ``options``, every name and value checked.

    Raises ``ValueError`` naming the model and the bad option (listing the valid
    ones), also for combinations that cannot be built, e.g. a cnn whose image
    is too small for its number of pooling blocks.
    """
    resolved = resolve("model", name, _MODELS, options)
    if name == "cnn":
        min_side_px = 2 ** len(resolved["channels"])
        if resolved["image_size"] < min_side_px:
            raise ValueError(
                f"model 'cnn': option 'image_size' must be >= {min_side_px} for "
                f"{len(resolved['channels'])} pooling blocks (option 'channels'), "
                f"got {resolved['image_size']}"
            )
    return resolved


def input_shape(name: str, options: Mapping[str, Any]) -> tuple[int, ...]:
    """The shape of one input sample (no batch dimension) that model ``name`` accepts."""
    opts = resolve_model_options(name, options)
    if name == "mlp":
        return (opts["input_dim"],)
    return (opts["in_channels"], opts["image_size"], opts["image_size"])


# -- the built-in datasets ---------------------------------------------------------------

_DATASETS: Registry = {
    "synthetic_classification": {
        "n_samples": Option(4096, int_at_least(1)),
        "input_dim": Option(64, int_at_least(1)),
        "num_classes": Option(10, int_at_least(2)),
        # Std of the label noise relative to the unit-std teacher logits.
        "noise": Option(0.1, non_negative_float),
    },
    "synthetic_images": {
        "n_samples": Option(2048, int_at_least(1)),
        "in_channels": Option(1, int_at_least(1)),
        # At least 2 so a pattern has more than one pixel to normalise over.
        "image_size": Option(28, int_at_least(2)),
        "num_classes": Option(10, int_at_least(2)),
        # Std of the pixel noise relative to the unit-std class patterns.
        "noise": Option(1.0, non_negative_float),
        # Random circular shift per image, up to this many pixels on each axis:
        # without it a template match solves the task and the loss curve is flat.
        "max_shift_px": Option(3, int_at_least(0)),
    },
}

DATASET_NAMES: tuple[str, ...] = tuple(sorted(_DATASETS))
"""Every dataset ``jobs.data.build_dataset`` knows."""


def dataset_options(name: str) -> dict[str, Any]:
    """The default options of dataset ``name``; ``ValueError`` if the name is unknown."""
    return defaults("dataset", name, _DATASETS)


def resolve_dataset_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults of ``name`` overlaid with ``options``, every name and value checked.

    ``ValueError`` names the dataset and the bad option and lists the valid ones.
    """
    return resolve("dataset", name, _DATASETS, options)


def sample_shape(name: str, options: Mapping[str, Any]) -> tuple[int, ...]:
    """The shape of one sample's features (no batch dimension), without generating data."""
    opts = resolve_dataset_options(name, options)
    if name == "synthetic_classification":
        return (opts["input_dim"],)
    return (opts["in_channels"], opts["image_size"], opts["image_size"])


# -- one training run ----------------------------------------------------------------------

OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")
"""Optimizer names :class:`TrainParams` accepts."""


@dataclass(frozen=True)
class TrainParams:
    """Everything that defines a training run; validated on construction.

    Set ``epochs`` or ``max_steps`` (or both: training stops at whichever comes
    first). Construction raises ``ValueError`` naming the bad field, including
    unknown model/dataset names or options and a model that does not fit the data.

    Example::

        params = TrainParams(
            model="mlp", model_options={"hidden": [32]},
            data="synthetic_classification", data_options={"n_samples": 512},
            batch_size=64, lr=1e-3, max_steps=100, checkpoint_every_steps=50,
        )
    """

    model: str
    model_options: Mapping[str, Any]
    data: str
    data_options: Mapping[str, Any]
    batch_size: int
    lr: float
    epochs: int | None = None
    max_steps: int | None = None
    checkpoint_every_steps: int | None = None
    seed: int = 0
    optimizer: str = "adam"

    def __post_init__(self) -> None:
        """Reject an invalid run before any data or model is built."""
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.epochs is None and self.max_steps is None:
            raise ValueError("set epochs or max_steps")
        for field in ("epochs", "max_steps", "checkpoint_every_steps"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise ValueError(f"{field} must be >= 1, got {value}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; valid optimizers: {', '.join(OPTIMIZERS)}"
            )
        model_opts = resolve_model_options(self.model, self.model_options)
        data_opts = resolve_dataset_options(self.data, self.data_options)
        expects, gives = input_shape(self.model, model_opts), sample_shape(self.data, data_opts)
        if expects != gives:
            raise ValueError(
                f"model {self.model!r} expects samples of shape {expects} but dataset "
                f"{self.data!r} gives {gives}; make model_options and data_options agree"
            )
        if model_opts["num_classes"] != data_opts["num_classes"]:
            raise ValueError(
                f"model {self.model!r} has num_classes={model_opts['num_classes']} but dataset "
                f"{self.data!r} has num_classes={data_opts['num_classes']}"
            )

    def total_steps(self, n_samples: int, world_size: int = 1) -> int:
        """Global steps a full run takes on ``n_samples`` samples (last batch may be short).

        With ``world_size`` data-parallel ranks a step trains ``world_size``
        batches at once, so an epoch takes ``ceil(batches / world_size)`` steps.
        """
        per_epoch = steps_per_epoch(n_samples, self.batch_size, world_size)
        limits = [self.max_steps] if self.max_steps is not None else []
        if self.epochs is not None:
            limits.append(self.epochs * per_epoch)
        return min(limits)


def steps_per_epoch(n_samples: int, batch_size: int, world_size: int) -> int:
    """Steps in one epoch when ``world_size`` ranks each train one batch per step."""
    return math.ceil(math.ceil(n_samples / batch_size) / world_size)
