"""How long the exact (PyBullet) checker takes when the obstacle scene changes, as markers change it.

A scene of --primitives small boxes, spheres and cylinders in [-1, 1] x [-1, 1] x [0, 1] m (a marker flood
leaves the node's 256), one configuration checked per change. Three series: the same scene throughout, a
new scene every time (every marker replaced), and one marker of the scene moved per change. PyBullet holds
the GIL for all of it, so these are the times every other thread of the node waits.

    PYTHONPATH=. .venv/bin/python bench/exact_scene_changes.py    # -> bench/results/exact_scene_changes.json
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from mace_ros.core.pybullet_backend import PyBulletCollisionChecker
from mace_ros.core.scene import Box, Cylinder, Scene, Sphere

ROOT = Path(__file__).resolve().parents[1]
LOW, HIGH = (-1.0, -1.0, 0.0), (1.0, 1.0, 1.0)


def marker(kind: str, index: int, rng: np.random.Generator) -> Box | Sphere | Cylinder:
    center = rng.uniform(LOW, HIGH)
    if kind == "box":
        return Box(f"box_{index}", center, (1, 0, 0, 0), (0.01, 0.01, 0.01))
    if kind == "sphere":
        return Sphere(f"sphere_{index}", center, 0.01)
    return Cylinder(f"cylinder_{index}", center, (1, 0, 0, 0), 0.01, 0.01)


def summary(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()),
            "over_10_ms": int((ms > 10).sum()), "count": len(ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--primitives", type=int, default=256)
    parser.add_argument("--changes", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/exact_scene_changes.json")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    kinds = [("box", "sphere", "cylinder")[index % 3] for index in range(args.primitives)]

    def new_markers() -> list[Box | Sphere | Cylinder]:
        return [marker(kind, index, rng) for index, kind in enumerate(kinds)]

    def scene(markers: list[Box | Sphere | Cylinder]) -> Scene:
        return Scene(boxes=[m for m in markers if isinstance(m, Box)], spheres=[m for m in markers if isinstance(m, Sphere)],
                     cylinders=[m for m in markers if isinstance(m, Cylinder)])

    q = torch.tensor([[0.0, 0.0, 0.0, -2.0, 0.0, 2.0, 0.0]])
    series: dict[str, list[float]] = {"same_scene": [], "new_scene": [], "one_marker_moved": []}
    with PyBulletCollisionChecker() as checker:
        fixed = scene(new_markers())
        markers = new_markers()
        for name in series:
            for _ in range(args.changes):
                if name == "same_scene":
                    current = fixed
                elif name == "new_scene":
                    current = scene(new_markers())
                else:
                    index = int(rng.integers(len(markers)))
                    markers[index] = marker(kinds[index], index, rng)
                    current = scene(markers)
                started = time.perf_counter()
                checker.check(q, current)
                series[name].append(time.perf_counter() - started)
    result = {
        "command": "PYTHONPATH=. python bench/exact_scene_changes.py " + " ".join(
            f"--{key} {value}" for key, value in vars(args).items() if key != "out"),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        **{name: summary(times) for name, times in series.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
