"""The broker calls only the middleware hooks that exist, in dramatiq's order and with its
error handling: before-hooks in list order, after-hooks in reverse, a failing hook logged."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from dramatiq.middleware import Middleware, SkipMessage

from worker.runtime.broker import VerloopBroker


class _Recording(Middleware):
    def __init__(self, name: str, calls: list[str]) -> None:
        self.name = name
        self.calls = calls

    def before_process_message(self, broker: Any, message: Any) -> None:
        self.calls.append(f"{self.name}:before")

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        self.calls.append(f"{self.name}:after:{result}")


class _OnlyAck(Middleware):
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def after_ack(self, broker: Any, message: Any) -> None:
        self.calls.append("ack")


def _broker(*middleware: Middleware) -> VerloopBroker:
    return VerloopBroker(url="amqp://guest:guest@127.0.0.1:1/%2F", middleware=list(middleware))


def test_hooks_run_in_dramatiq_s_order_and_empty_ones_are_left_out() -> None:
    calls: list[str] = []
    broker = _broker(_Recording("a", calls), _OnlyAck(calls), _Recording("b", calls))
    broker.emit_before("process_message", object())
    broker.emit_after("process_message", object(), result=7)
    broker.emit_after("ack", object())
    assert calls == ["a:before", "b:before", "b:after:7", "a:after:7", "ack"]
    # _OnlyAck has no process_message hooks of its own, _Recording no ack hook.
    assert [hook.__self__.__class__ for hook in broker._hooks("after_ack")] == [_OnlyAck]
    assert len(broker._hooks("before_process_message")) == 2


def test_middleware_added_later_is_called_too() -> None:
    calls: list[str] = []
    broker = _broker(_Recording("a", calls))
    broker.emit_before("process_message", object())
    broker.add_middleware(_Recording("b", calls))
    broker.emit_before("process_message", object())
    assert calls == ["a:before", "a:before", "b:before"]


def test_a_hook_set_on_the_instance_is_called() -> None:
    calls: list[str] = []
    plain = Middleware()
    plain.before_ack = lambda broker, message: calls.append("instance")  # type: ignore[method-assign]
    broker = _broker(plain)
    broker.emit_before("ack", object())
    assert calls == ["instance"]


def test_a_failing_hook_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[str] = []

    class Failing(Middleware):
        def after_process_message(self, broker: Any, message: Any, **kwargs: Any) -> None:
            raise RuntimeError("boom")

        def before_process_message(self, broker: Any, message: Any) -> None:
            raise RuntimeError("boom before")

    broker = _broker(_Recording("a", calls), Failing())
    with caplog.at_level(logging.CRITICAL):
        broker.emit_after("process_message", object(), result=1)
        broker.emit_before("process_message", object())
    assert calls == ["a:after:1", "a:before"]
    failures = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(failures) == 2
    assert "after_process_message" in failures[0]
    assert "Failing" in failures[0]
    assert "before_process_message" in failures[1]


def test_a_middleware_error_before_a_message_stops_the_chain() -> None:
    """SkipMessage (a MiddlewareError) still reaches dramatiq's worker, which skips the job."""
    calls: list[str] = []

    class Skipping(Middleware):
        def before_process_message(self, broker: Any, message: Any) -> None:
            raise SkipMessage()

    broker = _broker(Skipping(), _Recording("a", calls))
    with pytest.raises(SkipMessage):
        broker.emit_before("process_message", object())
    assert calls == []
