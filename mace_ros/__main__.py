"""The engines without ROS.

    python -m mace_ros ik --scene box --goal 0.5 0.0 0.25 [--quaternion 0 1 0 0] [--num-solutions 4]
    python -m mace_ros shape --contacts "0.04,0,0;-0.04,0,0;0,0.03,0;0,-0.03,0" [--num-samples 16]
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from mace_ros.core.resources import scene_path


def _ik(args: argparse.Namespace) -> int:
    from mace_ros.core.ik_engine import IKEngine, IKRequest
    from mace_ros.core.scene import Scene

    engine = IKEngine(device=args.device)
    scene = Scene.load_yaml(scene_path(args.scene)) if args.scene else Scene()
    request = IKRequest(
        goal_position=np.array(args.goal, dtype=float),
        goal_quaternion_wxyz=None if args.quaternion is None else np.array(args.quaternion, dtype=float),
        tip_link=args.tip_link,
        num_solutions=args.num_solutions,
        num_samples=args.num_samples or engine.config["num_samples"],
        tuning_iterations=engine.config["tuning_iterations"] if args.tuning_iterations < 0 else args.tuning_iterations,
        timeout_s=args.timeout,
        random_seed=args.seed,
    )
    result = engine.solve(request, scene)
    print(json.dumps({
        "success": result.success,
        "message": result.message,
        "failure_kind": result.failure_kind,
        "solutions": np.round(result.solutions, 6).tolist(),
        "position_errors_m": result.position_errors_m.tolist(),
        "orientation_errors_rad": result.orientation_errors_rad.tolist(),
        "collision_free_rate": result.collision_free_rate,
        "tuning_iterations_done": result.tuning_iterations_done,
        "tuning_time_s": round(result.tuning_time_s, 4),
        "elapsed_s": round(result.elapsed_s, 4),
    }, indent=2))
    return 0 if result.success else 1


def _shape(args: argparse.Namespace) -> int:
    from mace_ros.core.shape_engine import ShapeEngine, ShapeRequest

    engine = ShapeEngine(device=args.device)
    contacts = np.array([[float(v) for v in point.split(",")] for point in args.contacts.split(";")])
    request = ShapeRequest(
        contacts=contacts,
        partial_cloud=None,
        object_origin=np.array(args.origin, dtype=float),
        num_samples=args.num_samples or engine.config["num_samples"],
        tuning_iterations=args.tuning_iterations,
        timeout_s=args.timeout,
        random_seed=args.seed,
    )
    result = engine.infer(request)
    print(json.dumps({
        "success": result.success,
        "message": result.message,
        "scores": np.round(result.scores, 4).tolist(),
        "mean_score": result.mean_score,
        "diversity": result.diversity,
        "tuning_iterations_done": result.tuning_iterations_done,
        "elapsed_s": round(result.elapsed_s, 3),
    }, indent=2))
    return 0 if result.success else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mace_ros", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (0 = torch's default)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds")
    parser.add_argument("--tuning-iterations", type=int, default=-1, help="0 = no tuning, -1 = configured default")
    parser.add_argument("--num-samples", type=int, default=0, help="0 = configured default")
    commands = parser.add_subparsers(dest="command", required=True)
    ik = commands.add_parser("ik", help="collision-free IK for a goal")
    ik.add_argument("--scene", default="box", help="shipped scene name or a scene YAML file; '' for none")
    ik.add_argument("--goal", type=float, nargs=3, required=True, metavar=("X", "Y", "Z"))
    ik.add_argument("--quaternion", type=float, nargs=4, metavar=("W", "X", "Y", "Z"), help="omit for position only")
    ik.add_argument("--tip-link", default="panda_hand")
    ik.add_argument("--num-solutions", type=int, default=4)
    ik.set_defaults(handler=_ik)
    shape = commands.add_parser("shape", help="object shapes consistent with grasp contacts")
    shape.add_argument("--contacts", required=True, help="'x,y,z;x,y,z;...' in metres, around the origin")
    shape.add_argument("--origin", type=float, nargs=3, default=(0.0, 0.0, 0.0))
    shape.set_defaults(handler=_shape)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
