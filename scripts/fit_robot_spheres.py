"""Fit the Panda's collision spheres to PyBullet's collision meshes; writes mace_ros/core/data/panda_spheres.yaml.

PyBullet (like Bullet's URDF importer in general) collides a link's .obj mesh as its convex hull,
inflated by a 1 mm collision margin; the Panda's collision meshes are (nearly) convex already. So
the target of each link is the convex hull of its mesh vertices, and the sphere union must contain
that hull grown by the margin: every hull vertex, surface sample and interior sample lies inside
some sphere with at least `BULLET_MARGIN_M + SAMPLING_SLACK_M` to spare.

Within that constraint the sphere centres are optimized (Adam) so that the union pokes out of the
hull as little as possible: the loss is the mean depth to which points sampled just outside the
hull lie inside the union. After optimization every sphere is grown until coverage holds exactly
on a dense (~1 mm) verification sample. The best of a few k-means initializations is kept.

    PYTHONPATH=. python scripts/fit_robot_spheres.py            # a few minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pybullet_data
import torch
import trimesh
import yaml
from scipy.cluster.vq import kmeans2
from scipy.spatial import ConvexHull

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "mace_ros/core/data/panda_spheres.yaml"
MESH_DIR = Path(pybullet_data.getDataPath()) / "franka_panda/meshes/collision"

BULLET_MARGIN_M = 0.001  # Bullet's default collision margin for URDF meshes, measured against getClosestPoints
SAMPLING_SLACK_M = 0.001  # covers the gaps between the ~1 mm-spaced verification samples

# link name -> (mesh file, yaw of the URDF collision origin, number of spheres)
LINK_MESHES: dict[str, tuple[str, float, int]] = {
    "panda_link0": ("link0.obj", 0.0, 5),
    "panda_link1": ("link1.obj", 0.0, 6),
    "panda_link2": ("link2.obj", 0.0, 6),
    "panda_link3": ("link3.obj", 0.0, 6),
    "panda_link4": ("link4.obj", 0.0, 6),
    "panda_link5": ("link5.obj", 0.0, 8),
    "panda_link6": ("link6.obj", 0.0, 6),
    "panda_link7": ("link7.obj", 0.0, 5),
    "panda_hand": ("hand.obj", 0.0, 6),
    "panda_leftfinger": ("finger.obj", 0.0, 3),
    "panda_rightfinger": ("finger.obj", np.pi, 3),  # URDF: <origin rpy="0 0 3.14159265359"/>
}


def link_hull(mesh_file: str, yaw: float) -> trimesh.Trimesh:
    """The convex hull of a collision mesh in its link frame (the URDF collision origin applied)."""
    mesh = trimesh.load(MESH_DIR / mesh_file, force="mesh")
    rotation = trimesh.transformations.rotation_matrix(yaw, (0.0, 0.0, 1.0))
    return trimesh.convex.convex_hull(trimesh.transform_points(mesh.vertices, rotation))


def hull_signed_distance_bound(hull: ConvexHull, points: np.ndarray) -> np.ndarray:
    """max over facet planes of the plane distance: exact inside (negative), a lower bound outside."""
    return (points @ hull.equations[:, :3].T + hull.equations[:, 3]).max(axis=1)


def interior_points(hull: trimesh.Trimesh, scipy_hull: ConvexHull, count: int, rng: np.random.Generator) -> np.ndarray:
    """About `count` uniform samples of the hull's interior (rejection from its bounding box)."""
    samples = rng.uniform(hull.bounds[0], hull.bounds[1], size=(4 * count, 3))
    return samples[hull_signed_distance_bound(scipy_hull, samples) < 0.0][:count]


def target_points(hull: trimesh.Trimesh, scipy_hull: ConvexHull, count: int, rng: np.random.Generator) -> np.ndarray:
    """Points the sphere union must contain: hull vertices, surface and interior samples."""
    surface, _ = trimesh.sample.sample_surface(hull, count, seed=int(rng.integers(1 << 31)))
    return np.concatenate([hull.vertices, surface, interior_points(hull, scipy_hull, count // 4, rng)])


def outside_points(hull: trimesh.Trimesh, scipy_hull: ConvexHull, count: int, pad: float, rng: np.random.Generator) -> np.ndarray:
    """About `count` uniform samples of the shell within `pad` outside the hull: the bloat to minimize."""
    samples = rng.uniform(hull.bounds[0] - pad, hull.bounds[1] + pad, size=(8 * count, 3))
    distance = hull_signed_distance_bound(scipy_hull, samples)
    return samples[(distance > 0.0) & (distance < pad)][:count]


def fit_link(hull: trimesh.Trimesh, num_spheres: int, seed: int, steps: int = 600) -> np.ndarray:
    """[n <= num_spheres, 4] spheres (x, y, z, r) whose union covers the hull with the required slack.

    Coverage holds by construction throughout: each target point is assigned to one sphere, and
    each radius is the distance to its farthest assigned point plus the slack. Adam moves only the
    centres, to reduce the bloat; every few steps each point is reassigned to the sphere it lies
    deepest in, which lets the radii of the others shrink.
    """
    rng = np.random.default_rng(seed)
    scipy_hull = ConvexHull(hull.vertices)
    inner = torch.as_tensor(target_points(hull, scipy_hull, 2000, rng), dtype=torch.float32)
    outer = torch.as_tensor(outside_points(hull, scipy_hull, 10000, 0.04, rng), dtype=torch.float32)
    slack = BULLET_MARGIN_M + SAMPLING_SLACK_M

    # Initial centres: k-means of interior samples spreads the spheres over the link's bulk.
    centers0, _ = kmeans2(interior_points(hull, scipy_hull, 3000, rng), num_spheres, seed=int(rng.integers(1 << 31)), minit="++")
    centers = torch.tensor(centers0, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([centers], lr=1e-3)

    def covering_radii(assignment: torch.Tensor) -> torch.Tensor:
        own_distance = (inner - centers[assignment]).norm(dim=-1)
        return torch.zeros(num_spheres).scatter_reduce(0, assignment, own_distance, reduce="amax") + slack

    with torch.no_grad():
        assignment = torch.cdist(inner, centers).argmin(1)
    for step in range(steps):
        radii = covering_radii(assignment)
        # Bloat: how deep samples just outside the hull lie inside the union.
        depth = (radii - (outer[:, None] - centers).norm(dim=-1)).max(1).values.clamp_min(0.0)
        optimizer.zero_grad()
        depth.mean().backward()
        optimizer.step()
        if step % 10 == 9:
            with torch.no_grad():
                assignment = (torch.cdist(inner, centers) - covering_radii(assignment)).argmin(1)
    with torch.no_grad():
        radii = covering_radii(assignment) - slack
    # The exact covering pass runs in float64 on a much denser sample.
    return cover_exactly(hull, scipy_hull, centers.detach().double().numpy(), radii.double().numpy(), slack, rng)


def cover_exactly(hull: trimesh.Trimesh, scipy_hull: ConvexHull, centers: np.ndarray, radii: np.ndarray, slack: float, rng: np.random.Generator) -> np.ndarray:
    """Grow radii until a dense sample of the hull (~1 mm spacing) is covered with `slack` to spare.

    Spheres that are no sample's best cover are redundant and dropped.
    """
    verification = target_points(hull, scipy_hull, int(hull.area / 1e-6), rng)
    distances = np.linalg.norm(verification[:, None] - centers[None], axis=-1)
    best = (distances - radii).argmin(1)
    needed = distances[np.arange(len(verification)), best] + slack
    used = [k for k in range(len(radii)) if (best == k).any()]
    grown = [max(radii[k], needed[best == k].max()) for k in used]
    return np.concatenate([centers[used], np.array(grown)[:, None]], 1)


def bloat_stats(hull: trimesh.Trimesh, spheres: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """(volume of the union outside the hull / hull volume, farthest reach outside the hull in m)."""
    scipy_hull = ConvexHull(hull.vertices)
    low = np.minimum(hull.bounds[0], (spheres[:, :3] - spheres[:, 3:]).min(0))
    high = np.maximum(hull.bounds[1], (spheres[:, :3] + spheres[:, 3:]).max(0))
    samples = rng.uniform(low, high, size=(400000, 3))
    in_union = (np.linalg.norm(samples[:, None] - spheres[None, :, :3], axis=-1) < spheres[:, 3]).any(1)
    outside = hull_signed_distance_bound(scipy_hull, samples) > 0.0
    box_volume = np.prod(high - low)
    excess = (in_union & outside).mean() * box_volume / hull.volume
    # Farthest reach: sphere surface points outside the hull, measured by the plane bound (exact
    # where the nearest feature is a facet, the common case for bulging spheres).
    directions = rng.normal(size=(2000, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    surface = (spheres[:, None, :3] + spheres[:, None, 3:] * directions[None]).reshape(-1, 3)
    surface_in_union = ((np.linalg.norm(surface[:, None] - spheres[None, :, :3], axis=-1) < spheres[:, 3] - 1e-9).any(1))
    reach = hull_signed_distance_bound(scipy_hull, surface[~surface_in_union]).max(initial=0.0)
    return float(excess), float(reach)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--restarts", type=int, default=3, help="k-means initializations per link; the least bloated fit wins")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs cost more than they save

    fitted: dict[str, list[list[float]]] = {}
    for link, (mesh_file, yaw, num_spheres) in LINK_MESHES.items():
        hull = link_hull(mesh_file, yaw)
        candidates = [fit_link(hull, num_spheres, seed) for seed in range(args.restarts)]
        scored = [(bloat_stats(hull, spheres, np.random.default_rng(99)), spheres) for spheres in candidates]
        (excess, reach), best = min(scored, key=lambda item: item[0][0])
        print(f"{link:18s} {len(best)} spheres  union outside hull: {excess:6.2f} x hull volume, reaches {100 * reach:4.1f} cm out", flush=True)
        fitted[link] = [[round(float(v), 5) for v in sphere] for sphere in best]

    args.output.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# Panda collision spheres, link name -> [[x, y, z, radius], ...] in the link frame (metres).\n"
        "# Generated by scripts/fit_robot_spheres.py from pybullet_data/franka_panda/meshes/collision:\n"
        f"# each sphere union covers its link's convex hull grown by {1000 * (BULLET_MARGIN_M + SAMPLING_SLACK_M):.0f} mm. Do not edit by hand.\n"
    )
    args.output.write_text(header + yaml.safe_dump(fitted, sort_keys=False, default_flow_style=None))
    print(f"wrote {sum(len(s) for s in fitted.values())} spheres to {args.output}")


if __name__ == "__main__":
    main()
