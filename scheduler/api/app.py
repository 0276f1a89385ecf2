"""The HTTP API (FastAPI). Routes map requests to service calls and hold no logic."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from scheduler.api.auth import Auth, Authenticate, Caller, audit_target, document_security
from scheduler.api.console.data import ConsoleSources
from scheduler.api.console.routes import console_routes
from scheduler.api.docs import docs_routes
from scheduler.api.guards import BodyLimits, RequestGuard
from scheduler.api.identity_routes import identity_routes
from scheduler.api.views import (
    NOT_FOUND,
    ConfigRejected,
    DeploymentOut,
    JobOut,
    LogsOut,
    PredictionOut,
    QueueEntryOut,
    Refusal,
    ValidationOk,
    deployment_out,
    job_out,
)
from scheduler.auth.identity import Forbidden, Identity, check_predict
from scheduler.auth.tokens import TokenNotFound
from scheduler.batch.predictions import JobPrediction
from scheduler.batch.service import JobService
from scheduler.core.states import JobState
from scheduler.realtime.metrics import ServingMetrics
from scheduler.realtime.payload import parse_inputs, render
from scheduler.realtime.router import Router
from scheduler.realtime.service import DeploymentService
from workers.interface.errors import (
    ConfigError,
    DeploymentNotFound,
    JobNotFound,
    NothingToRollBack,
    PredictError,
)

_CONFIG_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/yaml": {"schema": {"type": "string"}},
            "application/json": {"schema": {"type": "object"}},
        },
    }
}
# Refusals any route may give before it runs (scheduler.api.guards), and the 404 of a
# route naming a job or deployment.
_GUARDED: dict[int | str, dict[str, Any]] = {
    400: {"model": Refusal, "description": "Host not served, or a malformed request"},
    413: {"model": Refusal, "description": "Request body over the route's limit"},
    415: {"model": Refusal, "description": "Body neither JSON nor YAML (mutating routes)"},
}
_UNAVAILABLE: dict[int | str, dict[str, Any]] = {503: {"model": Refusal}}
_MAX_OFFSET = 2**63 - 1  # the largest file offset (off_t)


@dataclass
class Serving:
    """The real-time lane as the API sees it."""

    deployments: DeploymentService
    router: Router
    metrics: ServingMetrics


def create_app(
    service: JobService,
    auth: Auth,
    mlflow_ui_url: str | None = None,
    cluster_view: Callable[[], dict[str, Any]] | None = None,
    serving: Serving | None = None,
    queue_view: Callable[[], list[dict[str, Any]]] | None = None,
    predictions: Callable[[str], JobPrediction | None] | None = None,
    leading: Callable[[], bool] | None = None,
    body_limits: BodyLimits = BodyLimits(),
    allowed_hosts: frozenset[str] | None = None,
    console: ConsoleSources = ConsoleSources(),
    metrics: Callable[[], bytes] | None = None,
) -> FastAPI:
    """The API over a job service. ``cluster_view`` serves ``GET /cluster``,
    ``queue_view`` ``GET /queue``; ``predictions`` gives a job's predicted start and
    end (``GET /jobs/{id}``'s ``prediction``); ``leading`` says whether this control plane
    acts on jobs or stands by (``GET /healthz``'s ``role``). Requests pass
    :class:`~scheduler.api.guards.RequestGuard` first: ``body_limits``, and the
    ``Host`` names served (``allowed_hosts``; None: any); then every route but
    ``/healthz`` needs a token (``scheduler.api.auth``). The console (``/ui``) shows
    these same views, with what ``console`` adds (quotas, loss histories). ``metrics``
    renders ``GET /metrics`` (None: the serving metrics alone, when there are some)."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if serving is not None:
            serving.router.bind(asyncio.get_running_loop())
        yield

    app = FastAPI(
        title="jobworker",
        description="GPU-aware scheduler for ML training and inference.",
        version="0.1.0",
        lifespan=lifespan,
        responses=_GUARDED,
        docs_url=None,  # served with no CDN by docs_routes
        redoc_url=None,  # likewise
    )

    @app.exception_handler(ConfigError)
    async def _config_error(_request: Request, exc: ConfigError) -> JSONResponse:
        detail = [{"loc": loc, "msg": msg} for loc, msg in exc.errors]
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.exception_handler(Forbidden)
    async def _forbidden(_request: Request, exc: Forbidden) -> JSONResponse:
        return JSONResponse(status_code=403, content={"detail": str(exc)})

    @app.exception_handler(JobNotFound)
    @app.exception_handler(DeploymentNotFound)
    @app.exception_handler(TokenNotFound)
    async def _not_found(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": str(exc)})

    @app.exception_handler(NothingToRollBack)
    async def _conflict(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(exc)})

    @app.exception_handler(PredictError)
    async def _predict_error(_request: Request, exc: PredictError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        return JSONResponse(status_code=exc.status, content={"detail": str(exc)}, headers=headers)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Up; ``role``: ``leader`` acts on jobs, ``standby`` takes over if it dies."""
        return {"status": "ok", "role": "leader" if leading is None or leading() else "standby"}

    @app.post(
        "/jobs",
        status_code=201,
        response_model=JobOut,
        responses={422: {"model": ConfigRejected}},
        openapi_extra=_CONFIG_BODY,
    )
    async def submit(request: Request, who: Caller, queue_anyway: bool = False) -> JobOut:
        """Queue a training config, sent as YAML or JSON, for the token's team.

        A job no node of the cluster could ever hold is refused (422, each node's
        reason) unless ``queue_anyway``: then it waits for nodes yet to join."""
        text = await _body_text(request)
        job = await asyncio.to_thread(service.submit, text, who, queue_anyway)
        audit_target(request, f"job {job.id}")
        return job_out(job, mlflow_ui_url, service.history(job.id))

    @app.post(
        "/jobs/validate",
        response_model=ValidationOk,
        responses={422: {"model": ConfigRejected}},
        openapi_extra=_CONFIG_BODY,
    )
    async def validate(request: Request) -> ValidationOk:
        """Check a config without queueing it."""
        spec = service.validate(await _body_text(request))
        return ValidationOk(valid=True, name=spec.name, spec=spec.model_dump(mode="json"))

    @app.get("/jobs", response_model=list[JobOut])
    def list_jobs(
        state: list[JobState] | None = Query(default=None),
        limit: int = Query(default=200, ge=1, le=10000),
    ) -> list[JobOut]:
        return [job_out(j, mlflow_ui_url) for j in service.list(state, limit)]

    @app.get("/jobs/{job_id}", response_model=JobOut, responses=NOT_FOUND)
    def get_job(job_id: str) -> JobOut:
        """The job, its history, and, pending or running, when it should start and end."""
        prediction = predictions(job_id) if predictions is not None else None
        return job_out(service.get(job_id), mlflow_ui_url, service.history(job_id), prediction)

    @app.post("/jobs/{job_id}/cancel", response_model=JobOut, responses=NOT_FOUND)
    def cancel(job_id: str, request: Request, who: Caller) -> JobOut:
        audit_target(request, f"job {job_id}")
        return job_out(service.cancel(job_id, who), mlflow_ui_url, service.history(job_id))

    @app.get(
        "/jobs/{job_id}/logs",
        response_model=LogsOut,
        responses={**NOT_FOUND, 200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    def logs(
        job_id: str, offset: int = Query(default=0, ge=0, le=_MAX_OFFSET), follow: bool = False
    ) -> LogsOut | StreamingResponse:
        """The job's output: JSON, or with ``follow`` a ``text/plain`` stream until the job ends."""
        text, next_offset = service.logs(job_id, offset)
        if not follow:
            return LogsOut(text=text, next_offset=next_offset)
        return StreamingResponse(_follow(service, job_id, offset), media_type="text/plain")

    @app.get("/queue", response_model=list[QueueEntryOut], responses=_UNAVAILABLE)
    def queue() -> list[QueueEntryOut]:
        """Pending jobs in the order the scheduler considers them, with why each waits."""
        if queue_view is None:
            raise HTTPException(status_code=503, detail="no queue view configured")
        return [QueueEntryOut(position=i, **e) for i, e in enumerate(queue_view(), start=1)]

    @app.get("/cluster", responses=_UNAVAILABLE)
    def cluster() -> dict[str, Any]:
        if cluster_view is None:
            raise HTTPException(status_code=503, detail="no cluster view configured")
        return cluster_view()

    identity_routes(app, auth)
    docs_routes(app)
    if serving is not None:
        _serving_routes(app, serving)
    console_routes(
        app,
        auth,
        service,
        console,
        mlflow_ui_url,
        cluster_view,
        queue_view,
        predictions,
        serving.deployments if serving is not None else None,
        serving.metrics if serving is not None else None,
    )
    render_metrics = metrics or (serving.metrics.render if serving is not None else None)
    if render_metrics is not None:
        _metrics_route(app, render_metrics)
    document_security(app, auth.public_paths)
    app.add_middleware(Authenticate, auth=auth)
    # Added last, so outermost: a request for a Host not served, or with too big a
    # body, is refused before its token is looked at.
    app.add_middleware(RequestGuard, limits=body_limits, allowed_hosts=allowed_hosts)
    return app


def _metrics_route(app: FastAPI, render: Callable[[], bytes]) -> None:
    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> Response:
        """Scheduler and serving metrics in Prometheus' text format."""
        return Response(render(), media_type="text/plain; version=0.0.4")


def _serving_routes(app: FastAPI, serving: Serving) -> None:
    deployments = serving.deployments
    router = serving.router

    def out(name: str) -> DeploymentOut:
        return deployment_out(deployments.get(name), deployments.replicas(name))

    @app.post(
        "/deployments",
        status_code=201,
        response_model=DeploymentOut,
        responses={200: {"model": DeploymentOut}, 422: {"model": ConfigRejected}},
        openapi_extra=_CONFIG_BODY,
    )
    async def deploy(request: Request, response: Response, who: Caller) -> DeploymentOut:
        """Deploy a model (201), or update the deployment of that name (200), for the
        token's team."""
        text = await _body_text(request)
        record, created = await asyncio.to_thread(deployments.deploy, text, who)
        audit_target(request, f"deployment {record.name}")
        if not created:
            response.status_code = 200
        return out(record.name)

    @app.get("/deployments", response_model=list[DeploymentOut])
    def list_deployments() -> list[DeploymentOut]:
        return [deployment_out(r, deployments.replicas(r.name)) for r in deployments.all()]

    @app.get("/deployments/{name}", response_model=DeploymentOut, responses=NOT_FOUND)
    def get_deployment(name: str) -> DeploymentOut:
        return out(name)

    @app.delete("/deployments/{name}", status_code=204, responses=NOT_FOUND)
    def undeploy(name: str, request: Request, who: Caller) -> Response:
        audit_target(request, f"deployment {name}")
        deployments.undeploy(name, who)
        return Response(status_code=204)

    @app.post(
        "/deployments/{name}/rollback",
        response_model=DeploymentOut,
        responses={**NOT_FOUND, 409: {"model": Refusal}},
    )
    def rollback(name: str, request: Request, who: Caller) -> DeploymentOut:
        """Serve the model version the deployment served before its current one, pinned
        (``models:/NAME/<version>``); 409 when it has served no other version."""
        audit_target(request, f"deployment {name}")
        return out(deployments.rollback(name, who).name)

    async def predict(request: Request) -> Response:
        """Predict: ``{"inputs": [[...]]}`` → outputs, model name, version and run id."""
        name = request.path_params["name"]
        identity: Identity = request.scope["state"]["identity"]  # set by Authenticate
        check_predict(identity, router.team(name), name)
        shape, dtype = router.schema(name)
        inputs = parse_inputs(await request.body(), shape, dtype)
        body, headers = render(await router.predict(name, inputs))
        return Response(body, media_type="application/json", headers=headers)

    # The hot path is a plain Starlette route, ahead of FastAPI's: it skips the
    # per-request parameter solving (see bench/serving.py). The FastAPI route
    # below, never reached, documents the endpoint in the OpenAPI schema.
    app.router.routes.insert(0, Route("/v1/models/{name}/predict", predict, methods=["POST"]))

    @app.post(
        "/v1/models/{name}/predict",
        response_model=PredictionOut,
        responses={
            **NOT_FOUND,
            413: {"model": Refusal, "description": "Body or row count over the limit"},
            422: {"model": Refusal},
            429: {"model": Refusal},
            503: {"model": Refusal},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"example": {"inputs": [[0.1, 0.2]]}}},
            }
        },
    )
    async def predict_documented(name: str, request: Request) -> Response:
        """Predict: ``{"inputs": [[...]]}`` → outputs, model name, version and run id.

        413 when it has more rows than the deployment takes in one request
        (``max_batch_size`` times 4), 422 when the input does not match the model's
        signature or holds a non-finite number, 429 with ``Retry-After`` when
        overloaded, 503 while no replica is ready. A non-finite output (NaN,
        ±infinity) is written as ``null``: the body is always JSON.
        """
        return await predict(request)


async def _body_text(request: Request) -> str:
    raw = await request.body()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([("", f"the body is not UTF-8 text: {exc}")]) from exc


async def _follow(service: JobService, job_id: str, offset: int) -> AsyncIterator[bytes]:
    while True:
        text, offset = await asyncio.to_thread(service.logs, job_id, offset)
        if text:
            yield text.encode()
            continue
        job = await asyncio.to_thread(service.get, job_id)
        if job.terminal:
            text, offset = await asyncio.to_thread(service.logs, job_id, offset)
            if text:
                yield text.encode()
            return
        await asyncio.sleep(0.5)
