"""Grasps that leave an object's shape open: does tuning stay among the prior's shapes?

Four objects a user might grasp, none from the training families' generator, each with its grasp's
contacts and travel directions and object_origin at its true centre (the observations an exploratory
client sent when the posterior drifted to shapes 30-50 cm tall, seventeenth session):
- a box 5 x 5 x 15 cm, one side grasp at its centre;
- a cylinder 7 cm across, 12 cm tall, two side grasps 2 cm above and 2 cm below its centre;
- a sphere of radius 4 cm, one oblique grasp;
- a flat box 20 x 6 x 4 cm, a grasp across its width 3 cm off its centre.
`ShapeEngine` (default config unless --engine), 100 MACE iterations, 16 samples, seeds 1 and 2, and the
prior (tuning 0) on the same requests. Reported per request: the engine's mean score, the mean symmetric
Chamfer distance of the samples to the object's surface (2048 points), and the samples' mean height.

    PYTHONPATH=. .venv/bin/python bench/shape_open_grasps.py --threads 1 [--engine prior_anchor_weight=0] --out out/open.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import trimesh

from bench.engine_settings import engine_settings
from mace_ros.core.shape.chamfer import chamfer_distance
from mace_ros.core.shape.training import device_name, git_commit
from mace_ros.core.shape_engine import ShapeEngine, ShapeRequest

ROOT = Path(__file__).resolve().parents[1]
SURFACE_POINTS = 2048


def observations() -> list[tuple[str, trimesh.Trimesh, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, mesh placed at its centre, contacts [k, 3], travel directions [k, 3], centre [3])."""
    tall_box, cylinder = np.array([0.5, 0.1, 0.075]), np.array([0.45, -0.1, 0.06])
    sphere, flat_box = np.array([0.55, 0.0, 0.04]), np.array([0.5, 0.0, 0.02])
    diagonal = np.array([0.0, 1.0, 1.0]) / np.sqrt(2.0)
    return [
        ("box 5 x 5 x 15 cm, side grasp", trimesh.creation.box((0.05, 0.05, 0.15)), tall_box + [[0, 0.025, 0], [0, -0.025, 0]],
         np.array([[0, -1, 0], [0, 1, 0]]), tall_box),
        ("cylinder 7 x 12 cm, two side grasps", trimesh.creation.cylinder(radius=0.035, height=0.12),
         cylinder + [[0, 0.035, 0.02], [0, -0.035, 0.02], [0.035, 0, -0.02], [-0.035, 0, -0.02]],
         np.array([[0, -1, 0], [0, 1, 0], [-1, 0, 0], [1, 0, 0]]), cylinder),
        ("sphere r 4 cm, oblique grasp", trimesh.creation.icosphere(subdivisions=4, radius=0.04),
         sphere + 0.04 * np.stack([diagonal, -diagonal]), np.stack([-diagonal, diagonal]), sphere),
        ("flat box 20 x 6 x 4 cm, grasp 3 cm off-centre", trimesh.creation.box((0.20, 0.06, 0.04)),
         flat_box + [[0.03, 0.03, 0.01], [0.03, -0.03, 0.01]], np.array([[0, -1, 0], [0, 1, 0]]), flat_box),
    ]


def engine_run(script: str, description: str, iterations: int, seeds: list[int], engine_example: str,
               argv: list[str] | None) -> tuple[argparse.Namespace, str, ShapeEngine]:
    """(arguments, the command as run, the engine) of a `ShapeEngine` benchmark run: --iterations, --seeds,
    --threads, --engine KEY=VALUE (repeatable) and --out (by default bench/results/<script's name>.json)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--iterations", type=int, default=iterations)
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                        help=f"a ShapeEngine setting instead of its default (repeatable), e.g. {engine_example}")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results" / f"{Path(script).stem}.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = f"PYTHONPATH=. .venv/bin/python {script} " + " ".join(argv if argv is not None else sys.argv[1:])
    engine = ShapeEngine(engine_settings(args.engine))
    return args, command, engine


def write_run(args: argparse.Namespace, command: str, script: str, engine: ShapeEngine, started: float, summary: dict,
              rows: list[dict]) -> None:
    """The run's results and metadata to args.out (JSON)."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": command, "commit": git_commit(), "device": device_name(torch.device("cpu")), "script": script,
        "engine_config": dict(engine.config), "wall_time_s": time.monotonic() - started, "summary": summary, "observations": rows,
    }, indent=1) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_absolute() and ROOT in args.out.parents else args.out}")


def main(argv: list[str] | None = None) -> None:
    script = "bench/shape_open_grasps.py"
    args, command, engine = engine_run(script, __doc__.split("\n\n")[0], 100, [1, 2], "prior_anchor_weight=0", argv)
    started, rows = time.monotonic(), []
    for name, mesh, contacts, directions, centre in observations():
        surface, _ = trimesh.sample.sample_surface(mesh, SURFACE_POINTS, seed=0)
        truth = torch.as_tensor(surface + centre, dtype=torch.float32)
        for seed in args.seeds:
            row = {"object": name, "seed": seed}
            for label, iterations in (("prior", 0), ("mace", args.iterations)):
                result = engine.infer(ShapeRequest(contacts.astype(float), None, centre, num_samples=16, tuning_iterations=iterations,
                                                   timeout_s=120.0, random_seed=seed, contact_directions=directions.astype(float)))
                samples = torch.as_tensor(result.samples)
                heights = result.samples[:, :, 2].max(axis=1) - result.samples[:, :, 2].min(axis=1)
                row[label] = {"success": result.success, "score": result.mean_score, "iterations_done": result.tuning_iterations_done,
                              "chamfer_m2": float(chamfer_distance(samples, truth.expand(samples.shape[0], -1, -1)).mean()),
                              "mean_height_m": float(heights.mean()), "max_height_m": float(heights.max())}
            rows.append(row)
            print(f"{name}, seed {seed}: prior {row['prior']['score']:.3f} / {row['prior']['chamfer_m2'] * 1e4:.1f} cm², "
                  f"MACE {row['mace']['score']:.3f} / {row['mace']['chamfer_m2'] * 1e4:.1f} cm², "
                  f"height {row['mace']['mean_height_m'] * 100:.0f} cm (max {row['mace']['max_height_m'] * 100:.0f})", flush=True)
    summary = {label: {key: float(np.mean([row[label][key] for row in rows])) for key in ("score", "chamfer_m2", "mean_height_m")}
               for label in ("prior", "mace")}
    print(f"mean: prior {summary['prior']['score']:.3f} / {summary['prior']['chamfer_m2'] * 1e4:.1f} cm², "
          f"MACE {summary['mace']['score']:.3f} / {summary['mace']['chamfer_m2'] * 1e4:.1f} cm²")
    write_run(args, command, script, engine, started, summary, rows)


if __name__ == "__main__":
    main()
