"""`make demo`: start the installed node on the box scene, ask it for collision-free IK, then for
object shapes consistent with grasp contacts, and plot prior vs posterior shapes (out/shape_demo.png).

Runs with install/setup.bash sourced (the Makefile does it), like any ROS 2 client.
"""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
import yaml
from geometry_msgs.msg import Point, Quaternion
from std_msgs.msg import Header

from mace_ros.core.resources import default_parameters, scene_path
from mace_ros.core.shape.datasets import sample_object
from mace_ros.core.shape.simulators import DEFAULT_FINGER_RADIUS_M, finger_directions, grasp_contacts
from mace_ros.ros.client import MaceClient, NodeProcess, installed_executable
from mace_ros.ros.conversions import pointcloud2_to_xyz
from mace_ros.srv import GetIK, InferShape

matplotlib.use("Agg")
from matplotlib import pyplot  # noqa: E402  (after choosing the file-only backend)

SCENE = "box"
ENGINE_WAIT_S = 300.0
OUT_DIR = Path(__file__).resolve().parents[1] / "out"


def scene_goal(scene: str) -> tuple[list[float], list[float]]:
    """The first example goal of the scene file (position, quaternion w x y z)."""
    goals = yaml.safe_load(scene_path(scene).read_text()).get("goals") or []
    if not goals:
        raise SystemExit(f"scene '{scene}' lists no example goals")
    return goals[0]["position"], goals[0].get("quaternion_wxyz", [0.0, 1.0, 0.0, 0.0])


def when_ready(call, request):
    """Call a service, retrying while the node reports its engine still loading."""
    deadline = time.monotonic() + ENGINE_WAIT_S
    while True:
        response = call(request)
        if "still loading" not in response.message or time.monotonic() > deadline:
            return response
        time.sleep(1.0)


def grasp_observation(object_origin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A hidden object (an 8-25 cm box-family shape, seed 7) and the contacts of the node's finger set on it."""
    shape = default_parameters("shape")
    cloud = sample_object("box", np.random.default_rng(7))
    directions = finger_directions(
        int(shape["num_fingers"]), from_above=bool(shape["finger_from_above"]),
        elevation_rad=float(shape["finger_elevation_rad"]), azimuth_offset_rad=float(shape["finger_azimuth_offset_rad"]),
        dtype=torch.float64)
    contacts, valid = grasp_contacts(torch.as_tensor(cloud, dtype=torch.float64)[None], directions,
                                     finger_radius_m=DEFAULT_FINGER_RADIUS_M)
    return cloud + object_origin, contacts[0][valid[0]].numpy() + object_origin


def plot_shapes(path: Path, truth: np.ndarray, contacts: np.ndarray, prior: list[np.ndarray], posterior: list[np.ndarray]) -> None:
    """Top views (x-y) of the first samples: prior row, posterior row; the hidden object in grey, contacts in red."""
    columns = min(4, len(prior), len(posterior))
    figure, axes = pyplot.subplots(2, columns, figsize=(3 * columns, 6), squeeze=False)
    for row, (label, samples) in enumerate((("prior", prior), ("MACE posterior", posterior))):
        for column in range(columns):
            axis = axes[row][column]
            axis.scatter(truth[:, 0], truth[:, 1], s=1, c="0.8")
            axis.scatter(samples[column][:, 0], samples[column][:, 1], s=1, c="tab:blue")
            axis.scatter(contacts[:, 0], contacts[:, 1], s=30, c="tab:red", marker="x")
            axis.set_aspect("equal")
            axis.set_title(f"{label} #{column}", fontsize=9)
    figure.suptitle("InferShape: grasp contacts (red) of a hidden object (grey); top view, metres")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


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
            response = when_ready(client.get_ik, request)
            report_ik(response, log_path)
            shape_ok = infer_shape_demo(client)
        finally:
            client.close()
            node.stop()
    return 0 if response.success and shape_ok else 1


def infer_shape_demo(client: MaceClient) -> bool:
    object_origin = np.array([0.5, 0.0, 0.1])
    truth, contacts = grasp_observation(object_origin)
    request = InferShape.Request(header=Header(frame_id="panda_link0"),
                                 contacts=[Point(x=float(x), y=float(y), z=float(z)) for x, y, z in contacts],
                                 object_origin=Point(x=0.5, y=0.0, z=0.1), num_samples=8)
    print(f"\nInferShape from {len(contacts)} grasp contacts around {object_origin.tolist()}")
    answers = {}
    for label, iterations in (("prior (no tuning)", 0), ("MACE posterior", -1)):
        request.tuning_iterations = iterations
        answer = when_ready(client.infer_shape, request)
        print(f"  {label}: success {answer.success}, mean score {answer.mean_score:.3f}, diversity "
              f"{answer.diversity:.2e} m^2, {answer.tuning_iterations_done} iterations, {answer.elapsed_s:.2f} s; {answer.message}")
        if not answer.success:
            return False
        answers[label] = [pointcloud2_to_xyz(cloud) for cloud in answer.samples]
    plot_path = OUT_DIR / "shape_demo.png"
    plot_shapes(plot_path, truth, contacts, answers["prior (no tuning)"], answers["MACE posterior"])
    print(f"  plot: {plot_path}")
    return True


def report_ik(response: GetIK.Response, log_path: Path) -> None:
    print(f"success: {response.success}\nmessage: {response.message}")
    for rank, (state, score, position_error, orientation_error) in enumerate(zip(
            response.solutions, response.scores, response.position_errors_m, response.orientation_errors_rad)):
        joints = " ".join(f"{q:+.4f}" for q in state.position)
        print(f"  #{rank}: [{joints}] score {score:.4f}, error {position_error:.2e} m / {orientation_error:.2e} rad")
    print(f"collision-free rate {response.collision_free_rate:.3f}, {response.tuning_iterations_done} tuning "
          f"iterations in {response.tuning_time_s:.3f} s, {response.elapsed_s:.3f} s in all; node log: {log_path}")


if __name__ == "__main__":
    sys.exit(main())
