"""Procedural tabletop objects and the paper's box dataset, as surface point clouds in metres.

ShapeNet is not reachable here, so the shape prior trains on generated objects (DESIGN §5).
Each object is built from trimesh primitives (boxes, revolved profiles, icospheres, tori, an extruded
L) composed without booleans, and its surface is sampled uniformly by area with
`trimesh.sample.sample_surface`.

Conventions shared by every cloud this module returns:
- units are metres; float32 arrays [num_points, 3];
- the cloud's axis-aligned bounding box is centred at the origin: the grasp simulator's fingers
  close toward the object origin, so the origin must lie inside the object's extent;
- z is up (the object's resting direction); tabletop objects get a uniform random yaw about z;
- sizes: every bounding-box extent lies in [2 cm, 25 cm]. Tabletop objects are generated with a
  horizontal footprint whose diameter is at most 25 cm, so the bound holds at any yaw.

The paper's box set (Appendix C: 10K boxes with random edge lengths, on the xy plane centred on the
z axis, points uniform on the faces) is `generate_box_dataset`: edges uniform in [2 cm, 25 cm],
axis-aligned, no yaw. Where the paper rests boxes on the xy plane, we centre them at the origin
(shift by half the height to recover the paper's placement) so both datasets share one convention.

Command line (datasets are written under data/, which git ignores):
    python -m mace_ros.core.shape.datasets --kind tabletop --num-objects 10000 --num-points 2048 \
        --seed 0 --out data/shapes_tabletop.npz
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import trimesh

FAMILIES: tuple[str, ...] = ("box", "cylinder", "ellipsoid", "frustum", "mug", "bottle", "l_shape", "bowl", "torus")
# Excluded from training sets, kept for out-of-distribution tests: a mug is a cylinder shell plus a
# handle, a combination no training family has.
HELD_OUT_FAMILY = "mug"
TRAINING_FAMILIES: tuple[str, ...] = tuple(family for family in FAMILIES if family != HELD_OUT_FAMILY)

MIN_SIZE_M = 0.02
MAX_SIZE_M = 0.25
# Smallest generated dimension: 10 % above MIN_SIZE_M, so a finite sample of a curved surface (which
# never quite reaches its extreme points) still spans at least MIN_SIZE_M.
_MIN_DIMENSION_M = 1.1 * MIN_SIZE_M
_MAX_RADIUS_M = MAX_SIZE_M / 2
_REVOLVE_SECTIONS = 64  # polygonal approximation error of a 12.5 cm radius: 0.15 mm


def _revolved(profile: np.ndarray) -> trimesh.Trimesh:
    """Solid of revolution about z of a (radius, height) polyline that starts and ends on the axis."""
    return trimesh.creation.revolve(profile, sections=_REVOLVE_SECTIONS)


def _box(rng: np.random.Generator) -> trimesh.Trimesh:
    # Rejection keeps the footprint diagonal (the widest extent under any yaw) within MAX_SIZE_M.
    while True:
        length_m, width_m = rng.uniform(_MIN_DIMENSION_M, MAX_SIZE_M, size=2)
        if math.hypot(length_m, width_m) <= MAX_SIZE_M:
            break
    return trimesh.creation.box(extents=(length_m, width_m, rng.uniform(_MIN_DIMENSION_M, MAX_SIZE_M)))


def _cylinder(rng: np.random.Generator) -> trimesh.Trimesh:
    radius_m = rng.uniform(_MIN_DIMENSION_M / 2, _MAX_RADIUS_M)
    return trimesh.creation.cylinder(radius_m, rng.uniform(_MIN_DIMENSION_M, MAX_SIZE_M), sections=_REVOLVE_SECTIONS)


def _ellipsoid(rng: np.random.Generator) -> trimesh.Trimesh:
    semi_axes_m = rng.uniform(_MIN_DIMENSION_M / 2, _MAX_RADIUS_M, size=3)
    sphere = trimesh.creation.icosphere(subdivisions=3)
    sphere.apply_transform(np.diag([*semi_axes_m, 1.0]))
    return sphere


def _frustum(rng: np.random.Generator) -> trimesh.Trimesh:
    """Truncated cone, wider at the bottom or the top; a true cone (top radius 0) 30 % of the time."""
    bottom_radius_m = rng.uniform(_MIN_DIMENSION_M / 2, _MAX_RADIUS_M)
    top_radius_m = 0.0 if rng.random() < 0.3 else rng.uniform(0.0, _MAX_RADIUS_M)
    height_m = rng.uniform(_MIN_DIMENSION_M, MAX_SIZE_M)
    return _revolved(np.array([[0.0, 0.0], [bottom_radius_m, 0.0], [top_radius_m, height_m], [0.0, height_m]]))


def _mug(rng: np.random.Generator) -> trimesh.Trimesh:
    """Open cylindrical cup (walls and a bottom) with a half-torus handle on the +x side."""
    outer_radius_m = rng.uniform(0.03, 0.06)
    wall_m = rng.uniform(0.003, 0.006)
    height_m = rng.uniform(0.06, 0.14)
    cup = _revolved(np.array([
        [0.0, 0.0], [outer_radius_m, 0.0], [outer_radius_m, height_m],
        [outer_radius_m - wall_m, height_m], [outer_radius_m - wall_m, wall_m], [0.0, wall_m],
    ]))
    handle_tube_radius_m = rng.uniform(0.004, 0.008)
    # The handle spans at most 70 % of the height (+ its tube), so it never sticks out above or below.
    handle_radius_m = rng.uniform(0.2, 0.35) * height_m
    angles = np.linspace(0.0, 2 * np.pi, 17)
    tube_section = np.stack(
        [handle_radius_m + handle_tube_radius_m * np.cos(angles), handle_tube_radius_m * np.sin(angles)], axis=1
    )
    handle = trimesh.creation.revolve(tube_section, angle=np.pi, sections=24)  # half ring in y >= 0, axis z
    # Cyclic axis permutation: the ring's axis z becomes y (ring in the xz plane), its y >= 0 half
    # points to +x. The ends sit in the middle of the wall so that no gap shows at the roots.
    handle_pose = np.array([
        [0.0, 1.0, 0.0, outer_radius_m - wall_m / 2],
        [0.0, 0.0, 1.0, 0.0],
        [1.0, 0.0, 0.0, height_m / 2],
        [0.0, 0.0, 0.0, 1.0],
    ])
    handle.apply_transform(handle_pose)
    return trimesh.util.concatenate([cup, handle])


def _bottle(rng: np.random.Generator) -> trimesh.Trimesh:
    """Cylindrical body, conical shoulder, cylindrical neck."""
    body_radius_m = rng.uniform(0.02, 0.05)
    height_m = rng.uniform(0.12, MAX_SIZE_M)
    neck_radius_m = rng.uniform(max(_MIN_DIMENSION_M / 4, 0.25 * body_radius_m), 0.5 * body_radius_m)
    body_height_m = rng.uniform(0.5, 0.7) * height_m
    shoulder_top_m = body_height_m + rng.uniform(0.1, 0.2) * height_m
    return _revolved(np.array([
        [0.0, 0.0], [body_radius_m, 0.0], [body_radius_m, body_height_m],
        [neck_radius_m, shoulder_top_m], [neck_radius_m, height_m], [0.0, height_m],
    ]))


def _l_shape(rng: np.random.Generator) -> trimesh.Trimesh:
    """An L bracket: a flat base and an upright at one end, extruded along y."""
    while True:
        length_m, depth_m = rng.uniform(0.05, 0.2), rng.uniform(_MIN_DIMENSION_M, 0.2)
        if math.hypot(length_m, depth_m) <= MAX_SIZE_M:
            break
    height_m = rng.uniform(0.05, 0.2)
    base_thickness_m = rng.uniform(0.01, 0.3 * height_m)
    upright_thickness_m = rng.uniform(0.01, 0.3 * length_m)
    # L outline in the (x, z) plane, counter-clockwise, and its fan triangulation from the corner
    # (0, 0) (every fan triangle lies inside the L, which is star-shaped from that corner).
    outline = np.array([
        [0.0, 0.0], [length_m, 0.0], [length_m, base_thickness_m],
        [upright_thickness_m, base_thickness_m], [upright_thickness_m, height_m], [0.0, height_m],
    ])
    triangles = np.array([[0, 1, 2], [0, 2, 3], [0, 3, 4], [0, 4, 5]])
    bracket = trimesh.creation.extrude_triangulation(outline, triangles, depth_m)
    # Extrusion runs along z; a quarter turn about x puts the outline's second axis up.
    bracket.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, [1.0, 0.0, 0.0]))
    return bracket


def _bowl(rng: np.random.Generator) -> trimesh.Trimesh:
    """Open bowl: a flat foot and a quarter-ellipse wall of constant thickness."""
    rim_radius_m = rng.uniform(0.04, _MAX_RADIUS_M)
    height_m = rng.uniform(0.03, min(0.1, rim_radius_m))
    wall_m = rng.uniform(0.003, 0.006)
    foot_radius_m = rng.uniform(0.3, 0.5) * rim_radius_m
    phase = np.linspace(0.0, np.pi / 2, 16)
    outer = np.stack([foot_radius_m + (rim_radius_m - foot_radius_m) * np.sin(phase), height_m * (1 - np.cos(phase))], 1)
    # The inner wall: shifted inward by the wall thickness, its bottom raised by it.
    inner = np.stack(
        [foot_radius_m - wall_m + (rim_radius_m - foot_radius_m) * np.sin(phase), wall_m + (height_m - wall_m) * (1 - np.cos(phase))], 1
    )[::-1]
    return _revolved(np.concatenate([[[0.0, 0.0]], outer, inner, [[0.0, wall_m]]]))


def _torus(rng: np.random.Generator) -> trimesh.Trimesh:
    """A ring lying flat (a tape roll, a donut)."""
    tube_radius_m = rng.uniform(_MIN_DIMENSION_M / 2, 0.03)
    ring_radius_m = rng.uniform(tube_radius_m + 0.01, _MAX_RADIUS_M - tube_radius_m)
    return trimesh.creation.torus(ring_radius_m, tube_radius_m, major_sections=48, minor_sections=24)


_MESH_BUILDERS: dict[str, Callable[[np.random.Generator], trimesh.Trimesh]] = {
    "box": _box,
    "cylinder": _cylinder,
    "ellipsoid": _ellipsoid,
    "frustum": _frustum,
    "mug": _mug,
    "bottle": _bottle,
    "l_shape": _l_shape,
    "bowl": _bowl,
    "torus": _torus,
}
assert tuple(_MESH_BUILDERS) == FAMILIES


def _surface_cloud(mesh: trimesh.Trimesh, rng: np.random.Generator, num_points: int) -> np.ndarray:
    """Area-uniform surface samples, bounding box centred at the origin, float32 [num_points, 3]."""
    points, _ = trimesh.sample.sample_surface(mesh, num_points, seed=rng)
    points -= (points.min(axis=0) + points.max(axis=0)) / 2
    return points.astype(np.float32)


def sample_object(family: str, rng: np.random.Generator, num_points: int = 2048) -> np.ndarray:
    """One random object of `family` with a uniform random yaw: float32 [num_points, 3] in metres.

    Deterministic given the state of `rng` (which it advances).
    """
    if family not in _MESH_BUILDERS:
        raise ValueError(f"unknown shape family {family!r}; known: {', '.join(FAMILIES)}")
    mesh = _MESH_BUILDERS[family](rng)
    mesh.apply_transform(trimesh.transformations.rotation_matrix(rng.uniform(0.0, 2 * np.pi), [0.0, 0.0, 1.0]))
    return _surface_cloud(mesh, rng, num_points)


def sample_box(rng: np.random.Generator, num_points: int = 2048) -> np.ndarray:
    """One box of the paper's set: edges uniform in [2 cm, 25 cm], axis-aligned, centred at the origin."""
    mesh = trimesh.creation.box(extents=rng.uniform(MIN_SIZE_M, MAX_SIZE_M, size=3))
    return _surface_cloud(mesh, rng, num_points)


def _sample_one(task: tuple[str, np.random.SeedSequence, int]) -> np.ndarray:
    """Worker entry point: (family or "paper_box", the object's own seed, number of points)."""
    family, seed_sequence, num_points = task
    rng = np.random.default_rng(seed_sequence)
    return sample_box(rng, num_points) if family == "paper_box" else sample_object(family, rng, num_points)


def _sample_all(tasks: list[tuple[str, np.random.SeedSequence, int]], workers: int) -> np.ndarray:
    # Each object has its own seed, so the result does not depend on the number of workers.
    if not 1 <= workers <= 2:
        raise ValueError(f"workers must be 1 or 2 (the machine is shared), got {workers}")
    if workers == 1:
        clouds = [_sample_one(task) for task in tasks]
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            clouds = pool.map(_sample_one, tasks, chunksize=64)
    return np.stack(clouds)


def generate_tabletop_dataset(
    num_objects: int,
    num_points: int,
    seed: int,
    families: Sequence[str] = TRAINING_FAMILIES,
    workers: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Clouds float32 [N, P, 3] and family ids int64 [N] (indices into `FAMILIES`, not into `families`).

    Families are balanced (counts differ by at most one) and shuffled. The default leaves out
    `HELD_OUT_FAMILY`; pass `families=[HELD_OUT_FAMILY]` for the out-of-distribution set.
    """
    unknown = set(families) - set(FAMILIES)
    if unknown or not families:
        raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {list(families)}")
    order_seed, objects_seed = np.random.SeedSequence(seed).spawn(2)
    family_ids = np.resize(np.array([FAMILIES.index(family) for family in families], dtype=np.int64), num_objects)
    family_ids = np.random.default_rng(order_seed).permutation(family_ids)
    tasks = [(FAMILIES[i], object_seed, num_points) for i, object_seed in zip(family_ids, objects_seed.spawn(num_objects))]
    return _sample_all(tasks, workers), family_ids


def generate_box_dataset(num_objects: int = 10000, num_points: int = 2048, seed: int = 0, workers: int = 1) -> np.ndarray:
    """The paper's box set (Appendix C): float32 [N, P, 3], see `sample_box`."""
    tasks = [("paper_box", object_seed, num_points) for object_seed in np.random.SeedSequence(seed).spawn(num_objects)]
    return _sample_all(tasks, workers)


@dataclass(frozen=True)
class ShapeDataset:
    """A generated dataset as stored on disk (npz, no pickle). `family_ids` index into `families`."""

    clouds: np.ndarray  # float32 [N, P, 3], metres
    family_ids: np.ndarray  # int64 [N]
    families: tuple[str, ...]
    seed: int
    held_out_family: str
    kind: str  # "tabletop" or "boxes"

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            path,
            clouds=self.clouds,
            family_ids=self.family_ids,
            families=np.array(self.families),
            seed=np.int64(self.seed),
            held_out_family=np.array(self.held_out_family),
            kind=np.array(self.kind),
        )

    @staticmethod
    def load(path: Path) -> "ShapeDataset":
        with np.load(Path(path), allow_pickle=False) as data:
            return ShapeDataset(
                clouds=data["clouds"],
                family_ids=data["family_ids"],
                families=tuple(str(name) for name in data["families"]),
                seed=int(data["seed"]),
                held_out_family=str(data["held_out_family"]),
                kind=str(data["kind"]),
            )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("tabletop", "boxes"), default="tabletop")
    parser.add_argument("--num-objects", type=int, default=10000)
    parser.add_argument("--num-points", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--families", nargs="+", choices=FAMILIES, default=list(TRAINING_FAMILIES),
        help=f"tabletop families to draw from (default: all but the held-out {HELD_OUT_FAMILY!r})",
    )
    parser.add_argument("--workers", type=int, choices=(1, 2), default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    start = time.monotonic()
    if args.kind == "tabletop":
        clouds, family_ids = generate_tabletop_dataset(args.num_objects, args.num_points, args.seed, args.families, args.workers)
    else:
        clouds = generate_box_dataset(args.num_objects, args.num_points, args.seed, args.workers)
        family_ids = np.full(args.num_objects, FAMILIES.index("box"), dtype=np.int64)
    elapsed_s = time.monotonic() - start
    ShapeDataset(clouds, family_ids, FAMILIES, args.seed, HELD_OUT_FAMILY, args.kind).save(args.out)
    print(f"wrote {args.out}: {clouds.shape[0]} {args.kind} objects x {clouds.shape[1]} points in {elapsed_s:.1f} s")


if __name__ == "__main__":
    main()
