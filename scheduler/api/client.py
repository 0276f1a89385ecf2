"""A small Python SDK over the HTTP API (what the CLI uses).

Example::

    client = Client("http://127.0.0.1:8000", token=os.environ["JOBWORKER_TOKEN"])
    job = client.submit(Path("configs/train/mlp_synthetic.yaml").read_text())
    print(client.get(job["id"])["state"])
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx

from workers.interface.errors import JobworkerError


class ApiError(JobworkerError):
    """The API refused a request; ``errors`` holds ``(field, message)`` pairs for a 422.

    ``retry_after_s`` is set when the API said when to retry (429, 503).
    """

    def __init__(
        self,
        status: int,
        message: str,
        errors: list[tuple[str, str]] | None = None,
        retry_after_s: int | None = None,
    ):
        self.status = status
        self.errors = errors or []
        self.retry_after_s = retry_after_s
        super().__init__(message)


class ApiUnreachable(JobworkerError):
    """Nothing answers at the API address."""


class Client:
    """The API's calls as methods; ``token`` (``jw_…``) is sent as a bearer token."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        timeout_s: float = 30.0,
        token: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s, headers=headers)

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            response = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise ApiUnreachable(
                f"cannot reach the jobworker API at {self.base_url} ({exc}); "
                "is `jobworker up` running?"
            ) from exc
        if response.status_code >= 400:
            raise _api_error(response)
        try:
            return response.json() if response.content else None
        except ValueError as exc:
            raise ApiUnreachable(
                f"{self.base_url} answered {method} {path} with something other than JSON; "
                "is that the jobworker API's address (not MLflow's)?"
            ) from exc

    def healthz(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/healthz")
        return result

    def submit(self, text: str, queue_anyway: bool = False) -> dict[str, Any]:
        """The job queued; ``queue_anyway``: even if no node of the cluster could hold it."""
        params = {"queue_anyway": "true"} if queue_anyway else None
        result: dict[str, Any] = self._call(
            "POST",
            "/jobs",
            content=text,
            params=params,
            headers={"content-type": "application/yaml"},
        )
        return result

    def validate(self, text: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "POST", "/jobs/validate", content=text, headers={"content-type": "application/yaml"}
        )
        return result

    def get(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/jobs/{job_id}")
        return result

    def jobs(self, states: list[str] | None = None) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/jobs", params={"state": states or []})
        return result

    def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/jobs/{job_id}/cancel")
        return result

    def logs(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        body = self._call("GET", f"/jobs/{job_id}/logs", params={"offset": offset})
        return body["text"], body["next_offset"]

    def follow_logs(self, job_id: str, offset: int = 0) -> Iterator[str]:
        """Stream the job's output until it ends."""
        try:
            with self._http.stream(
                "GET",
                f"/jobs/{job_id}/logs",
                params={"offset": offset, "follow": True},
                timeout=httpx.Timeout(30.0, read=None),
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _api_error(response)
                yield from response.iter_text()
        except httpx.TransportError as exc:
            raise ApiUnreachable(f"lost the log stream from {self.base_url}: {exc}") from exc

    def queue(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/queue")
        return result

    def cluster(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/cluster")
        return result

    # -- the real-time lane ---------------------------------------------------------------
    def deploy(self, text: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "POST", "/deployments", content=text, headers={"content-type": "application/yaml"}
        )
        return result

    def deployments(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/deployments")
        return result

    def deployment(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/deployments/{name}")
        return result

    def undeploy(self, name: str) -> None:
        self._call("DELETE", f"/deployments/{name}")

    # -- identity -----------------------------------------------------------------------
    def create_token(self, team: str, role: str, name: str | None = None) -> dict[str, Any]:
        """A new token (admin); its ``token`` is shown this once."""
        body = {"team": team, "role": role} | ({"name": name} if name else {})
        result: dict[str, Any] = self._call("POST", "/tokens", json=body)
        return result

    def tokens(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/tokens")
        return result

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE", f"/tokens/{token_id}")
        return result

    def audit(self, **filters: Any) -> list[dict[str, Any]]:
        """Audit events, newest first; filters: ``team``, ``token_id``, ``since``, ``limit``."""
        params = {k: v for k, v in filters.items() if v is not None}
        result: list[dict[str, Any]] = self._call("GET", "/audit", params=params)
        return result

    def predict(self, name: str, inputs: Any) -> dict[str, Any]:
        """``{"outputs", "model", "version", "run_id"}``; a 429 or 503 raises :class:`ApiError`."""
        result: dict[str, Any] = self._call(
            "POST", f"/v1/models/{name}/predict", json={"inputs": inputs}
        )
        return result

    def rollback(self, name: str) -> dict[str, Any]:
        """Serve the version the deployment served before its current one; 409 if none."""
        result: dict[str, Any] = self._call("POST", f"/deployments/{name}/rollback")
        return result

    def login_link(self) -> dict[str, Any]:
        """A one-time console login: ``{"path": "/ui/login?code=…", "expires_at": unix s}``."""
        result: dict[str, Any] = self._call("POST", "/ui/links")
        return result


def _api_error(response: httpx.Response) -> ApiError:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = response.text
    if isinstance(detail, list):
        errors = [(str(d.get("loc", "")), str(d.get("msg", ""))) for d in detail]
        message = "; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in errors)
        return ApiError(response.status_code, message, errors)
    retry = response.headers.get("retry-after")
    return ApiError(response.status_code, str(detail), retry_after_s=int(retry) if retry else None)
