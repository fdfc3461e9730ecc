"""`make demo`: start the installed node on the box scene and ask it for collision-free IK.

Runs with install/setup.bash sourced (the Makefile does it), like any ROS 2 client.
"""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import yaml
from geometry_msgs.msg import Point, Quaternion

from mace_ros.core.resources import scene_path
from mace_ros.ros.client import MaceClient, NodeProcess, installed_executable
from mace_ros.srv import GetIK

SCENE = "box"
ENGINE_WAIT_S = 300.0
OUT_DIR = Path(__file__).resolve().parents[1] / "out"


def scene_goal(scene: str) -> tuple[list[float], list[float]]:
    """The first example goal of the scene file (position, quaternion w x y z)."""
    goals = yaml.safe_load(scene_path(scene).read_text()).get("goals") or []
    if not goals:
        raise SystemExit(f"scene '{scene}' lists no example goals")
    return goals[0]["position"], goals[0].get("quaternion_wxyz", [0.0, 1.0, 0.0, 0.0])


def get_ik_when_ready(client: MaceClient, request: GetIK.Request) -> GetIK.Response:
    """Call GetIK, retrying while the node reports its engine still loading."""
    deadline = time.monotonic() + ENGINE_WAIT_S
    while True:
        response = client.get_ik(request)
        if "still loading" not in response.message or time.monotonic() > deadline:
            return response
        time.sleep(1.0)


def main() -> int:
    position, quaternion = scene_goal(SCENE)
    request = GetIK.Request()
    request.goal.header.frame_id = "panda_link0"
    request.goal.pose.position = Point(x=position[0], y=position[1], z=position[2])
    request.goal.pose.orientation = Quaternion(w=quaternion[0], x=quaternion[1], y=quaternion[2], z=quaternion[3])
    request.num_solutions = 4
    request.tuning_iterations = -1  # the configured MACE budget (0 would mean no tuning)

    OUT_DIR.mkdir(exist_ok=True)
    isolation = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_DOMAIN_ID": str(random.randint(1, 101))}
    os.environ.update(isolation)
    log_path = OUT_DIR / "mace_node.log"
    with log_path.open("w") as log:
        node = NodeProcess(installed_executable(), ["-p", f"scene:={SCENE}"], env=isolation, log=log)
        client = MaceClient("mace_demo")
        try:
            client.wait_for_services(120.0, alive=node)
            print(f"GetIK on the '{SCENE}' scene: goal {position}, orientation (w, x, y, z) {quaternion}")
            response = get_ik_when_ready(client, request)
        finally:
            client.close()
            node.stop()
    print(f"success: {response.success}\nmessage: {response.message}")
    for rank, (state, score, position_error, orientation_error) in enumerate(zip(
            response.solutions, response.scores, response.position_errors_m, response.orientation_errors_rad)):
        joints = " ".join(f"{q:+.4f}" for q in state.position)
        print(f"  #{rank}: [{joints}] score {score:.4f}, error {position_error:.2e} m / {orientation_error:.2e} rad")
    print(f"collision-free rate {response.collision_free_rate:.3f}, {response.tuning_iterations_done} tuning "
          f"iterations in {response.tuning_time_s:.3f} s, {response.elapsed_s:.3f} s in all; node log: {log_path}")
    return 0 if response.success else 1


if __name__ == "__main__":
    sys.exit(main())
