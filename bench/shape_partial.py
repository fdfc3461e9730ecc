"""Partial-cloud shape completion (the paper's second shape experiment; issue 9 item 6).

Each hidden object (a dense 2048-point cloud, training families or the held-out family) is cut by
`simulators.random_hyperplane_cut` (a random plane near its centre; one side kept); the kept points,
randomly subsampled to at most `--partial-points`, are the observation. Methods, each returning
`--num-samples` full shapes:
- prior: `ShapeEngine` (default config) with tuning_iterations 0;
- MACE: `ShapeEngine` (default config: posterior samples, σ_z ≥ min_std_ratio × the prior's, best θ kept, lr 1e-3,
  the paper's partial_cloud_vae preset N 256, M 128, q 1/32) with `--iterations` iterations;
- IS: `mace.importance_sampling_tune` on the engine's own domain and preset (same lr), given the
  same wall-clock time as MACE's tuning took on that observation, then fresh samples of its θ;
- CVAE: not run. The shipped CVAE is conditioned on the 5 contacts of its finger set only
  (`cvae.ContactCVAE.sample` takes contacts [5, 3]); it has no partial-cloud input.
Reported: the mean score (exp(−τ CD_k), the engine's partial-cloud score) and the mean symmetric
Chamfer distance (m², `chamfer.chamfer_distance`) from each sample to the hidden full cloud.
object_origin is the true bounding-box centre (the frame origin, where `datasets` centres objects);
`--origin centroid` gives the observed points' centroid instead, what a client without the object's
centre might send (the score barely tells the two placements apart: it measures the observed points'
distance to each sample, which a misplaced shape can match as well).

    PYTHONPATH=. .venv/bin/python bench/shape_partial.py --threads 1
    PYTHONPATH=. .venv/bin/python bench/shape_partial.py --threads 1 --engine min_std_ratio=0.8 --out out/partial.json
    PYTHONPATH=. .venv/bin/python bench/shape_partial.py --threads 1 --iterations 100 --timeout 0.3 --out out/partial_0.3.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.engine_settings import engine_settings
from mace_ros.core.mace import importance_sampling_tune
from mace_ros.core.shape.chamfer import chamfer_distance
from mace_ros.core.shape.datasets import FAMILIES, HELD_OUT_FAMILY, generate_tabletop_dataset
from mace_ros.core.shape.simulators import random_hyperplane_cut
from mace_ros.core.shape.training import device_name, git_commit
from mace_ros.core.shape.vae import MaceVAEPrior
from mace_ros.core.shape_engine import ShapeEngine, ShapeRequest

ROOT = Path(__file__).resolve().parents[1]
GROUND_TRUTH_POINTS = 2048
METHODS = ("prior", "mace", "is")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-in-distribution", type=int, default=4)
    parser.add_argument("--num-held-out", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--partial-points", type=int, default=512, help="observed points kept at most (random subset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="MACE's timeout_s (s): short ones show what a request gets with little or no time to tune")
    parser.add_argument("--origin", choices=("true", "centroid"), default="true", help="object_origin sent (the module docstring)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/shape_partial.json")
    parser.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                        help="a ShapeEngine setting instead of its default (repeatable), e.g. min_std_ratio=0.8")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = device_name(torch.device("cpu"))
    command = "PYTHONPATH=. .venv/bin/python bench/shape_partial.py " + " ".join(argv if argv is not None else sys.argv[1:])
    engine = ShapeEngine(engine_settings(args.engine))
    in_distribution, in_families = generate_tabletop_dataset(args.num_in_distribution, GROUND_TRUTH_POINTS, seed=5000 + args.seed)
    held_out, held_families = generate_tabletop_dataset(args.num_held_out, GROUND_TRUTH_POINTS, seed=6000 + args.seed,
                                                        families=[HELD_OUT_FAMILY]) if args.num_held_out else ([], [])
    objects = [("in_distribution", c, FAMILIES[f]) for c, f in zip(in_distribution, in_families)]
    objects += [("held_out", c, FAMILIES[f]) for c, f in zip(held_out, held_families)]
    generator = torch.Generator().manual_seed(args.seed)
    started = time.monotonic()
    rows = []
    for index, (setting, cloud_np, family) in enumerate(objects):
        cloud = torch.from_numpy(cloud_np)
        cut = random_hyperplane_cut(cloud.unsqueeze(0), generator)
        partial = cut.partial(0)
        if partial.shape[0] > args.partial_points:
            partial = partial[torch.randperm(partial.shape[0], generator=generator)[: args.partial_points]]
        seed = args.seed * 1000 + index
        row = {"object": index, "setting": setting, "family": family, "observed_points": int(partial.shape[0]),
               "cut_kept_fraction": float(cut.kept.float().mean())}
        samples: dict[str, torch.Tensor] = {}
        origin = np.zeros(3) if args.origin == "true" else partial.double().mean(0).numpy()
        request = ShapeRequest(contacts=None, partial_cloud=partial.double().numpy(), object_origin=origin,
                               num_samples=args.num_samples, tuning_iterations=0, timeout_s=600.0, random_seed=seed)
        for method, iterations, timeout_s in (("prior", 0, 600.0), ("mace", args.iterations, args.timeout)):
            result = engine.infer(ShapeRequest(**{**request.__dict__, "tuning_iterations": iterations, "timeout_s": timeout_s}))
            if not result.samples.size:
                raise RuntimeError(f"{method} on object {index}: {result.message}")
            samples[method] = torch.from_numpy(result.samples).float()
            row[method] = {"elapsed_s": result.elapsed_s, "tuning_s": result.tuning_time_s,
                           "iterations_done": result.tuning_iterations_done, "message": result.message}
        # IS: the engine's domain and preset, MACE's tuning time.
        domain = engine.build_domain(engine.validate(request))
        prior = MaceVAEPrior(engine.vae, torch.from_numpy(origin).float())
        is_generator = torch.Generator().manual_seed(seed)
        tuned = importance_sampling_tune(prior, domain, engine.tuning_preset(engine.config["partial_cloud_preset"], args.iterations),
                                         deadline_s=row["mace"]["tuning_s"], generator=is_generator)
        with torch.no_grad():
            samples["is"] = prior.sample(args.num_samples, is_generator).float()
        row["is"] = {"tuning_s": tuned.elapsed_s, "iterations_done": tuned.iterations_done}
        truth = cloud.float().unsqueeze(0).expand(args.num_samples, -1, -1)
        for method in METHODS:
            with torch.no_grad():
                row[method]["score"] = float(domain.score(samples[method]).mean())
                chamfers = chamfer_distance(samples[method], truth[: samples[method].shape[0]])
            row[method]["chamfer_m2"] = float(chamfers.mean())
            row[method]["best_chamfer_m2"] = float(chamfers.min())
        rows.append(row)
        print(f"{setting} {family} #{index} ({row['observed_points']} pts): "
              + ", ".join(f"{m} {row[m]['score']:.3f} / {row[m]['chamfer_m2'] * 1e4:.2f} cm²" for m in METHODS)
              + f" (MACE {row['mace']['tuning_s']:.1f} s, {row['mace']['iterations_done']} it; IS {row['is']['iterations_done']} it;"
              f" {(time.monotonic() - started) / 60:.1f} min)", flush=True)
    summary: dict = {}
    for setting in ("in_distribution", "held_out", "all"):
        chosen = [r for r in rows if setting in ("all", r["setting"])]
        if not chosen:
            continue
        entry: dict = {"num_objects": len(chosen)}
        for method in METHODS:
            for key in ("score", "chamfer_m2", "best_chamfer_m2"):
                entry[f"{method}_{key}"] = float(np.mean([r[method][key] for r in chosen]))
        entry["mace_tuning_s"] = float(np.mean([r["mace"]["tuning_s"] for r in chosen]))
        entry["is_iterations"] = float(np.mean([r["is"]["iterations_done"] for r in chosen]))
        summary[setting] = entry
    results = {
        "command": command, "commit": git_commit(), "device": device, "script": "bench/shape_partial.py",
        "cvae": "not run: the shipped CVAE is conditioned on grasp contacts only (no partial-cloud input)",
        "engine_config": dict(engine.config),
        "args": {k: (str(v.resolve().relative_to(ROOT)) if isinstance(v, Path) and v.resolve().is_relative_to(ROOT) else
                     str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "wall_time_s": round(time.monotonic() - started, 1), "summary": summary, "observations": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    for setting, entry in summary.items():
        print(f"{setting} (n={entry['num_objects']}): " + ", ".join(
            f"{m} {entry[f'{m}_score']:.3f} / {entry[f'{m}_chamfer_m2']:.2e} m²" for m in METHODS))
    print(f"wrote {args.out} ({results['wall_time_s']:.0f} s on {device})")


if __name__ == "__main__":
    main()
