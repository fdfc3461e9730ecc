"""Chamfer distances between point clouds, batched and chunked (device and dtype follow the inputs).

Convention: distances are SQUARED Euclidean (m² for metric clouds), averaged over points (not
summed), so values do not depend on how many points a cloud has:

    CD(A, B)   = mean_{a∈A} min_{b∈B} ‖a − b‖² + mean_{b∈B} min_{a∈A} ‖a − b‖²
    CD_k(O, X) = mean_{o∈O} (1/k) Σ_{x ∈ kNN_X(o)} ‖o − x‖²           (one-sided, observed → sample)

Neighbour search runs without gradients: on CPU with scipy's k-d trees (O(N log N); ~10x faster
than brute force for 2048-point clouds on one core), elsewhere (CUDA) by brute force over chunks of
query points, because full (B, N, M) distance tensors do not fit in memory for 64 pairs of
2048-point clouds (1 GiB in float32). The distances to the chosen neighbours are then recomputed as
plain differences: exact, differentiable (the Chamfer loss of VAE training), O(B·N) memory.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from scipy.spatial import cKDTree

# Elements of one chunk's distance tensor in the brute-force search: 2^25 float32 = 128 MiB.
_MAX_CHUNK_ELEMENTS = 1 << 25


def _squared_distances(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """‖q − r‖² for queries [B, n, 3] and references [B, m, 3] -> [B, n, m], for neighbour search.

    Expanded as ‖q‖² + ‖r‖² − 2 q·r: one matrix product instead of a [B, n, m, 3] difference
    tensor. Its float32 round-off (~1e-9 m² within 0.25 m of the origin) is far below the
    nearest-neighbour distances of a 2048-point object (~1e-5 m²); it only decides which neighbour
    is chosen, never the returned distance.
    """
    cross = torch.baddbmm(references.square().sum(-1).unsqueeze(1), queries, references.transpose(1, 2), alpha=-2)
    return cross + queries.square().sum(-1, keepdim=True)


def _knn_brute_force(queries: torch.Tensor, references: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, n, k] of each query's k nearest references, chunked over queries."""
    rows = max(1, _MAX_CHUNK_ELEMENTS // max(1, queries.shape[0] * references.shape[1]))

    def nearest(distances: torch.Tensor) -> torch.Tensor:
        # argmin for the nearest one: a CUDA top-k runs several radix passes (~0.6 ms per call on an H200).
        return distances.argmin(dim=2, keepdim=True) if k == 1 else distances.topk(k, dim=2, largest=False).indices

    return torch.cat([nearest(_squared_distances(chunk, references)) for chunk in queries.split(rows, dim=1)], dim=1)


def _knn_kd_tree(queries: torch.Tensor, references: torch.Tensor, k: int) -> torch.Tensor:
    """Same as `_knn_brute_force`, for CPU tensors, one k-d tree per batch element."""
    query_points = queries.detach().to(torch.float64).numpy()
    reference_points = references.detach().to(torch.float64).numpy()
    indices = np.stack(
        [cKDTree(reference).query(query, k=k)[1].reshape(len(query), k) for query, reference in zip(query_points, reference_points)]
    )
    return torch.from_numpy(indices.astype(np.int64))


def _knn_indices(queries: torch.Tensor, references: torch.Tensor, k: int) -> torch.Tensor:
    with torch.no_grad():
        if queries.device.type == "cpu":
            return _knn_kd_tree(queries, references, k)
        return _knn_brute_force(queries, references, k)


def _gather_points(cloud: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """cloud [B, M, 3], indices [B, ...] -> the indexed points [B, ..., 3]."""
    flat = indices.reshape(indices.shape[0], -1, 1).expand(-1, -1, 3)
    return cloud.gather(1, flat).reshape(*indices.shape, 3)


def _check_clouds(name: str, cloud: torch.Tensor) -> None:
    if cloud.dim() != 3 or cloud.shape[2] != 3:
        raise ValueError(f"expected {name} as clouds [B, N, 3], got {tuple(cloud.shape)}")


def chamfer_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Symmetric Chamfer distance (see the module docstring) of a [B, N, 3] and b [B, M, 3] -> [B]."""
    _check_clouds("a", a)
    _check_clouds("b", b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"batch sizes differ: {a.shape[0]} and {b.shape[0]}")
    a_to_b = (a - _gather_points(b, _knn_indices(a, b, 1)[..., 0])).square().sum(-1).mean(dim=1)
    b_to_a = (b - _gather_points(a, _knn_indices(b, a, 1)[..., 0])).square().sum(-1).mean(dim=1)
    return a_to_b + b_to_a


def knn_chamfer(
    observed: torch.Tensor,
    samples: torch.Tensor,
    k: int = 5,
    observed_mask: torch.Tensor | None = None,
    max_distance_m: float | None = None,
) -> torch.Tensor:
    """The paper's k-nearest Chamfer distance CD_k of a partial observation to full samples -> [B].

    observed: [K, 3] (one observation for every sample) or [B, K, 3]; samples: [B, N, 3];
    observed_mask: optional bool [K] or [B, K] marking which observed points count (for padded,
    batched partial clouds; every row needs at least one True).

    For each observed point, the mean squared distance to its k nearest sample points; averaged over
    observed points. Why one-sided: the observation is a partial cloud (a hyperplane cut, a camera's
    view) while samples are whole objects, so sample points with no observed point nearby are the
    unobserved part of the object and must not be penalized. Why k neighbours rather than one: with
    k = 1 a sample can match with a single stray point near each observed point; averaging over k
    neighbours asks the sample's surface to be there with its usual density (the authors' public
    `chamfer_dist(..., k)` averages over the k nearest points the same way). Per-point means (not the
    authors' sums) keep a temperature meaningful whatever the number of observed points.

    `max_distance_m` caps each observed point's term at its square: a sensor's stray points (a few at
    0.6 m from the object) then cost every sample alike instead of rewarding samples stretched toward them.
    """
    _check_clouds("samples", samples)
    if not 1 <= k <= samples.shape[1]:
        raise ValueError(f"k must be in [1, {samples.shape[1]}], got {k}")
    batch_size = samples.shape[0]
    observed = observed.to(samples)
    if observed.dim() == 2:
        observed = observed.unsqueeze(0)
    observed = observed.expand(batch_size, -1, -1)
    neighbours = _knn_indices(observed, samples, k)  # [B, K, k]
    knn_means = (observed.unsqueeze(2) - _gather_points(samples, neighbours)).square().sum(-1).mean(dim=2)
    if max_distance_m is not None:
        knn_means = knn_means.clamp_max(max_distance_m ** 2)
    if observed_mask is None:
        return knn_means.mean(dim=1)
    weights = observed_mask.to(device=samples.device, dtype=samples.dtype).expand(batch_size, -1)
    return (knn_means * weights).sum(dim=1) / weights.sum(dim=1)


def pairwise_chamfer_diversity(samples: torch.Tensor, max_pairs_per_batch: int = 64) -> float:
    """Mean symmetric Chamfer distance over all pairs i < j of samples [n, N, 3] (the diversity metric)."""
    _check_clouds("samples", samples)
    if samples.shape[0] < 2:
        raise ValueError("diversity needs at least two clouds")
    first, second = torch.triu_indices(samples.shape[0], samples.shape[0], offset=1, device=samples.device)
    total = samples.new_zeros(())
    with torch.no_grad():
        for first_chunk, second_chunk in zip(first.split(max_pairs_per_batch), second.split(max_pairs_per_batch)):
            total += chamfer_distance(samples[first_chunk], samples[second_chunk]).sum()
    return float(total / first.numel())


# Points per cloud in diverse_selection's distances: a fixed random subset (decoders may order their
# points by region). 64: ~0.3 s for 49 of 392 candidates on one CPU core (128: 1.3 s).
SELECTION_DISTANCE_POINTS = 64
SELECTION_CHUNK = 512  # candidates per distance computation: 512 x 64 x 64 float32 = 8 MB


def diverse_selection(
    samples: torch.Tensor, scores: torch.Tensor, count: int, diversity_weight: float, deadline_at: float | None = None,
    checkpoint: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Indices of `count` of `samples` [M, N, 3], chosen greedily by score plus diversity (maximal
    marginal relevance): first the best-scoring one, then each time the candidate maximising
    score + diversity_weight * (its Chamfer distance to the nearest one chosen) / (the mean distance
    of the candidates to the first), among those scoring above 0 while any is left. Weight 0 is the
    `count` best-scoring ones.

    Near-copies of a chosen shape gain nothing, so among shapes consistent with an observation the
    set spreads over the different ones instead of the most frequent. Distances use
    SELECTION_DISTANCE_POINTS points of each cloud. Once `deadline_at` (time.monotonic()) passes, the
    rest is filled by score. `checkpoint()` runs between chunks of distances; an exception it raises
    (e.g. a cancel) propagates.
    """
    count = min(count, samples.shape[0])
    by_score = torch.argsort(scores, descending=True)
    if diversity_weight <= 0.0 or count >= samples.shape[0] or count == 0:
        return by_score[:count]
    generator = torch.Generator().manual_seed(0)
    subset = torch.randperm(samples.shape[1], generator=generator)[:SELECTION_DISTANCE_POINTS].to(samples.device)
    clouds = samples[:, subset]
    chosen = torch.zeros(samples.shape[0], dtype=torch.bool, device=samples.device)
    order = [int(by_score[0])]
    chosen[order[0]] = True

    def filled_by_score() -> torch.Tensor:
        rest = by_score[~chosen[by_score]][: count - len(order)]
        return torch.cat([torch.tensor(order, dtype=torch.long, device=samples.device), rest])

    chunk_s = [0.0]  # the slowest chunk of distances so far

    def distances_to(index: int) -> torch.Tensor | None:
        """Chamfer distances of every candidate to candidate `index`, by brute force (small clouds), in
        chunks of candidates so that thousands of draws need no more than a few MB at a time; None once
        the deadline passes, checked between chunks: one pass over 16k candidates took ~0.3 s on the
        2-core development CPU, a chunk ~10 ms."""
        parts = []
        with torch.no_grad():
            for chunk in clouds.split(SELECTION_CHUNK):
                # Not started when it would end past the deadline at the last chunk's pace.
                if deadline_at is not None and time.monotonic() + chunk_s[0] >= deadline_at:
                    return None
                if checkpoint is not None:
                    checkpoint()
                chunk_started = time.monotonic()
                squared = _squared_distances(clouds[index].expand_as(chunk), chunk).clamp_min(0.0)
                parts.append(squared.amin(dim=2).mean(dim=1) + squared.amin(dim=1).mean(dim=1))
                chunk_s[0] = max(chunk_s[0], time.monotonic() - chunk_started)
        return torch.cat(parts)

    nearest = distances_to(order[0])
    if nearest is None:
        return filled_by_score()
    scale = nearest.mean().clamp_min(torch.finfo(nearest.dtype).tiny)
    # A draw the observation rules out (score 0) is far from every consistent one, so diversity alone
    # would pick it: it is kept only once no consistent draw is left.
    ruled_out = scores <= 0
    ruled_out_host = ruled_out.cpu().numpy()  # read per chosen index: one copy, not a sync each
    consistent_left = int((~ruled_out_host).sum()) - int(not ruled_out_host[order[0]])
    while len(order) < count:
        value = scores.to(nearest.dtype) + diversity_weight * nearest / scale
        value[chosen] = -torch.inf
        if consistent_left > 0:
            value[ruled_out] = -torch.inf
        index = int(torch.argmax(value))
        consistent_left -= int(not ruled_out_host[index])
        order.append(index)
        chosen[index] = True
        if len(order) == count:
            break
        distances = distances_to(index)
        if distances is None:
            return filled_by_score()
        nearest = torch.minimum(nearest, distances)
    return torch.tensor(order, dtype=torch.long, device=samples.device)
