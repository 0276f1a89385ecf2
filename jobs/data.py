"""Built-in datasets that need no download: generated in memory from a seed.

Each dataset is a learnable classification problem, so a training run shows a
real falling loss, and is a pure function of ``(name, options, seed)``: the
same arguments give bit-identical tensors on every machine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.nn import functional
from torch.utils.data import TensorDataset

from jobs.params import resolve_dataset_options


def build_dataset(name: str, options: Mapping[str, Any], seed: int) -> TensorDataset:
    """Generate dataset ``name`` as ``TensorDataset(features_float32, labels_int64)``.

    Deterministic in ``seed`` and independent of torch's global RNG, which it
    leaves untouched. ``ValueError`` for an unknown name or a bad option.

    Example::

        ds = build_dataset("synthetic_classification", {"n_samples": 8}, seed=0)
        x, y = ds.tensors   # x: (8, 64) float32, y: (8,) int64 in [0, 10)
    """
    opts = resolve_dataset_options(name, options)
    generator = torch.Generator().manual_seed(seed)
    features, labels = _GENERATORS[name](opts, generator)
    return TensorDataset(features, labels)


def _classification(
    opts: Mapping[str, Any], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs labelled by a fixed random linear teacher plus logit noise.

    The teacher makes the problem linearly separable up to the noise, so an
    MLP can fit it; scaling by ``sqrt(input_dim)`` keeps the teacher logits at
    unit std whatever the width, so ``noise`` means the same for every shape.
    """
    n, dim, classes = opts["n_samples"], opts["input_dim"], opts["num_classes"]
    features = torch.randn(n, dim, generator=generator)
    teacher = torch.randn(dim, classes, generator=generator) / dim**0.5
    logits = features @ teacher
    logits += opts["noise"] * torch.randn(n, classes, generator=generator)
    return features, logits.argmax(dim=1)


def _images(
    opts: Mapping[str, Any], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class smooth random patterns, randomly shifted, plus pixel noise; classes balanced.

    Patterns are drawn at a quarter of the resolution and upsampled, so they
    are spatially smooth: the kind of local structure convolutions pick up,
    and the shifts reward their translation invariance.
    """
    n, classes = opts["n_samples"], opts["num_classes"]
    channels, side_px = opts["in_channels"], opts["image_size"]
    coarse_px = max(2, side_px // 4)
    coarse = torch.randn(classes, channels, coarse_px, coarse_px, generator=generator)
    patterns = functional.interpolate(
        coarse, size=(side_px, side_px), mode="bilinear", align_corners=False
    )
    # Upsampling shrinks the variance; restore unit std so ``noise`` is a ratio.
    patterns /= patterns.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    # Round-robin then shuffle: every class appears n // classes times (or one more).
    labels = torch.arange(n) % classes
    labels = labels[torch.randperm(n, generator=generator)]
    images = _shift(patterns[labels], opts["max_shift_px"], generator)
    noise = torch.randn(n, channels, side_px, side_px, generator=generator)
    return images + opts["noise"] * noise, labels


def _shift(images: torch.Tensor, max_shift_px: int, generator: torch.Generator) -> torch.Tensor:
    """Roll each ``(C, H, W)`` image by its own random offset in ``[-max, max]`` per axis.

    Equivalent to a per-image ``torch.roll``, done as two gathers for the whole batch.
    """
    n, channels, height, width = images.shape
    if max_shift_px == 0:
        return images
    offsets = torch.randint(-max_shift_px, max_shift_px + 1, (n, 2), generator=generator)
    rows = (torch.arange(height) - offsets[:, :1]) % height  # (n, H): source row per row
    cols = (torch.arange(width) - offsets[:, 1:]) % width  # (n, W): source column per column
    shape = (n, channels, height, width)
    images = images.gather(2, rows[:, None, :, None].expand(shape))
    return images.gather(3, cols[:, None, None, :].expand(shape))


_GENERATORS: dict[
    str, Callable[[Mapping[str, Any], torch.Generator], tuple[torch.Tensor, torch.Tensor]]
] = {
    "synthetic_classification": _classification,
    "synthetic_images": _images,
}
