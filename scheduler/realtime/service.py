"""The deployment service: what the API and the CLI can ask of the real-time lane.

It validates and stores; the controller, on the loop's next pass (woken at
once), starts, rolls and stops replicas.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from scheduler.auth.identity import (
    Forbidden,
    Identity,
    acting_team,
    check_admin,
    check_can_mutate,
    check_model_name,
    check_owner,
)
from scheduler.auth.model_names import ModelNames
from scheduler.realtime.spec import DeploymentSpec, load_deployment
from scheduler.realtime.store import DeploymentRecord, DeploymentStore
from workers.interface.errors import (
    ConfigError,
    DeploymentNotFound,
    ModelUnavailable,
    NothingToRollBack,
)
from workers.interface.replicas import ResolvedModel


class DeploymentService:
    """Deploy, inspect and undeploy models.

    Example::

        service = DeploymentService(
            store, resolver, controller.replicas_view, scheduler.wake, names, job_store.run_team
        )
        record, created = service.deploy(Path("configs/serve/x.yaml").read_text(), caller)
    """

    def __init__(
        self,
        store: DeploymentStore,
        resolver: Callable[[str], ResolvedModel],
        replicas_view: Callable[[str], list[dict[str, Any]]],
        wake: Callable[[], None],
        model_names: ModelNames,
        run_team: Callable[[str], str | None],
    ) -> None:
        self._store = store
        self._model_names = model_names
        self._run_team = run_team  # the team of the job that made an MLflow run
        self._resolver = resolver
        self._replicas_view = replicas_view
        self._wake = wake

    def deploy(self, text: str, caller: Identity) -> tuple[DeploymentRecord, bool]:
        """Validate a config, check that its model exists, store it; ``(record, created)``.

        The deployment runs for the token's team (an admin may name any); an existing
        deployment of that name must be the caller's team's; the model must be the
        team's (see :meth:`_check_model`). A model that MLflow cannot resolve is
        refused as a config error on ``model``; nothing is stored.
        """
        spec = load_deployment(text)
        check_can_mutate(caller, "deploy models")
        if spec.allow_pickled_model:  # unpickling runs whatever the model's writer chose
            check_admin(caller, "set allow_pickled_model (loading a pickle runs its code)")
        team = acting_team(caller, spec.team)
        try:
            current = self._store.get(spec.name)
        except DeploymentNotFound:
            pass
        else:
            check_owner(caller, current.spec.team, f"deployment {spec.name!r}", "update")
        spec = spec.model_copy(update={"team": team})
        self._check_model(caller, spec)
        try:
            self._resolver(spec.model)
        except ModelUnavailable as exc:
            raise ConfigError([("model", str(exc))]) from exc
        model_name = spec.model_ref().name
        if model_name is not None:
            self._model_names.claim(model_name, team)
        record, created = self._store.put(spec, text)
        self._wake()
        return record, created

    def get(self, name: str) -> DeploymentRecord:
        return self._store.get(name)

    def all(self) -> list[DeploymentRecord]:
        return self._store.list()

    def replicas(self, name: str) -> list[dict[str, Any]]:
        return self._replicas_view(name)

    def _check_model(self, caller: Identity, spec: DeploymentSpec) -> None:
        """A deployment follows only its team's models: a registered name it owns (an
        unclaimed one is claimed for it once it resolves), or a run one of its jobs made.
        An admin may deploy any model for any team: that is how a model is shared."""
        ref = spec.model_ref()
        team = spec.team or caller.team
        if ref.name is not None:
            check_model_name(caller, self._model_names.owner(ref.name), team, ref.name)
        elif ref.run_id is not None and not caller.admin:
            owner = self._run_team(ref.run_id)
            if owner != team:
                raise Forbidden(
                    f"model: run {ref.run_id} was not made by a job of team {team!r}"
                    + (f" (its job is team {owner!r})" if owner else "")
                )

    def undeploy(self, name: str, caller: Identity) -> None:
        """Forget the deployment; its replicas stop on the next pass. Only its team's
        members (or an admin) may."""
        check_owner(caller, self._store.get(name).spec.team, f"deployment {name!r}", "undeploy")
        self._store.delete(name)
        self._wake()

    def rollback(self, name: str, caller: Identity) -> DeploymentRecord:
        """Pin the deployment to the registered model version it served before its
        current one (``models:/NAME/<previous>``); its replicas roll on the next pass.

        Only its team's members (or an admin) may. :class:`NothingToRollBack` when it
        follows a run rather than a registered model, or has served one version only.
        Rolling back twice returns to the version rolled back from.
        """
        record = self._store.get(name)
        check_owner(caller, record.spec.team, f"deployment {name!r}", "roll back")
        model_name = record.spec.model_ref().name
        if model_name is None:
            raise NothingToRollBack(
                f"deployment {name!r} serves a run's model ({record.spec.model}), "
                "not a registered model: there is no earlier version to return to"
            )
        previous = self._store.previous_version(name)
        if previous is None:
            served = f"version {record.model_version}" if record.model_version else "no version"
            raise NothingToRollBack(
                f"deployment {name!r} has served {served} of {model_name!r} and none before "
                "it: nothing to roll back to"
            )
        spec = record.spec.model_copy(update={"model": f"models:/{model_name}/{previous}"})
        try:
            self._resolver(spec.model)
        except ModelUnavailable as exc:
            raise NothingToRollBack(
                f"deployment {name!r}: its previous version {previous} cannot be loaded: {exc}"
            ) from exc
        record, _created = self._store.put(spec, spec.model_dump_json(indent=2))
        self._wake()
        return record
