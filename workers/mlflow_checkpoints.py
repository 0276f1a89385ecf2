"""What ``torch.load(weights_only=True)`` takes back: checked before a checkpoint is saved.

A checkpoint is loaded without running code, so it may hold only tensors and
plain values; :func:`not_plain` says where a state holds anything else, and
:func:`refused_part` reads what torch's weights-only unpickler refused.

>>> not_plain({"w": [1, 2.0]}, "state") is None
True
"""

from __future__ import annotations

import collections
import pickle
import re
from typing import Any

import torch

PLAIN_HELP = (
    "jobworker loads checkpoints with torch.load(weights_only=True), which runs no code: "
    "checkpoint only tensors, numbers, strings, bytes, None and lists, tuples, sets and dicts "
    "of them (model.state_dict(), optimizer.state_dict(); torch.from_numpy(x) for an array)"
)
# What torch.load(weights_only=True) takes back without an allow-list (exact types: a
# subclass, an enum say, is pickled by its own class and refused).
_PLAIN_VALUES = (
    *(torch.Tensor, torch.nn.Parameter, torch.Size, torch.dtype, torch.device),
    *(int, float, complex, bool, str, bytes, bytearray, type(None)),
)
_PLAIN_CONTAINERS = (list, tuple, set, dict, collections.OrderedDict)


def not_plain(value: Any, where: str) -> str | None:
    """Where in ``value`` the first value is that weights-only loading refuses, or None."""
    kind = type(value)
    if kind in _PLAIN_VALUES:
        return None
    if kind not in _PLAIN_CONTAINERS:
        return f"{where} is a {kind.__module__}.{kind.__qualname__}"
    if isinstance(value, dict):
        for key, item in value.items():
            found = not_plain(key, f"a key of {where}") or not_plain(item, f"{where}[{key!r}]")
            if found:
                return found
        return None
    for i, item in enumerate(value):
        found = not_plain(item, f"{where}[{i}]")
        if found:
            return found
    return None


def refused_part(exc: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, out of its long message."""
    found = re.search(
        r"WeightsUnpickler error: (.*?)(?: was not an allowed global|\.?\n|$)", str(exc)
    )
    return found.group(1) if found else str(exc).splitlines()[0]
