"""The HTTP API (FastAPI). Routes map requests to service calls and hold no logic."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from scheduler.errors import ConfigError, JobNotFound
from scheduler.service import JobService
from scheduler.spec import load_spec
from scheduler.states import JobState
from scheduler.views import ConfigRejected, JobOut, LogsOut, ValidationOk, job_out

_CONFIG_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/yaml": {"schema": {"type": "string"}},
            "application/json": {"schema": {"type": "object"}},
        },
    }
}


def create_app(
    service: JobService,
    mlflow_ui_url: str | None = None,
    cluster_view: Callable[[], dict[str, Any]] | None = None,
) -> FastAPI:
    """The API over a job service. ``cluster_view`` serves ``GET /cluster``."""
    app = FastAPI(
        title="jobworker",
        description="GPU-aware scheduler for ML training and inference.",
        version="0.1.0",
    )

    @app.exception_handler(ConfigError)
    async def _config_error(_request: Request, exc: ConfigError) -> JSONResponse:
        detail = [{"loc": loc, "msg": msg} for loc, msg in exc.errors]
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.exception_handler(JobNotFound)
    async def _not_found(_request: Request, exc: JobNotFound) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": str(exc)})

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post(
        "/jobs",
        status_code=201,
        response_model=JobOut,
        responses={422: {"model": ConfigRejected}},
        openapi_extra=_CONFIG_BODY,
    )
    async def submit(request: Request) -> JobOut:
        """Queue a training config, sent as YAML or JSON."""
        text = await _body_text(request)
        job = await asyncio.to_thread(service.submit, text)
        return job_out(job, mlflow_ui_url, service.history(job.id))

    @app.post(
        "/jobs/validate",
        response_model=ValidationOk,
        responses={422: {"model": ConfigRejected}},
        openapi_extra=_CONFIG_BODY,
    )
    async def validate(request: Request) -> ValidationOk:
        """Check a config without queueing it."""
        spec = load_spec(await _body_text(request))
        return ValidationOk(valid=True, name=spec.name, spec=spec.model_dump(mode="json"))

    @app.get("/jobs", response_model=list[JobOut])
    def list_jobs(
        state: list[JobState] | None = Query(default=None),
        limit: int = Query(default=200, ge=1, le=10000),
    ) -> list[JobOut]:
        return [job_out(j, mlflow_ui_url) for j in service.list(state, limit)]

    @app.get("/jobs/{job_id}", response_model=JobOut)
    def get_job(job_id: str) -> JobOut:
        return job_out(service.get(job_id), mlflow_ui_url, service.history(job_id))

    @app.post("/jobs/{job_id}/cancel", response_model=JobOut)
    def cancel(job_id: str) -> JobOut:
        return job_out(service.cancel(job_id), mlflow_ui_url, service.history(job_id))

    @app.get("/jobs/{job_id}/logs", response_model=LogsOut)
    def logs(
        job_id: str, offset: int = Query(default=0, ge=0), follow: bool = False
    ) -> LogsOut | StreamingResponse:
        """The job's output; with ``follow`` a plain-text stream until the job ends."""
        text, next_offset = service.logs(job_id, offset)
        if not follow:
            return LogsOut(text=text, next_offset=next_offset)
        return StreamingResponse(_follow(service, job_id, offset), media_type="text/plain")

    @app.get("/cluster")
    def cluster() -> dict[str, Any]:
        if cluster_view is None:
            raise HTTPException(status_code=503, detail="no cluster view configured")
        return cluster_view()

    return app


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
