"""The engines without ROS.

    python -m mace_ros ik --scene box --goal 0.5 0.0 0.25 [--quaternion W X Y Z] [--num-solutions 4]
    python -m mace_ros [--num-samples 16] shape --contacts "0,0.04,0;0,-0.04,0" [--output shapes.npz|shapes.ply]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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


def write_shapes(path: Path, samples: np.ndarray, scores: np.ndarray, contacts: np.ndarray, origin: np.ndarray) -> None:
    """The ranked shape samples [S, P, 3] (metres) and their scores [S], by `path`'s suffix:

    - `.npz`: arrays `samples` [S, P, 3] float32, `scores` [S], `contacts` [k, 3], `object_origin` [3];
    - `.ply`: one binary little-endian point cloud of all S * P points with properties x, y, z (float32),
      `sample_index` (uint32, 0 = the best sample, as on the node's ~/shape_samples) and `score`
      (float32, its sample's score), so one file opens in any viewer and splits by sample_index.
    """
    samples = np.asarray(samples, dtype=np.float32).reshape(len(scores), -1, 3)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        np.savez(path, samples=samples, scores=np.asarray(scores, dtype=np.float64),
                 contacts=np.asarray(contacts, dtype=np.float64), object_origin=np.asarray(origin, dtype=np.float64))
        return
    if suffix != ".ply":
        raise ValueError(f"--output must end in .npz or .ply, got '{path.name}'")
    count, points = samples.shape[0], samples.shape[1]
    vertices = np.empty(count * points, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("sample_index", "<u4"), ("score", "<f4")])
    for axis, name in enumerate("xyz"):
        vertices[name] = samples[..., axis].reshape(-1)
    vertices["sample_index"] = np.repeat(np.arange(count, dtype=np.uint32), points)
    vertices["score"] = np.repeat(np.asarray(scores, dtype=np.float32), points)
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"comment mace_ros shape samples: {count} samples of {points} points, ranked by score; metres\n"
        f"element vertex {vertices.shape[0]}\n"
        "property float x\nproperty float y\nproperty float z\nproperty uint sample_index\nproperty float score\n"
        "end_header\n")
    with path.open("wb") as file:
        file.write(header.encode("ascii"))
        file.write(vertices.tobytes())


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
    if args.output is not None:
        write_shapes(args.output, result.samples, result.scores, contacts, request.object_origin)
    print(json.dumps({
        "success": result.success,
        "message": result.message,
        "scores": np.round(result.scores, 4).tolist(),
        "mean_score": result.mean_score,
        "diversity": result.diversity,
        "tuning_iterations_done": result.tuning_iterations_done,
        "elapsed_s": round(result.elapsed_s, 3),
        **({} if args.output is None else {"output": str(args.output)}),
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
    shape.add_argument("--output", type=Path, metavar="PATH",
                       help="write the samples to PATH: .npz (samples [S, P, 3], scores, contacts, object_origin) or "
                            ".ply (one cloud, x y z, sample_index, score per point)")
    shape.set_defaults(handler=_shape)
    args = parser.parse_args(argv)
    if getattr(args, "output", None) is not None and args.output.suffix.lower() not in (".npz", ".ply"):
        parser.error(f"--output must end in .npz or .ply, got '{args.output.name}'")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
