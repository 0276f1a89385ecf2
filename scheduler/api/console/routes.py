"""The console's routes (``/ui/*``, ``/``): fetch the sources, hand them to
:mod:`scheduler.api.console.data`, render. Actions call the API's own services with
the caller's identity, so the console has exactly the API's permissions."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from scheduler.api.auth import LOGIN_PATH, SESSION_COOKIE, Auth, Caller, audit_target
from scheduler.api.console import data
from scheduler.api.console.render import STATIC_DIR, environment
from scheduler.api.views import LogsOut, job_out, run_url
from scheduler.batch.predictions import JobPrediction
from scheduler.batch.service import JobService
from scheduler.core.states import JobState
from scheduler.realtime.metrics import ServingMetrics
from scheduler.realtime.service import DeploymentService

HOME = "/ui/gpus"
ACTIVE = [JobState.SCHEDULED, JobState.RUNNING]
_ALL_JOBS = 100_000  # the jobs page filters in memory; 1,000s of rows read in ~10 ms


class LoginLink(BaseModel):
    path: str
    expires_at: int


class TokenLogin(BaseModel):
    token: str


def console_routes(
    app: FastAPI,
    auth: Auth,
    service: JobService,
    sources: data.ConsoleSources,
    mlflow_ui_url: str | None,
    cluster_view: Callable[[], dict[str, Any]] | None,
    queue_view: Callable[[], list[dict[str, Any]]] | None,
    predictions: Callable[[str], JobPrediction | None] | None,
    deployments: DeploymentService | None,
    metrics: ServingMetrics | None,
) -> None:
    env = environment()
    sessions = auth.sessions
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="console-static")

    def page(request: Request, name: str, fragment: bool, **values: Any) -> HTMLResponse:
        session = sessions.session(request.scope.get("state", {}).get("console_session", ""))
        template = env.get_template(f"_{name}.html" if fragment else f"{name}.html")
        return HTMLResponse(
            template.render(
                page=name,
                live_url=f"{request.url.path}?{_with_fragment(request)}",
                csrf_token=session.csrf_token if session else "",
                who=request.state.identity,
                **values,
            )
        )

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui", status_code=303)

    @app.get("/ui", include_in_schema=False)
    def console_root() -> RedirectResponse:
        return RedirectResponse(HOME, status_code=303)

    @app.get(LOGIN_PATH, include_in_schema=False, response_model=None)
    def login(request: Request, code: str | None = None) -> Response:
        """With a one-time ``code`` (``POST /ui/links``): a session cookie, then the GPUs."""
        if code is None:
            return HTMLResponse(env.get_template("login.html").render(error=None))
        session_id = sessions.exchange(code)
        if session_id is None:
            error = "This login link is spent or expired: ask for a new one (jobworker ui)."
            return HTMLResponse(env.get_template("login.html").render(error=error), 400)
        return _logged_in(request, RedirectResponse(HOME, status_code=303), session_id)

    @app.post(LOGIN_PATH, include_in_schema=False)
    def login_with_token(request: Request, body: TokenLogin) -> Response:
        """A pasted token: a session cookie, and where to go (``{"path": …}``)."""
        identity = auth.tokens.verify(body.token.strip())
        if identity is None:
            raise HTTPException(status_code=401, detail="that token is not valid")
        return _logged_in(request, JSONResponse({"path": HOME}), sessions.open(identity))

    @app.post("/ui/links", response_model=LoginLink)
    def login_link(request: Request, who: Caller) -> LoginLink:
        """A one-time console login path for the token's identity (valid 120 s, one use)."""
        audit_target(request, "console login link")
        code, expires_at = sessions.create_code(who)
        return LoginLink(path=f"{LOGIN_PATH}?code={code}", expires_at=int(expires_at))

    @app.get("/ui/gpus", include_in_schema=False)
    def gpus(request: Request, fragment: bool = False) -> HTMLResponse:
        cluster = cluster_view() if cluster_view is not None else {"nodes": []}
        return page(request, "gpus", fragment, nodes=data.gpu_map(cluster))

    @app.get("/ui/queue", include_in_schema=False)
    def queue(request: Request, fragment: bool = False) -> HTMLResponse:
        entries = queue_view() if queue_view is not None else []
        return page(
            request,
            "queue",
            fragment,
            rows=data.queue_rows(entries, time.time()),
            quotas=data.quota_rows(sources.quotas, service.list(ACTIVE, _ALL_JOBS)),
        )

    @app.get("/ui/jobs", include_in_schema=False)
    def jobs(
        request: Request,
        state: JobState | None = None,
        team: str | None = None,
        q: str | None = None,
        fragment: bool = False,
    ) -> HTMLResponse:
        chosen = data.JobFilter(state, team or None, q or None)
        found = service.list([state] if state else None, _ALL_JOBS)
        return page(
            request,
            "jobs",
            fragment,
            listing=data.jobs_page(found, chosen),
            chosen=chosen,
            states=list(JobState),
        )

    @app.get("/ui/jobs/{job_id}", include_in_schema=False)
    def job(request: Request, job_id: str, fragment: bool = False) -> HTMLResponse:
        record = service.get(job_id)
        losses = (
            sources.loss_history(record.run_id)
            if sources.loss_history is not None and record.run_id
            else ()
        )
        prediction = predictions(job_id) if predictions is not None else None
        text, offset = service.logs(job_id) if not fragment else ("", 0)
        return page(
            request,
            "job",
            fragment,
            job=job_out(record, mlflow_ui_url, service.history(job_id), prediction),
            run_link=run_url(mlflow_ui_url, record),
            spark=data.sparkline(losses),
            last_loss=losses[-1] if losses else None,
            log_text=text,
            log_offset=offset,
        )

    @app.get("/ui/jobs/{job_id}/log", include_in_schema=False)
    def job_log(job_id: str, offset: int = Query(default=0, ge=0)) -> LogsOut:
        text, next_offset = service.logs(job_id, offset)
        return LogsOut(text=text, next_offset=next_offset)

    @app.post("/ui/jobs/{job_id}/cancel", include_in_schema=False)
    def cancel(job_id: str, request: Request, who: Caller) -> dict[str, str]:
        audit_target(request, f"job {job_id}")
        return {"state": service.cancel(job_id, who).state.value}

    if deployments is None or metrics is None:
        return
    serving_routes(app, page, deployments, metrics, mlflow_ui_url)


def serving_routes(
    app: FastAPI,
    page: Callable[..., HTMLResponse],
    deployments: DeploymentService,
    metrics: ServingMetrics,
    mlflow_ui_url: str | None,
) -> None:
    def row(name: str) -> data.DeploymentRow:
        record = deployments.get(name)
        replicas = deployments.replicas(name)
        return data.deployment_row(record, replicas, metrics.summary(name), mlflow_ui_url)

    @app.get("/ui/deployments", include_in_schema=False)
    def deployments_page(request: Request, fragment: bool = False) -> HTMLResponse:
        rows = [row(r.name) for r in deployments.all()]
        return page(request, "deployments", fragment, rows=rows)

    @app.get("/ui/deployments/{name}", include_in_schema=False)
    def deployment_page(request: Request, name: str, fragment: bool = False) -> HTMLResponse:
        return page(request, "deployment", fragment, row=row(name))

    @app.post("/ui/deployments/{name}/undeploy", include_in_schema=False)
    def undeploy(name: str, request: Request, who: Caller) -> dict[str, str]:
        audit_target(request, f"deployment {name}")
        deployments.undeploy(name, who)
        return {"undeployed": name}

    @app.post("/ui/deployments/{name}/rollback", include_in_schema=False)
    def rollback(name: str, request: Request, who: Caller) -> dict[str, str | None]:
        audit_target(request, f"deployment {name}")
        record = deployments.rollback(name, who)
        return {"name": record.name, "model_version": record.model_version}


def _with_fragment(request: Request) -> str:
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "fragment"]
    return urlencode([*params, ("fragment", "1")])


def _logged_in(request: Request, response: Response, session_id: str) -> Response:
    secure = request.url.scheme == "https"
    response.set_cookie(
        SESSION_COOKIE, session_id, httponly=True, samesite="strict", path="/ui", secure=secure
    )
    return response
