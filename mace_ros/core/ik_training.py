"""Train the autoregressive IK prior by maximum likelihood and write the shipped weights.

    python -m mace_ros.core.ik_training --num-configurations 1000000 --epochs 8 --seed 0

Data: configurations uniform within Franka's joint limits, rejected when in self-collision (torch
sphere model), paired with the `panda_hand` pose from forward kinematics (paper: 1M-10M samples).
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from mace_ros.core.collision import TorchCollisionChecker
from mace_ros.core.ik_prior import DEFAULT_WEIGHTS, PRIOR_TIP_LINK, AutoregressiveIKPrior, goal_features
from mace_ros.core.kinematics import JOINT_LOWER, JOINT_UPPER, PandaKinematics
from mace_ros.core.scene import Scene
from mace_ros.core.weights import save_weights


def generate_configurations(
    num_configurations: int, seed: int, device: torch.device, chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Self-collision-free configurations [n, 7] with hand positions [n, 3] and rotations [n, 3, 3].

    Returns also how many uniform draws were needed (the rejection rate goes in the metadata).
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    kinematics = PandaKinematics(device, torch.float32)
    checker = TorchCollisionChecker(device=device, dtype=torch.float32)
    empty_scene = Scene()
    kept: list[torch.Tensor] = []
    count = drawn = 0
    while count < num_configurations:
        q = kinematics.random_configurations(chunk, generator)
        drawn += chunk
        free = ~checker.check(q, empty_scene).self_collision
        kept.append(q[free])
        count += int(free.sum())
    q = torch.cat(kept)[:num_configurations]
    positions, rotations = [], []
    for start in range(0, q.shape[0], chunk):
        position, rotation = kinematics.forward(q[start : start + chunk], PRIOR_TIP_LINK)
        positions.append(position)
        rotations.append(rotation)
    return q, torch.cat(positions), torch.cat(rotations), drawn


def batch_goal_features(position: torch.Tensor, rotation: torch.Tensor, orientation_mask: torch.Tensor) -> torch.Tensor:
    """Goal features where rows with mask False are position-only goals."""
    with_rotation = goal_features(position, rotation)
    without_rotation = goal_features(position, None)
    return torch.where(orientation_mask[:, None], with_rotation, without_rotation)


def evaluate_nll(model: AutoregressiveIKPrior, q: torch.Tensor, position: torch.Tensor, rotation: torch.Tensor, with_orientation: bool) -> float:
    mask = torch.full((q.shape[0],), with_orientation, device=q.device)
    with torch.no_grad():
        return float(-model.log_prob(q, batch_goal_features(position, rotation, mask)).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-configurations", type=int, default=1_000_000)
    parser.add_argument("--held-out", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--schedule-epochs", type=int, default=None,
                        help="epochs of the cosine learning-rate schedule (default: --epochs); lets a shorter run reproduce a cut-off one")
    parser.add_argument("--max-minutes", type=float, default=45.0, help="stop early, after the epoch in progress")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    started = time.monotonic()
    q, position, rotation, drawn = generate_configurations(args.num_configurations + args.held_out, args.seed, device)
    data_seconds = time.monotonic() - started
    print(f"data: {q.shape[0]} self-collision-free of {drawn} drawn in {data_seconds:.1f} s", flush=True)
    train = slice(args.held_out, None)
    test = slice(0, args.held_out)

    model = AutoregressiveIKPrior(JOINT_LOWER, JOINT_UPPER).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    steps_per_epoch = math.ceil(args.num_configurations / args.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=(args.schedule_epochs or args.epochs) * steps_per_epoch)
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)
    q_train, position_train, rotation_train = q[train], position[train], rotation[train]
    epochs_done = 0
    train_nll = float("nan")
    for epoch in range(args.epochs):
        permutation = torch.randperm(q_train.shape[0], generator=generator, device=device)
        running, batches = 0.0, 0
        for start in range(0, q_train.shape[0], args.batch_size):
            index = permutation[start : start + args.batch_size]
            orientation_mask = torch.rand(index.shape[0], generator=generator, device=device) < 0.5
            goal = batch_goal_features(position_train[index], rotation_train[index], orientation_mask)
            loss = -model.log_prob(q_train[index], goal).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.item()
            batches += 1
        train_nll = running / batches
        epochs_done = epoch + 1
        held_out_pose = evaluate_nll(model, q[test], position[test], rotation[test], True)
        held_out_position = evaluate_nll(model, q[test], position[test], rotation[test], False)
        minutes = (time.monotonic() - started) / 60
        print(
            f"epoch {epochs_done}: train NLL {train_nll:.3f}, held-out NLL pose {held_out_pose:.3f} "
            f"position-only {held_out_position:.3f} ({minutes:.1f} min)",
            flush=True,
        )
        if minutes > args.max_minutes:
            print("time limit reached", flush=True)
            break

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    metadata = {
        "model": "AutoregressiveIKPrior(num_components=2, hidden_width=200, hidden_layers=5)",
        "tip_link": PRIOR_TIP_LINK,
        "data": "uniform within Franka's joint limits, self-collision-free (torch sphere model), hand pose by FK",
        "num_training_configurations": args.num_configurations,
        "num_held_out": args.held_out,
        "draws_for_data": drawn,
        "seed": args.seed,
        "epochs": epochs_done,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "command": "python -m mace_ros.core.ik_training " + " ".join(argv if argv is not None else sys.argv[1:]),
        # The same run without the wall-clock cut-off (the only non-deterministic argument).
        "regenerate_command": (
            f"python -m mace_ros.core.ik_training --num-configurations {args.num_configurations} --held-out {args.held_out} "
            f"--epochs {epochs_done} --schedule-epochs {args.schedule_epochs or args.epochs} --seed {args.seed} --max-minutes 1e9"
        ),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "wall_time_s": round(time.monotonic() - started, 1),
        "final_train_nll": train_nll,
        "held_out_nll_pose": evaluate_nll(model, q[test], position[test], rotation[test], True),
        "held_out_nll_position_only": evaluate_nll(model, q[test], position[test], rotation[test], False),
        "git_commit": commit,
    }
    save_weights(model, args.out, metadata, storage_dtype=torch.float32)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
