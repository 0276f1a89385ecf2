"""The operator console in a real headless chromium, against the console's DOM contract.

The tests share one stack (tests/browser/conftest.py) and run in file order: the queue
test comes last because it cancels the job that blocks the waiting one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Dialog, Page, expect

from scheduler.core.states import JobState
from tests.browser.conftest import BLOCKER_GB, GIB, MLFLOW_UI, MODEL, REPLICA_GB, Stack
from tests.integration.serving_helpers import rows

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]
LIVE_S = 30_000  # ms: how long `expect` waits for a live region to show a change (a bound on hangs)
Screenshot = Callable[[str], Path]


def mark_document(page: Page) -> None:
    """Tag the loaded document: `assert_same_document` fails if it was reloaded since."""
    page.evaluate("window.__jobworkerTestMark = 'kept'")


def assert_same_document(page: Page) -> None:
    assert page.evaluate("window.__jobworkerTestMark") == "kept", "the page was reloaded"


def test_gpu_map_shows_the_nodes_gpus_and_who_holds_their_memory(
    page: Page, stack: Stack, screenshot: Screenshot
) -> None:
    page.goto(f"{stack.base_url}/ui/gpus")
    node = page.locator('section.node[data-node="local"]')  # the simulated node with GPUs
    expect(node).to_have_count(1)
    expect(node.locator("div.gpu")).to_have_count(2)
    job = node.locator(f'.share[data-holder="job:{stack.blocker}"]')
    expect(job).to_have_count(1, timeout=LIVE_S)
    expect(job).to_have_attribute("data-bytes", str(BLOCKER_GB * GIB))
    replica = node.locator(f'.share[data-holder="replica:{MODEL}"]')
    expect(replica).to_have_count(1, timeout=LIVE_S)
    expect(replica).to_have_attribute("data-bytes", str(REPLICA_GB * GIB))
    outside = node.locator('div.gpu[data-gpu-index="1"] .share[data-holder="outside"]')
    expect(outside).to_have_attribute("data-bytes", str(8 * GIB))  # local_sim.yaml's 8 GB
    screenshot("gpus")


def test_deployments_page_shows_the_replica_and_its_p99(
    page: Page, stack: Stack, screenshot: Screenshot
) -> None:
    for _ in range(5):
        r = stack.api.http.post(f"/v1/models/{MODEL}/predict", json={"inputs": rows(2)})
        assert r.status_code == 200, r.text
    page.goto(f"{stack.base_url}/ui/deployments")
    p99 = page.locator(f'#deployments tr[data-deployment="{MODEL}"] td.p99')
    expect(p99).to_have_text(re.compile(r"\d"), timeout=LIVE_S)
    screenshot("deployments")
    page.goto(f"{stack.base_url}/ui/deployments/{MODEL}")
    expect(page.locator("tr[data-replica]")).to_have_count(1, timeout=LIVE_S)
    expect(page.locator('button[data-action="undeploy"]')).to_be_visible()
    expect(page.locator('button[data-action="rollback"]')).to_be_visible()
    screenshot("deployment")


def test_jobs_list_shows_the_jobs(page: Page, stack: Stack, screenshot: Screenshot) -> None:
    page.goto(f"{stack.base_url}/ui/jobs")
    for job_id in (stack.blocker, stack.tailed, stack.waiting):
        expect(page.locator(f'#jobs tr[data-job-id="{job_id}"]')).to_have_count(1)
    page.goto(f"{stack.base_url}/ui/jobs?state=PENDING")
    expect(page.locator(f'#jobs tr[data-job-id="{stack.waiting}"]')).to_have_count(1)
    expect(page.locator(f'#jobs tr[data-job-id="{stack.tailed}"]')).to_have_count(0)
    screenshot("jobs")


def test_job_page_log_follows_new_lines(page: Page, stack: Stack, screenshot: Screenshot) -> None:
    page.goto(f"{stack.base_url}/ui/jobs/{stack.tailed}")
    expect(page.locator("#job-state")).to_have_text("RUNNING")
    log = page.locator("pre#log")
    expect(log).to_contain_text(re.compile(r"step \d+"), timeout=LIVE_S)
    mark_document(page)
    shown = max(int(n) for n in re.findall(r"step (\d+)", log.inner_text()))
    expect(log).to_contain_text(re.compile(rf"\bstep {shown + 3}\b"), timeout=LIVE_S)
    assert_same_document(page)
    expect(page.locator("a#mlflow-run")).to_have_attribute(
        "href",
        re.compile(rf"^{re.escape(MLFLOW_UI)}/.*{stack.api.plane.store.get(stack.tailed).run_id}"),
    )
    screenshot("job")


def test_cancel_from_the_job_page_cancels_the_job(page: Page, stack: Stack) -> None:
    page.goto(f"{stack.base_url}/ui/jobs/{stack.tailed}")
    expect(page.locator("#job-state")).to_have_text("RUNNING")
    dialogs: list[str] = []

    def accept(dialog: Dialog) -> None:
        dialogs.append(dialog.type)
        dialog.accept()

    page.once("dialog", accept)
    page.locator('button[data-action="cancel"]').click()
    stack.api.wait_for(stack.tailed, {JobState.CANCELLED})
    assert dialogs == ["confirm"]
    expect(page.locator("#job-state")).to_have_text("CANCELLED", timeout=LIVE_S)


def test_queue_lists_the_waiting_job_and_updates_when_it_starts(
    page: Page, stack: Stack, screenshot: Screenshot
) -> None:
    page.goto(f"{stack.base_url}/ui/queue")
    waiting = page.locator(f'#queue tr[data-job-id="{stack.waiting}"]')
    expect(waiting).to_have_count(1)
    reasons = stack.api.http.get(f"/jobs/{stack.waiting}").json()["pending_reasons"]
    on_local = next(r for r in reasons if r.startswith("local"))  # the API's, for the node
    expect(waiting.locator("td.reason")).to_contain_text(on_local)
    expect(page.locator("#quotas")).to_be_visible()
    screenshot("queue")
    mark_document(page)
    cancelled = stack.api.http.post(f"/jobs/{stack.blocker}/cancel")
    assert cancelled.status_code == httpx.codes.OK, cancelled.text
    stack.api.wait_for(stack.waiting, {JobState.SCHEDULED, JobState.RUNNING})
    expect(waiting).to_have_count(0, timeout=LIVE_S)
    assert_same_document(page)
