"""The console's login codes and sessions: single use, expiry, CSRF (a fake clock)."""

from __future__ import annotations

from scheduler.api.console.sessions import CODE_TTL_S, SESSION_TTL_S, Sessions
from scheduler.auth.identity import Identity, Role

ALICE = Identity(token_id="t1", name="alice", team="a", role=Role.MEMBER)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_code_opens_one_session_for_its_identity() -> None:
    sessions = Sessions(clock=Clock())
    code, expires_at = sessions.create_code(ALICE)
    assert expires_at == 1000.0 + CODE_TTL_S
    session_id = sessions.exchange(code)
    assert session_id is not None
    assert sessions.identity(session_id) == ALICE


def test_a_code_is_spent_by_its_first_use() -> None:
    sessions = Sessions(clock=Clock())
    code, _ = sessions.create_code(ALICE)
    assert sessions.exchange(code) is not None
    assert sessions.exchange(code) is None


def test_an_expired_code_opens_nothing() -> None:
    clock = Clock()
    sessions = Sessions(clock=clock)
    code, _ = sessions.create_code(ALICE)
    clock.now += CODE_TTL_S
    assert sessions.exchange(code) is None


def test_an_unknown_code_or_session_is_refused() -> None:
    sessions = Sessions(clock=Clock())
    assert sessions.exchange("made-up") is None
    assert sessions.identity("made-up") is None


def test_a_session_ends_after_its_life() -> None:
    clock = Clock()
    sessions = Sessions(clock=clock)
    session_id = sessions.open(ALICE)
    clock.now += SESSION_TTL_S - 1
    assert sessions.identity(session_id) == ALICE
    clock.now += 1
    assert sessions.identity(session_id) is None
    assert sessions.session(session_id) is None


def test_csrf_takes_only_the_sessions_own_token() -> None:
    sessions = Sessions(clock=Clock())
    first, second = sessions.open(ALICE), sessions.open(ALICE)
    token = sessions.session(first).csrf_token  # type: ignore[union-attr]
    assert sessions.check_csrf(first, token)
    assert not sessions.check_csrf(first, None)
    assert not sessions.check_csrf(first, "")
    assert not sessions.check_csrf(first, token + "x")
    assert not sessions.check_csrf(second, token)
    assert not sessions.check_csrf("made-up", token)
