"""Many goals per request (issue 8): throughput of `IKEngine.solve_batch` on this machine.

Goals as cuRobo's batch IK benchmark makes them: the hand poses of random configurations within the
joint limits that the exact meshes call collision-free in the scene (so every goal is solvable). One
`solve_batch` call per batch size and scene (`--timeout` s), one exactly collision-free solution per
goal; success = within 1e-6 m / 1e-4 rad (the engine's tolerances) and collision-free by the exact
meshes, checked again here. Throughput = goals / the call's wall time.

    .venv/bin/python bench/ik_batch.py --batch 100 1000

With `--node` the same goals also go, one request per batch, to the installed node's ~/get_ik_batch
(`install/setup.bash` sourced; one node per scene): throughput there is goals / the client's round trip,
which includes ROS's message conversion of every goal and answer.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))
from mace_ros.core.ik_engine import IKEngine  # noqa: E402
from mace_ros.core.kinematics import PandaKinematics, matrix_to_quaternion, rotation_angle_between  # noqa: E402
from mace_ros.core.pybullet_backend import PyBulletCollisionChecker  # noqa: E402
from mace_ros.core.resources import scene_path  # noqa: E402
from mace_ros.core.scene import Scene  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
POSITION_TOLERANCE_M, ORIENTATION_TOLERANCE_RAD = 1e-6, 1e-4


def solvable_goals(scene: Scene, count: int, exact: PyBulletCollisionChecker, kinematics: PandaKinematics,
                   generator: torch.Generator) -> torch.Tensor:
    """`count` configurations uniform in the joint limits that the exact meshes call collision-free in `scene`."""
    kept = []
    while sum(part.shape[0] for part in kept) < count:
        q = kinematics.random_configurations(4 * count, generator)
        kept.append(q[~exact.check(q, scene).in_collision])
    return torch.cat(kept)[:count]


class BatchNode:
    """The installed node with `scene` (localhost-only DDS, a random domain) and a client of its ~/get_ik_batch."""

    def __init__(self, scene: str) -> None:
        import random

        from mace_ros.ros.client import MaceClient, NodeProcess, installed_executable

        isolation = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_DOMAIN_ID": str(random.randint(1, 101))}
        os.environ.update(isolation)
        self.log = (ROOT / "out").joinpath(f"ik_batch_node_{scene}.log")
        self.log.parent.mkdir(exist_ok=True)
        self.process = NodeProcess(installed_executable(), [] if scene == "open" else ["-p", f"scene:={scene}"],
                                   env=isolation, log=self.log.open("w"))
        self.client = MaceClient("ik_batch_bench")
        self.client.wait_for_services(300.0, alive=self.process)

    def solve(self, position: torch.Tensor, quaternion: torch.Tensor, timeout_s: float) -> tuple[Any, float]:
        """(GetIKBatch response, round trip s) for goals position [G, 3], quaternion wxyz [G, 4] in panda_link0."""
        import time

        from geometry_msgs.msg import Point, Pose, PoseStamped, Quaternion
        from mace_ros.ros.client import MaceClient
        from mace_ros.srv import GetIKBatch

        request = GetIKBatch.Request(timeout_s=timeout_s, random_seed=1)
        request.goals = [PoseStamped(pose=Pose(position=Point(x=x, y=y, z=z), orientation=Quaternion(w=qw, x=qx, y=qy, z=qz)))
                         for (x, y, z), (qw, qx, qy, qz) in zip(position.tolist(), quaternion.tolist())]
        for goal in request.goals:
            goal.header.frame_id = "panda_link0"
        MaceClient.when_loaded(lambda r: self.client.get_ik_batch(r, timeout_s=300.0), GetIKBatch.Request(goals=request.goals[:1]))
        started = time.monotonic()
        response = self.client.get_ik_batch(request, timeout_s=timeout_s + 300.0)
        return response, time.monotonic() - started

    def close(self) -> None:
        self.client.close()
        self.process.stop()


def checked(q: torch.Tensor, solved: torch.Tensor, position: torch.Tensor, rotation: torch.Tensor, scene: Scene,
            exact: PyBulletCollisionChecker, kinematics: PandaKinematics) -> torch.Tensor:
    """[G] bool: goal solved by a configuration q[g] within the tolerances and free by the exact meshes."""
    valid = torch.zeros_like(solved)
    answer = q[solved]
    reached, reached_rotation = kinematics.forward(answer)
    close = ((reached - position[solved]).norm(dim=-1) <= POSITION_TOLERANCE_M) & (
        rotation_angle_between(reached_rotation, rotation[solved]) <= ORIENTATION_TOLERANCE_RAD)
    valid[solved] = close & ~exact.check(answer, scene).in_collision
    return valid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--scenes", nargs="+", default=["open", "box"], help="open = no obstacles, else a shipped scene")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--node", action="store_true", help="also through the installed node's ~/get_ik_batch")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/ik_batch.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = IKEngine(device=args.device)
    exact = PyBulletCollisionChecker()
    kinematics = PandaKinematics(dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    runs: list[dict[str, Any]] = []
    for name in args.scenes:
        scene = Scene() if name == "open" else Scene.load_yaml(scene_path(name))
        node = BatchNode(name) if args.node else None
        for size in args.batch:
            q = solvable_goals(scene, size, exact, kinematics, generator)
            position, rotation = kinematics.forward(q)
            quaternion = matrix_to_quaternion(rotation)
            result = engine.solve_batch(position.numpy(), quaternion.numpy(), scene, timeout_s=args.timeout, random_seed=1)
            solved = torch.as_tensor(result.success)
            valid = checked(torch.as_tensor(result.solutions), solved, position, rotation, scene, exact, kinematics)
            runs.append({"scene": name, "goals": size, "success": float(valid.sum()) / size, "elapsed_s": result.elapsed_s,
                         "goals_per_s": size / result.elapsed_s, "attempts": result.attempts,
                         "answered_but_invalid": int((solved & ~valid).sum())})
            if node is not None:
                response, round_trip_s = node.solve(position, quaternion, args.timeout)
                node_solved = torch.tensor(list(response.solved), dtype=torch.bool)
                node_q = torch.tensor([list(state.position) if ok else [0.0] * 7
                                       for state, ok in zip(response.solutions, response.solved)], dtype=torch.float64)
                node_valid = checked(node_q, node_solved, position, rotation, scene, exact, kinematics)
                runs[-1]["node"] = {"success": float(node_valid.sum()) / size, "round_trip_s": round_trip_s,
                                    "node_elapsed_s": response.elapsed_s, "goals_per_s": size / round_trip_s,
                                    "answered_but_invalid": int((node_solved & ~node_valid).sum()), "message": response.message}
            print(json.dumps(runs[-1]), flush=True)
        if node is not None:
            node.close()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {
        "command": ".venv/bin/python bench/ik_batch.py " + " ".join(sys.argv[1:]),
        "commit": commit,
        "device": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                   "torch_threads": args.threads, "load_average_at_end": os.getloadavg(), "engine_device": args.device},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
