"""What the node shows in rviz: IK solutions as arm skeletons, the obstacle model, shape samples."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from geometry_msgs.msg import Point, Pose, Quaternion, Vector3
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from mace_ros.core.kinematics import LINK_INDEX, PandaKinematics
from mace_ros.ros.conversions import xyz_to_pointcloud2

if TYPE_CHECKING:
    from mace_ros.core.scene import Scene

# Joint origins from the base to the hand, then the point between the fingers.
SKELETON_LINKS = tuple(f"panda_link{i}" for i in range(9)) + ("panda_hand", "panda_grasptarget")
BEST_COLOR = ColorRGBA(r=0.1, g=0.8, b=0.2, a=1.0)
OTHER_COLOR = ColorRGBA(r=0.2, g=0.4, b=0.9, a=0.5)
GOAL_COLOR = ColorRGBA(r=0.9, g=0.1, b=0.1, a=1.0)
OBSTACLE_COLOR = ColorRGBA(r=0.6, g=0.6, b=0.6, a=0.6)

_kinematics = PandaKinematics(dtype=torch.float64)


def _delete_all(header: Header) -> Marker:
    return Marker(header=header, action=Marker.DELETEALL)


def _pose(position: np.ndarray, quaternion_wxyz: np.ndarray | None = None) -> Pose:
    w, x, y, z = (1.0, 0.0, 0.0, 0.0) if quaternion_wxyz is None else (float(v) for v in quaternion_wxyz)
    return Pose(position=Point(x=float(position[0]), y=float(position[1]), z=float(position[2])),
                orientation=Quaternion(w=w, x=x, y=y, z=z))


def ik_solution_markers(solutions: np.ndarray, header: Header, goal_position: np.ndarray, tip_link: str) -> MarkerArray:
    """One skeleton line strip per solution (best first, in green) with its tip, and the goal in red."""
    markers = [_delete_all(header)]
    if solutions.shape[0] > 0:
        frames = _kinematics.link_transforms(torch.as_tensor(solutions, dtype=torch.float64)).numpy()
        skeleton = frames[:, [LINK_INDEX[name] for name in SKELETON_LINKS], :3, 3]
        tips = frames[:, LINK_INDEX[tip_link], :3, 3]
        for rank, (joints, tip) in enumerate(zip(skeleton, tips)):
            color = BEST_COLOR if rank == 0 else OTHER_COLOR
            markers.append(Marker(
                header=header, ns="ik_solutions", id=rank, type=Marker.LINE_STRIP, action=Marker.ADD,
                pose=_pose(np.zeros(3)), scale=Vector3(x=0.01), color=color,
                points=[Point(x=float(p[0]), y=float(p[1]), z=float(p[2])) for p in joints]))
            markers.append(Marker(
                header=header, ns="ik_tips", id=rank, type=Marker.SPHERE, action=Marker.ADD,
                pose=_pose(tip), scale=Vector3(x=0.02, y=0.02, z=0.02), color=color))
    markers.append(Marker(
        header=header, ns="ik_goal", id=0, type=Marker.SPHERE, action=Marker.ADD,
        pose=_pose(goal_position), scale=Vector3(x=0.03, y=0.03, z=0.03), color=GOAL_COLOR))
    return MarkerArray(markers=markers)


def scene_markers(scene: Scene, header: Header) -> MarkerArray:
    """The primitives of the obstacle model (static scene and ~/obstacles); clouds are left to their topic."""
    markers = [_delete_all(header)]
    for box in scene.boxes:
        markers.append(Marker(
            type=Marker.CUBE, pose=_pose(box.center, box.quaternion_wxyz),
            scale=Vector3(x=2 * box.half_extents[0], y=2 * box.half_extents[1], z=2 * box.half_extents[2])))
    for sphere in scene.spheres:
        diameter = 2 * sphere.radius
        markers.append(Marker(type=Marker.SPHERE, pose=_pose(sphere.center), scale=Vector3(x=diameter, y=diameter, z=diameter)))
    for cylinder in scene.cylinders:
        diameter = 2 * cylinder.radius
        markers.append(Marker(
            type=Marker.CYLINDER, pose=_pose(cylinder.center, cylinder.quaternion_wxyz),
            scale=Vector3(x=diameter, y=diameter, z=2 * cylinder.half_height)))
    for index, marker in enumerate(markers[1:]):
        marker.header, marker.ns, marker.id, marker.action, marker.color = header, "scene", index, Marker.ADD, OBSTACLE_COLOR
    return MarkerArray(markers=markers)


def shape_samples_cloud(samples: np.ndarray, header: Header) -> PointCloud2:
    """All shape samples [n, P, 3] in one cloud; the sample_index field lets rviz colour them apart."""
    count, points_per_sample = samples.shape[:2]
    sample_index = np.repeat(np.arange(count, dtype=np.uint32), points_per_sample)
    return xyz_to_pointcloud2(samples.reshape(-1, 3), header, sample_index=sample_index)
