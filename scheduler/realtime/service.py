"""The deployment service: what the API and the CLI can ask of the real-time lane.

It validates and stores; the controller, on the loop's next pass (woken at
once), starts, rolls and stops replicas.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from scheduler.realtime.spec import load_deployment
from scheduler.realtime.store import DeploymentRecord, DeploymentStore
from workers.interface.errors import ConfigError, ModelUnavailable
from workers.interface.replicas import ResolvedModel


class DeploymentService:
    """Deploy, inspect and undeploy models.

    Example::

        service = DeploymentService(store, resolver, controller.replicas_view, scheduler.wake)
        record, created = service.deploy(Path("configs/serve/mlp_synthetic.yaml").read_text())
    """

    def __init__(
        self,
        store: DeploymentStore,
        resolver: Callable[[str], ResolvedModel],
        replicas_view: Callable[[str], list[dict[str, Any]]],
        wake: Callable[[], None],
    ) -> None:
        self._store = store
        self._resolver = resolver
        self._replicas_view = replicas_view
        self._wake = wake

    def deploy(self, text: str) -> tuple[DeploymentRecord, bool]:
        """Validate a config, check that its model exists, store it; ``(record, created)``.

        A model that MLflow cannot resolve is refused as a config error on
        ``model``; nothing is stored.
        """
        spec = load_deployment(text)
        try:
            self._resolver(spec.model)
        except ModelUnavailable as exc:
            raise ConfigError([("model", str(exc))]) from exc
        record, created = self._store.put(spec, text)
        self._wake()
        return record, created

    def get(self, name: str) -> DeploymentRecord:
        return self._store.get(name)

    def all(self) -> list[DeploymentRecord]:
        return self._store.list()

    def replicas(self, name: str) -> list[dict[str, Any]]:
        return self._replicas_view(name)

    def undeploy(self, name: str) -> None:
        """Forget the deployment; its replicas stop on the next pass."""
        self._store.delete(name)
        self._wake()
