"""Simulated GPUs: the cluster config, the job usage files, and the backend that reads them.

When NVML finds no GPU, a node agent reports the GPUs its cluster config
declares (DESIGN.md: "Only hardware is faked"). Memory is accounted "as jobs
declare": a job process placed on simulated GPUs records what it holds with
:func:`write_usage`, and :class:`SimulatedBackend` adds that to the GPU's
external memory for as long as the process lives, as NVML drops a dead
process's memory.

Usage file: ``<usage_dir>/<job_id>@<pid>.json``, one per job process::

    {"format": 1, "job_id": "j-42", "pid": 1234, "gpu_indices": [0, 1],
     "memory_bytes_per_gpu": 2147483648, "pid_start_ticks": 123456}

``pid_start_ticks`` (Linux ``/proc/<pid>/stat`` field 22, or null) guards
against a recycled pid. Files are written atomically (temp file + rename).

Sizes in configs are in GB of 2**30 bytes, as GPU vendors label memory
("A100 40GB" is 40 GiB).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from workers.interface.errors import ClusterConfigError, NvmlUnavailable
from workers.interface.telemetry import GIB, GpuBackend, GpuProcess, GpuReading, GpuUuid
from workers.nvml_backend import NvmlBackend
from workers.procs import check_job_id, pid_alive, proc_stat

logger = logging.getLogger(__name__)

JOB_UTIL_INCREMENT_PCT = 30.0
"""GPU utilization each live job adds to a simulated GPU (on top of its background)."""

_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "jobworker/simulated-gpu")
# Rough board power (W) at full load, so simulated power tracks utilization.
_TDP_W = {"T4": 70.0, "L4": 72.0, "V100": 300.0, "A10": 150.0, "A100": 400.0, "H100": 700.0}
_DEFAULT_TDP_W = 300.0


# -- cluster config -------------------------------------------------------------------


class SimGpuSpec(BaseModel):
    """One declared GPU (or ``count`` identical ones). Example: ``{type: A100, memory_gb: 40}``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    type: Annotated[str, Field(min_length=1)]
    memory_gb: Annotated[float, Field(gt=0)]
    external_memory_gb: Annotated[float, Field(ge=0)] = 0.0
    """Memory held by a process outside jobworker."""
    background_util_pct: Annotated[float, Field(ge=0, le=100)] = 0.0
    count: Annotated[int, Field(ge=1)] = 1
    nvlink: bool = False
    """All GPUs of a node declared with ``nvlink: true`` are NVLink peers of each other."""

    @field_validator("external_memory_gb")
    @classmethod
    def _external_fits(cls, value: float, info: ValidationInfo) -> float:
        total = info.data.get("memory_gb")
        if total is not None and value > total:
            raise ValueError(f"must not exceed memory_gb ({total:g})")
        return value


class SimNodeSpec(BaseModel):
    """One simulated node. Example: ``{name: local, cpus: 4, memory_gb: 16, gpus: [...]}``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: Annotated[str, Field(min_length=1)]
    cpus: Annotated[int, Field(ge=1)]
    memory_gb: Annotated[float, Field(gt=0)]
    gpus: list[SimGpuSpec] = []

    def expand_gpus(self) -> list[SimGpuSpec]:
        """One spec per device, in index order (``count`` expanded)."""
        return [gpu for gpu in self.gpus for _ in range(gpu.count)]


class SimClusterSpec(BaseModel):
    """A simulated cluster: its nodes, with unique names."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    nodes: Annotated[list[SimNodeSpec], Field(min_length=1)]

    @field_validator("nodes")
    @classmethod
    def _unique_names(cls, nodes: list[SimNodeSpec]) -> list[SimNodeSpec]:
        seen: dict[str, int] = {}
        for i, node in enumerate(nodes):
            if node.name in seen:
                raise ValueError(
                    f"duplicate node name {node.name!r} (nodes {seen[node.name]} and {i})"
                )
            seen[node.name] = i
        return nodes

    def node(self, name: str) -> SimNodeSpec:
        """The node called ``name``; :class:`ClusterConfigError` naming the known ones if absent."""
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.nodes)
        raise ClusterConfigError(f"no node {name!r} in the cluster config (nodes: {known})")


def _yaml_line(root: yaml.Node | None, loc: Sequence[int | str]) -> int | None:
    """1-based line of the deepest YAML node along a pydantic error location."""
    if root is None:
        return None
    node: yaml.Node = root
    line = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((kv for kv in node.value if kv[0].value == str(part)), None)
            if match is None:
                return line  # a missing key: point at the mapping that lacks it
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(node.value):
                return line
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def parse_cluster_config(text: str, source: str = "<string>") -> SimClusterSpec:
    """Validate cluster YAML text; :class:`ClusterConfigError` names line and field path."""
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ClusterConfigError(f"{where}: YAML syntax error: {problem}", (problem,)) from exc
    try:
        return SimClusterSpec.model_validate(data)
    except ValidationError as exc:
        problems, lines = [], []
        for err in exc.errors():
            path = ".".join(str(part) for part in err["loc"]) or "(top level)"
            line = _yaml_line(root, err["loc"])
            # Our own validators' messages read better without pydantic's prefix.
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{path}: {message}")
            lines.append(
                f"{source}:{line}: {problems[-1]}" if line else f"{source}: {problems[-1]}"
            )
        raise ClusterConfigError("\n".join(lines), tuple(problems)) from None


def load_cluster_config(path: str | Path) -> SimClusterSpec:
    """Read and validate a cluster config file (see ``configs/cluster/``).

    Raises :class:`ClusterConfigError` (a ``ValueError``) whose message names
    the file and line, e.g. ``x.yaml:7: nodes.1.gpus.0.memory_gb: Input should
    be greater than 0``.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ClusterConfigError(f"{path}: cannot read cluster config: {exc.strerror}") from exc
    return parse_cluster_config(text, str(path))


# -- usage files ------------------------------------------------------------------------


class UsageRecord(BaseModel):
    """What one job process declares it holds on simulated GPUs (the usage file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = 1
    job_id: str
    pid: Annotated[int, Field(gt=0)]
    gpu_indices: list[Annotated[int, Field(ge=0)]]
    memory_bytes_per_gpu: Annotated[int, Field(ge=0)]
    pid_start_ticks: int | None = None


def write_usage(
    usage_dir: str | Path,
    job_id: str,
    pid: int,
    gpu_indices: Sequence[int],
    memory_bytes_per_gpu: int,
) -> Path:
    """Declare that process ``pid`` of ``job_id`` holds ``memory_bytes_per_gpu`` on each GPU.

    ``gpu_indices`` are the node's physical indices (what ``CUDA_VISIBLE_DEVICES``
    lists). Rewriting replaces the previous declaration of the same job process.
    Returns the file written.
    """
    check_job_id(job_id)
    stat = proc_stat(pid)
    record = UsageRecord(
        job_id=job_id,
        pid=pid,
        gpu_indices=list(gpu_indices),
        memory_bytes_per_gpu=memory_bytes_per_gpu,
        pid_start_ticks=None if stat is None else stat[1],
    )
    directory = Path(usage_dir)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{job_id}@{pid}.json"
    # A reader must never see half a file: write aside, then rename over.
    tmp = directory / f".{target.name}.{os.getpid()}.tmp"
    tmp.write_text(record.model_dump_json(), encoding="utf-8")
    os.replace(tmp, target)
    return target


def remove_usage(usage_dir: str | Path, job_id: str) -> int:
    """Forget every declaration of ``job_id`` (all its processes). Returns how many were removed."""
    check_job_id(job_id)
    removed = 0
    for path in Path(usage_dir).glob("*.json"):
        if path.name.rsplit("@", 1)[0] == job_id:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _live_records(usage_dir: Path | None, warned: set[str]) -> list[UsageRecord]:
    """Usage records of live processes; an unreadable file is skipped, logged once."""
    if usage_dir is None or not usage_dir.is_dir():
        return []
    records = []
    for path in sorted(usage_dir.glob("*.json")):
        try:
            record = UsageRecord.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            continue  # removed between listing and reading
        except (OSError, ValueError) as exc:
            if path.name not in warned:  # agents sample every few seconds: say it once
                warned.add(path.name)
                logger.warning("ignoring unreadable GPU usage file %s: %s", path, exc)
            continue
        if pid_alive(record.pid, record.pid_start_ticks):
            records.append(record)
    return records


# -- the backend ------------------------------------------------------------------------


def sim_gpu_uuid(node_name: str, index: int, node_seed: str = "") -> GpuUuid:
    """The stable UUID of simulated GPU ``index`` of ``node_name``."""
    return GpuUuid(f"GPU-sim-{uuid.uuid5(_UUID_NAMESPACE, f'{node_seed}:{node_name}:{index}')}")


class SimulatedBackend:
    """GPU readings for a node's declared GPUs; a :class:`~workers.interface.telemetry.GpuBackend`.

    UUIDs are deterministic (``GPU-sim-<uuid5(node_seed:node:index)>``), so a
    restarted agent reports the same GPUs. Memory used = external + what live
    job processes declared in ``usage_dir``; util = background +
    ``JOB_UTIL_INCREMENT_PCT`` per live job, capped at 100.

    Example::

        node = load_cluster_config("configs/cluster/local_sim.yaml").node("local")
        backend = SimulatedBackend(node, usage_dir=Path("/tmp/jw-usage"))
        backend.read()[1].memory_used_bytes   # 8 GiB held externally
    """

    name: str = "simulated"

    def __init__(
        self, node: SimNodeSpec, usage_dir: Path | None = None, node_seed: str = ""
    ) -> None:
        self.node = node
        self.usage_dir = None if usage_dir is None else Path(usage_dir)
        self._gpus = [
            (sim_gpu_uuid(node.name, i, node_seed), spec)
            for i, spec in enumerate(node.expand_gpus())
        ]
        linked = [gpu_uuid for gpu_uuid, spec in self._gpus if spec.nvlink]
        self._peers = {u: tuple(p for p in linked if p != u) for u in linked}
        self._warned: set[str] = set()  # problems already logged, so each is logged once

    def read(self) -> tuple[GpuReading, ...]:
        """Sample every declared GPU, in index order. Never raises for a bad usage file."""
        declared: dict[int, dict[int, int]] = {}  # index -> pid -> bytes
        jobs: dict[int, set[str]] = {}
        for record in _live_records(self.usage_dir, self._warned):
            for index in set(record.gpu_indices):
                if index >= len(self._gpus):
                    self._warn_once(
                        f"{record.job_id}@{index}",
                        "job %s declares absent GPU %d",
                        record.job_id,
                        index,
                    )
                    continue
                by_pid = declared.setdefault(index, {})
                by_pid[record.pid] = by_pid.get(record.pid, 0) + record.memory_bytes_per_gpu
                jobs.setdefault(index, set()).add(record.job_id)
        return tuple(
            self._reading(i, declared.get(i, {}), len(jobs.get(i, ())))
            for i in range(len(self._gpus))
        )

    def _reading(self, index: int, by_pid: dict[int, int], job_count: int) -> GpuReading:
        gpu_uuid, spec = self._gpus[index]
        total = int(spec.memory_gb * GIB)
        wanted = int(spec.external_memory_gb * GIB) + sum(by_pid.values())
        if wanted > total:
            # Real hardware would have refused the allocation; the scheduler over-committed.
            self._warn_once(
                f"over:{gpu_uuid}",
                "simulated GPU %s over-committed: %d > %d bytes",
                gpu_uuid,
                wanted,
                total,
            )
        else:
            self._warned.discard(f"over:{gpu_uuid}")
        used = min(wanted, total)
        util = min(100.0, spec.background_util_pct + JOB_UTIL_INCREMENT_PCT * job_count)
        tdp = _TDP_W.get(spec.type.upper(), _DEFAULT_TDP_W)
        return GpuReading(
            index=index,
            uuid=gpu_uuid,
            name=spec.type,
            memory_total_bytes=total,
            memory_used_bytes=used,
            memory_free_bytes=total - used,
            util_pct=util,
            memory_util_pct=util,  # memory bandwidth is not modelled; follows compute
            temperature_c=30.0 + 0.5 * util,
            power_w=tdp * (0.2 + 0.8 * util / 100.0),
            processes=tuple(GpuProcess(pid, used_b) for pid, used_b in sorted(by_pid.items())),
            mig_mode=False,
            nvlink_peers=self._peers.get(gpu_uuid, ()),
        )

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def close(self) -> None:
        """Nothing to release; present for the protocol."""


def simulated_backend_for(
    cluster: SimClusterSpec, node_name: str, usage_dir: Path | None, node_seed: str = ""
) -> SimulatedBackend:
    """The backend for node ``node_name`` of ``cluster`` (:class:`ClusterConfigError` if absent)."""
    return SimulatedBackend(cluster.node(node_name), usage_dir, node_seed)


def _gpuless_local_node() -> SimNodeSpec:
    """This machine as a node without GPUs, for ``auto`` with no cluster config."""
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        memory_gb = 1.0
    return SimNodeSpec(
        name=socket.gethostname() or "local", cpus=os.cpu_count() or 1, memory_gb=memory_gb
    )


def select_backend(
    mode: str,
    node: SimNodeSpec | None,
    usage_dir: Path | None,
    nvml_module: ModuleType | None = None,
) -> GpuBackend:
    """Pick the GPU backend for a node agent.

    ``"nvml"``: NVML, or :class:`NvmlUnavailable` saying why not. ``"simulated"``:
    the GPUs ``node`` declares (none if ``node`` is ``None``). ``"auto"``: NVML
    when it starts and sees at least one GPU, else simulated. ``nvml_module``
    replaces ``pynvml`` (tests).
    """
    if mode not in ("auto", "nvml", "simulated"):
        raise ValueError(f"GPU backend mode must be 'auto', 'nvml' or 'simulated', not {mode!r}")
    if mode in ("auto", "nvml"):
        try:
            nvml = NvmlBackend(nvml_module)
            count = nvml.device_count()
        except NvmlUnavailable as exc:
            if mode == "nvml":
                raise NvmlUnavailable(
                    f"GPU backend 'nvml' was requested but {exc}", exc.code
                ) from exc
            logger.info("NVML unavailable (%s); using simulated GPUs", exc)
        else:
            if count > 0 or mode == "nvml":
                return nvml
            nvml.close()
            logger.info("NVML sees no GPU; using simulated GPUs")
    return SimulatedBackend(node if node is not None else _gpuless_local_node(), usage_dir)
