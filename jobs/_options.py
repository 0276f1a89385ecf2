"""Named-option checking shared by the model zoo and the dataset registry.

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
