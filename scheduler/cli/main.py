"""The ``jobworker`` command line: every command, registered on one Typer app.

Server commands (``up``, ``down``, ``demo``) start things; the rest call the
API through the client SDK (``scheduler.api.client``).
"""

from __future__ import annotations

import typer

from scheduler.cli import identity, jobs, servers, serving, simulate

app = typer.Typer(
    help="jobworker: a GPU-aware scheduler for ML training and inference.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

for command in (
    servers.up,
    servers.down,
    servers.demo,
    jobs.validate,
    jobs.submit,
    jobs.status,
    jobs.logs,
    jobs.cancel,
    jobs.queue,
    jobs.cluster,
    serving.deploy,
    serving.deployments,
    serving.undeploy,
    serving.rollback,
    serving.predict,
    simulate.simulate,
    identity.audit,
):
    app.command()(command)
app.add_typer(identity.token_app, name="token")
