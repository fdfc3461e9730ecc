"""A partial cloud alone, and the same cloud with a grasp of the object: does seeing more help?

Four objects a user might see and grasp, none from the training families' generator (a mug, a
cylinder, a bottle, a flat box), each placed on the table with a yaw. The partial cloud is what a
camera above and in front of it sees: surface points (2048 sampled) whose face turns toward the camera,
with 2 mm Gaussian noise. The grasp is a Panda hand's side grasp at mid-height: the two surface points
farthest along +-y near the vertical line through the centre, with their fingers' travel directions.
`ShapeEngine` (default config unless --engine), `--iterations` MACE iterations, 16 samples, seeds 11
and 12, on the cloud alone and on cloud + grasp. Reported per request: the mean score, the diversity
(mean pairwise Chamfer distance of the samples) and the mean symmetric Chamfer distance of the samples
to the object's surface (2048 points).

    PYTHONPATH=. .venv/bin/python bench/shape_cloud_and_grasp.py --threads 1 --out out/cloud_and_grasp.json
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import trimesh

from mace_ros.core.shape.chamfer import chamfer_distance
from mace_ros.core.shape_engine import ShapeRequest

sys.path.append(str(Path(__file__).resolve().parent))
from shape_open_grasps import engine_run, write_run  # noqa: E402
SURFACE_POINTS = 2048
CAMERA_OFFSET_M = np.array([0.0, -0.3, 0.6])  # from the object's centre: above it, in front
NOISE_M = 0.002
GRASP_LINE_TOLERANCE_M = 0.004


def objects() -> list[tuple[str, trimesh.Trimesh]]:
    """(name, mesh with its bounding-box centre at the origin, resting on z)."""
    mug = trimesh.util.concatenate([trimesh.creation.cylinder(radius=0.04, height=0.10),
                                    trimesh.creation.box((0.03, 0.01, 0.06), trimesh.transformations.translation_matrix((0.05, 0, 0)))])
    bottle = trimesh.util.concatenate([trimesh.creation.cylinder(radius=0.035, height=0.15),
                                       trimesh.creation.cylinder(radius=0.012, height=0.05,
                                                                 transform=trimesh.transformations.translation_matrix((0, 0, 0.1)))])
    meshes = [("mug", mug), ("cylinder", trimesh.creation.cylinder(radius=0.035, height=0.12)), ("bottle", bottle),
              ("flat box", trimesh.creation.box((0.16, 0.08, 0.04)))]
    for _, mesh in meshes:
        mesh.apply_translation(-mesh.bounds.mean(axis=0))
    return meshes


def observation(mesh: trimesh.Trimesh, centre: np.ndarray, yaw: float, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """(true surface [S, 3], partial cloud [P, 3], contacts [2, 3], travel directions [2, 3]) in the base frame."""
    placed = mesh.copy()
    placed.apply_transform(trimesh.transformations.rotation_matrix(yaw, (0, 0, 1)))
    placed.apply_translation(centre)
    surface, faces = trimesh.sample.sample_surface(placed, SURFACE_POINTS, seed=int(rng.integers(1 << 30)))
    to_camera = centre + CAMERA_OFFSET_M - surface
    facing = np.einsum("ij,ij->i", placed.face_normals[faces], to_camera) > 0.0
    partial = surface[facing] + rng.normal(0.0, NOISE_M, size=(int(facing.sum()), 3))
    near_line = np.linalg.norm((surface - centre)[:, [0, 2]], axis=1) < GRASP_LINE_TOLERANCE_M
    line = surface[near_line]
    contacts = np.stack([line[np.argmax(line[:, 1])], line[np.argmin(line[:, 1])]])
    return surface, partial, contacts, np.array([[0.0, -1.0, 0.0], [0.0, 1.0, 0.0]])


def main(argv: list[str] | None = None) -> None:
    script = "bench/shape_cloud_and_grasp.py"
    args, command, engine = engine_run(script, __doc__.split("\n\n")[0], 30, [11, 12], "partial_cloud_diversity_weight=0.2", argv)
    started, rows = time.monotonic(), []
    for index, (name, mesh) in enumerate(objects()):
        centre = np.array([0.5, 0.1 * (index - 1.5), mesh.extents[2] / 2])
        surface, partial, contacts, directions = observation(mesh, centre, yaw=0.7 * index, rng=np.random.default_rng(index))
        truth = torch.as_tensor(surface, dtype=torch.float32)
        for seed in args.seeds:
            row = {"object": name, "seed": seed, "partial_points": int(partial.shape[0])}
            for label, grasp in (("cloud", False), ("cloud_and_grasp", True)):
                result = engine.infer(ShapeRequest(
                    contacts if grasp else None, partial, centre, num_samples=16, tuning_iterations=args.iterations,
                    timeout_s=120.0, random_seed=seed, contact_directions=directions if grasp else None))
                samples = torch.as_tensor(result.samples)
                row[label] = {"success": result.success, "score": result.mean_score, "diversity_m2": result.diversity,
                              "iterations_done": result.tuning_iterations_done,
                              "chamfer_m2": float(chamfer_distance(samples, truth.expand(samples.shape[0], -1, -1)).mean())}
            rows.append(row)
            print(f"{name}, seed {seed}: " + ", ".join(
                f"{label} {row[label]['score']:.3f} / diversity {row[label]['diversity_m2'] * 1e4:.1f} cm² / "
                f"Chamfer {row[label]['chamfer_m2'] * 1e4:.2f} cm²" for label in ("cloud", "cloud_and_grasp")), flush=True)
    summary = {label: {key: float(np.mean([row[label][key] for row in rows])) for key in ("score", "diversity_m2", "chamfer_m2")}
               for label in ("cloud", "cloud_and_grasp")}
    print("mean: " + ", ".join(f"{label} {summary[label]['score']:.3f} / diversity {summary[label]['diversity_m2'] * 1e4:.1f} cm² / "
                               f"Chamfer {summary[label]['chamfer_m2'] * 1e4:.2f} cm²" for label in summary))
    write_run(args, command, script, engine, started, summary, rows)


if __name__ == "__main__":
    main()
