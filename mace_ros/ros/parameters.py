"""Every parameter of the `mace` node: descriptions and ranges here, defaults in config/mace.yaml.

The node declares each parameter found in the package's mace.yaml with the descriptor below, so
`ros2 param describe` explains it and out-of-range values are refused. `ik.*` and `shape.*` are
passed whole to the engines as their `config`; the request defaults among them may be changed
at run time, the rest are read once when the engines are built.
"""
from __future__ import annotations

import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.node import Node
from rclpy.parameter import Parameter

NODE_NAME = "mace"
PARAMETERS_FILE = "mace.yaml"

INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class ParameterSpec:
    description: str
    min_value: float | None = None  # inclusive; ints become an IntegerRange, floats a FloatingPointRange
    max_value: float | None = None
    read_only: bool = True  # False: read at each request, so it may be changed at run time
    # For an array whose default is empty: YAML's [] carries no element type, and rclpy can declare neither an
    # empty array of a given type nor, usefully, an unset parameter (one unset parameter empties every
    # GetParameters answer that names it, e.g. `ros2 param dump`'s). Such a parameter is declared with the
    # value [] and dynamic typing, so that an override of this type replaces it; the description names the type.
    array_type: Parameter.Type | None = None


PARAMETERS: dict[str, ParameterSpec] = {
    "robot_prefix": ParameterSpec(
        "Prefix of the robot's joint and link names (Franka's arm_id + '_'): <prefix>joint1..7, <prefix>link0, <prefix>hand, "
        "<prefix>hand_tcp. Requests, responses and topics use these names; the engines keep panda_*."),
    "base_frame": ParameterSpec(
        "Robot base frame, in which everything is computed ('' = <robot_prefix>link0); other frames are transformed into it."),
    "static_transforms": ParameterSpec(
        "Extra fixed frames accepted on topics and requests, as 'frame x y z qx qy qz qw; ...': each frame's pose in base_frame."),
    "device": ParameterSpec("Torch device of the engines: auto (cuda when available), cpu, cuda or cuda:N."),
    "dtype": ParameterSpec("Torch dtype of the engines: float32 or float64."),
    "torch_threads": ParameterSpec(
        "Torch intra-op threads on CPU (0 = torch's default, one per core); 1 avoids OpenMP oversubscription.", 0, 1024),
    "random_seed": ParameterSpec("Random seed used when a request's random_seed is 0.", 1, INT32_MAX, read_only=False),
    "scene": ParameterSpec("Static obstacles loaded at start: a scene name from config/scenes/ or a YAML path; '' = none."),
    "obstacle_cloud.voxel_size_m": ParameterSpec(
        "Voxel edge (m) the obstacle cloud is thinned to: the centre of each occupied voxel of a grid fixed to the workspace; "
        "0 keeps every point.", 0.0, 1.0, read_only=False),
    "obstacle_cloud.self_filter_padding_m": ParameterSpec(
        "Cloud points closer than this (m) to the robot's collision spheres at its joint state are its own and removed.",
        0.0, 0.5, read_only=False),
    "obstacle_cloud.point_subsample": ParameterSpec(
        "Use every n-th row and column of an organized cloud (every n-th point of an unorganized one), as MoveIt's "
        "point_subsample: less work per cloud for large cameras, fewer points far away; 1 uses every point.",
        1, 64, read_only=False),
    "obstacles.max_markers": ParameterSpec(
        "Most obstacle markers (~/obstacles primitives) kept; beyond it new ones are refused and logged. Every collision "
        "check costs time in proportion to their number.", 1, 100_000),
    "attached_frames": ParameterSpec(
        "Frames fixed to a robot link, placed by forward kinematics at /joint_states: 'frame link x y z qx qy qz qw; ...' "
        "= each frame's pose in its link (e.g. an eye-in-hand camera)."),
    "workspace.min_m": ParameterSpec(
        "Lower corner [x, y, z] (m, base frame) of the box outside which cloud points and obstacle markers are dropped."),
    "workspace.max_m": ParameterSpec("Upper corner [x, y, z] (m, base frame) of that box."),
    "ik.tip_link": ParameterSpec(
        "Default tip link of GetIK requests: any link of the robot, e.g. <robot_prefix>hand_tcp ('' = <robot_prefix>hand).",
        read_only=False),
    "ik.num_solutions": ParameterSpec("Default number of ranked GetIK solutions.", 1, 1000, read_only=False),
    "ik.num_samples": ParameterSpec("Default prior samples per MACE iteration (N) for GetIK.", 1, 100000, read_only=False),
    "ik.tuning_iterations": ParameterSpec("Default MACE iterations (T) for GetIK; 0 = no tuning.", 0, 100000, read_only=False),
    "ik.timeout_s": ParameterSpec("Default wall-clock budget (s) of a GetIK request.", 0.001, 600.0, read_only=False),
    "ik.weights_path": ParameterSpec("IK prior weights (.safetensors); '' = the weights shipped in the package."),
    "ik.grad_steps_per_iteration": ParameterSpec("Gradient steps per MACE iteration (M).", 1, 10000),
    "ik.elite_quantile": ParameterSpec("Fraction of samples kept as elites (q).", 1e-6, 1.0),
    "ik.learning_rate": ParameterSpec("Adam learning rate of MACE tuning.", 0.0, 1.0),
    "ik.collision_margin_m": ParameterSpec("Extra clearance (m) added to every collision sphere.", 0.0, 0.5),
    "ik.cloud_point_radius_m": ParameterSpec(
        "Obstacle cloud points are balls of this radius (m): a surface sampled about twice as far apart cannot be passed "
        "through between its points (half obstacle_cloud.voxel_size_m: each occupied voxel's centre stands for the voxel).", 0.0, 0.5),
    "ik.position_length_scale_m": ParameterSpec("Length scale (m) of the score exp(-position error / scale).", 1e-6, 100.0),
    "ik.orientation_length_scale_rad": ParameterSpec("Angle scale (rad) of the orientation term of the score.", 1e-6, 100.0),
    "ik.refine_candidates": ParameterSpec("Best tuned samples polished by Levenberg-Marquardt.", 1, 100000),
    "ik.refine_max_iterations": ParameterSpec("Levenberg-Marquardt iterations at most.", 0, 100000),
    "ik.refine_time_fraction": ParameterSpec("Share of the time left at each solving round's start kept for its refinement.", 0.0, 1.0),
    "ik.tuning_block_iterations": ParameterSpec(
        "MACE iterations per solving round before its refinement; rounds repeat until solved or the deadline.", 1, 100000),
    "ik.refine_fresh_fraction": ParameterSpec(
        "Plain samples of the tuned prior refined each round, as a share of refine_candidates (other solution modes).", 0.0, 1.0),
    "ik.round_time_fraction": ParameterSpec(
        "Share of the time left that one solving round may take (all of it once less than 2 min_round_s is left).", 0.01, 1.0),
    "ik.min_round_s": ParameterSpec("Shortest solving round (s), unless less time is left; a round starts only with half of it left (a first one also with half the request's timeout).", 0.0, 600.0),
    "ik.fast_stage_starts": ParameterSpec(
        "Starts of GetIK's fast stage before any tuning: obstacle-ignoring LM, then the collision checks (half prior samples, "
        "half uniform; 0 = none).", 0, 100000),
    "ik.scene_warm_start_iterations": ParameterSpec(
        "Background MACE iterations of the scene's tuned prior that each GetIK request earns (0 = no scene warm start).", 0, 100000),
    "ik.scene_warm_start_goals": ParameterSpec("Recent goals of the scene that its background tuning tunes on.", 1, 10000),
    "ik.scene_warm_start_samples": ParameterSpec("Prior samples per goal of one background tuning iteration.", 1, 100000),
    "ik.unobstructed_starts": ParameterSpec(
        "Starts per round for the obstacle-ignoring LM whose collision-free results count (half prior samples, half uniform).", 0, 100000),
    "ik.unobstructed_max_iterations": ParameterSpec("LM iterations of the obstacle-ignoring starts each round.", 0, 100000),
    "ik.slide_starts": ParameterSpec(
        "Colliding goal-reaching results per round that slide along the goal's self-motion manifold away from obstacles.", 0, 100000),
    "ik.slide_iterations": ParameterSpec("Iterations of that slide.", 0, 100000),
    "ik.slide_step_rad": ParameterSpec("Largest joint step (rad) of one slide iteration in the null space of the goal.", 0.0, 1.0),
    "ik.sample_chunk_size": ParameterSpec(
        "Samples drawn and scored at once; the deadline is checked between chunks (bounds a huge num_samples).", 1, 1000000),
    "ik.deadline_reserve_s": ParameterSpec("Time (s) kept before the deadline for the final exact check and ranking.", 0.0, 10.0),
    "ik.exact_check": ParameterSpec(
        "Final collision authority for returned solutions: pybullet (exact Panda meshes) or none (the fast checker only)."),
    "ik.tuning_narrow_phase_fraction": ParameterSpec(
        "Share of each tuning batch, nearest the goal, whose sphere-model collisions the exact narrow phase re-checks.", 0.0, 1.0),
    "ik.more_solutions_time_factor": ParameterSpec(
        "After the first solution at time t, distinct further solutions are sought until t * (1 + factor) at most.", 0.0, 1000.0),
    "ik.min_separation_rad": ParameterSpec(
        "Least Euclidean joint distance (rad) between returned solutions: closer ones are near-copies, left out.", 0.0, 100.0),
    "ik.joint_limit_margin_rad": ParameterSpec(
        "Without a seed, solutions at least this far (rad) inside every joint limit are preferred.", 0.0, 1.0),
    "ik.position_tolerance_m": ParameterSpec("Position error (m) under which a solution counts as solved.", 0.0, 1.0),
    "ik.orientation_tolerance_rad": ParameterSpec("Orientation error (rad) under which a solution counts as solved.", 0.0, 3.1416),
    "ik.early_stop_position_m": ParameterSpec("Tuning stops early once enough samples are within this position error (m).", 0.0, 10.0),
    "ik.early_stop_orientation_rad": ParameterSpec("Orientation error (rad) of that early stop rule.", 0.0, 3.1416),
    "ik.duplicate_tolerance_rad": ParameterSpec("Solutions closer than this in every joint (rad) count as one.", 0.0, 1.0),
    "shape.num_samples": ParameterSpec("Default number of InferShape samples.", 1, 1000, read_only=False),
    "shape.tuning_iterations": ParameterSpec("Default MACE iterations for InferShape; 0 = no tuning.", 0, 100000, read_only=False),
    "shape.timeout_s": ParameterSpec("Default wall-clock budget (s) of an InferShape request.", 0.001, 600.0, read_only=False),
    "shape.weights_path": ParameterSpec("Shape VAE weights (.safetensors); '' = the weights shipped in the package: "
                                        "the 2048-point model when the node runs on a GPU, the reduced 512-point one on a CPU."),
    "shape.grasp_preset": ParameterSpec("MACE preset (mace_ros.core.mace.PAPER_PRESETS) for contacts alone."),
    "shape.partial_cloud_preset": ParameterSpec("MACE preset for observations with a partial cloud (alone or with contacts)."),
    "shape.result_samples": ParameterSpec(
        "posterior: fresh samples of the tuned prior, ranked; best: the best samples seen while tuning."),
    "shape.result_oversampling": ParameterSpec(
        "posterior: the best num_samples of this many times num_samples draws of the tuned prior (1 = plain draws).", 1, 64),
    "shape.result_diversity_weight": ParameterSpec(
        "With result_oversampling > 1: keep draws by score plus this weight times their Chamfer distance to those kept "
        "(0 = by score alone); for contacts alone.", 0.0, 10.0),
    "shape.partial_cloud_diversity_weight": ParameterSpec(
        "result_diversity_weight for observations with a partial cloud, with contacts or not (0 = the best-scoring draws: closest to the hidden shape).",
        0.0, 10.0),
    "shape.num_fingers": ParameterSpec(
        "Fingers of the finger set for contacts without directions, closing toward the object origin (2: the Panda hand).", 1, 32),
    "shape.finger_elevation_rad": ParameterSpec("Elevation of the fingers' travel directions (rad).", -1.5708, 1.5708),
    "shape.finger_azimuth_offset_rad": ParameterSpec(
        "Azimuth of the first finger's start (rad); pi/2 with 2 fingers: the Panda hand pointing down.", -3.1416, 3.1416),
    "shape.finger_from_above": ParameterSpec("Add a finger coming down from above."),
    "shape.finger_directions": ParameterSpec(
        "Explicit finger travel directions, flat [x1, y1, z1, x2, ...]; empty = the finger set of the four parameters above.",
        array_type=Parameter.Type.DOUBLE_ARRAY),
    "shape.finger_matching": ParameterSpec(
        "direction: each contact goes to the finger on its side of the object; ordered: contact i to finger i."),
    "shape.max_contact_angle_deg": ParameterSpec("Largest angle (deg) between a contact without a direction and its finger's side, "
                                                  "in the directions the fingers travel.", 0.0, 180.0),
    "shape.max_contacts": ParameterSpec(
        "Most contacts in one InferShape (request or ~/contacts, which keeps the latest this many).", 1, 1024),
    "shape.min_std_ratio": ParameterSpec(
        "Tuning keeps the latent sigma_z >= this times the prior's (0 = unbounded; keeps the posterior diverse).", 0.0, 1.0),
    "shape.prior_anchor_weight": ParameterSpec(
        "Tuning's loss adds this x KL(tuned latent prior || the trained one): the latent means move only as far "
        "as the elites keep pulling (0 = none).", 0.0, 100.0),
    "shape.max_shape_extent_m": ParameterSpec(
        "A shape whose extent along x, y or z exceeds this (m) scores 0: beyond the training objects' 25 cm (0 = no limit).",
        0.0, 10.0),
    "shape.finger_radius_m": ParameterSpec("Finger pad radius (m); 0 = matched to the model's point density.", 0.0, 0.1),
    "shape.length_scale_m": ParameterSpec("Grasp score length scale s (m): max(1 - mean contact error / s, 0).", 1e-6, 10.0),
    "shape.temperature_per_m2": ParameterSpec("Partial-cloud score temperature: exp(-temperature * Chamfer).", 0.0, 1e9),
    "shape.knn_k": ParameterSpec("k of the k-nearest Chamfer distance of the partial-cloud score.", 1, 100),
    "shape.partial_outlier_distance_m": ParameterSpec(
        "Each observed partial-cloud point's term of that distance counts at most this far (m); 0 = uncapped.", 0.0, 10.0),
    "shape.max_scored_partial_points": ParameterSpec(
        "A partial cloud is scored on at most this many of its points (a fixed random subset).", 1, 10000000),
    "shape.min_partial_points": ParameterSpec("Fewest points a partial cloud may have, at least 1 mm apart.", 1, 1000000),
    "shape.max_num_samples": ParameterSpec("Largest num_samples an InferShape request may ask for.", 1, 1000),
    "shape.diversity_max_samples": ParameterSpec("The diversity is measured over this many best samples.", 1, 1000),
    "shape.tuning_time_fraction": ParameterSpec("Share of the timeout given to tuning; the rest to the final sampling.", 0.0, 1.0),
}


class InvalidParameterError(ValueError):
    """A parameter's value (from -p or a params file) the node cannot start with; the message names it."""


UNDOCUMENTED = ParameterSpec("(undocumented: add it to mace_ros/ros/parameters.py)")


def default_parameters_file() -> Path:
    """config/mace.yaml of the installed package (share/mace_ros/config) or of the source tree."""
    from mace_ros.core.resources import config_dir

    return config_dir() / PARAMETERS_FILE


def load_defaults(path: Path) -> dict[str, Any]:
    """Flat {dotted name: value} from a ROS parameters file's `mace` (or `/**`) section."""
    document = yaml.safe_load(Path(path).read_text()) or {}
    for key in (NODE_NAME, f"/{NODE_NAME}", "/**"):
        if key in document:
            return _flatten(document[key].get("ros__parameters", {}))
    raise ValueError(f"{path} has no '{NODE_NAME}: ros__parameters:' section")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_number_array(value: Any) -> bool:
    return isinstance(value, (list, tuple, array.array)) and all(_is_number(item) for item in value)


def _start_override(node: Node, name: str, default: Any) -> Any:
    """The start-up value of `name` (`default` unless -p or a params file override it), whatever its type:
    read through a dynamically typed probe, so that the caller checks and converts it."""
    value = node.declare_parameter(name, default, ParameterDescriptor(dynamic_typing=True)).value
    node.undeclare_parameter(name)
    return value


def _start_value_of_double(node: Node, name: str, default: float | list[float]) -> float | list[float]:
    """The start-up value of a double (or double array) parameter, where integers in an override
    (-p ik.timeout_s:=5, workspace.min_m: [-1, -1, 0]) count too.

    ROS refuses an integer for a declared double (InvalidParameterTypeException at start-up), so the
    override is read through a dynamically typed probe, checked and converted here.
    """
    value = _start_override(node, name, default)
    if isinstance(default, list):
        if not _is_number_array(value):
            raise InvalidParameterError(f"parameter '{name}' must be an array of numbers, got {value!r}")
        return [float(item) for item in value]
    if not _is_number(value):
        raise InvalidParameterError(f"parameter '{name}' must be a number, got {value!r}")
    return float(value)


def _integers_as_doubles(node: Node, parameters: list[Parameter]) -> list[Parameter]:
    """Pre-set callback: `ros2 param set` with an integer for a double parameter sets that double."""
    return [
        Parameter(parameter.name, Parameter.Type.DOUBLE, float(parameter.value))
        if parameter.type_ == Parameter.Type.INTEGER and node.has_parameter(parameter.name)
        and node.get_parameter(parameter.name).type_ == Parameter.Type.DOUBLE
        else parameter
        for parameter in parameters
    ]


def _start_value_of_empty_array(node: Node, name: str, array_type: Parameter.Type) -> list:
    """The start-up value of an array parameter whose default is [] (declared with dynamic typing, so
    that an override of any array type replaces it), checked against its documented element type.

    An empty list in a params file (config/mace.yaml's own `finger_directions: []`, copied by a user)
    arrives unset, since rcl's YAML parser cannot type it: that is the default [] (it reached the
    shape engine as None). A string there failed only later, in the engine, without its name.
    """
    value = _start_override(node, name, [])
    if value is None:
        return []
    numeric = array_type in (Parameter.Type.DOUBLE_ARRAY, Parameter.Type.INTEGER_ARRAY)
    if numeric and not _is_number_array(value):
        raise InvalidParameterError(f"parameter '{name}' must be an array of numbers, got {value!r}")
    return list(value)


def descriptor(name: str, default: Any, spec: ParameterSpec) -> ParameterDescriptor:
    result = ParameterDescriptor(name=name, description=spec.description, read_only=spec.read_only)
    if spec.min_value is None:
        return result
    if isinstance(default, bool):
        return result
    if isinstance(default, int):
        result.integer_range = [IntegerRange(from_value=int(spec.min_value), to_value=int(spec.max_value), step=1)]
    elif isinstance(default, float):
        result.floating_point_range = [
            FloatingPointRange(from_value=float(spec.min_value), to_value=float(spec.max_value), step=0.0)]
    return result


def declare_parameters(node: Node, defaults_file: Path) -> list[str]:
    """Declare every parameter of `defaults_file` on `node` (overrides from --params-file / -p apply).

    Returns the names that have no spec here (declared all the same, with a placeholder description).
    A spec without a default in the file is a packaging error and raises. Double parameters accept
    integer values, at start-up and at run time.
    """
    defaults = load_defaults(defaults_file)
    missing = sorted(set(PARAMETERS) - set(defaults))
    if missing:
        raise ValueError(f"{defaults_file} lacks default(s) for {', '.join(missing)}")
    undocumented = sorted(set(defaults) - set(PARAMETERS))
    declarations, probed = [], []  # probed: start-up values read, checked and converted here
    for name, value in defaults.items():
        spec = PARAMETERS.get(name, UNDOCUMENTED)
        if isinstance(value, float) or (isinstance(value, list) and value and all(isinstance(item, float) for item in value)):
            probed.append((name, _start_value_of_double(node, name, value), descriptor(name, value, spec)))
        elif spec.array_type is not None and value == []:
            declared = descriptor(name, value, spec)
            declared.dynamic_typing = True
            probed.append((name, _start_value_of_empty_array(node, name, spec.array_type), declared))
        else:
            declarations.append((name, value, descriptor(name, value, spec)))
    node.declare_parameters("", declarations)
    node.declare_parameters("", probed, ignore_override=True)  # overrides already read
    node.add_pre_set_parameters_callback(lambda parameters: _integers_as_doubles(node, parameters))
    return undocumented


def section(node: Node, prefix: str) -> dict[str, Any]:
    """Current values of `prefix.*` as {key without prefix: value}, e.g. the engine config `ik`."""
    return {name: parameter.value for name, parameter in node.get_parameters_by_prefix(prefix).items()}
