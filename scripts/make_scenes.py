"""Write the shipped obstacle scenes config/scenes/{wall,window,box,shelf,table}.yaml with verified goals.

Geometry is defined here (metres, base frame panda_link0). `wall` and `window` are the scenes of the
MACE paper (arXiv 2310.12862; the authors' code, orrkrup/mace `tuner.py`, places the robot at
x = -0.6 in its world; here those boxes are shifted into the robot's base frame), the window framed
by a full wall so that the arm must reach through the opening. `box` is an open-top box on the floor
with goals inside (the paper's MoveIt comparison reaches into a box), `shelf` a bookshelf with three
boards, `table` a table next to the robot's mount with objects on it. Every scene has a floor.

Each candidate goal (for panda_hand, the IK engine's default tip) is kept only if a configuration
reaches it (to 1e-5 m and 1e-4 rad: gradient descent on goal error plus a clearance penalty from
many random starts, then damped least squares) that both the torch sphere model and PyBullet's
exact meshes call collision-free; that configuration is
stored as the goal's `example_q` (an existence proof for tests and benchmarks, never used by the engine).

    PYTHONPATH=. python scripts/make_scenes.py                  # ~30 min on 2 busy CPU cores
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import yaml

from mace_ros.core.collision import TensorScene, TorchCollisionChecker
from mace_ros.core.kinematics import PandaKinematics, matrix_to_rotation_vector, quaternion_to_matrix
from mace_ros.core.pybullet_backend import PyBulletCollisionChecker
from mace_ros.core.scene import Box, Cylinder, Scene, Sphere

ROOT = Path(__file__).resolve().parents[1]
SCENE_DIR = ROOT / "config" / "scenes"
TIP_LINK = "panda_hand"
IDENTITY = (1.0, 0.0, 0.0, 0.0)
HAND_DOWN = (0.0, 1.0, 0.0, 0.0)  # hand z axis pointing down (pi about x)
HAND_FORWARD = (math.sqrt(0.5), 0.0, math.sqrt(0.5), 0.0)  # hand z axis along +x (pi/2 about y)


def yaw_quaternion(yaw: float) -> tuple[float, float, float, float]:
    return (math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2))


def floor() -> Box:
    """The ground under the robot: top face at z = 0 (the base link touches it and is not checked)."""
    return Box("floor", (0.0, 0.0, -0.01), IDENTITY, (1.5, 1.5, 0.01))


def box_between(name: str, low: tuple[float, float, float], high: tuple[float, float, float]) -> Box:
    """An axis-aligned box from its corners."""
    low_a, high_a = np.asarray(low), np.asarray(high)
    return Box(name, (low_a + high_a) / 2, IDENTITY, (high_a - low_a) / 2)


def wall_scene() -> Scene:
    # Paper: a 0.11 m thick wall 0.8 m wide from z = 0.5 to 1.1 and a 1 cm ledge at its foot on the far side.
    return Scene(boxes=[
        floor(),
        Box("wall", (0.35, 0.0, 0.8), IDENTITY, (0.055, 0.4, 0.3)),
        Box("ledge", (0.5, 0.0, 0.5), IDENTITY, (0.1, 0.4, 0.005)),
    ])


def window_scene() -> Scene:
    # Paper: a 2 cm thick frame at x = 0.4 around a 0.3 x 0.3 m opening centred at z = 0.6.
    x0, x1 = 0.39, 0.41
    return Scene(boxes=[
        floor(),
        box_between("wall_below", (x0, -0.6, 0.0), (x1, 0.6, 0.45)),
        box_between("wall_above", (x0, -0.6, 0.75), (x1, 0.6, 1.2)),
        box_between("wall_left", (x0, 0.15, 0.45), (x1, 0.6, 0.75)),
        box_between("wall_right", (x0, -0.6, 0.45), (x1, -0.15, 0.75)),
    ])


def box_scene() -> Scene:
    # A 0.32 x 0.32 x 0.25 m open-top box with 1 cm walls on the floor, centred 0.5 m in front.
    cx, half, height, wall = 0.5, 0.16, 0.25, 0.01
    return Scene(boxes=[
        floor(),
        box_between("box_floor", (cx - half, -half, 0.0), (cx + half, half, wall)),
        box_between("box_front", (cx + half - wall, -half, 0.0), (cx + half, half, height)),
        box_between("box_back", (cx - half, -half, 0.0), (cx - half + wall, half, height)),
        box_between("box_left", (cx - half, half - wall, 0.0), (cx + half, half, height)),
        box_between("box_right", (cx - half, -half, 0.0), (cx + half, -half + wall, height)),
    ])


def shelf_scene() -> Scene:
    # A bookshelf 0.3 m deep and 0.9 m wide, 0.55 m in front of the robot, boards at 0.25, 0.6, 0.95 m.
    front, back, half_width, top = 0.55, 0.85, 0.45, 1.2
    boards = [box_between(f"board_{i}", (front, -half_width, z - 0.01), (back, half_width, z + 0.01)) for i, z in enumerate((0.25, 0.6, 0.95))]
    return Scene(boxes=[
        floor(),
        box_between("shelf_back", (back, -half_width - 0.02, 0.0), (back + 0.02, half_width + 0.02, top)),
        box_between("shelf_left", (front, half_width, 0.0), (back, half_width + 0.02, top)),
        box_between("shelf_right", (front, -half_width - 0.02, 0.0), (back, -half_width, top)),
        box_between("shelf_top", (front, -half_width, top - 0.02), (back, half_width, top)),
        *boards,
    ])


TABLE_TOP_Z = 0.2


def table_scene() -> Scene:
    # The robot stands on a low mount beside a table whose top is 0.2 m above the robot's base.
    legs = [
        Cylinder(f"table_leg_{i}", (x, y, (TABLE_TOP_Z - 0.03) / 2), IDENTITY, 0.025, (TABLE_TOP_Z - 0.03) / 2)
        for i, (x, y) in enumerate(((0.35, 0.55), (0.35, -0.55), (1.05, 0.55), (1.05, -0.55)))
    ]
    return Scene(
        boxes=[
            floor(),
            box_between("table_top", (0.3, -0.6, TABLE_TOP_Z - 0.03), (1.1, 0.6, TABLE_TOP_Z)),
            Box("cereal_box", (0.62, 0.28, TABLE_TOP_Z + 0.15), yaw_quaternion(math.radians(20)), (0.04, 0.1, 0.15)),
        ],
        spheres=[Sphere("ball", (0.78, -0.02, TABLE_TOP_Z + 0.06), 0.06)],
        cylinders=[
            *legs,
            Cylinder("bottle", (0.55, -0.22, TABLE_TOP_Z + 0.12), IDENTITY, 0.035, 0.12),
            Cylinder("mug", (0.45, 0.06, TABLE_TOP_Z + 0.05), IDENTITY, 0.04, 0.05),
        ],
    )


# (scene, description, candidate goals as (position, quaternion_wxyz or None))
SCENES: dict[str, tuple[Scene, str, list[tuple[tuple[float, float, float], tuple[float, ...] | None]]]] = {
    # The paper's goal (panda_grasptarget at (0.43, 0, 0.56), over the ledge behind the wall) has no
    # collision-free solution within 5 cm here, which matches the paper's MACE score (0.937 = exp(-6.5 cm)).
    # These goals can be reached exactly: under the wall, beyond the ledge, and along the wall's near face.
    "wall": (wall_scene(), "MACE paper wall: a 0.11 m thick wall (z 0.5-1.1, 0.8 m wide) with a ledge at its far foot; goals around it", [
        ((0.35, 0.0, 0.4), None), ((0.66, 0.0, 0.6), None), ((0.22, 0.0, 0.75), None), ((0.35, 0.2, 0.4), None),
        ((0.66, 0.2, 0.58), None), ((0.22, 0.25, 0.65), None), ((0.35, -0.2, 0.4), None), ((0.7, -0.2, 0.6), None),
        ((0.22, -0.25, 0.65), None), ((0.42, 0.1, 0.42), None), ((0.3, 0.3, 0.42), None), ((0.3, -0.3, 0.42), None),
        ((0.25, 0.0, 0.95), None), ((0.55, 0.0, 0.56), None),
    ]),
    "window": (window_scene(), "MACE paper window: a wall at x = 0.4 with a 0.3 x 0.3 m opening at z 0.45-0.75; goals beyond it", [
        ((0.6, 0.0, 0.6), None), ((0.55, 0.05, 0.55), None), ((0.65, -0.05, 0.6), None), ((0.6, 0.1, 0.65), None),
        ((0.6, -0.1, 0.55), None), ((0.7, 0.0, 0.6), None), ((0.55, 0.0, 0.7), None), ((0.62, 0.0, 0.6), HAND_FORWARD),
    ]),
    "box": (box_scene(), "an open-top 0.32 x 0.32 x 0.25 m box on the floor 0.5 m in front; goals inside", [
        ((0.5, 0.0, 0.2), None), ((0.5, 0.0, 0.18), HAND_DOWN), ((0.45, 0.05, 0.2), None), ((0.55, -0.05, 0.19), None),
        ((0.5, 0.06, 0.17), HAND_DOWN), ((0.47, -0.06, 0.2), HAND_DOWN), ((0.53, 0.0, 0.22), None), ((0.5, 0.0, 0.25), HAND_DOWN),
    ]),
    "shelf": (shelf_scene(), "a bookshelf 0.55-0.85 m in front, boards at z 0.25, 0.6, 0.95; goals in the compartments", [
        ((0.62, 0.0, 0.42), None), ((0.62, 0.2, 0.42), None), ((0.62, -0.2, 0.42), None), ((0.62, 0.0, 0.42), HAND_FORWARD),
        ((0.62, 0.0, 0.77), None), ((0.6, 0.2, 0.77), None), ((0.6, -0.2, 0.77), None), ((0.62, 0.0, 0.77), HAND_FORWARD),
    ]),
    "table": (table_scene(), "a table (top at z = 0.2) beside the robot's mount with a cereal box, a bottle, a mug and a ball", [
        ((0.6, 0.05, 0.34), HAND_DOWN), ((0.55, -0.22, 0.47), HAND_DOWN), ((0.62, 0.28, 0.62), HAND_DOWN), ((0.45, 0.06, 0.42), HAND_DOWN),
        ((0.7, -0.2, 0.4), None), ((0.5, 0.3, 0.35), None), ((0.8, 0.15, 0.35), None), ((0.65, -0.05, 0.45), None),
    ]),
}


def rounded(data: object, digits: int = 6) -> object:
    """Floats rounded for a readable file (box_between's sums leave 0.35000000000000003 and the like)."""
    if isinstance(data, float):
        return round(data, digits)
    if isinstance(data, list):
        return [rounded(item, digits) for item in data]
    if isinstance(data, dict):
        return {key: rounded(value, digits) for key, value in data.items()}
    return data


def goal_residual(kinematics: PandaKinematics, q: torch.Tensor, position: torch.Tensor, rotation: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual [N, 3 or 6] (position; rotation as a base-frame rotation vector) and its Jacobian rows."""
    jacobian, tip_position, tip_rotation = kinematics.jacobian(q, TIP_LINK)
    residual = position - tip_position
    if rotation is None:
        return residual, jacobian[:, :3]
    return torch.cat([residual, matrix_to_rotation_vector(rotation @ tip_rotation.transpose(1, 2))], -1), jacobian


def collision_aware_ik(
    kinematics: PandaKinematics, checker: TorchCollisionChecker, scene: TensorScene,
    position: torch.Tensor, rotation: torch.Tensor | None, starts: torch.Tensor, iterations: int = 300,
) -> torch.Tensor:
    """Gradient descent on goal error plus a penalty on clearance below 1 cm (the sphere model's)."""
    q = starts.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([q], lr=0.02)
    for iteration in range(iterations):
        residual, _ = goal_residual(kinematics, q, position, rotation)
        shortfall = torch.relu(0.01 - checker.signed_distance(q, scene))
        # The penalty ramps in: first get near the goal, then push out of collisions.
        loss = (residual**2).sum() + 10.0 * min(1.0, iteration / 100) * (shortfall**2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            q.copy_(kinematics.clamp_to_limits(q))
    return q.detach()


def polish(kinematics: PandaKinematics, q: torch.Tensor, position: torch.Tensor, rotation: torch.Tensor | None, steps: int = 50) -> torch.Tensor:
    """Damped least squares to machine precision from nearby configurations [N, 7]."""
    for _ in range(steps):
        residual, jacobian = goal_residual(kinematics, q, position, rotation)
        identity = torch.eye(residual.shape[1], dtype=q.dtype)
        step = jacobian.transpose(1, 2) @ torch.linalg.solve(jacobian @ jacobian.transpose(1, 2) + 1e-6 * identity, residual[..., None])
        q = kinematics.clamp_to_limits(q + step.squeeze(-1))
    return q


def find_witness(
    kinematics: PandaKinematics, checker: TorchCollisionChecker, exact: PyBulletCollisionChecker, scene: Scene,
    position: tuple[float, float, float], quaternion: tuple[float, ...] | None, generator: torch.Generator, num_starts: int = 512,
) -> tuple[np.ndarray | None, int]:
    """A configuration reaching the goal that both checkers call free (or None), and how many torch-free solutions there were."""
    tensor_scene = checker.prepare(scene)
    goal_position = torch.tensor(position, dtype=torch.float64)
    goal_rotation = None if quaternion is None else quaternion_to_matrix(torch.tensor(quaternion, dtype=torch.float64))
    q = collision_aware_ik(kinematics, checker, tensor_scene, goal_position, goal_rotation, kinematics.random_configurations(num_starts, generator))
    residual, _ = goal_residual(kinematics, q, goal_position, goal_rotation)
    near = residual.norm(dim=-1) < 0.03
    q = polish(kinematics, q[near], goal_position, goal_rotation)
    residual, _ = goal_residual(kinematics, q, goal_position, goal_rotation)
    reached = residual[:, :3].norm(dim=-1) < 1e-5
    if goal_rotation is not None:
        reached &= residual[:, 3:].norm(dim=-1) < 1e-4
    result = checker.check(q[reached], tensor_scene)
    free = q[reached][~result.in_collision]
    # The torch-free solution with the largest clearance is the most robust existence proof.
    for index in result.signed_distance[~result.in_collision].argsort(descending=True)[:32].tolist():
        if not bool(exact.check(free[index: index + 1], scene).in_collision[0]):
            return free[index].numpy(), int(free.shape[0])
    return None, int(free.shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=SCENE_DIR)
    args = parser.parse_args()
    kinematics = PandaKinematics(dtype=torch.float64)
    torch.set_num_threads(1)  # small batches: threads cost more than they give on 2 cores
    torch_checker = TorchCollisionChecker(dtype=torch.float64)
    exact = PyBulletCollisionChecker()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, (scene, description, candidates) in SCENES.items():
        generator = torch.Generator().manual_seed(args.seed)
        goals = []
        for position, quaternion in candidates:
            witness, num_free = find_witness(kinematics, torch_checker, exact, scene, position, quaternion, generator)
            status = "ok" if witness is not None else "DROPPED (no verified collision-free solution)"
            print(f"{name:7s} goal {position} {'' if quaternion is None else quaternion}: {num_free} torch-free IK solutions, {status}", flush=True)
            if witness is None:
                continue
            goal = {"position": list(position)}
            if quaternion is not None:
                goal["quaternion_wxyz"] = rounded(list(quaternion), 9)
            goal["example_q"] = [round(float(v), 6) for v in witness]
            goals.append(goal)
        header = (
            f"# {name}: {description}.\n"
            "# Metres, base frame panda_link0. Generated by scripts/make_scenes.py.\n"
            f"# goals: for the {TIP_LINK} frame; example_q is one configuration reaching the goal that the torch\n"
            "# sphere model and PyBullet's exact meshes both call collision-free (an existence proof).\n"
        )
        data = {**rounded(scene.to_yaml_dict()), "goal_tip_link": TIP_LINK, "goals": goals}
        if not scene.spheres:
            data.pop("spheres")
        if not scene.cylinders:
            data.pop("cylinders")
        (args.out_dir / f"{name}.yaml").write_text(header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None))
        print(f"wrote {args.out_dir / (name + '.yaml')} with {len(goals)} goals", flush=True)
    exact.close()


if __name__ == "__main__":
    main()
