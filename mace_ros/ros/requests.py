"""Validation of GetIK / InferShape requests and their translation into engine arguments.

Conventions (see srv/*.srv): a numeric field left at 0 means the configured default, except
tuning_iterations, where 0 means no tuning and -1 the default. Anything invalid raises
InvalidRequest with a message for the response. Nothing here imports the engines, so bad input
is answered the same way whether or not they have loaded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mace_ros.core.kinematics import LINK_NAMES
from mace_ros.ros import conversions
from mace_ros.ros.frames import FrameTable, RigidTransform, UnknownFrameError

if TYPE_CHECKING:
    from mace_ros.srv import GetIK, InferShape

MAX_NUM_SOLUTIONS = 1000
MAX_IK_SAMPLES = 100_000
MAX_SHAPE_SAMPLES = 1000
MAX_TUNING_ITERATIONS = 100_000
MAX_TIMEOUT_S = 600.0
# The Panda reaches about 0.855 m from its shoulder (panda_link1's origin); 1.2 m leaves room for
# long tip links while still catching goals given in millimetres or in the wrong frame.
SHOULDER_POSITION_M = np.array([0.0, 0.0, 0.333])
MAX_REACH_M = 1.2


class InvalidRequest(ValueError):
    """The request cannot be served as given; the message says why."""


@dataclass(frozen=True)
class RequestDefaults:
    """The configured values that fields left at 0 (or -1 for tuning_iterations) stand for."""

    num_samples: int
    tuning_iterations: int
    timeout_s: float
    random_seed: int
    num_solutions: int = 0  # GetIK only
    tip_link: str = ""  # GetIK only


def _count(value: int, default: int, maximum: int, field: str) -> int:
    resolved = default if value == 0 else value
    if resolved > maximum:
        raise InvalidRequest(f"{field} = {resolved} is too large (at most {maximum})")
    return int(resolved)


def _tuning_iterations(value: int, default: int) -> int:
    if value < -1:
        raise InvalidRequest(f"tuning_iterations = {value} is invalid: use -1 (default), 0 (no tuning) or a positive count")
    resolved = default if value == -1 else value
    if resolved > MAX_TUNING_ITERATIONS:
        raise InvalidRequest(f"tuning_iterations = {resolved} is too large (at most {MAX_TUNING_ITERATIONS})")
    return int(resolved)


def _timeout(value: float, default: float) -> float:
    if not math.isfinite(value):
        raise InvalidRequest(f"timeout_s = {value} is not a finite number")
    if value < 0.0:
        raise InvalidRequest(f"timeout_s = {value} is negative (0 = default)")
    resolved = default if value == 0.0 else value
    if resolved > MAX_TIMEOUT_S:
        raise InvalidRequest(f"timeout_s = {resolved} is too long (at most {MAX_TIMEOUT_S:.0f} s)")
    return float(resolved)


def _to_base(frames: FrameTable, frame_id: str, what: str) -> RigidTransform:
    try:
        return frames.to_base(frame_id)
    except UnknownFrameError as error:
        raise InvalidRequest(f"{what}: {error}") from None


def ik_request_arguments(request: GetIK.Request, defaults: RequestDefaults, frames: FrameTable) -> dict[str, Any]:
    """Keyword arguments of mace_ros.core.ik_engine.IKRequest for a GetIK request, in the base frame."""
    to_base = _to_base(frames, request.goal.header.frame_id, "goal")
    try:
        position = conversions.point_to_array(request.goal.pose.position, "goal position")
        if request.position_only:
            quaternion = None
            position = to_base.apply(position)
        else:
            quaternion = conversions.quaternion_to_array(
                request.goal.pose.orientation, "goal orientation (set position_only to ignore it)")
            position, quaternion = to_base.apply_pose(position, quaternion)
        seed_state = conversions.joint_state_to_positions(request.seed_state)
    except ValueError as error:
        raise InvalidRequest(str(error)) from None

    distance = float(np.linalg.norm(position - SHOULDER_POSITION_M))
    if distance > MAX_REACH_M:
        raise InvalidRequest(
            f"goal out of reach: {distance:.3f} m from the shoulder (0, 0, 0.333) in {frames.base_frame}, "
            f"more than {MAX_REACH_M} m")
    tip_link = request.tip_link or defaults.tip_link
    if tip_link not in LINK_NAMES:
        raise InvalidRequest(f"unknown tip_link '{tip_link}'; Panda links: {', '.join(LINK_NAMES)}")
    return {
        "goal_position": position,
        "goal_quaternion_wxyz": quaternion,
        "tip_link": tip_link,
        "num_solutions": _count(request.num_solutions, defaults.num_solutions, MAX_NUM_SOLUTIONS, "num_solutions"),
        "num_samples": _count(request.num_samples, defaults.num_samples, MAX_IK_SAMPLES, "num_samples"),
        "tuning_iterations": _tuning_iterations(request.tuning_iterations, defaults.tuning_iterations),
        "timeout_s": _timeout(request.timeout_s, defaults.timeout_s),
        "seed_state": seed_state,
        "random_seed": int(request.random_seed or defaults.random_seed),
    }


def shape_request_arguments(
    request: InferShape.Request, defaults: RequestDefaults, frames: FrameTable, latest_contacts: np.ndarray | None,
) -> tuple[dict[str, Any], RigidTransform]:
    """Keyword arguments of mace_ros.core.shape_engine.ShapeRequest (base frame), and the request frame's
    transform to the base frame (its inverse brings the returned shapes back into the request's frame).

    `latest_contacts` ([k, 3], base frame) stands in when the request carries no contacts.
    """
    frame_id = request.header.frame_id
    to_base = _to_base(frames, frame_id, "header")
    cloud_frame = request.partial_cloud.header.frame_id
    if cloud_frame and cloud_frame != frame_id:
        raise InvalidRequest(f"partial_cloud is in frame '{cloud_frame}' but the request header says '{frame_id}'")
    try:
        contacts = conversions.points_to_array(request.contacts, "contacts")
        origin = conversions.point_to_array(request.object_origin, "object_origin")
    except ValueError as error:
        raise InvalidRequest(str(error)) from None
    cloud = None
    if request.partial_cloud.width * request.partial_cloud.height > 0:
        try:
            cloud = conversions.pointcloud2_to_xyz(request.partial_cloud)
        except ValueError as error:
            raise InvalidRequest(f"partial_cloud: {error}") from None
        if cloud.shape[0] == 0:
            raise InvalidRequest("partial_cloud: no point has finite coordinates")

    if contacts.shape[0] > 0:
        contacts = to_base.apply(contacts)
    else:
        contacts = latest_contacts
    if contacts is None and cloud is None:
        raise InvalidRequest("no observation: give contacts or a partial_cloud, or publish contacts on ~/contacts")
    arguments = {
        "contacts": contacts,
        "partial_cloud": None if cloud is None else to_base.apply(cloud),
        "object_origin": to_base.apply(origin),
        "num_samples": _count(request.num_samples, defaults.num_samples, MAX_SHAPE_SAMPLES, "num_samples"),
        "tuning_iterations": _tuning_iterations(request.tuning_iterations, defaults.tuning_iterations),
        "timeout_s": _timeout(request.timeout_s, defaults.timeout_s),
        "random_seed": int(request.random_seed or defaults.random_seed),
    }
    return arguments, to_base
