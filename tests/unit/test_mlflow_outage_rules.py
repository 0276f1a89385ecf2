"""What the job process waits out (an MLflow outage) and what fails the job (a refusal)."""

from __future__ import annotations

import threading

import pytest
import requests
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from jobs.context import StopRequested
from workers.interface.errors import MlflowRefused
from workers.mlflow_context import MlflowWaiter, is_outage


def _wrapped(cause: Exception) -> MlflowException:
    """As MLflow's client reports a transport error: its own exception, raised from it."""
    try:
        raise cause
    except Exception as exc:
        try:
            raise MlflowException(f"API request failed with exception {exc}") from exc
        except MlflowException as wrapped:
            return wrapped


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status}", response=response)


@pytest.mark.parametrize(
    ("exc", "outage"),
    [
        (_wrapped(requests.ConnectionError("connection refused")), True),
        (_wrapped(requests.Timeout("read timed out")), True),
        (_wrapped(ConnectionResetError(104, "reset by peer")), True),
        (RestException({"error_code": "INTERNAL_ERROR", "message": "db"}), True),
        (RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"}), True),
        (RestException({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow down"}), True),
        (MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE), True),
        (_http_error(503), True),
        (RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"}), False),
        (RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "gone"}), False),
        (RestException({"error_code": "NOT_IMPLEMENTED", "message": "no"}), False),
        (_http_error(403), False),
        (MlflowException("pt2 needs an input example"), False),  # INTERNAL_ERROR, this side
        (MlflowException.invalid_parameter_value("bad URL"), False),
        (RuntimeError("the job's own"), False),
    ],
)
def test_outage_or_refusal(exc: Exception, outage: bool) -> None:
    assert is_outage(exc) is outage


def test_a_refusal_fails_at_once_naming_what_was_refused() -> None:
    calls = []

    def refused() -> None:
        calls.append(1)
        raise RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "key 'a b'"})

    with pytest.raises(MlflowRefused, match=r"MLflow refused to log the params: .*key 'a b'"):
        MlflowWaiter("http://mlflow", threading.Event()).call("log the params", refused)
    assert calls == [1]


def test_the_jobs_own_error_is_raised_as_it_is() -> None:
    def broken() -> None:
        raise ZeroDivisionError("in the job's model")

    with pytest.raises(ZeroDivisionError):
        MlflowWaiter("http://mlflow", threading.Event()).call("log the model", broken)


def test_a_stop_request_ends_the_wait_after_one_try(capsys: pytest.CaptureFixture[str]) -> None:
    stop = threading.Event()
    stop.set()
    calls = []

    def down() -> None:
        calls.append(1)
        raise _wrapped(requests.ConnectionError("connection refused"))

    with pytest.raises(StopRequested, match="while waiting for MLflow to end the run"):
        MlflowWaiter("http://mlflow", stop).call("end the run", down)
    assert calls == [1]
    assert "waiting for MLflow" not in capsys.readouterr().out


def test_an_outage_is_waited_out_and_said(capsys: pytest.CaptureFixture[str]) -> None:
    answers = iter([_wrapped(requests.ConnectionError("connection refused")), "run"])

    def flaky() -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    waiter = MlflowWaiter("http://mlflow:5000", threading.Event())
    assert waiter.call("read the run", flaky) == "run"
    out = capsys.readouterr().out
    assert "jobworker: waiting for MLflow at http://mlflow:5000: API request failed" in out
    assert "jobworker: MLflow at http://mlflow:5000 answers again" in out
