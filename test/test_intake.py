"""Parts of the intake process (mace_ros/ros/intake.py) that need no running node."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
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


def test_an_intake_whose_node_is_already_gone_exits():
    """The node may die between starting its intake and the intake's first look at its parent (a node
    stopped while it restarts its intake): the intake, re-parented at once, must still see that its node is
    gone and exit, not keep serving (and taking a core) with no node. The node's end stays open here."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    node_end, intake_end = socket.socketpair()
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
    intake = subprocess.Popen([sys.executable, "-P", "-m", "mace_ros.ros.intake", str(intake_end.fileno()), str(gone.pid)],
                              pass_fds=[intake_end.fileno()], env=environment)
    intake_end.close()
    try:
        assert intake.wait(timeout=30.0) == 0
    finally:
        if intake.poll() is None:
            intake.kill()
            intake.wait()
        node_end.close()
