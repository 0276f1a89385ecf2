"""The model zoo: built-in models addressed by name and a mapping of options.

Configs name a model (``model: {name: cnn, options: {image_size: 32}}``); this
module turns that into a ``torch.nn.Module`` and an example input of the shape
the model accepts (used for the MLflow model signature). Option names and
values are checked before anything is built, so a config validator can call
:func:`resolve_model_options` cheaply.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from jobs._options import Option, Registry, defaults, int_at_least, int_list, resolve

_KIND = "model"

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
"""Every model :func:`build_model` knows."""


def model_options(name: str) -> dict[str, Any]:
    """The default options of model ``name``; ``ValueError`` if the name is unknown.

    Example: ``model_options("mlp")["hidden"] == [256, 256]``.
    """
    return defaults(_KIND, name, _MODELS)


def resolve_model_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults of ``name`` overlaid with ``options``, every name and value checked.

    Raises ``ValueError`` naming the model and the bad option (listing the valid
    ones), also for combinations that cannot be built, e.g. a cnn whose image
    is too small for its number of pooling blocks.
    """
    resolved = resolve(_KIND, name, _MODELS, options)
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


def example_input(name: str, options: Mapping[str, Any], batch: int = 2) -> torch.Tensor:
    """A deterministic float32 CPU batch of ``batch`` samples the model accepts.

    Meant for signatures and smoke tests, not for training: the values are a
    fixed standard-normal draw, the same on every call.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    # A private generator keeps the global RNG (and so training) untouched.
    generator = torch.Generator().manual_seed(0)
    shape = (batch, *input_shape(name, options))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def build_model(name: str, options: Mapping[str, Any]) -> nn.Module:
    """Build model ``name`` with ``options`` over its defaults, on CPU, freshly initialised.

    Initialisation draws from torch's global RNG: seed it first for a
    reproducible model. ``ValueError`` for an unknown name or a bad option.

    Example::

        model = build_model("mlp", {"hidden": [32]})   # Linear 64->32, ReLU, Linear 32->10
        logits = model(example_input("mlp", {"hidden": [32]}))   # shape (2, 10)
    """
    opts = resolve_model_options(name, options)
    return _BUILDERS[name](opts)


def _build_mlp(opts: Mapping[str, Any]) -> nn.Module:
    """Linear layers ``input_dim -> *hidden -> num_classes`` with ReLU between them."""
    dims = [opts["input_dim"], *opts["hidden"], opts["num_classes"]]
    layers: list[nn.Module] = []
    for in_dim, out_dim in itertools.pairwise(dims):
        layers += [nn.Linear(in_dim, out_dim), nn.ReLU()]
    # No activation after the head: the loss expects raw logits.
    return nn.Sequential(*layers[:-1])


def _build_cnn(opts: Mapping[str, Any]) -> nn.Module:
    """Blocks of conv3x3 (same padding) + ReLU + 2x2 max-pool, then a linear head."""
    layers: list[nn.Module] = []
    in_channels = opts["in_channels"]
    side_px = opts["image_size"]
    for out_channels in opts["channels"]:
        layers += [
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        in_channels = out_channels
        side_px //= 2  # max-pool floors odd sides
    layers += [nn.Flatten(), nn.Linear(in_channels * side_px * side_px, opts["num_classes"])]
    return nn.Sequential(*layers)


_BUILDERS: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {
    "mlp": _build_mlp,
    "cnn": _build_cnn,
}
