"""Tabulate the Panda's wrist self-clearance over (q6, q7); writes mace_ros/core/data/panda_wrist_clearance.safetensors.

Why a table: panda_link5 and the links after joint 6 (panda_link7, panda_hand, the fingers) are
~2 cm apart in most configurations (PyBullet's meshes, median), closer than any sphere model's
bloat, so spheres would report a self-collision almost everywhere. Their relative pose depends on
q6 and q7 only, so the exact mesh clearance is a function on a 2-D grid: PyBullet's closest
distance between link5 and each of those links (convex hulls with Bullet's margin, the ground
truth of the tests), minimized over the pairs, capped at CAP_M, at every node.

The torch checker interpolates it bilinearly and subtracts a Lipschitz slack
(`collision.WristClearanceTable`), so its value never exceeds the true clearance.

    PYTHONPATH=. python scripts/build_wrist_clearance.py        # ~1 min
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pybullet
import pybullet_data
import torch
import trimesh
from safetensors.torch import save_file

from mace_ros.core.collision import WRIST_LINK, WRIST_TABLE_LINKS, WRIST_TABLE_PATH
from mace_ros.core.kinematics import JOINT_LOWER, JOINT_UPPER, LINK_INDEX, PandaKinematics
from mace_ros.core.pybullet_backend import PyBulletCollisionChecker

CAP_M = 0.05  # clearances beyond this never decide a collision; capping keeps PyBullet's queries short
MESHES = {"panda_link7": ("link7.obj", 0.0), "panda_hand": ("hand.obj", 0.0), "panda_leftfinger": ("finger.obj", 0.0), "panda_rightfinger": ("finger.obj", math.pi)}


def lipschitz_constants() -> tuple[float, float]:
    """Upper bounds (m/rad) on how fast any point of the distal links moves relative to link5 per radian of q6 and q7.

    A point p rotating about an axis moves at its distance from that axis. For joint 7 that distance
    is fixed; for joint 6 it is at most dist(axis 6, link7 origin) + |p - link7 origin|.
    """
    kinematics = PandaKinematics(dtype=torch.float64)
    frames = kinematics.link_transforms(torch.zeros(1, 7, dtype=torch.float64))[0]
    mesh_dir = Path(pybullet_data.getDataPath()) / "franka_panda/meshes/collision"
    link7 = frames[LINK_INDEX["panda_link7"]]
    points = []
    for link, (mesh_file, yaw) in MESHES.items():
        vertices = torch.as_tensor(trimesh.load(mesh_dir / mesh_file, force="mesh").vertices, dtype=torch.float64)
        rotation = torch.as_tensor(trimesh.transformations.rotation_matrix(yaw, (0, 0, 1))[:3, :3])
        frame = frames[LINK_INDEX[link]]
        points.append((frame[:3, :3] @ (rotation @ vertices.T)).T + frame[:3, 3])
    points = torch.cat(points)
    margin = 0.002  # Bullet's margins inflate each hull by 1 mm
    from_link7_origin = (points - link7[:3, 3]).norm(dim=-1).max()
    axis7, origin7 = link7[:3, 2], link7[:3, 3]
    relative = points - origin7
    from_axis7 = (relative - (relative @ axis7)[:, None] * axis7).norm(dim=-1).max()
    link6 = frames[LINK_INDEX["panda_link6"]]
    axis6, origin6 = link6[:3, 2], link6[:3, 3]
    offset = origin7 - origin6
    axis6_to_origin7 = (offset - (offset @ axis6) * axis6).norm()
    return float(axis6_to_origin7 + from_link7_origin + margin), float(from_axis7 + margin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step-deg", type=float, default=0.5, help="grid step in q6 and q7")
    parser.add_argument("--output", type=Path, default=WRIST_TABLE_PATH)
    args = parser.parse_args()

    step = math.radians(args.step_deg)
    q6 = np.linspace(JOINT_LOWER[5], JOINT_UPPER[5], int(math.ceil((JOINT_UPPER[5] - JOINT_LOWER[5]) / step)) + 1)
    q7 = np.linspace(JOINT_LOWER[6], JOINT_UPPER[6], int(math.ceil((JOINT_UPPER[6] - JOINT_LOWER[6]) / step)) + 1)
    checker = PyBulletCollisionChecker()
    client, robot = checker.client, checker.robot
    wrist = checker.link_index[WRIST_LINK]
    distal = [checker.link_index[name] for name in WRIST_TABLE_LINKS]
    joint6, joint7 = checker.arm_joints[5], checker.arm_joints[6]
    clearance = np.full((len(q6), len(q7)), CAP_M)
    for i, angle6 in enumerate(q6):
        pybullet.resetJointState(robot, joint6, float(angle6), physicsClientId=client)
        for j, angle7 in enumerate(q7):
            pybullet.resetJointState(robot, joint7, float(angle7), physicsClientId=client)
            for link in distal:
                for contact in pybullet.getClosestPoints(robot, robot, CAP_M, linkIndexA=wrist, linkIndexB=link, physicsClientId=client):
                    clearance[i, j] = min(clearance[i, j], contact[8])
    checker.close()

    lipschitz_q6, lipschitz_q7 = lipschitz_constants()
    # float16 halves the file; 0.1 mm taken off first keeps the rounding on the safe side.
    values = torch.as_tensor(clearance - 1e-4).to(torch.float16)
    metadata = {
        "q6_range": json.dumps([float(q6[0]), float(q6[-1])]),
        "q7_range": json.dumps([float(q7[0]), float(q7[-1])]),
        "lipschitz_m_per_rad": json.dumps([lipschitz_q6, lipschitz_q7]),
        "cap_m": json.dumps(CAP_M),
        "pairs": json.dumps([[WRIST_LINK, name] for name in WRIST_TABLE_LINKS]),
        "source": "PyBullet getClosestPoints on pybullet_data/franka_panda/panda.urdf, fingers at 0.04 m",
        "command": f"PYTHONPATH=. python scripts/build_wrist_clearance.py --step-deg {args.step_deg}",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file({"clearance_m": values.contiguous()}, str(args.output), metadata=metadata)
    colliding = float((clearance < 0).mean())
    print(f"{len(q6)} x {len(q7)} grid, {100 * colliding:.1f}% of (q6, q7) in wrist self-collision, "
          f"Lipschitz bounds {lipschitz_q6:.3f} / {lipschitz_q7:.3f} m/rad; wrote {args.output}")


if __name__ == "__main__":
    main()
