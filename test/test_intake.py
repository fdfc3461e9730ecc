"""Parts of the intake process (mace_ros/ros/intake.py) that need no running node."""
from __future__ import annotations

import time

from mace_ros.ros.intake import KeyedThrottle


def test_keyed_throttle_lets_each_key_through_once_per_period_and_bounds_its_keys():
    throttle = KeyedThrottle(period_s=0.2, max_keys=3)
    assert throttle.due(("camera", "unknown frame"))
    assert not throttle.due(("camera", "unknown frame"))
    assert throttle.due(("camera", "data has # bytes"))  # another kind of problem of the same sensor
    assert throttle.due(("table", "unknown frame"))  # another sensor
    assert throttle.due(("d", "x"))  # a fourth key pushes out the least recently logged (camera / unknown frame)
    assert throttle.due(("camera", "unknown frame"))
    time.sleep(0.25)
    assert throttle.due(("table", "unknown frame"))
