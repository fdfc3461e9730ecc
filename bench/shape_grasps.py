"""Two-finger multi-grasp shape inference (issue 9 item 6): score and Chamfer against the number of grasps.

A Panda-hand-like gripper: two fingers on one line, closing toward each other. Each grasp draws a
random closing axis d (uniform on the sphere) and a grasp line parallel to d through the object's
bounding-box centre shifted by up to `--max-offset-m` perpendicular to d (an off-centre grasp); finger
A travels along +d, finger B along −d, each stops at the first point of the hidden object's dense
cloud (2048 points) within the engine's finger radius of the line (`simulators.grasp_contacts`, the
simulator the engine scores with). A grasp where a finger touches nothing is redrawn. One grasp gives
2 contacts and their travel directions; g grasps give 2g, all sent in one `ShapeRequest` with
`contact_directions` (each finger is simulated on the line through its own contact).

For each object and g in `--grasps` (the first g of the same object's grasp sequence) the
`ShapeEngine` with its default config (posterior samples, σ_z ≥ min_std_ratio × the prior's, best θ kept, lr 1e-3)
answers with `--iterations` MACE iterations and `--num-samples` samples; the prior is the same
request with tuning_iterations 0. Reported per method and g: the mean score of the returned
samples (the engine's own score on that observation) and the mean symmetric Chamfer distance
(m², squared-distance convention, `chamfer.chamfer_distance`) from each sample to the hidden full
object cloud.

object_origin (where the samples are placed): by default the true bounding-box centre (the frame's
origin, where `datasets` centres objects); `--origin fingertips` uses the mean of the observed
fingertips instead, an estimate a robot could make.

`--grasp-kind topdown`: one grasp per object by the engine's default hand (the Panda hand pointing down,
closing along the base y axis), at a height drawn uniformly within ±`--max-height-fraction` of the object's
height around its centre and up to `--max-offset-m` off it along x, its contacts sent **without
directions** (matched to the configured fingers, as a client that does not report directions sends them).

    PYTHONPATH=. .venv/bin/python bench/shape_grasps.py --threads 1   # ~5 min on this 2-core CPU
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.engine_settings import engine_settings
from mace_ros.core.shape.chamfer import chamfer_distance
from mace_ros.core.shape.datasets import HELD_OUT_FAMILY, FAMILIES, generate_tabletop_dataset
from mace_ros.core.shape.simulators import grasp_contacts
from mace_ros.core.shape.training import device_name, git_commit
from mace_ros.core.shape_engine import ShapeEngine, ShapeRequest

ROOT = Path(__file__).resolve().parents[1]
GROUND_TRUTH_POINTS = 2048
MAX_GRASP_TRIES = 200


def random_unit(rng: np.random.Generator) -> np.ndarray:
    vector = rng.normal(size=3)
    return vector / np.linalg.norm(vector)


def two_finger_grasps(cloud: torch.Tensor, count: int, rng: np.random.Generator, radius_m: float,
                      max_offset_m: float) -> tuple[np.ndarray, np.ndarray, int]:
    """`count` grasps of `cloud` [N, 3]: contacts [2·count, 3], travel directions [2·count, 3], redraws."""
    contacts, directions, redraws = [], [], 0
    centre = ((cloud.amin(0) + cloud.amax(0)) / 2).double().numpy()
    while len(contacts) < 2 * count:
        if redraws > MAX_GRASP_TRIES:
            raise RuntimeError("no two-finger grasp touches this object")
        axis = random_unit(rng)
        # An offset perpendicular to the closing axis, uniform in a disc of radius max_offset_m.
        offset = random_unit(rng)
        offset -= offset.dot(axis) * axis
        offset *= max_offset_m * math.sqrt(rng.uniform()) / max(np.linalg.norm(offset), 1e-12)
        point = centre + offset
        travel = np.stack([axis, -axis])
        found, valid = grasp_contacts(cloud.double().unsqueeze(0), torch.from_numpy(travel), None, radius_m,
                                      torch.from_numpy(np.stack([point, point])))
        if not bool(valid.all()):
            redraws += 1
            continue
        contacts.extend(found[0].numpy())
        directions.extend(travel)
    return np.asarray(contacts), np.asarray(directions), redraws


def topdown_grasp(cloud: torch.Tensor, rng: np.random.Generator, radius_m: float, max_offset_m: float,
                  max_height_fraction: float, fingers: np.ndarray) -> tuple[np.ndarray, int]:
    """One grasp of `cloud` [N, 3] by `fingers` [2, 3] (travel directions on one line), its line through the
    centre shifted along x and in height: contacts [2, 3], redraws."""
    low, high = cloud.amin(0).double().numpy(), cloud.amax(0).double().numpy()
    centre = (low + high) / 2
    for redraws in range(MAX_GRASP_TRIES):
        point = centre + [rng.uniform(-max_offset_m, max_offset_m), 0.0,
                          rng.uniform(-max_height_fraction, max_height_fraction) * (high[2] - low[2])]
        found, valid = grasp_contacts(cloud.double().unsqueeze(0), torch.from_numpy(fingers), None, radius_m,
                                      torch.from_numpy(np.stack([point, point])))
        if bool(valid.all()):
            return found[0].numpy(), redraws
    raise RuntimeError("no top-down grasp touches this object")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-in-distribution", type=int, default=6, help="objects of the training families")
    parser.add_argument("--num-held-out", type=int, default=6, help=f"objects of the held-out family ({HELD_OUT_FAMILY})")
    parser.add_argument("--grasps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--iterations", type=int, default=50, help="MACE iterations per request")
    parser.add_argument("--num-samples", type=int, default=16, help="samples per answer (the engine's default)")
    parser.add_argument("--max-offset-m", type=float, default=0.01, help="grasp line offset from the centre, at most")
    parser.add_argument("--origin", choices=("true", "fingertips"), default="true")
    parser.add_argument("--grasp-kind", choices=("random", "topdown"), default="random",
                        help="random closing axes with directions, or one top-down grasp without (the module docstring)")
    parser.add_argument("--max-height-fraction", type=float, default=0.4, help="topdown: grasp height off the centre, at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                        help="a ShapeEngine setting instead of its default (repeatable), e.g. prior_anchor_weight=0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/shape_grasps.json")
    args = parser.parse_args(argv)
    if args.grasp_kind == "topdown" and args.grasps != [1]:
        parser.error("--grasp-kind topdown takes --grasps 1: contacts without directions are one grasp's")

    torch.set_num_threads(args.threads)
    device = device_name(torch.device("cpu"))
    command = "PYTHONPATH=. .venv/bin/python bench/shape_grasps.py " + " ".join(argv if argv is not None else sys.argv[1:])
    engine = ShapeEngine(engine_settings(args.engine))
    radius_m = engine.finger_radius_m
    # Objects never seen in training (training uses seeds 0 and 1); seeds differ from shape_inference.py's.
    in_distribution, in_families = generate_tabletop_dataset(args.num_in_distribution, GROUND_TRUTH_POINTS, seed=3000 + args.seed)
    held_out, held_families = generate_tabletop_dataset(args.num_held_out, GROUND_TRUTH_POINTS, seed=4000 + args.seed,
                                                         families=[HELD_OUT_FAMILY])
    objects = [("in_distribution", c, FAMILIES[f]) for c, f in zip(in_distribution, in_families)]
    objects += [("held_out", c, FAMILIES[f]) for c, f in zip(held_out, held_families)]
    rng = np.random.default_rng(args.seed)
    started = time.monotonic()
    rows = []
    for index, (setting, cloud_np, family) in enumerate(objects):
        cloud = torch.from_numpy(cloud_np)
        if args.grasp_kind == "topdown":
            contacts, redraws = topdown_grasp(cloud, rng, radius_m, args.max_offset_m, args.max_height_fraction, engine.finger_directions)
            directions = None
        else:
            contacts, directions, redraws = two_finger_grasps(cloud, max(args.grasps), rng, radius_m, args.max_offset_m)
        for grasps in args.grasps:
            used, travel = contacts[: 2 * grasps], None if directions is None else directions[: 2 * grasps]
            origin = np.zeros(3) if args.origin == "true" else used.mean(axis=0)
            row = {"object": index, "setting": setting, "family": family, "grasps": grasps, "redraws": redraws}
            for method, iterations in (("prior", 0), ("mace", args.iterations)):
                request = ShapeRequest(contacts=used, partial_cloud=None, object_origin=origin, num_samples=args.num_samples,
                                       tuning_iterations=iterations, timeout_s=120.0, random_seed=args.seed * 1000 + index,
                                       contact_directions=travel)
                result = engine.infer(request)
                if not result.samples.size:  # refused (an invalid request): counted, left out of the means
                    row[method] = {"refused": result.message}
                    continue
                samples = torch.from_numpy(result.samples).float()
                truth = cloud.float().unsqueeze(0).expand(samples.shape[0], -1, -1)
                with torch.no_grad():
                    chamfers = chamfer_distance(samples, truth)
                row[method] = {"score": result.mean_score, "chamfer_m2": float(chamfers.mean()),
                               "best_chamfer_m2": float(chamfers.min()), "diversity_m2": result.diversity,
                               "elapsed_s": result.elapsed_s, "iterations_done": result.tuning_iterations_done,
                               "message": result.message}
            rows.append(row)
            if any("refused" in row[method] for method in ("prior", "mace")):
                print(f"{setting} {family} #{index} g={grasps}: refused: {row['mace'].get('refused', row['prior'].get('refused'))}")
                continue
            print(f"{setting} {family} #{index} g={grasps}: prior {row['prior']['score']:.3f} / {row['prior']['chamfer_m2'] * 1e4:.2f} cm², "
                  f"MACE {row['mace']['score']:.3f} / {row['mace']['chamfer_m2'] * 1e4:.2f} cm² "
                  f"({row['mace']['elapsed_s']:.1f} s; {(time.monotonic() - started) / 60:.1f} min)", flush=True)
    summary: dict = {}
    for setting in ("in_distribution", "held_out", "all"):
        summary[setting] = {}
        for grasps in args.grasps:
            asked = [r for r in rows if r["grasps"] == grasps and setting in ("all", r["setting"])]
            chosen = [r for r in asked if not any("refused" in r[method] for method in ("prior", "mace"))]
            if not chosen:
                continue
            entry = {"num_objects": len(chosen), "refused": len(asked) - len(chosen)}
            for method in ("prior", "mace"):
                for key in ("score", "chamfer_m2", "best_chamfer_m2", "diversity_m2", "elapsed_s"):
                    entry[f"{method}_{key}"] = float(np.mean([r[method][key] for r in chosen]))
            summary[setting][str(grasps)] = entry
    results = {
        "command": command,
        "commit": git_commit(),
        "device": device,
        "script": "bench/shape_grasps.py",
        "engine_config": {k: v for k, v in engine.config.items()},
        "finger_radius_m": radius_m,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "wall_time_s": round(time.monotonic() - started, 1),
        "summary": summary,
        "observations": rows,
    }
    results["args"]["out"] = str(args.out.resolve().relative_to(ROOT)) if args.out.resolve().is_relative_to(ROOT) else str(args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    for setting, by_grasps in summary.items():
        for grasps, entry in by_grasps.items():
            print(f"{setting} g={grasps} (n={entry['num_objects']}, {entry['refused']} refused): prior {entry['prior_score']:.3f} / {entry['prior_chamfer_m2']:.2e} m², "
                  f"MACE {entry['mace_score']:.3f} / {entry['mace_chamfer_m2']:.2e} m²")
    print(f"wrote {args.out} ({results['wall_time_s']:.0f} s on {device})")


if __name__ == "__main__":
    main()
