"""Ray calls gathered under one deadline: answers, errors and silence told apart."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from tests.conftest import wait_until
from workers.ray_calls import gather


@ray.remote(num_cpus=0)
class Peer:
    def answer(self, value: int) -> int:
        return value

    def fail(self) -> None:
        raise ValueError("the peer refused")

    def hang(self, seconds: float) -> None:
        time.sleep(seconds)


@pytest.fixture
def peers(ray_session: None) -> Iterator[list[Any]]:
    made = [Peer.remote() for _ in range(4)]  # type: ignore[attr-defined]
    yield made
    for peer in made:
        ray.kill(peer)


def test_gather_tells_answers_errors_and_silence_apart(peers: list[Any]) -> None:
    fine, failing, hung, dead = peers
    ray.get(dead.answer.remote(0))
    ray.kill(dead)

    def killed() -> bool:  # ray.kill only asks: a call sent at once may still be answered
        try:
            ray.get(dead.answer.remote(0), timeout=10)
        except RayActorError:
            return True
        return False

    wait_until(killed, "the killed peer no longer answers", timeout_s=60)
    refs = {
        "fine": fine.answer.remote(7),
        "failing": failing.fail.remote(),
        "hung-1": hung.hang.remote(120),
        "hung-2": hung.hang.remote(120),
        "dead": dead.answer.remote(1),
    }

    answers = gather(refs, timeout_s=1.0)

    assert answers["fine"] == 7
    assert isinstance(answers["failing"], RayTaskError)
    assert "the peer refused" in str(answers["failing"])
    assert isinstance(answers["hung-1"], GetTimeoutError)
    assert isinstance(answers["hung-2"], GetTimeoutError)
    assert isinstance(answers["dead"], RayActorError)
    assert gather({}, timeout_s=1.0) == {}
