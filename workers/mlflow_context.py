"""The MLflow-backed :class:`jobs.context.JobContext` a job process runs with.

Metrics are buffered, and about once a second a background thread moves them
into the job's spool on local disk (:mod:`workers.mlflow_spool`); checkpoints
are written locally and spooled for upload. The same thread sends the spool to
MLflow oldest record first (``MlflowClient.log_batch``, ``log_artifact``), so
a training step never waits on the tracking server (one call costs ~70 ms; a
step of a small model costs ~1 ms), and an MLflow outage costs local disk,
not data. The spool's bound (``spool_max_bytes``) is on the metrics waiting in
it: past it, new metrics are dropped (the output says which steps) until
MLflow takes some. A checkpoint waits as its file, which the job keeps anyway;
its upload is never dropped for room.

Outage or refusal. The job process makes every MLflow call through an
:class:`MlflowWaiter`. An error that says MLflow is out of reach or unwell
(no connection, a timeout, an HTTP 5xx other than 501, a 429, a locked
database) is an outage: the call is retried with backoff (1 s doubling to
30 s) for as long as it lasts, and the job's output says ``waiting for MLflow
at <uri>: <error>`` once, then ``MLflow at <uri> answers again``. Any other
``MlflowException`` (HTTP 4xx such as ``INVALID_PARAMETER_VALUE`` on the
job's own data, or a model MLflow cannot save) is a refusal that no retry can
change: a refused call of the runner fails the job with :class:`MlflowRefused`
saying what was refused; a refused spool record is dropped and reported at
the end, as a failed ``log_batch`` always was. Any other exception is the
job's own and is raised as it is. A stop request (SIGTERM) ends a wait at its
next retry with :class:`StopRequested`; a call already inside MLflow's client
finishes first (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``/``_TIMEOUT`` bound it, and
so does the worker's kill after its grace period).

Each step once. Every ``log_batch`` of metrics also sets two run tags:
``jobworker.logged_step``, the highest step MLflow has taken, and
``jobworker.logged_batch``, the id of the spool record it carries. A resumed
attempt (same run, restarted from a checkpoint, so redoing some steps) reads
the first and drops its metrics at or below it (or below the last step of
the records it adopted, see below). After a call whose outcome is
unknown (a timeout, a cut connection), the record is sent again only if the
second does not name it. (``log_batch`` writes the metrics before the tags;
should the server die in between, the record is sent again, and MLflow's SQL
store keeps a metric sent twice with the same timestamp once.)

Resume. :meth:`MlflowJobContext.load_checkpoint` takes the run's newest
checkpoint, uploaded or still waiting in the spool (the local file), and loads
it with ``torch.load(weights_only=True)``: tensors and plain values only, no
code (:class:`CheckpointRefused` otherwise). A job
process that ends before MLflow took its spool (stopped during an outage,
killed) leaves it in its work dir; the job's next attempt on the same node
adopts it and sends it first. An attempt on another node cannot see it: it
resumes from the newest checkpoint MLflow has, and the metrics left in the
other node's spool are missing from the run (or sent later, if the job runs
there again, without the steps logged meanwhile).
"""

from __future__ import annotations

import functools
import pickle
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import torch
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

from jobs.context import StopRequested
from workers.files import write_json_atomic
from workers.interface.errors import CheckpointRefused, MlflowRefused
from workers.interface.executor import Progress
from workers.mlflow_checkpoints import PLAIN_HELP, not_plain, refused_part
from workers.mlflow_spool import SPOOL_DIR, Entry, Spool

T = TypeVar("T")

CHECKPOINT_DIR = "checkpoints"
LOGGED_STEP_TAG = "jobworker.logged_step"
LOGGED_BATCH_TAG = "jobworker.logged_batch"
DEFAULT_SPOOL_MAX_BYTES = 256 * 2**20
_MAX_BATCH = 998  # MLflow takes 1000 entities per log_batch call: 998 metrics and our 2 tags
_MAX_BUFFERED = 20 * _MAX_BATCH  # beyond this the training thread spools them itself


def say(message: str) -> None:
    """A line in the job's output."""
    print(f"jobworker: {message}", flush=True)


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes >= 2**20 else f"{n_bytes / 2**10:.1f} KiB"


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says MLflow is out of reach or unwell (see the module docstring)."""
    status: int | None
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()  # type: ignore[no-untyped-call]
        # INTERNAL_ERROR (500) is also what MLflow's client says of whatever went wrong
        # on this side (a model it cannot save): unless the server said it, look at the cause.
        if isinstance(exc, RestException) or status != 500:
            return _answer_is_outage(status)
    else:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, OSError) and isinstance(status, int):  # an artifact upload's answer
            return _answer_is_outage(status)
    cause: BaseException | None = exc
    while cause is not None:  # the transport error that MLflow's client wrapped
        if isinstance(cause, ConnectionError | TimeoutError) or type(cause).__module__.startswith(
            ("requests.", "urllib3.")
        ):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _answer_is_outage(http_status: int) -> bool:
    return http_status == 429 or (http_status >= 500 and http_status != 501)


class MlflowWaiter:
    """Makes MLflow calls that wait out outages; see the module docstring.

    Setting ``stop`` ends a wait with :class:`StopRequested` (a call made when
    it is set already is tried once). ``waiting`` is true from a call's first
    outage until it returns.

    Example::

        wait = MlflowWaiter("http://127.0.0.1:5000", threading.Event())
        run = wait.call("read the run", lambda: client.get_run(run_id))
    """

    def __init__(self, uri: str, stop: threading.Event, max_delay_s: float = 30.0) -> None:
        self.uri = uri
        self.stop = stop
        self.waiting = False
        self._max_delay_s = max_delay_s

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` once MLflow answers; ``what`` names it in messages ("log the model")."""
        delay_s = 1.0
        outage = False
        try:
            while True:
                try:
                    result = fn()
                except Exception as exc:
                    if not is_outage(exc):
                        if isinstance(exc, MlflowException):
                            raise MlflowRefused(f"MLflow refused to {what}: {exc}") from exc
                        raise
                    stopped = StopRequested(f"stopped while waiting for MLflow to {what}")
                    if self.stop.is_set():
                        raise stopped from exc
                    if not outage:
                        say(f"waiting for MLflow at {self.uri}: {exc}")
                    outage = self.waiting = True
                    if self.stop.wait(delay_s):
                        raise stopped from exc
                    delay_s = min(2 * delay_s, self._max_delay_s)
                    continue
                if outage:
                    say(f"MLflow at {self.uri} answers again")
                return result
        finally:
            self.waiting = False


class MlflowJobContext:
    """Reports one job attempt to one MLflow run and to its progress file.

    In a multi-node job only rank 0 (``leader``) records metrics and
    checkpoints; the other ranks read the same checkpoints, so all resume alike.
    ``adopt`` names spools that earlier attempts of the job left on this node
    (never for a multi-node job: its ranks must all resume from a checkpoint
    that MLflow shows them).
    """

    def __init__(
        self,
        *,
        client: MlflowClient,
        run: Future[tuple[str, str]],
        work_dir: Path,
        gpu_ids: tuple[int, ...],
        cpus: int,
        waiter: MlflowWaiter,
        flush_interval_s: float = 1.0,
        leader: bool = True,
        spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES,
        adopt: Sequence[Path] = (),
    ) -> None:
        self._leader = leader
        self._client = client
        self._run = run
        self._work_dir = work_dir
        self._gpu_ids = gpu_ids
        self._cpus = cpus
        self._wait = waiter
        self._metrics: list[Metric] = []
        self._lock = threading.Lock()
        self._spool_lock = threading.RLock()  # one spooler at a time keeps the records in order
        self._progress_lock = threading.Lock()
        self._flush_interval_s = flush_interval_s
        self._closed = threading.Event()
        self._last_progress_s = 0.0
        self._progress = Progress()
        self._latest: dict[str, float] = {}  # each metric's latest value
        self._errors: list[str] = []
        self._dropped_steps: tuple[int, int] | None = None  # metrics dropped: the spool was full
        self._spool: Spool | None = None
        self._skip_through: int | None = None  # a resume logs no step at or below this
        self._resumed_at: int | None = None
        self._logged_step: int | None = None
        self._last_batch: str | None = ""  # None: to be read
        self._attached = threading.Event()  # the run is open and the spool made, or never will be
        if leader:
            self._spool_max_bytes = spool_max_bytes
            self._adopt = adopt
            self._sender_wait = MlflowWaiter(waiter.uri, threading.Event())  # set: close gave up
            self._thread = threading.Thread(target=self._send, name="mlflow-send", daemon=True)
            self._thread.start()
        self._write_progress()

    @property
    def run_id(self) -> str:
        """The job's MLflow run: waits until it is open (raises what opening it raised)."""
        return self._run.result()[0]

    def _attach(self) -> bool:
        """Once the run is open: read where an earlier attempt logged up to and make the spool
        (the metrics logged meanwhile waited in memory). False: the run was never opened."""
        try:
            run_id, experiment_id = self._run.result()
            tags = self._wait.call("read the run", lambda: self._client.get_run(run_id)).data.tags
            spool = Spool(self._work_dir / SPOOL_DIR, run_id, self._spool_max_bytes, self._adopt)
        except BaseException:  # the job runner reports why (the opening's error first)
            self._attached.set()
            return False
        tag = tags.get(LOGGED_STEP_TAG)
        self._resumed_at = self._logged_step = int(tag) if tag is not None else None
        self._last_batch = tags.get(LOGGED_BATCH_TAG, "")
        logged = [] if self._resumed_at is None else [self._resumed_at]
        adopted = [
            step
            for e in spool.entries()
            if e.record["kind"] == "metrics"
            for _, _, _, step in e.record["metrics"]
        ]
        with self._lock:
            skip = self._skip_through = max([*logged, *adopted], default=None)
            if skip is not None:
                self._metrics = [m for m in self._metrics if m.step > skip]
            self._progress = self._progress.model_copy(
                update={"run_id": run_id, "experiment_id": experiment_id}
            )
        self._spool = spool
        self._attached.set()
        self._write_progress()
        return True

    def _spool_ready(self) -> Spool | None:
        """The spool, once the run is open (waits until then); None: it never opened."""
        self._attached.wait()
        return self._spool

    # -- JobContext -------------------------------------------------------------------
    @property
    def device(self) -> str:
        return "cuda" if self._gpu_ids and torch.cuda.is_available() else "cpu"

    @property
    def gpu_ids(self) -> tuple[int, ...]:
        return self._gpu_ids

    @property
    def cpus(self) -> int:
        return self._cpus

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self._leader:
            return
        now_ms = int(time.time() * 1000)
        with self._lock:
            if self._skip_through is None or step > self._skip_through:
                self._metrics.extend(
                    Metric(key=k, value=float(v), timestamp=now_ms, step=step)
                    for k, v in metrics.items()
                )
            self._latest.update({k: float(v) for k, v in metrics.items()})
            first = self._progress.first_step_at
            self._progress = self._progress.model_copy(
                update={
                    "step": step,
                    "metrics": dict(self._latest),
                    "first_step_at": now_ms / 1000 if first is None else first,
                }
            )
            overfull = len(self._metrics) >= _MAX_BUFFERED
        # The sender is stuck in a call, or the run is still being opened: bound the memory
        # (the spool bounds the disk).
        if overfull and self._spool_ready() is not None:
            self._spool_metrics()
        if now_ms / 1000 - self._last_progress_s > 0.25:
            self._write_progress()

    def save_checkpoint(self, state: Mapping[str, Any], step: int) -> None:
        if not self._leader:
            return
        problem = not_plain(state, "state")
        if problem is not None:  # now, rather than when a resume cannot load it
            raise CheckpointRefused(f"cannot checkpoint step {step}: {problem}. {PLAIN_HELP}")
        local = self._work_dir / CHECKPOINT_DIR
        local.mkdir(exist_ok=True)
        path = local / f"step-{step:09d}.pt"
        torch.save(dict(state), path)
        if self._spool_ready() is None:
            raise StopRequested("the job's MLflow run could not be opened")
        record = {"kind": "checkpoint", "path": str(path), "step": step}
        with self._spool_lock:
            self._spool_metrics()  # the metrics logged before it go before it
            why = self._put(record, bounded=False)  # the file is kept anyway, and needed
        if why is not None:
            say(f"{why}: dropping the upload of checkpoint {path.name} (it stays at {path})")

    def load_checkpoint(self) -> tuple[dict[str, Any], int] | None:
        """The run's newest checkpoint: uploaded, or still in this node's spool (a resume)."""
        names = self._wait.call(
            "list the run's checkpoints",
            lambda: [
                a.path
                for a in self._client.list_artifacts(self.run_id, CHECKPOINT_DIR)
                if a.path.endswith(".pt")
            ],
        )
        found: dict[int, str | Path] = {int(Path(n).stem.removeprefix("step-")): n for n in names}
        spool = self._spool_ready() if self._leader else None
        for entry in spool.entries() if spool is not None else ():
            path = Path(entry.record.get("path", ""))
            if entry.record["kind"] == "checkpoint" and path.is_file():
                found[int(entry.record["step"])] = path
        if not found:
            return None
        step = max(found)
        source = found[step]
        if isinstance(source, str):
            name = source
            source = Path(
                self._wait.call(
                    f"download {name}",
                    lambda: self._client.download_artifacts(self.run_id, name, str(self._work_dir)),
                )
            )
        try:
            state: dict[str, Any] = torch.load(source, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointRefused(
                f"checkpoint {source.name} of run {self.run_id} holds more than tensors and "
                f"plain values ({refused_part(exc)}). {PLAIN_HELP}"
            ) from None
        return state, step

    def should_stop(self) -> bool:
        return self._wait.stop.is_set()

    # -- runner side ------------------------------------------------------------------
    def request_stop(self) -> None:
        """Called from the SIGTERM handler: the loop checkpoints and stops at its next step."""
        self._wait.stop.set()

    def close(self) -> list[str]:
        """Wait until MLflow has every metric and upload; returns the errors met while logging.

        After a stop request it waits only while MLflow answers: what it cannot
        send stays in the spool for the job's next attempt on this node.
        """
        spool = self._spool_ready() if self._leader else None
        if spool is not None:
            self._spool_metrics()
            self._closed.set()  # after the last records: the sender ends once they are sent
            while self._thread.is_alive():
                if self.should_stop() and self._sender_wait.waiting:
                    self._sender_wait.stop.set()
                    say(
                        f"{len(spool)} records for MLflow left in {spool.directory}: "
                        "the job's next attempt on this node sends them"
                    )
                    break
                self._thread.join(0.1)
            self._report_dropped_steps()
        self._write_progress()
        return self._errors

    def _write_progress(self) -> None:
        with self._progress_lock:  # the sender writes it too (the run id): the newest wins
            with self._lock:
                progress = self._progress
            self._last_progress_s = time.time()
            write_json_atomic(self._work_dir / "progress.json", progress.model_dump(mode="json"))

    # -- the spool ----------------------------------------------------------------------
    def _put(self, record: dict[str, Any], bounded: bool = True) -> str | None:
        """Spool ``record``; when it does not fit, why (the caller says what is dropped)."""
        assert self._spool is not None
        spool = self._spool
        try:
            if spool.put(record, bounded):
                return None
        except OSError as exc:
            return f"cannot write the MLflow spool: {exc}"
        return (
            f"no room in the MLflow spool ({_size(spool.used_bytes)} of its "
            f"{_size(spool.max_bytes)} used, in {spool.directory})"
        )

    def _spool_metrics(self) -> None:
        """Move the buffered metrics into the spool, one record per ``log_batch``."""
        with self._spool_lock:
            with self._lock:
                pending, self._metrics = self._metrics, []
            for i in range(0, len(pending), _MAX_BATCH):
                chunk = pending[i : i + _MAX_BATCH]
                rows = [[m.key, m.value, m.timestamp, m.step] for m in chunk]
                why = self._put({"kind": "metrics", "metrics": rows})
                if why is None:
                    self._report_dropped_steps()
                    continue
                first, last = min(m.step for m in chunk), max(m.step for m in chunk)
                if self._dropped_steps is None:
                    say(f"{why}: dropping metrics from step {first} on, until MLflow takes some")
                    self._dropped_steps = (first, last)
                self._dropped_steps = (self._dropped_steps[0], last)

    def _report_dropped_steps(self) -> None:
        if self._dropped_steps is not None:
            first, last = self._dropped_steps
            say(f"dropped the metrics of steps {first}-{last}: the MLflow spool was full")
            self._dropped_steps = None

    def _send(self) -> None:
        """The sender thread: once the run is open, spools the buffer every interval and sends
        the spool, oldest first."""
        if not self._attach():
            return
        assert self._spool is not None
        next_spool_s = 0.0
        while True:
            closing = self._closed.is_set()
            if time.monotonic() >= next_spool_s:
                self._spool_metrics()
                next_spool_s = time.monotonic() + self._flush_interval_s
            entry = self._spool.oldest()
            if entry is None:
                if closing:
                    return
                self._closed.wait(max(0.0, next_spool_s - time.monotonic()))
                continue
            metrics = entry.record["kind"] == "metrics"
            what = "log metrics" if metrics else "upload a checkpoint"
            try:
                self._sender_wait.call(what, functools.partial(self._send_one, entry))
            except StopRequested:  # close() gave up: the record stays for the next attempt
                return
            except Exception as exc:  # refused, or a checkpoint file gone: reported at close
                self._errors.append(
                    f"{'log_batch' if metrics else 'checkpoint upload'} failed: {exc}"
                )
            self._spool.remove(entry)

    def _send_one(self, entry: Entry) -> None:
        record = entry.record
        if record["kind"] == "checkpoint":
            self._client.log_artifact(self.run_id, record["path"], CHECKPOINT_DIR)
            return
        if self._last_batch is None:  # the last try's outcome is unknown: did MLflow take it?
            self._last_batch = self._client.get_run(self.run_id).data.tags.get(LOGGED_BATCH_TAG)
        if self._last_batch == entry.id:
            return
        resumed_at = self._resumed_at
        metrics = [
            Metric(key=key, value=value, timestamp=timestamp, step=step)
            for key, value, timestamp, step in record["metrics"]
            if resumed_at is None or step > resumed_at  # another attempt logged these steps
        ]
        if not metrics:
            return
        logged_step = max(m.step for m in metrics)
        if self._logged_step is not None:
            logged_step = max(logged_step, self._logged_step)
        tags = [RunTag(LOGGED_STEP_TAG, str(logged_step)), RunTag(LOGGED_BATCH_TAG, entry.id)]
        self._last_batch = None
        self._client.log_batch(self.run_id, metrics=metrics, tags=tags)
        self._last_batch, self._logged_step = entry.id, logged_step
