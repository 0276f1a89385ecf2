"""Training configs: the pydantic schema, and loading from YAML or JSON text.

Loading never half-succeeds: either a valid :class:`TrainingSpec` comes back or
a :class:`ConfigError` names every field path and rule that failed, e.g.
``resources.gpus: Input should be greater than or equal to 0``.
"""

from __future__ import annotations

import importlib
from typing import Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jobs.params import TrainParams, resolve_dataset_options, resolve_model_options
from scheduler.errors import ConfigError

GIB = 2**30
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class Resources(_Strict):
    gpus: int = Field(default=0, ge=0, le=64)
    gpu_memory_gb: float = Field(default=0.0, ge=0)
    gpu_type: str | None = None
    cpus: int = Field(default=1, ge=1, le=256)
    memory_gb: float = Field(default=1.0, gt=0)
    # More than one: a data-parallel gang, `gpus` on each of `nodes` distinct nodes,
    # placed all-or-nothing, one process per node (torch.distributed, jobs/distributed.py).
    nodes: int = Field(default=1, ge=1, le=64)

    @model_validator(mode="after")
    def _gpu_memory_needs_gpus(self) -> Self:
        if self.gpus == 0 and self.gpu_memory_gb > 0:
            raise ValueError("gpu_memory_gb is set but gpus is 0")
        return self


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
    tags: dict[str, str] = Field(default_factory=dict)

    @field_validator("entrypoint")
    @classmethod
    def _importable(cls, value: str | None) -> str | None:
        if value is not None:
            module_name, _, attr = value.partition(":")
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:  # any import-time failure of user code is a config error
                raise ValueError(f"cannot import module {module_name!r}: {exc}") from exc
            if not callable(getattr(module, attr, None)):
                raise ValueError(f"module {module_name!r} has no callable {attr!r}")
        return value

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


def parse_text(text: str) -> Any:
    """Parse YAML (a superset of JSON); a syntax error names the line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError([("", f"YAML syntax error at {where}: {exc.problem}")]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([("", f"YAML error: {exc}")]) from exc


def validation_errors(exc: ValidationError) -> list[tuple[str, str]]:
    """Pydantic errors as ``(dotted.field.path, message)`` pairs."""
    out: list[tuple[str, str]] = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown key {str(err['loc'][-1])!r}"
        out.append((loc, msg.removeprefix("Value error, ")))
    return out


def spec_from_data(data: Any) -> TrainingSpec:
    """Validate already-parsed data into a spec, or raise :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError([("", "a training config must be a mapping of keys to values")])
    try:
        return TrainingSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_errors(exc)) from exc


def load_spec(text: str) -> TrainingSpec:
    """Parse and validate a YAML or JSON training config."""
    return spec_from_data(parse_text(text))
