"""The node's engine slot (mace_ros/ros/node.py): what an engine is given of a request's time."""
from __future__ import annotations

import threading
import time

import pytest

from mace_ros.ros.node import ENGINE_OVERRUN_GRACE_S, OVERRUN_ALLOWANCE_MAX_SHARE, EngineSlot
from mace_ros.ros.requests import RequestRefused


class RecordingLogger:
    """Keeps what the slot logs (rclpy's logger takes the same calls)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str, **_) -> None:
        self.lines.append(message)

    warning = error = info


def loaded_slot() -> EngineSlot:
    slot = EngineSlot("test", lambda: "engine", RecordingLogger())
    assert slot.loaded_by(time.monotonic() + 10.0) == "engine"
    return slot


def test_an_engine_that_overran_is_given_that_much_less_time_next():
    """An engine that ran 0.1 s past the time it was given (a loaded CPU) is answered TIMED_OUT; the next
    request gives it 0.1 s less, so that its result arrives in time; the allowance fades request by
    request, and never takes more than its share of the time left."""
    slot = loaded_slot()
    given: list[float] = []

    def overrun(engine: str, seconds: float) -> str:
        given.append(seconds)
        time.sleep(seconds + 0.1)
        return engine

    def quick(engine: str, seconds: float) -> str:
        given.append(seconds)
        time.sleep(0.02)
        return engine

    with pytest.raises(RequestRefused) as refused:
        slot.run(time.monotonic() + 0.3, overrun)
    assert refused.value.code == "TIMED_OUT"
    time.sleep(0.15)  # the overrunning work ends and frees the turn
    for _ in range(4):
        assert slot.run(time.monotonic() + 1.0, quick) == "engine"
    assert 0.7 <= given[1] <= 0.91, given  # 1 s less the overrun, at least 0.1 s
    assert given[1] < given[2] < given[3] < given[4] < 1.0, given  # fading
    with pytest.raises(RequestRefused):
        slot.run(time.monotonic() + 0.3, overrun)
    time.sleep(0.15)
    slot.run(time.monotonic() + 0.2, quick)
    assert given[-1] >= (1.0 - OVERRUN_ALLOWANCE_MAX_SHARE) * 0.2 - 0.01, given


def test_a_request_is_answered_by_its_deadline_whatever_the_engine_does():
    slot = loaded_slot()
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(RequestRefused):
        slot.run(started + 0.2, lambda engine, seconds: release.wait(5.0))
    assert time.monotonic() - started <= 0.2 + ENGINE_OVERRUN_GRACE_S + 0.05
    release.set()
