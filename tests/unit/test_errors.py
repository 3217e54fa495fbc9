from __future__ import annotations

import pytest

from sandbox_core import errors


@pytest.mark.parametrize(
    "cls",
    [
        errors.WorkerCrashed,
        errors.RequestTimeout,
        errors.RequestCancelled,
        errors.PoolExhausted,
        errors.IsolationUnavailable,
        errors.GatewayError,
        errors.PoolClosed,
        errors.ServerShuttingDown,
        errors.WorkerStartError,
        errors.LimitExceeded,
    ],
)
def test_errors_cross_the_wire_with_code_message_data(cls: type[errors.SandboxError]) -> None:
    exc = cls("it broke", data={"worker_id": "w1"})
    back = errors.from_wire(exc.to_wire())
    assert type(back) is cls
    assert back.message == "it broke" and back.data == {"worker_id": "w1"}


def test_unknown_code_becomes_remote_error() -> None:
    back = errors.from_wire({"code": -32601, "message": "method not found: x"})
    assert isinstance(back, errors.RemoteError) and back.remote_code == -32601
    assert back.to_wire()["code"] == -32601


def test_malformed_error_object_is_a_protocol_error() -> None:
    assert isinstance(errors.from_wire({"code": "x"}), errors.ProtocolError)
    assert isinstance(errors.from_wire("nope"), errors.ProtocolError)


def test_every_error_is_a_sandbox_error() -> None:
    for name in dir(errors):
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == errors.__name__:
            assert issubclass(obj, errors.SandboxError)
