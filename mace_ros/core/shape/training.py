"""Train the shape VAE prior (or the contact-conditioned CVAE baseline) and write the shipped weights.

    # the paper's setting (needs a GPU: ~2 s per 10K-object epoch on an H100, 35 min on this CPU)
    python -m mace_ros.core.shape.training --model vae --dataset tabletop --device cuda
    # the reduced CPU preset the shipped weights come from when no GPU was available
    python -m mace_ros.core.shape.training --model vae --dataset tabletop --reduced --max-minutes 35

Loss: β_rec · CD_sum + β_KL · KL(q(z|x) || N(0, σ_z² I)), the paper's β_rec 50, β_KL 1, σ_z 0.2, Adam
5e-4, batch 64. CD_sum is the squared Chamfer distance in network units (metres / scale_m) summed
over the paper's 2048 points, i.e. `chamfer_distance` (a per-point mean) × 2048: the authors' code
sums over points, and keeping that fixed factor when a reduced model has fewer points keeps the
reconstruction/KL balance of the paper whatever the point count.

Reduced preset (DESIGN §5, "Training cost"): 512 points per cloud, the encoder sees a random
256-point subset of each training cloud (its cost dominates on CPU; max-pooling makes PointNet
indifferent to the subset), 4000 objects, as many epochs as fit in --max-minutes.

After every epoch the VAE's sampling prior is fitted to the aggregate posterior of the first
--prior-fit-objects training objects (vae.LatentPriorFit explains why; the CVAE keeps N(0, σ_z² I)).

Datasets are generated with `mace_ros.core.shape.datasets` and cached as npz under data/.
Weights are rewritten after every epoch, so a stopped run still leaves usable weights.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mace_ros.core.shape.chamfer import chamfer_distance
from mace_ros.core.shape.cvae import DEFAULT_CVAE_WEIGHTS, PAPER_NUM_FINGERS, ContactCVAE, contact_features
from mace_ros.core.shape.datasets import FAMILIES, HELD_OUT_FAMILY, TRAINING_FAMILIES, ShapeDataset, generate_box_dataset, generate_tabletop_dataset
from mace_ros.core.shape.vae import DEFAULT_LATENT_DIM, DEFAULT_SCALE_M, DEFAULT_VAE_WEIGHTS, PAPER_PRIOR_STD, PointCloudVAE
from mace_ros.core.shape.simulators import finger_directions, grasp_contacts
from mace_ros.core.shape_engine import density_matched_finger_radius
from mace_ros.core.weights import save_weights

PAPER_CHAMFER_POINTS = 2048
REPOSITORY_ROOT = Path(__file__).resolve().parents[3]
DATA_CACHE_DIR = REPOSITORY_ROOT / "data"


@dataclass(frozen=True)
class TrainingPreset:
    num_objects: int
    num_points: int
    encoder_points: int
    epochs: int


PRESETS = {
    # Authors' config: 2048 points, 2000 epochs (their ShapeNet class has a few thousand objects).
    "paper": TrainingPreset(num_objects=10000, num_points=2048, encoder_points=2048, epochs=2000),
    "reduced": TrainingPreset(num_objects=4000, num_points=512, encoder_points=256, epochs=1000),
}
VALIDATION_OBJECTS = 256


@dataclass(frozen=True)
class ConditionSet:
    """Per-object model inputs besides the cloud (the CVAE's contacts), by split; empty for the VAE."""

    train: dict[str, torch.Tensor]
    validation: dict[str, torch.Tensor]
    held_out: dict[str, torch.Tensor]
    metadata: dict

    @staticmethod
    def none() -> "ConditionSet":
        return ConditionSet({}, {}, {}, {})

    def train_batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: value[index] for name, value in self.train.items()}


def load_or_generate(kind: str, num_objects: int, num_points: int, seed: int, families: Sequence[str], cache_dir: Path) -> ShapeDataset:
    """The dataset from data/ if generated before with the same arguments, else generated and cached."""
    family_tag = "-".join(families) if kind == "tabletop" else "paper_box"
    path = cache_dir / f"shapes_{kind}_{family_tag}_{num_objects}x{num_points}_seed{seed}.npz"
    if path.is_file():
        return ShapeDataset.load(path)
    if kind == "tabletop":
        clouds, family_ids = generate_tabletop_dataset(num_objects, num_points, seed, families)
    else:
        clouds = generate_box_dataset(num_objects, num_points, seed)
        family_ids = np.full(num_objects, FAMILIES.index("box"), dtype=np.int64)
    dataset = ShapeDataset(clouds, family_ids, FAMILIES, seed, HELD_OUT_FAMILY, kind)
    dataset.save(path)
    return dataset


def contact_conditions(
    train_clouds: torch.Tensor, validation_clouds: torch.Tensor, held_out_clouds: torch.Tensor, scale_m: float
) -> ConditionSet:
    """The CVAE's conditions: each object's contacts with the paper's finger set, from the grasp simulator.

    Clouds are in network units; the simulator works in metres, with the finger radius matched to
    the clouds' point density as the engine does.
    """
    num_points = train_clouds.shape[1]
    directions = finger_directions(PAPER_NUM_FINGERS, dtype=train_clouds.dtype, device=train_clouds.device)
    radius_m = density_matched_finger_radius(num_points)

    def features(clouds: torch.Tensor) -> torch.Tensor:
        contacts = torch.cat([grasp_contacts(chunk * scale_m, directions, None, radius_m)[0] for chunk in clouds.split(256)])
        return contact_features(contacts, None, scale_m)

    metadata = {
        "num_contacts": PAPER_NUM_FINGERS,
        "finger_directions": directions.tolist(),
        "finger_radius_m": radius_m,
    }
    return ConditionSet(
        {"condition": features(train_clouds)},
        {"condition": features(validation_clouds)},
        {"condition": features(held_out_clouds)},
        metadata,
    )


def random_point_subset(clouds: torch.Tensor, num_points: int, generator: torch.Generator) -> torch.Tensor:
    if num_points >= clouds.shape[1]:
        return clouds
    index = torch.randperm(clouds.shape[1], generator=generator, device=generator.device)[:num_points].to(clouds.device)
    return clouds[:, index]


def evaluate_reconstruction(model: torch.nn.Module, clouds: torch.Tensor, scale_m: float, batch_size: int = 64, **condition) -> float:
    """Mean Chamfer distance (m², per-point mean) between clouds and their posterior-mean reconstructions."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, clouds.shape[0], batch_size):
            batch = clouds[start : start + batch_size]
            extra = {name: value[start : start + batch_size] for name, value in condition.items()}
            reconstructions = model.reconstruct(batch, **extra)
            total += float(chamfer_distance(reconstructions, batch).sum())
    model.train()
    return total / clouds.shape[0] * scale_m**2


def fit_latent_prior(model: PointCloudVAE, clouds: torch.Tensor, batch_size: int = 256) -> None:
    """Fit the VAE's sampling prior to the aggregate posterior of `clouds` (see vae.LatentPriorFit)."""
    model.eval()
    means, log_variances = [], []
    with torch.no_grad():
        for start in range(0, clouds.shape[0], batch_size):
            mean, log_variance = model.encode(clouds[start : start + batch_size])
            means.append(mean)
            log_variances.append(log_variance)
    model.latent_prior_fit.fit(torch.cat(means), torch.cat(log_variances))
    model.train()


def git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPOSITORY_ROOT)
    return result.stdout.strip()


def device_name(device: torch.device) -> str:
    """What the run computed on, for metadata and benchmark outputs."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.machine()
    cpu_info = Path("/proc/cpuinfo")
    for line in cpu_info.read_text().splitlines() if cpu_info.is_file() else []:
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"cpu: {model}, {torch.get_num_threads()} thread(s) of {os.cpu_count()}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("vae", "cvae"), default="vae")
    parser.add_argument("--dataset", choices=("tabletop", "boxes"), default="tabletop")
    parser.add_argument("--reduced", action="store_true", help="the CPU preset (512 points, 4000 objects)")
    parser.add_argument("--num-objects", type=int, help="training objects (default: from the preset)")
    parser.add_argument("--num-points", type=int, help="points per cloud (default: from the preset)")
    parser.add_argument("--encoder-points", type=int, help="points the encoder sees per training cloud")
    parser.add_argument("--epochs", type=int, help="default: from the preset")
    parser.add_argument("--max-minutes", type=float, default=55.0, help="stop after the epoch that passes this")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--beta-rec", type=float, default=50.0)
    parser.add_argument("--beta-kl", type=float, default=1.0)
    parser.add_argument("--latent-dim", type=int, default=DEFAULT_LATENT_DIM)
    parser.add_argument("--prior-std", type=float, default=PAPER_PRIOR_STD)
    parser.add_argument("--scale-m", type=float, default=DEFAULT_SCALE_M)
    parser.add_argument("--prior-fit-objects", type=int, default=2048, help="training objects the latent prior is fitted to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-dir", type=Path, default=DATA_CACHE_DIR)
    parser.add_argument("--out", type=Path, help="default: mace_ros/core/data/shape_<model>.safetensors")
    args = parser.parse_args(argv)

    preset = PRESETS["reduced" if args.reduced else "paper"]
    num_objects = args.num_objects or preset.num_objects
    num_points = args.num_points or preset.num_points
    encoder_points = args.encoder_points or min(preset.encoder_points, num_points)
    epochs = args.epochs or preset.epochs
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    started = time.monotonic()
    commit = git_commit()  # the code this run started from (others may commit while it trains)

    families = TRAINING_FAMILIES if args.dataset == "tabletop" else ("box",)
    dataset = load_or_generate(args.dataset, num_objects + VALIDATION_OBJECTS, num_points, args.seed, families, args.data_dir)
    held_out = load_or_generate("tabletop", VALIDATION_OBJECTS, num_points, args.seed + 1, (HELD_OUT_FAMILY,), args.data_dir)
    clouds = torch.from_numpy(dataset.clouds).to(device) / args.scale_m
    train_clouds, validation_clouds = clouds[VALIDATION_OBJECTS:], clouds[:VALIDATION_OBJECTS]
    held_out_clouds = torch.from_numpy(held_out.clouds).to(device) / args.scale_m
    print(f"data: {train_clouds.shape[0]} training objects x {num_points} points ({time.monotonic() - started:.1f} s)", flush=True)

    if args.model == "vae":
        model = PointCloudVAE(num_points, args.latent_dim, args.prior_std, args.scale_m, encoder_points).to(device)
        conditions = ConditionSet.none()
        out = args.out or DEFAULT_VAE_WEIGHTS
    else:
        conditions = contact_conditions(train_clouds, validation_clouds, held_out_clouds, args.scale_m)
        model = ContactCVAE(num_points, PAPER_NUM_FINGERS, args.latent_dim, args.prior_std, args.scale_m, encoder_points).to(device)
        out = args.out or DEFAULT_CVAE_WEIGHTS

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    generator = torch.Generator(device=device).manual_seed(args.seed + 2)
    command = "python -m mace_ros.core.shape.training " + " ".join(argv if argv is not None else sys.argv[1:])
    history: list[dict[str, float]] = []
    for epoch in range(epochs):
        permutation = torch.randperm(train_clouds.shape[0], generator=generator, device=device)
        sums = {"loss": 0.0, "chamfer_m2": 0.0, "kl": 0.0}
        batches = 0
        for start in range(0, train_clouds.shape[0], args.batch_size):
            index = permutation[start : start + args.batch_size]
            targets = train_clouds[index]
            inputs = random_point_subset(targets, encoder_points, generator)
            reconstructions, kl = model(inputs, generator=generator, **conditions.train_batch(index))
            chamfer = chamfer_distance(reconstructions, targets)
            loss = (args.beta_rec * chamfer * PAPER_CHAMFER_POINTS + args.beta_kl * kl).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums["loss"] += float(loss.detach())
            sums["chamfer_m2"] += float(chamfer.detach().mean()) * args.scale_m**2
            sums["kl"] += float(kl.detach().mean())
            batches += 1
        record = {name: value / batches for name, value in sums.items()}
        record["validation_chamfer_m2"] = evaluate_reconstruction(model, validation_clouds, args.scale_m, **conditions.validation)
        record["held_out_family_chamfer_m2"] = evaluate_reconstruction(model, held_out_clouds, args.scale_m, **conditions.held_out)
        if args.model == "vae":
            fit_latent_prior(model, train_clouds[: args.prior_fit_objects])
        minutes = (time.monotonic() - started) / 60
        history.append(record)
        print(
            f"epoch {epoch + 1}: loss {record['loss']:.2f}, train CD {record['chamfer_m2']:.3e} m², KL {record['kl']:.1f}, "
            f"validation CD {record['validation_chamfer_m2']:.3e} m², {HELD_OUT_FAMILY} CD "
            f"{record['held_out_family_chamfer_m2']:.3e} m² ({minutes:.1f} min)",
            flush=True,
        )
        metadata = {
            "model": args.model,
            "architecture": type(model).__name__,
            "dataset_kind": args.dataset,
            "families": list(families),
            "held_out_family": HELD_OUT_FAMILY,
            "num_objects": int(train_clouds.shape[0]),
            "num_validation_objects": VALIDATION_OBJECTS,
            "num_points": num_points,
            "encoder_points": encoder_points,
            "latent_dim": args.latent_dim,
            "prior_std": args.prior_std,
            "scale_m": args.scale_m,
            "preset": "reduced" if args.reduced else "paper",
            "seed": args.seed,
            "command": command,
            # The same run with the epoch count fixed (--max-minutes depends on the machine's speed).
            "regenerate_command": f"{command} --epochs {epoch + 1} --max-minutes inf",
            "epochs": epoch + 1,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "beta_rec": args.beta_rec,
            "beta_kl": args.beta_kl,
            "final_train_chamfer_m2": record["chamfer_m2"],
            "final_train_kl": record["kl"],
            "final_validation_chamfer_m2": record["validation_chamfer_m2"],
            "final_held_out_family_chamfer_m2": record["held_out_family_chamfer_m2"],
            **({"latent_prior_fit_objects": min(args.prior_fit_objects, int(train_clouds.shape[0]))} if args.model == "vae" else {}),
            "chamfer_convention": "squared distances, per-point means, both directions summed (m²)",
            "device": device_name(device),
            "wall_time_s": round(time.monotonic() - started, 1),
            "git_commit": commit,
            **conditions.metadata,
        }
        save_weights(model, out, metadata, storage_dtype=torch.float16)
        if minutes > args.max_minutes:
            print("time limit reached", flush=True)
            break
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
