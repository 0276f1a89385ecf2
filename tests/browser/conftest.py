"""One console stack for the browser tests (a control plane on the session Ray, MLflow on
SQLite, real HTTP, simulated GPUs, in the state the tests look at), Debian's chromium driven
by Playwright over CDP, and the screenshots the tests save (listed at the end of the run)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from playwright.sync_api import Browser, Page, Playwright, sync_playwright

from scheduler.core.states import JobState
from tests.browser.chromium import headless_chromium
from tests.conftest import wait_until
from tests.integration.conftest import Api, entrypoint_yaml, start_api
from tests.integration.serving_helpers import deploy, deploy_yaml, log_model, wait_deployment

GIB = 2**30
MODEL = "browser-mlp"
BLOCKER_GB = 20  # of an A100 of 40 GB (32 free on the other): what is left < WAITING_GB
REPLICA_GB = 2
WAITING_GB = 25
MLFLOW_UI = "http://127.0.0.1:5000"  # only linked to: no MLflow server runs
SCREENSHOTS_ENV = "JOBWORKER_SCREENSHOTS"  # a folder: the GPU map and queue PNGs go there too
README_SHOTS = ("gpus", "queue")
_SHOTS = pytest.StashKey[list[Path]]()


@dataclass
class Stack:
    """The control plane the console is served by, and what runs on it.

    On the simulated node "local" (2 A100s of 40 GB, 8 GB of the second held outside
    jobworker): the deployment ``MODEL`` has a ready replica holding ``REPLICA_GB`` of one
    GPU, which batch jobs then leave to it; ``blocker`` holds ``BLOCKER_GB`` of the other;
    ``tailed`` (no GPU) prints ``step N`` at each step; ``waiting`` asks one GPU with
    ``WAITING_GB`` free, which no GPU has for it until the blocker is gone.
    """

    api: Api
    blocker: str
    tailed: str
    waiting: str

    @property
    def base_url(self) -> str:
        return str(self.api.http.base_url).rstrip("/")


def submit(api: Api, text: str) -> str:
    response = api.http.post("/jobs", content=text, headers={"content-type": "application/yaml"})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


@pytest.fixture(scope="module")
def stack(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("console-home")
    api, stop = start_api(home, f"jw-browser-{uuid.uuid4().hex[:8]}", mlflow_ui_url=MLFLOW_UI)
    try:
        log_model(api.tracking_uri, MODEL, torch.nn.Sequential(torch.nn.Linear(64, 10)))
        deploy(
            api,
            deploy_yaml(
                MODEL, f"models:/{MODEL}/1", resources=f"{{cpus: 1, gpu_memory_gb: {REPLICA_GB}}}"
            ),
        )
        steps = {"step_s": 0.5, "print_steps": True}
        tailed = submit(api, entrypoint_yaml("tailed", "run_until_stopped", **steps))
        # The replica first: the blocker then takes the other GPU (batch jobs leave a
        # replica's GPU to it), and the waiting job has no GPU until the blocker is gone.
        wait_deployment(api, MODEL)
        blocker = submit(
            api,
            entrypoint_yaml(
                "blocker", "run_until_stopped", gpus=1, gpu_memory_gb=BLOCKER_GB, **steps
            ),
        )
        for job_id in (blocker, tailed):
            api.wait_for(job_id, {JobState.RUNNING})
        waiting = submit(
            api, entrypoint_yaml("waiting", "run_until_stopped", gpus=1, gpu_memory_gb=WAITING_GB)
        )
        wait_until(
            lambda: any(
                e["job_id"] == waiting and e["reasons"] for e in api.http.get("/queue").json()
            ),
            "the waiting job is queued with a reason",
        )
        yield Stack(api, blocker, tailed, waiting)
    finally:
        stop()


# Module-scoped, not session-scoped: Playwright's sync API runs an asyncio loop in this
# thread while it is started, and every later test that calls asyncio.run() would fail
# with "cannot be called from a running event loop". It is stopped when the module ends.
@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    with headless_chromium(tmp_path_factory.mktemp("chromium-profile")) as endpoint:
        connected = playwright.chromium.connect_over_cdp(endpoint)
        try:
            yield connected
        finally:
            connected.close()


@pytest.fixture(scope="module")
def page(browser: Browser, stack: Stack) -> Iterator[Page]:
    """A page logged in to the console as the admin, through a one-time login link."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        tab = context.new_page()
        link = stack.api.http.post("/ui/links")
        assert link.status_code == 200, link.text
        tab.goto(stack.base_url + link.json()["path"])
        yield tab
    finally:
        context.close()


@pytest.fixture(scope="session")
def screenshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("console-screenshots")


@pytest.fixture
def screenshot(
    page: Page, screenshot_dir: Path, request: pytest.FixtureRequest
) -> Callable[[str], Path]:
    """``screenshot(name)`` saves the page as ``<name>.png`` and lists it for the summary."""

    def take(name: str) -> Path:
        path = screenshot_dir / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        request.config.stash.setdefault(_SHOTS, []).append(path)
        print(f"screenshot: {path}")
        target = os.environ.get(SCREENSHOTS_ENV)
        if target and name in README_SHOTS:
            Path(target).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(target) / path.name)
        return path

    return take


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    shots = config.stash.get(_SHOTS, [])
    if shots:
        terminalreporter.section("console screenshots")
        for path in shots:
            terminalreporter.write_line(str(path))
