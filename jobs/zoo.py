"""The model zoo: built-in models addressed by name and a mapping of options.

Configs name a model (``model: {name: cnn, options: {image_size: 32}}``); this
module turns that into a ``torch.nn.Module`` and an example input of the shape
the model accepts (used for the MLflow model signature). The models' names,
options and shapes are declared in :mod:`jobs.params` (torch-free, so the
control plane can check a config without importing torch).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from jobs.params import input_shape, resolve_model_options


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
