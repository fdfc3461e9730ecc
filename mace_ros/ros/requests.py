"""Validation of GetIK / InferShape requests and their translation into engine arguments.

Conventions (see srv/*.srv): a numeric field left at 0 means the configured default, except
tuning_iterations, where 0 means no tuning and -1 the default. Anything invalid, including
finite but absurd values that would overflow the engines' arithmetic, raises InvalidRequest with
a message and an error code for the response. Nothing here imports the engines, so bad input is
answered the same way whether or not they have loaded. Joint and link names are the robot's
(RobotNames); the arguments returned use the core's panda_* names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from mace_ros.core.kinematics import JOINT_LOWER, JOINT_UPPER, LINK_NAMES
from mace_ros.ros import conversions
from mace_ros.ros.conversions import RobotNames
from mace_ros.ros.frames import FrameTable, RigidTransform, UnknownFrameError

if TYPE_CHECKING:
    from mace_ros.srv import GetIK, GetIKBatch, InferShape

MAX_NUM_SOLUTIONS = 1000
MAX_BATCH_GOALS = 10_000
MAX_IK_SAMPLES = 100_000
MAX_SHAPE_SAMPLES = 1000
MAX_TUNING_ITERATIONS = 100_000
MAX_TIMEOUT_S = 600.0
# The Panda reaches about 0.855 m from its shoulder (panda_link1's origin); 1.2 m leaves room for
# long tip links while still catching goals given in millimetres or in the wrong frame.
SHOULDER_POSITION_M = np.array([0.0, 0.0, 0.333])
MAX_REACH_M = 1.2
# Joint readings of a real arm can lie slightly outside its limits; a seed that close is clamped
# (as the engine does), one farther out is a wrong joint order or unit and is refused.
SEED_LIMIT_TOLERANCE_RAD = 0.1
# InferShape: objects are hand-sized (the VAE's shapes span ~0.2 m), so contacts and partial-cloud
# points farther than this from object_origin are a wrong frame, unit or segmentation.
MAX_OBJECT_RADIUS_M = 1.0
# ... and the object must be in the robot's surroundings (float32 shapes keep ~1 um there).
MAX_OBJECT_DISTANCE_M = 10.0
# A partial cloud is refused above this many points before decoding (a 1280 x 720 camera has 0.92 M)
# and thinned to MAX_PARTIAL_POINTS evenly spread ones after: the score is a per-point mean, and its
# nearest-neighbour search grows with the point count.
MAX_CLOUD_POINTS = 4_000_000
MAX_PARTIAL_POINTS = 4096

# The error code constants of srv/GetIK.srv and srv/InferShape.srv, by name (the .srv holds the values).
ErrorCode = Literal[
    "SUCCESS", "FAILURE", "TIMED_OUT", "GOAL_IN_COLLISION", "INVALID_ROBOT_STATE", "INVALID_LINK_NAME",
    "FRAME_TRANSFORM_FAILURE", "NO_IK_SOLUTION", "NO_SOLUTION", "INVALID_GOAL", "INVALID_REQUEST", "ENGINE_LOADING",
    "ENGINE_UNAVAILABLE",
]


class RequestRefused(Exception):
    """A request answered with success = false and no result; `code` names its error code constant."""

    def __init__(self, message: str, code: ErrorCode) -> None:
        super().__init__(message)
        self.code: ErrorCode = code


class InvalidRequest(RequestRefused, ValueError):
    """The request cannot be served as given; the message says why."""

    def __init__(self, message: str, code: ErrorCode = "INVALID_REQUEST") -> None:
        super().__init__(message, code)


@dataclass(frozen=True)
class RequestDefaults:
    """The configured values that fields left at 0 (or -1 for tuning_iterations) stand for."""

    num_samples: int
    tuning_iterations: int
    timeout_s: float
    random_seed: int
    num_solutions: int = 0  # GetIK only
    tip_link: str = ""  # GetIK only, the robot's name of the link (RobotNames)


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
        raise InvalidRequest(f"{what}: {error}", "FRAME_TRANSFORM_FAILURE") from None


def _seed_state(state: Any, names: RobotNames) -> np.ndarray | None:
    """The seed's 7 arm joint positions (core order), clamped to the limits, or None without positions."""
    try:
        positions = conversions.joint_state_to_positions(state, names)
    except ValueError as error:
        raise InvalidRequest(f"seed_state: {error}", "INVALID_ROBOT_STATE") from None
    if positions is None:
        return None
    lower, upper = np.array(JOINT_LOWER), np.array(JOINT_UPPER)
    outside = (positions < lower - SEED_LIMIT_TOLERANCE_RAD) | (positions > upper + SEED_LIMIT_TOLERANCE_RAD)
    if outside.any():
        joint = int(np.argmax(outside))
        raise InvalidRequest(
            f"seed_state: {names.joint_names[joint]} = {positions[joint]:.6g} rad is outside its limits "
            f"[{lower[joint]}, {upper[joint]}] by more than {SEED_LIMIT_TOLERANCE_RAD} rad", "INVALID_ROBOT_STATE")
    return np.clip(positions, lower, upper)


def _check_near_origin(
    points: np.ndarray, origin: np.ndarray, what: str, hint: str = "give only the object's points, in the header's frame",
) -> None:
    """InvalidRequest unless every point [k, 3] lies within MAX_OBJECT_RADIUS_M of the object origin."""
    if points.shape[0] == 0:
        return
    distances = np.linalg.norm(points - origin, axis=1)
    farthest = int(np.argmax(distances))
    if distances[farthest] > MAX_OBJECT_RADIUS_M:
        raise InvalidRequest(
            f"{what}: {int((distances > MAX_OBJECT_RADIUS_M).sum())} lie farther than {MAX_OBJECT_RADIUS_M} m from "
            f"object_origin (the farthest, {distances[farthest]:.3g} m); {hint}")


def _goal_in_base(goal: Any, position_only: bool, frames: FrameTable, what: str = "goal") -> tuple[np.ndarray, np.ndarray | None]:
    """(position [3], quaternion wxyz [4] or None when position_only) of a PoseStamped goal in the base frame."""
    to_base = _to_base(frames, goal.header.frame_id, what)
    try:
        position = conversions.point_to_array(goal.pose.position, f"{what} position")
        if position_only:
            quaternion = None
            position = to_base.apply(position)
        else:
            quaternion = conversions.quaternion_to_array(
                goal.pose.orientation, f"{what} orientation (set position_only to ignore it)")
            position, quaternion = to_base.apply_pose(position, quaternion)
    except ValueError as error:
        raise InvalidRequest(str(error), "INVALID_GOAL") from None
    distance = float(np.linalg.norm(position - SHOULDER_POSITION_M))
    if distance > MAX_REACH_M:
        raise InvalidRequest(
            f"{what} out of reach: {distance:.3f} m from the shoulder (0, 0, 0.333) in {frames.base_frame}, "
            f"more than {MAX_REACH_M} m", "INVALID_GOAL")
    return position, quaternion


def unknown_tip_link(tip_link: str, names: RobotNames) -> str | None:
    """What is wrong with `tip_link` (the robot's name of a link) as a tip link, or None if nothing."""
    if names.to_core(tip_link) in LINK_NAMES:
        return None
    return f"unknown tip_link '{tip_link}'; links of this robot: {', '.join(names.link_names)}"


def _tip_link(requested: str, defaults: RequestDefaults, names: RobotNames) -> str:
    """The core name of the requested tip link ('' = the default)."""
    tip_link = requested or defaults.tip_link
    error = unknown_tip_link(tip_link, names)
    if error is not None:
        raise InvalidRequest(error, "INVALID_LINK_NAME")
    return names.to_core(tip_link)


def ik_request_arguments(
    request: GetIK.Request, defaults: RequestDefaults, frames: FrameTable, names: RobotNames = RobotNames(),
) -> dict[str, Any]:
    """Keyword arguments of mace_ros.core.ik_engine.IKRequest for a GetIK request, in the base frame."""
    position, quaternion = _goal_in_base(request.goal, request.position_only, frames)
    return {
        "goal_position": position,
        "goal_quaternion_wxyz": quaternion,
        "tip_link": _tip_link(request.tip_link, defaults, names),
        "num_solutions": _count(request.num_solutions, defaults.num_solutions, MAX_NUM_SOLUTIONS, "num_solutions"),
        "num_samples": _count(request.num_samples, defaults.num_samples, MAX_IK_SAMPLES, "num_samples"),
        "tuning_iterations": _tuning_iterations(request.tuning_iterations, defaults.tuning_iterations),
        "timeout_s": _timeout(request.timeout_s, defaults.timeout_s),
        "seed_state": _seed_state(request.seed_state, names),
        "random_seed": int(request.random_seed or defaults.random_seed),
    }


def ik_batch_arguments(
    request: GetIKBatch.Request, defaults: RequestDefaults, frames: FrameTable, names: RobotNames = RobotNames(),
) -> dict[str, Any]:
    """Keyword arguments of mace_ros.core.ik_engine.IKEngine.solve_batch for a GetIKBatch request (base
    frame); a single invalid goal refuses the whole batch, naming it."""
    count = len(request.goals)
    if count == 0:
        raise InvalidRequest("no goals", "INVALID_GOAL")
    if count > MAX_BATCH_GOALS:
        raise InvalidRequest(f"{count} goals is too many (at most {MAX_BATCH_GOALS} per request)")
    positions = np.empty((count, 3))
    quaternions = None if request.position_only else np.empty((count, 4))
    for index, goal in enumerate(request.goals):
        position, quaternion = _goal_in_base(goal, request.position_only, frames, f"goals[{index}]")
        positions[index] = position
        if quaternions is not None:
            quaternions[index] = quaternion
    return {
        "positions": positions,
        "quaternions_wxyz": quaternions,
        "tip_link": _tip_link(request.tip_link, defaults, names),
        "timeout_s": _timeout(request.timeout_s, defaults.timeout_s),
        "random_seed": int(request.random_seed or defaults.random_seed),
    }


def shape_request_arguments(
    request: InferShape.Request, defaults: RequestDefaults, frames: FrameTable, latest_contacts: np.ndarray | None,
    latest_directions: np.ndarray | None = None,
) -> tuple[dict[str, Any], RigidTransform]:
    """Keyword arguments of mace_ros.core.shape_engine.ShapeRequest (base frame), and the request frame's
    transform to the base frame (its inverse brings the returned shapes back into the request's frame).

    `latest_contacts` ([k, 3], base frame) and their travel directions `latest_directions` ([k, 3],
    zero rows = none) stand in when the request carries no contacts.
    """
    frame_id = request.header.frame_id
    to_base = _to_base(frames, frame_id, "header")
    cloud_frame = request.partial_cloud.header.frame_id
    request_frame = frame_id or frames.base_frame  # an empty frame_id is the base frame, on either header
    if cloud_frame and cloud_frame != request_frame:
        raise InvalidRequest(
            f"partial_cloud is in frame '{cloud_frame}' but the request header says '{frame_id}'"
            + ("" if frame_id else f" (the base frame, {frames.base_frame})"), "FRAME_TRANSFORM_FAILURE")
    try:
        contacts = conversions.points_to_array(request.contacts, "contacts")
        directions = conversions.vectors_to_array(getattr(request, "contact_directions", []), "contact_directions")
        origin = conversions.point_to_array(request.object_origin, "object_origin")
    except ValueError as error:
        raise InvalidRequest(str(error)) from None
    if directions.shape[0] and directions.shape[0] != contacts.shape[0]:
        raise InvalidRequest(
            f"contact_directions has {directions.shape[0]} entries for {contacts.shape[0]} contacts: give one per "
            "contact (a zero vector for a contact without a direction) or none")
    origin_distance = float(np.linalg.norm(to_base.apply(origin)))
    if origin_distance > MAX_OBJECT_DISTANCE_M:
        raise InvalidRequest(
            f"object_origin is {origin_distance:.3g} m from {frames.base_frame}, more than {MAX_OBJECT_DISTANCE_M} m")
    _check_near_origin(contacts, origin, "contacts")
    cloud = None
    num_cloud_points = request.partial_cloud.width * request.partial_cloud.height
    if num_cloud_points > MAX_CLOUD_POINTS:
        raise InvalidRequest(f"partial_cloud has {num_cloud_points} points, more than {MAX_CLOUD_POINTS}")
    if num_cloud_points > 0:
        try:
            cloud = conversions.pointcloud2_to_xyz(request.partial_cloud)
        except ValueError as error:
            raise InvalidRequest(f"partial_cloud: {error}") from None
        if cloud.shape[0] == 0:
            raise InvalidRequest("partial_cloud: no point has finite coordinates")
        _check_near_origin(cloud, origin, "partial_cloud points")
        cloud = cloud[:: math.ceil(cloud.shape[0] / MAX_PARTIAL_POINTS)]

    if contacts.shape[0] > 0:
        contacts = to_base.apply(contacts)
        # Any length: each scaled to its largest component first, so that rotating a huge one cannot overflow.
        largest = np.abs(directions).max(axis=1, keepdims=True) if directions.shape[0] else None
        directions = (np.divide(directions, largest, out=np.zeros_like(directions), where=largest > 0) @ to_base.rotation.T
                      if directions.shape[0] else None)
    else:
        contacts, directions = latest_contacts, latest_directions
        if contacts is not None:  # they stand for the request's own contacts: checked as those are
            _check_near_origin(contacts, to_base.apply(origin), "contacts from ~/contacts",
                               "publish only the object's contacts, or clear them with an empty PoseArray")
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
        "contact_directions": directions,
    }
    return arguments, to_base
