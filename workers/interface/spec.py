"""Training configs: the pydantic schema, and loading from YAML or JSON text.

One typed value from the edge to the job process: the :class:`TrainingSpec` a
user submits is validated at the API, stored as its JSON, re-read as the model
by the reconcile loop, and handed to the job process inside its launch request.

Loading never half-succeeds: either a valid :class:`TrainingSpec` comes back or
a :class:`ConfigError` names every field path and rule that failed, e.g.
``resources.gpus: Input should be greater than or equal to 0``. A user's
entrypoint is checked without running any of its code (:func:`check_entrypoint`).
"""

from __future__ import annotations

import ast
import difflib
import functools
import math
import sys
from collections.abc import Iterator, Sequence
from importlib.machinery import PathFinder
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from jobs.params import TrainParams, resolve_dataset_options, resolve_model_options
from workers.interface.errors import ConfigError
from workers.interface.telemetry import GIB

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"

# Upper bounds on what one job or replica may ask for: far above any machine of today,
# low enough that the scheduler's arithmetic on them stays exact and cheap.
MAX_GPU_MEMORY_GB = 1024.0  # per GPU
MAX_MEMORY_GB = 16384.0  # host memory per node (16 TiB)
MAX_CPUS = 256  # per node

# User tags become MLflow run tags: MLflow's own limits (one log_batch holds 100 tags;
# keys up to 250 characters, values up to 8,000).
Tags = Annotated[
    dict[
        Annotated[str, StringConstraints(min_length=1, max_length=250)],
        Annotated[str, StringConstraints(max_length=8000)],
    ],
    Field(
        max_length=100,
        description="At most 100 tags; keys of 1 to 250 characters, values up to 8,000.",
    ),
]


class _Strict(BaseModel):
    # No infinities or NaN: they overflow the scheduler's arithmetic, and JSON (the
    # store's form of a spec) has no way to write them.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelRef(_Strict):
    """A built-in model from the ``jobs/`` zoo and its options."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> Self:
        resolve_model_options(self.name, self.options)  # ValueError names what is wrong
        return self


class DataRef(_Strict):
    """A built-in dataset (synthetic, no download) and its options."""

    name: str = "synthetic_classification"
    options: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0

    @model_validator(mode="after")
    def _known(self) -> Self:
        resolve_dataset_options(self.name, self.options)  # ValueError names what is wrong
        return self


class TrainSettings(_Strict):
    epochs: int | None = Field(default=None, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    optimizer: str = Field(default="adam", pattern="^(adam|sgd)$")
    checkpoint_every_steps: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _length(self) -> Self:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("set train.epochs or train.max_steps")
        return self


AUTO = "auto"
"""``resources.gpu_memory_gb: auto``: the scheduler sizes the request from the job's history."""


class Resources(_Strict):
    gpus: int = Field(default=0, ge=0, le=64, description="GPUs per node, at most 64.")
    # `auto` opts into a request sized from the peak GPU memory of the job's earlier runs
    # (scheduler/core/gpu_memory.py); a number is never changed.
    gpu_memory_gb: Annotated[float, Field(ge=0, le=MAX_GPU_MEMORY_GB)] | Literal["auto"] = Field(
        default=0.0,
        description=(
            f"GPU memory held on each GPU, at most {MAX_GPU_MEMORY_GB:g} GB; or 'auto': "
            "the peak of the job's earlier runs plus 10 %, the whole GPU while there are none."
        ),
    )
    gpu_type: str | None = None
    cpus: int = Field(default=1, ge=1, le=MAX_CPUS, description=f"At most {MAX_CPUS} per node.")
    memory_gb: float = Field(
        default=1.0,
        gt=0,
        le=MAX_MEMORY_GB,
        description=f"Host memory per node, at most {MAX_MEMORY_GB:g} GB.",
    )
    # More than one: a data-parallel gang, `gpus` on each of `nodes` distinct nodes,
    # placed all-or-nothing, one process per node (torch.distributed, jobs/distributed.py).
    nodes: int = Field(default=1, ge=1, le=64, description="Nodes of a gang, at most 64.")

    @field_validator("gpu_memory_gb", mode="before")
    @classmethod
    def _number_or_auto(cls, value: Any) -> Any:
        """Checked here so that a refusal names ``resources.gpu_memory_gb`` in one message,
        not one per member of the union (``…gpu_memory_gb.constrained-float``)."""
        if value == AUTO:
            return value
        wrong = ValueError(f"must be a number of GB per GPU or 'auto', got {value!r}")
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise wrong
        try:
            number = float(value)
        except ValueError:
            raise wrong from None
        if not math.isfinite(number):
            raise ValueError(f"must be a finite number, got {value!r}")
        if number < 0:
            raise ValueError("Input should be greater than or equal to 0")
        if number > MAX_GPU_MEMORY_GB:
            raise ValueError(f"Input should be less than or equal to {MAX_GPU_MEMORY_GB:g}")
        return number

    @model_validator(mode="after")
    def _gpu_memory_needs_gpus(self) -> Self:
        if self.gpus == 0 and self.gpu_memory_gb == AUTO:
            raise ValueError("gpu_memory_gb is auto but gpus is 0")
        if self.gpus == 0 and isinstance(self.gpu_memory_gb, float) and self.gpu_memory_gb > 0:
            raise ValueError("gpu_memory_gb is set but gpus is 0")
        return self

    @property
    def gpu_memory_auto(self) -> bool:
        """True for ``gpu_memory_gb: auto``: placement sizes the request."""
        return self.gpu_memory_gb == AUTO

    @property
    def gpu_memory_bytes(self) -> int | None:
        """``gpu_memory_gb`` in bytes, what the job holds on each of its GPUs; None for
        ``auto`` (what it holds is decided at placement: ``NodeAssignment.gpu_memory_bytes``)."""
        if self.gpu_memory_gb == AUTO:
            return None
        return int(self.gpu_memory_gb * GIB)

    @property
    def memory_bytes(self) -> int:
        """``memory_gb`` in bytes: host memory on each of its nodes."""
        return int(self.memory_gb * GIB)


class TrainingSpec(_Strict):
    """A training job as the user submits it (``configs/train/*.yaml``).

    Example::

        spec = load_spec("name: t\\nexperiment: e\\nmodel: {name: mlp}\\ntrain: {max_steps: 10}")
    """

    name: str = Field(pattern=_NAME)
    experiment: str = Field(default="Default", min_length=1, max_length=200)
    model: ModelRef | None = None
    entrypoint: str | None = Field(default=None, pattern=r"^[\w.]+:[\w]+$")
    config: dict[str, Any] = Field(default_factory=dict)
    data: DataRef = Field(default_factory=DataRef)
    train: TrainSettings
    resources: Resources = Field(default_factory=Resources)
    priority: int = Field(default=0, ge=-100, le=100)
    max_retries: int = Field(default=0, ge=0, le=20)
    register_as: str | None = Field(default=None, pattern=_NAME)
    # Point this alias of the registered model at the new version (deployments follow it).
    register_alias: str | None = Field(default=None, pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,99}$")
    team: str = Field(default="default", pattern=_NAME)
    tags: Tags = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_program(self) -> Self:
        if (self.model is None) == (self.entrypoint is None):
            raise ValueError("set exactly one of model or entrypoint")
        if self.register_alias and not self.register_as:
            raise ValueError("register_alias needs register_as (the model to alias)")
        if self.model is not None:
            self.train_params()  # the model must fit the data: input shape, classes
        return self

    def train_params(self) -> TrainParams:
        """The ``jobs/`` training parameters of a built-in model config."""
        if self.model is None:
            raise ValueError("an entrypoint job has no built-in training parameters")
        return TrainParams(
            model=self.model.name,
            model_options=self.model.options,
            data=self.data.name,
            data_options=self.data.options,
            batch_size=self.train.batch_size,
            lr=self.train.lr,
            epochs=self.train.epochs,
            max_steps=self.train.max_steps,
            checkpoint_every_steps=self.train.checkpoint_every_steps,
            seed=self.data.seed,
            optimizer=self.train.optimizer,
        )


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases: six levels of ``*x`` in 558 bytes expand
    to megabytes (a "billion laughs"), and a config never needs one."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            mark = event.start_mark
            raise ConfigError(
                [
                    (
                        "",
                        f"YAML aliases (*{event.anchor}) are not accepted, at line "
                        f"{mark.line + 1}, column {mark.column + 1}: write the value out",
                    )
                ]
            )
        return super().compose_node(parent, index)


def parse_text(text: str) -> Any:
    """Parse a config's YAML (a superset of JSON) into plain data.

    Refused with a :class:`ConfigError`: a syntax error (naming the line and
    column), an alias (``*x``), nesting deeper than Python's recursion allows, and
    a non-finite number anywhere (``.inf``, ``.nan``, ``1.0e+999``; naming its
    path): JSON, the store's form of a spec, cannot write one, and the
    scheduler's arithmetic overflows on it.
    """
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader, without aliases
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError([("", f"YAML syntax error at {where}: {exc.problem}")]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([("", f"YAML error: {exc}")]) from exc
    except RecursionError:
        raise ConfigError([("", "the config is nested too deeply")]) from None
    problems = list(_non_finite(data, ()))
    if problems:
        raise ConfigError(problems)
    return data


def _non_finite(data: Any, path: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """``(dotted.path, message)`` for each non-finite float in parsed YAML."""
    if isinstance(data, float) and not math.isfinite(data):
        yield ".".join(path), f"must be a finite number, got {data}"
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from _non_finite(value, (*path, str(key)))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _non_finite(value, (*path, str(i)))


def validation_errors(exc: ValidationError, model: type[BaseModel]) -> list[tuple[str, str]]:
    """Pydantic errors of validating ``model`` as ``(dotted.field.path, message)`` pairs.

    An unknown key gets the nearest field name of the model at its place, if one is
    close: ``("resources.gpu", "unknown key 'gpu' (did you mean 'gpus'?)")``.
    """
    out: list[tuple[str, str]] = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            close = difflib.get_close_matches(key, _field_names_at(model, err["loc"][:-1]), n=1)
            msg = f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
        out.append((loc, msg.removeprefix("Value error, ")))
    return out


def _field_names_at(model: type[BaseModel], path: tuple[int | str, ...]) -> list[str]:
    """The keys the models at ``path`` (an error's location) accept.

    A list index, a mapping's key or a union's tag on the path keeps the models found so
    far: those nested in the field's type are already among them.
    """
    models = [model]
    for part in path:
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        models = [n for f in fields for n in _models_in(f.annotation)] if fields else models
    return sorted({f.alias or name for m in models for name, f in m.model_fields.items()})


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's type holds: itself, or inside Optional, list, dict, …"""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


Model = TypeVar("Model", bound=BaseModel)


def validate_config(model: type[Model], data: Any, kind: str) -> Model:
    """Validate already-parsed ``data`` as ``model``, or raise :class:`ConfigError`.

    ``kind`` names the config in the error for data that is not a mapping
    (``"a training config"``).
    """
    if not isinstance(data, dict):
        raise ConfigError([("", f"{kind} must be a mapping of keys to values")])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_errors(exc, model)) from exc


def load_spec(text: str, search_path: Sequence[str] | None = None) -> TrainingSpec:
    """Parse and validate a YAML or JSON training config for submission.

    An ``entrypoint`` is looked for on ``search_path`` (the job's own Python
    path) and then on this process's ``sys.path``, without importing it; see
    :func:`check_entrypoint`.
    """
    spec = validate_config(TrainingSpec, parse_text(text), "a training config")
    if spec.entrypoint is not None:
        problem = check_entrypoint(spec.entrypoint, [*(search_path or ()), *sys.path])
        if problem:
            raise ConfigError([("entrypoint", problem)])
    return spec


@functools.lru_cache(maxsize=4096)
def stored_spec(spec_json: str) -> TrainingSpec:
    """A spec as the job store keeps it (its JSON), re-read as the model.

    Memoised on the text: the reconcile loop re-reads every waiting job each
    pass, and a spec never changes once stored (the model is frozen).
    """
    return TrainingSpec.model_validate_json(spec_json)


def check_entrypoint(entrypoint: str, search_path: Sequence[str]) -> str | None:
    """Why ``module:function`` cannot be a job's entrypoint, or None when it can.

    Nothing of the user's code runs here (no import, not even of its parent
    packages): the module is found on ``search_path`` as the import system would
    find it, its source is parsed, and ``function`` must be defined at its top
    level (a ``def``, a class, an assignment or an import of that name); a
    ``def`` must accept the two arguments the runner passes, ``(ctx, config)``.
    A module without source (a compiled extension) is taken on trust.
    """
    module_name, _, attr = entrypoint.partition(":")
    parts = module_name.split(".")
    path = list(search_path)
    origin = None
    for depth in range(1, len(parts) + 1):  # package by package, importing none of them
        found = PathFinder.find_spec(".".join(parts[:depth]), path)
        if found is None:
            return f"cannot find module {module_name!r} on the job's Python path"
        path, origin = list(found.submodule_search_locations or []), found.origin
    if origin is None or not origin.endswith(".py"):
        return None
    try:
        tree = ast.parse(Path(origin).read_text(encoding="utf-8"), filename=origin)
    except (OSError, SyntaxError, UnicodeDecodeError) as exc:
        return f"cannot read module {module_name!r} ({origin}): {exc}"
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == attr:
            return _signature_problem(module_name, node)
        if _binds(node, attr):
            return None
    if any(
        isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names)
        for node in tree.body
    ):
        return None  # `from x import *` may bring it: trust it
    return f"module {module_name!r} defines no {attr!r} at its top level"


def _binds(node: ast.stmt, name: str) -> bool:
    """True when the statement ``node`` binds ``name`` in its module's namespace.

    Inside ``if``/``try``/``with`` blocks every binding counts: such definitions
    are conditional, and they are trusted.
    """
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return node.name == name
    if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(isinstance(n, ast.Name) and n.id == name for t in targets for n in ast.walk(t))
    if isinstance(node, ast.Import | ast.ImportFrom):
        return any((a.asname or a.name.split(".")[0]) == name for a in node.names)
    if isinstance(node, ast.If | ast.Try | ast.With):
        return any(
            _binds(child, name)
            for child in ast.walk(node)
            if isinstance(child, ast.stmt) and not isinstance(child, ast.If | ast.Try | ast.With)
        )
    return False


def _signature_problem(module_name: str, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    args = fn.args
    positional = [*args.posonlyargs, *args.args]
    required_kwonly = [d for d in args.kw_defaults if d is None]
    if isinstance(fn, ast.AsyncFunctionDef):
        return f"{module_name}:{fn.name} is async; an entrypoint is a plain function (ctx, config)"
    takes_two = len(positional) >= 2 or (args.vararg is not None)
    required = len(positional) - len(args.defaults)
    if not takes_two or required > 2 or required_kwonly:
        return f"{module_name}:{fn.name} must accept two arguments (ctx, config)"
    return None
