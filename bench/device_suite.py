"""The GPU acceptance runs of issues 6, 8 and 9 as one prepared job for the lent device (no PyBullet, no ROS there).

The device has 15 minutes per session, torch and scipy but neither PyBullet nor ROS. So the work is split:

1. `prepare` (here, PyBullet installed): the goals that need exact meshes to choose, i.e. the box
   benchmark's feasible goals (`bench/results/ik_box.json`) and, for the batch runs, hand poses of
   random configurations the exact meshes call collision-free (as `bench/ik_batch.py` makes them).
2. `run` (on the device, `mace_ros.core` only): IKEngine with `exact_check: none` (the fast checker
   decides; nothing is judged there) records every answer: the checker's time (FK + check) for
   4096 and 65,536 configurations; GetIK latency by stage on the shipped goal sets (`bench/goal_sets.py`,
   as `bench/ik_latency.py`) with 1 solution and the default count, each scene's goals twice (scene warm start);
   the box benchmark's goals (`mace_lm`, as `bench/ik_box.py`); `solve_batch` throughput.
   `shape-speed`: ShapeEngine's MACE iterations on one grasp observation (the paper's 5 fingers).
3. `verify` (here): every returned configuration judged by FK tolerances and PyBullet's exact meshes
   (the tolerances of the benchmark each part comes from); the summary goes to `bench/results/`.

So the GPU latencies leave out the exact check that `exact_check: pybullet` adds on a machine with
PyBullet (its cost, per checked configuration on this CPU, is measured by `verify` too).

    PYTHONPATH=. .venv/bin/python bench/device_suite.py prepare --out out/device/inputs.json
    bash bench/device_run.sh            # on the device: run, shape training, shape-speed (see that file)
    PYTHONPATH=. .venv/bin/python bench/device_suite.py verify <files_at>/suite.json --out bench/results/device_suite.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.goal_sets import ROOT, SCENES, TIP_LINK, ik_goal, percentiles, scene_and_goals  # noqa: E402
from mace_ros.core import refinement  # noqa: E402
from mace_ros.core.collision import TorchCollisionChecker  # noqa: E402
from mace_ros.core.ik_engine import IKEngine, IKRequest  # noqa: E402
from mace_ros.core.kinematics import PandaKinematics, matrix_to_quaternion  # noqa: E402
from mace_ros.core.resources import scene_path  # noqa: E402
from mace_ros.core.scene import Scene  # noqa: E402

BATCH_SCENES = {"open": (2000, 10000), "box": (2000,)}


def git_commit() -> str:
    """$COMMIT if set: the device receives the working tree with the git metadata of the session's start,
    so its own HEAD can name an older commit (it did, in the second device session)."""
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return result.stdout.strip() or "unknown (no git on this machine)"


def device_description(device: torch.device) -> str:
    from mace_ros.core.shape.training import device_name

    return device_name(device)


def relative(path: Path) -> str:
    return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(call: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, float]:
    """Milliseconds per call (synchronized before and after each): min and median of `repeats` after 3 warm-ups."""
    for _ in range(3):
        call()
    durations = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        call()
        synchronize(device)
        durations.append(1000 * (time.perf_counter() - started))
    return {"min_ms": min(durations), "median_ms": statistics.median(durations)}


# ---------------------------------------------------------------------------------------------- prepare
def prepare(args: argparse.Namespace) -> None:
    from bench.ik_batch import solvable_goals
    from mace_ros.core.pybullet_backend import PyBulletCollisionChecker

    box_records = json.loads((ROOT / "bench/results/ik_box.json").read_text())["records"]
    box_goals = [{"index": r["goal_index"], "position": r["position"], "rotation": r["rotation"]} for r in box_records if r["counted"]]
    exact = PyBulletCollisionChecker()
    kinematics = PandaKinematics(dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    batch_goals = {}
    for name, sizes in BATCH_SCENES.items():
        scene = Scene() if name == "open" else Scene.load_yaml(scene_path(name))
        q = solvable_goals(scene, max(sizes), exact, kinematics, generator)
        position, rotation = kinematics.forward(q)
        batch_goals[name] = {"position": position.tolist(), "quaternion_wxyz": matrix_to_quaternion(rotation).tolist()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"box_goals": box_goals, "batch_goals": batch_goals}))
    print(f"wrote {args.out}: {len(box_goals)} box goals, batch goals {[len(v['position']) for v in batch_goals.values()]}")


# -------------------------------------------------------------------------------------------------- run
def checker_times(device: torch.device, sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    """FK + collision check of a batch (scene prepared once, as in tuning), sphere model and full check,
    with the broad phase eager and replayed from CUDA graphs (`TorchCollisionChecker.cuda_graphs`)."""
    checker = TorchCollisionChecker(device=device, dtype=torch.float32)
    kinematics = PandaKinematics(device, torch.float32)
    generator = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name in ("open", "box", "shelf"):
        prepared = checker.prepare(Scene() if name == "open" else Scene.load_yaml(scene_path(name)))
        # What a replay of the broad phase's graph launches (eagerly, one launch each).
        rows.append({"scene": name, "broad_phase_kernels": broad_phase_kernels(checker, prepared, kinematics.random_configurations(64, generator))})
        for size in sizes:
            q = kinematics.random_configurations(size, generator)
            for graphs in (False, True) if device.type == "cuda" else (False,):
                checker.cuda_graphs = graphs
                for narrow_phase in (False, True):
                    timing = timed_ms(lambda: checker.check(q, prepared, narrow_phase), device, repeats)
                    rows.append({"scene": name, "configurations": size, "narrow_phase": narrow_phase, "cuda_graphs": graphs, **timing})
                    print(f"check {name} {size} narrow={narrow_phase} graphs={graphs}: {timing['median_ms']:.3f} ms", flush=True)
    checker.cuda_graphs = device.type == "cuda"
    rows.append({"graph_failures": [call.failure for _, call in checker._graphs.values() if call.failure]})
    return rows


def broad_phase_kernels(checker: TorchCollisionChecker, prepared: Any, q: torch.Tensor) -> int:
    """Operators of one broad phase (`_sphere_gaps`) that run a kernel, i.e. all but views."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
            Counter.count += not func.is_view
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Counter():
        checker._sphere_gaps(q, prepared)
    return Counter.count


def request_for(position: np.ndarray, quaternion: np.ndarray | None, engine: IKEngine, num_solutions: int, timeout_s: float,
                random_seed: int) -> IKRequest:
    return IKRequest(position, quaternion, TIP_LINK, num_solutions or engine.config["num_solutions"], engine.config["num_samples"],
                     engine.config["tuning_iterations"], timeout_s, random_seed=random_seed)


def answer_row(result: Any) -> dict[str, Any]:
    return {"success": bool(result.success), "elapsed_s": result.elapsed_s, "rounds": result.rounds, "message": result.message[:200],
            "stage_times_s": result.stage_times_s, "tuning_iterations_done": result.tuning_iterations_done,
            "warm_start_iterations": result.warm_start_iterations, "solutions": np.asarray(result.solutions).tolist()}


def latency_rows(engine: IKEngine, args: argparse.Namespace, deadline: float) -> list[dict[str, Any]]:
    """As bench/ik_latency.py's engine part (no baseline): each scene's goals, `passes` times in a row."""
    rows: list[dict[str, Any]] = []
    for num_solutions in (1, 0):
        for name in SCENES:
            scene, goals = scene_and_goals(name)
            engine.forget_scenes()
            first = goals[0]
            engine.solve(request_for(np.asarray(first.position), None if first.quaternion_wxyz is None else np.asarray(first.quaternion_wxyz),
                                     engine, num_solutions, args.timeout, 0), scene)  # untimed: the scene's first upload
            for pass_index in (1, 2):
                for goal_index, goal in enumerate(goals):
                    for repeat in range(args.repeats):
                        if time.monotonic() > deadline:
                            print("latency: budget spent", flush=True)
                            return rows
                        quaternion = None if goal.quaternion_wxyz is None else np.asarray(goal.quaternion_wxyz)
                        result = engine.solve(request_for(np.asarray(goal.position), quaternion, engine, num_solutions, args.timeout, repeat + 1), scene)
                        time.sleep(args.gap)
                        rows.append({"scene": name, "goal": goal_index, "repeat": repeat, "pass": pass_index, "num_solutions_asked": num_solutions,
                                     **answer_row(result)})
                print(f"latency {name} solutions={num_solutions or 'default'} pass {pass_index}: p50 "
                      f"{np.median([r['elapsed_s'] for r in rows if r['scene'] == name and r['pass'] == pass_index and r['num_solutions_asked'] == num_solutions]) * 1000:.1f} ms",
                      flush=True)
    return rows


def box_rows(engine: IKEngine, goals: list[dict[str, Any]], timeout_s: float, deadline: float) -> list[dict[str, Any]]:
    """bench/ik_box.py's `mace_lm` (the engine's default config, what GetIK returns) on the feasible box goals."""
    scene = Scene.load_yaml(ROOT / "config/scenes/box.yaml")
    engine.forget_scenes()
    rows = []
    for number, goal in enumerate([goals[0], *goals]):  # the first call untimed (scene upload)
        if time.monotonic() > deadline:
            print("box: budget spent", flush=True)
            break
        quaternion = None if goal["rotation"] is None else matrix_to_quaternion(torch.as_tensor(goal["rotation"], dtype=torch.float64)).numpy()
        started = time.monotonic()
        result = engine.solve(request_for(np.asarray(goal["position"]), quaternion, engine, 0, timeout_s, goal["index"]), scene)
        if number:
            rows.append({"goal_index": goal["index"], "wall_s": time.monotonic() - started, **answer_row(result)})
    print(f"box: {sum(r['success'] for r in rows)}/{len(rows)} answered, p50 {np.median([r['wall_s'] for r in rows]) * 1000:.1f} ms", flush=True)
    return rows


def batch_rows(engine: IKEngine, batch_goals: dict[str, Any], timeout_s: float, deadline: float) -> list[dict[str, Any]]:
    rows = []
    for name, sizes in BATCH_SCENES.items():
        scene = Scene() if name == "open" else Scene.load_yaml(scene_path(name))
        position, quaternion = np.asarray(batch_goals[name]["position"]), np.asarray(batch_goals[name]["quaternion_wxyz"])
        engine.solve_batch(position[:16], quaternion[:16], scene, timeout_s=timeout_s, random_seed=1)  # warm-up
        for size in sizes:
            if time.monotonic() > deadline:
                print("batch: budget spent", flush=True)
                return rows
            result = engine.solve_batch(position[:size], quaternion[:size], scene, timeout_s=timeout_s, random_seed=1)
            rows.append({"scene": name, "goals": size, "elapsed_s": result.elapsed_s, "attempts": result.attempts,
                         "answered": np.asarray(result.success).tolist(), "solutions": np.asarray(result.solutions).tolist()})
            print(f"batch {name} {size}: {int(np.sum(result.success))} answered in {result.elapsed_s:.2f} s "
                  f"({int(np.sum(result.success)) / result.elapsed_s:.0f} answered/s)", flush=True)
    return rows


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    inputs = json.loads(args.inputs.read_text())
    out: dict[str, Any] = {"command": "python3 bench/device_suite.py " + " ".join(sys.argv[1:]).replace(str(args.out), "<OUT>/suite.json"),
                           "commit": git_commit(), "device": device_description(device), "torch": torch.__version__,
                           "exact_check": "none (judged later by `verify`)", "timeout_s": args.timeout}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out))

    sections = [s for s in ("checker", "latency", "box", "batch") if s in args.sections]
    budget = {"checker": 0.1, "latency": 0.45, "box": 0.25, "batch": 0.2}
    engine = IKEngine({"exact_check": "none"}, device=device)
    engine.checker.cuda_graphs = engine.checker.cuda_graphs and not args.no_cuda_graphs
    if args.no_cuda_graphs:
        refinement.LM_GRAPH_DEVICE_TYPES = ()
    out["cuda_graphs"] = engine.checker.cuda_graphs
    for section in sections:
        deadline = min(started + args.budget_s, time.monotonic() + budget[section] * args.budget_s)
        section_started = time.monotonic()
        if section == "checker":
            out["checker"] = checker_times(device, args.check_sizes, args.check_repeats)
        elif section == "latency":
            out["latency"] = latency_rows(engine, args, deadline)
        elif section == "box":
            goals = inputs["box_goals"][: args.max_box_goals or None]
            out["box"] = box_rows(engine, goals, args.box_timeout, deadline)
        else:
            out["batch"] = batch_rows(engine, inputs["batch_goals"], args.batch_timeout, deadline)
        out.setdefault("section_wall_s", {})[section] = time.monotonic() - section_started
        save()
    if args.profile:  # where a GetIK request's time goes (the shelf goals, 1 solution), for the next optimisation
        from torch.profiler import ProfilerActivity, profile

        scene, goals = scene_and_goals("shelf")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as profiler:
            for goal in goals:
                quaternion = None if goal.quaternion_wxyz is None else np.asarray(goal.quaternion_wxyz)
                engine.solve(request_for(np.asarray(goal.position), quaternion, engine, 1, args.timeout, 7), scene)
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        args.out.with_suffix(".profile.txt").write_text(profiler.key_averages().table(sort_by=sort, row_limit=80))
        if "batch" in sections:  # and of one 2,000-goal batch in the open scene (the throughput target's)
            goals = inputs["batch_goals"]["open"]
            with profile(activities=activities) as profiler:
                engine.solve_batch(np.asarray(goals["position"])[:2000], np.asarray(goals["quaternion_wxyz"])[:2000], Scene(),
                                   timeout_s=args.batch_timeout, random_seed=2)
            args.out.with_suffix(".batch_profile.txt").write_text(profiler.key_averages().table(sort_by=sort, row_limit=60))
    out["checker_graph_failures"] = [call.failure for _, call in engine.checker._graphs.values() if call.failure]
    out["lm_graphs"] = [{"rows": key[1], "per_row_goal": key[2], "pose": key[3], "respect_limits": key[5], "replays": state.block.replays,
                         "failure": state.block.failure} for key, state in refinement._LM_GRAPHS.items()]
    save()
    print(f"run done in {time.monotonic() - started:.0f} s", flush=True)


def shape_speed(args: argparse.Namespace) -> None:
    """Shape tuning speed on `args.device` (issue 9 item 4), all with the paper's 5 fingers grasping unseen
    training-family objects (seed 3000 on) and 49 samples:
    1. the tuning loop alone, autograd vs closed-form M steps (`mace_tune(closed_form=...)`), the latter
       eager and captured as a CUDA graph (`cuda_graph=...`), 100 iterations of the paper's grasp preset
       each, same observation, prior and seed;
    2. ShapeEngine end to end: `--iterations` of the paper's preset (lr `--learning-rate`);
    3. time until a MACE iteration's batch mean reaches the CVAE's mean score on that observation (the
       engine's default config; `--cvae-objects` observations), from the start of the request."""
    import dataclasses

    from mace_ros.core.mace import PAPER_PRESETS, mace_tune
    from mace_ros.core.shape.cvae import PAPER_NUM_FINGERS, load_shape_cvae
    from mace_ros.core.shape.datasets import generate_tabletop_dataset
    from mace_ros.core.shape.simulators import GraspDomain, finger_directions, grasp_contacts
    from mace_ros.core.shape.vae import MaceVAEPrior
    from mace_ros.core.shape_engine import ShapeEngine, ShapeRequest, density_matched_finger_radius

    device = torch.device(args.device)
    deadline = time.monotonic() + args.budget_s
    out: dict[str, Any] = {"device": device_description(device), "torch": torch.__version__, "commit": git_commit(),
                           "weights": relative(args.weights), "cvae_weights": relative(args.cvae_weights), "learning_rate": args.learning_rate}
    paper = ShapeEngine({"weights_path": str(args.weights), "tuning_learning_rate": args.learning_rate}, device=device)
    default = ShapeEngine({"weights_path": str(args.weights)}, device=device)
    clouds, _ = generate_tabletop_dataset(max(args.cvae_objects, 1), 2048, seed=3000)
    directions = finger_directions(PAPER_NUM_FINGERS, dtype=torch.float64)

    def request(index: int, iterations: int) -> ShapeRequest:
        contacts, valid = grasp_contacts(torch.from_numpy(clouds[index : index + 1]).double(), directions, None, paper.finger_radius_m)
        keep = valid[0]
        return ShapeRequest(contacts=contacts[0, keep].numpy(), partial_cloud=None, object_origin=np.zeros(3), num_samples=49,
                            tuning_iterations=iterations, timeout_s=600.0, random_seed=index + 1, contact_directions=directions[keep].numpy())

    paper.infer(request(0, 10))  # warm-up (allocations, kernels)
    default.infer(request(0, 10))

    # 1. The tuning loop, autograd vs closed form.
    observation = paper.validate(request(0, 0))
    preset = dataclasses.replace(PAPER_PRESETS["grasp_shape_vae"], iterations=args.loop_iterations, learning_rate=args.learning_rate)
    loop = []
    for closed_form, cuda_graph in ((False, False), (True, False), (True, True)):
        prior = MaceVAEPrior(paper.vae, torch.zeros(3, device=device))
        domain = paper.build_domain(observation)
        synchronize(device)
        started = time.perf_counter()
        result = mace_tune(prior, domain, preset, generator=torch.Generator(device=device).manual_seed(1), chunk_size=preset.num_samples,
                           closed_form=closed_form, cuda_graph=cuda_graph)
        synchronize(device)
        seconds = time.perf_counter() - started
        loop.append({"closed_form": closed_form, "cuda_graph": cuda_graph, "iterations": result.iterations_done, "seconds": seconds,
                     "ms_per_iteration": 1000 * seconds / max(result.iterations_done, 1), "last_mean_score": result.mean_score_history[-1],
                     "mean_of_last_10_batch_means": float(np.mean(result.mean_score_history[-10:])),
                     "cuda_graph_replays": result.cuda_graph_replays, "cuda_graph_failure": result.cuda_graph_failure})
        print(f"tuning loop closed_form={closed_form} cuda_graph={cuda_graph}: {loop[-1]['ms_per_iteration']:.2f} ms per iteration, "
              f"{result.cuda_graph_replays} replays, failure {result.cuda_graph_failure}", flush=True)
    out["tuning_loop"] = loop

    # 2. The engine end to end.
    engine_rows = []
    per_iteration = None
    for iterations in args.iterations:
        if per_iteration is not None and iterations * per_iteration > deadline - time.monotonic():
            print(f"engine: {iterations} iterations would pass the budget ({1000 * per_iteration:.1f} ms each)", flush=True)
            continue
        result = paper.infer(request(0, iterations))
        per_iteration = result.tuning_time_s / max(result.tuning_iterations_done, 1)
        engine_rows.append({"iterations": iterations, "iterations_done": result.tuning_iterations_done, "tuning_time_s": result.tuning_time_s,
                            "elapsed_s": result.elapsed_s, "ms_per_iteration": 1000 * per_iteration, "mean_score": result.mean_score,
                            "diversity_m2": result.diversity, "message": result.message[:200]})
        print(f"engine {iterations} iterations: {result.tuning_time_s:.2f} s tuning ({1000 * per_iteration:.2f} ms each), "
              f"{result.elapsed_s:.2f} s in all, score {result.mean_score:.3f}", flush=True)
    out["engine"] = engine_rows

    # 3. Time to the CVAE's score.
    cvae = load_shape_cvae(args.cvae_weights, device)
    reach = []
    for index in range(args.cvae_objects):
        if time.monotonic() > deadline:
            break
        cloud = torch.from_numpy(clouds[index]).to(device)
        domain = GraspDomain.from_ground_truth(cloud, directions.to(device, torch.float32), None, default.finger_radius_m)
        with torch.no_grad():
            cvae_contacts, _ = grasp_contacts(cloud[None], finger_directions(PAPER_NUM_FINGERS, device=device), None,
                                              density_matched_finger_radius(cvae.num_points))
            target = float(domain.score(cvae.sample(cvae_contacts[0], 49, torch.zeros(3, device=device),
                                                    torch.Generator(device=device).manual_seed(index))).mean())
        marks: list[tuple[float, torch.Tensor]] = []
        started = time.perf_counter()
        result = default.infer(dataclasses.replace(request(index, args.cvae_max_iterations), timeout_s=args.cvae_timeout),
                               lambda iteration, scores: marks.append((time.perf_counter() - started, scores.mean())))
        curve = [(seconds, float(mean)) for seconds, mean in marks]
        reached = next((seconds for seconds, mean in curve if mean >= target), None)
        reach.append({"object": index, "cvae_score": target, "seconds_to_cvae_score": reached, "iterations_done": result.tuning_iterations_done,
                      "final_mean_score": result.mean_score, "seconds_and_batch_mean_per_iteration": curve})
        print(f"object {index}: CVAE {target:.3f}, reached after {reached if reached is None else round(reached, 3)} s", flush=True)
    if reach:  # also against the CVAE's mean score over these observations (the Fig. 1 table's figure)
        average = float(np.mean([row["cvae_score"] for row in reach]))
        for row in reach:
            row["seconds_to_mean_cvae_score"] = next((t for t, mean in row["seconds_and_batch_mean_per_iteration"] if mean >= average), None)
        out["mean_cvae_score"] = average
    out["time_to_cvae_score"] = reach
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    if args.profile:  # where an engine iteration's time goes, for the next optimisation
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as profiler:
            paper.infer(request(0, 20))
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        args.out.with_suffix(".profile.txt").write_text(profiler.key_averages().table(sort_by=sort, row_limit=60))


# ----------------------------------------------------------------------------------------------- verify
def verify(args: argparse.Namespace) -> None:
    from bench.ik_batch import checked
    from bench.ik_box import BoxGoal, Judge
    from bench.ik_latency import STAGES, all_solved
    from mace_ros.core.kinematics import quaternion_to_matrix
    from mace_ros.core.pybullet_backend import PyBulletCollisionChecker

    raw = json.loads(args.suite.read_text())
    exact = PyBulletCollisionChecker()
    kinematics = PandaKinematics(dtype=torch.float64)
    summary: dict[str, Any] = {key: raw[key] for key in ("command", "commit", "device", "torch", "exact_check", "timeout_s") if key in raw}
    summary["checker"] = raw.get("checker", [])
    if raw.get("latency"):
        latency: dict[str, Any] = {}
        for row in raw["latency"]:
            scene, goals = scene_and_goals(row["scene"])
            solutions = np.asarray(row["solutions"]).reshape(-1, 7)
            row["exact_success"] = bool(row["success"]) and all_solved(solutions, ik_goal(goals[row["goal"]]), scene, exact, kinematics)
        for asked in sorted({row["num_solutions_asked"] for row in raw["latency"]}):
            for name in SCENES:
                entry = {}
                for pass_index in (1, 2):
                    chosen = [r for r in raw["latency"] if r["scene"] == name and r["pass"] == pass_index and r["num_solutions_asked"] == asked]
                    if not chosen:
                        continue
                    entry[f"pass_{pass_index}"] = {
                        "requests": len(chosen), "success": statistics.fmean(r["exact_success"] for r in chosen),
                        "latency_s": percentiles([r["elapsed_s"] for r in chosen]),
                        "stage_p50_s": {stage: float(np.percentile([r["stage_times_s"].get(stage, 0.0) for r in chosen], 50)) for stage in STAGES}}
                latency[f"{'default' if asked == 0 else asked}_solutions/{name}"] = entry
        summary["latency"] = latency
    if raw.get("box"):
        scene = Scene.load_yaml(ROOT / "config/scenes/box.yaml")
        judge = Judge(exact, scene)
        inputs = {g["index"]: g for g in json.loads(args.inputs.read_text())["box_goals"]}
        judged = []
        for row in raw["box"]:
            goal = inputs[row["goal_index"]]
            box_goal = BoxGoal(goal["index"], np.asarray(goal["position"]), None if goal["rotation"] is None else np.asarray(goal["rotation"]))
            solutions = np.asarray(row["solutions"]).reshape(-1, 7)
            first = judge.judge(solutions[0], box_goal) if len(solutions) else {"success": False}
            judged.append({"kind": box_goal.kind, "success": bool(first["success"]), "wall_s": row["wall_s"],
                           "returned": len(solutions), "returned_in_collision": judge.collision_count(solutions)})
        summary["box"] = {kind: {"goals": len(chosen), "success_rate": statistics.fmean(j["success"] for j in chosen),
                                 "latency_s": percentiles([j["wall_s"] for j in chosen]),
                                 "returned_solutions": sum(j["returned"] for j in chosen),
                                 "returned_in_collision": sum(j["returned_in_collision"] for j in chosen)}
                          for kind, chosen in (("all", judged), *((k, [j for j in judged if j["kind"] == k]) for k in ("pose", "position")))
                          if chosen}
    if raw.get("batch"):
        inputs = json.loads(args.inputs.read_text())["batch_goals"]
        batch = []
        for row in raw["batch"]:
            size = row["goals"]
            scene = Scene() if row["scene"] == "open" else Scene.load_yaml(scene_path(row["scene"]))
            position = torch.as_tensor(inputs[row["scene"]]["position"][:size], dtype=torch.float64)
            rotation = quaternion_to_matrix(torch.as_tensor(inputs[row["scene"]]["quaternion_wxyz"][:size], dtype=torch.float64))
            answered = torch.as_tensor(row["answered"], dtype=torch.bool)
            solutions = torch.as_tensor(row["solutions"], dtype=torch.float64).reshape(-1, 7)
            valid = checked(solutions, answered, position, rotation, scene, exact, kinematics)
            batch.append({"scene": row["scene"], "goals": size, "elapsed_s": row["elapsed_s"], "goals_per_s": size / row["elapsed_s"],
                          "success": float(valid.sum()) / size, "answered_but_invalid": int((answered & ~valid).sum())})
        summary["batch"] = batch
    started = time.perf_counter()
    probe = kinematics.random_configurations(200, torch.Generator().manual_seed(0))
    exact.check(probe, Scene.load_yaml(ROOT / "config/scenes/box.yaml"))
    summary["exact_check_ms_per_configuration_here"] = 1000 * (time.perf_counter() - started) / 200
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "checker"}, indent=1)[:6000])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare")
    p.add_argument("--out", type=Path, default=ROOT / "out/device/inputs.json")
    r = commands.add_parser("run")
    r.add_argument("--inputs", type=Path, default=ROOT / "out/device/inputs.json")
    r.add_argument("--device", default="cuda")
    r.add_argument("--sections", nargs="+", default=["checker", "latency", "box", "batch"])
    r.add_argument("--budget-s", type=float, default=240.0, help="wall-clock budget of all sections together")
    r.add_argument("--timeout", type=float, default=2.0, help="GetIK timeout of the latency requests")
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--gap", type=float, default=0.05)
    r.add_argument("--check-sizes", type=int, nargs="+", default=[4096, 65536], help="configurations per timed check")
    r.add_argument("--check-repeats", type=int, default=20)
    r.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); the node uses 1")
    r.add_argument("--box-timeout", type=float, default=2.0)
    r.add_argument("--max-box-goals", type=int, default=0, help="0 = all")
    r.add_argument("--batch-timeout", type=float, default=30.0)
    r.add_argument("--profile", action="store_true", help="also write torch profiles of the shelf goals' requests and of a batch beside --out")
    r.add_argument("--no-cuda-graphs", action="store_true", help="the engine's checker broad phase and obstacle-ignoring LM run eagerly")
    r.add_argument("--out", type=Path, required=True)
    s = commands.add_parser("shape-speed")
    s.add_argument("--device", default="cuda")
    s.add_argument("--weights", type=Path, default=ROOT / "mace_ros/core/data/shape_vae_2048.safetensors")
    s.add_argument("--cvae-weights", type=Path, default=ROOT / "mace_ros/core/data/shape_cvae_2048.safetensors")
    s.add_argument("--iterations", type=int, nargs="+", default=[100, 2500])
    s.add_argument("--loop-iterations", type=int, default=100)
    s.add_argument("--cvae-objects", type=int, default=5)
    s.add_argument("--cvae-max-iterations", type=int, default=300)
    s.add_argument("--cvae-timeout", type=float, default=5.0)
    s.add_argument("--profile", action="store_true", help="also write a torch profile of a 20-iteration request beside --out")
    s.add_argument("--learning-rate", type=float, default=2e-4, help="the paper's grasp lr")
    s.add_argument("--budget-s", type=float, default=120.0, help="iteration counts whose estimated time passes this are skipped")
    s.add_argument("--out", type=Path, required=True)
    v = commands.add_parser("verify")
    v.add_argument("suite", type=Path)
    v.add_argument("--inputs", type=Path, default=ROOT / "out/device/inputs.json")
    v.add_argument("--out", type=Path, default=ROOT / "bench/results/device_suite.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    {"prepare": prepare, "run": run, "shape-speed": shape_speed, "verify": verify}[args.command](args)


if __name__ == "__main__":
    main()
