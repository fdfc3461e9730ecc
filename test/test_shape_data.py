"""Shape data and simulators: procedural datasets, Chamfer distances, grasp and partial-cloud scores."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("trimesh")

from mace_ros.core.shape import chamfer  # noqa: E402
from mace_ros.core.shape.chamfer import (  # noqa: E402
    chamfer_distance, diverse_selection, knn_chamfer, pairwise_chamfer_diversity)
from mace_ros.core.shape.datasets import (  # noqa: E402
    FAMILIES,
    HELD_OUT_FAMILY,
    MAX_SIZE_M,
    MIN_SIZE_M,
    TRAINING_FAMILIES,
    ShapeDataset,
    generate_box_dataset,
    generate_tabletop_dataset,
    main,
    sample_object,
)
from mace_ros.core.shape.simulators import (  # noqa: E402
    GraspDomain,
    PartialCloudDomain,
    finger_directions,
    grasp_contacts,
    grasp_score,
    partial_cloud_score,
    random_hyperplane_cut,
)


def box_cloud(extents_m: tuple[float, float, float], num_points: int = 2048, seed: int = 0) -> torch.Tensor:
    """A box centred at the origin: points uniform on its faces (sampled by the dataset's own path)."""
    import trimesh

    points, _ = trimesh.sample.sample_surface(trimesh.creation.box(extents=extents_m), num_points, seed=seed)
    return torch.tensor(points, dtype=torch.float64)


# --- datasets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_the_right_size_shape_and_centre(family: str) -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        cloud = sample_object(family, rng, num_points=1024)
        assert cloud.shape == (1024, 3) and cloud.dtype == np.float32
        extents = cloud.max(axis=0) - cloud.min(axis=0)
        assert np.all(extents >= MIN_SIZE_M) and np.all(extents <= MAX_SIZE_M), (family, extents)
        np.testing.assert_allclose((cloud.max(axis=0) + cloud.min(axis=0)) / 2, 0.0, atol=1e-7)


def test_sampling_is_seeded_and_deterministic() -> None:
    first = sample_object("bottle", np.random.default_rng(3))
    again = sample_object("bottle", np.random.default_rng(3))
    other = sample_object("bottle", np.random.default_rng(4))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    clouds, ids = generate_tabletop_dataset(12, 256, seed=5, families=TRAINING_FAMILIES)
    clouds_again, ids_again = generate_tabletop_dataset(12, 256, seed=5, families=TRAINING_FAMILIES)
    np.testing.assert_array_equal(clouds, clouds_again)
    np.testing.assert_array_equal(ids, ids_again)


def test_results_do_not_depend_on_the_number_of_workers() -> None:
    serial = generate_box_dataset(8, 128, seed=2, workers=1)
    parallel = generate_box_dataset(8, 128, seed=2, workers=2)
    np.testing.assert_array_equal(serial, parallel)


def test_tabletop_set_is_balanced_and_excludes_the_held_out_family() -> None:
    assert HELD_OUT_FAMILY in FAMILIES and HELD_OUT_FAMILY not in TRAINING_FAMILIES
    clouds, family_ids = generate_tabletop_dataset(2 * len(TRAINING_FAMILIES), 128, seed=0, families=TRAINING_FAMILIES)
    assert clouds.shape == (2 * len(TRAINING_FAMILIES), 128, 3)
    assert FAMILIES.index(HELD_OUT_FAMILY) not in family_ids
    assert np.all(np.bincount(family_ids, minlength=len(FAMILIES))[[FAMILIES.index(f) for f in TRAINING_FAMILIES]] == 2)
    _, held_out_ids = generate_tabletop_dataset(3, 128, seed=0, families=[HELD_OUT_FAMILY])
    assert np.all(held_out_ids == FAMILIES.index(HELD_OUT_FAMILY))


def test_paper_boxes_are_axis_aligned_with_points_on_faces() -> None:
    clouds = generate_box_dataset(20, 512, seed=1)
    for cloud in clouds:
        half_extents = (cloud.max(axis=0) - cloud.min(axis=0)) / 2
        assert np.all(2 * half_extents >= MIN_SIZE_M - 1e-6) and np.all(2 * half_extents <= MAX_SIZE_M + 1e-6)
        # Every point lies on a face: at least one coordinate at ± the half extent.
        on_face = np.isclose(np.abs(cloud), half_extents, atol=1e-6).any(axis=1)
        assert on_face.all()


def test_command_line_writes_a_loadable_npz(tmp_path) -> None:
    out = tmp_path / "shapes.npz"
    main(["--kind", "tabletop", "--num-objects", "4", "--num-points", "64", "--seed", "3", "--out", str(out)])
    dataset = ShapeDataset.load(out)
    assert dataset.clouds.shape == (4, 64, 3) and dataset.families == FAMILIES
    assert dataset.held_out_family == HELD_OUT_FAMILY and dataset.seed == 3 and dataset.kind == "tabletop"
    np.testing.assert_array_equal(dataset.clouds, generate_tabletop_dataset(4, 64, 3)[0])


# --- Chamfer ----------------------------------------------------------------------------------------


def squared_distance_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def reference_chamfer(a: np.ndarray, b: np.ndarray) -> float:
    distances = squared_distance_matrix(a, b)
    return distances.min(axis=1).mean() + distances.min(axis=0).mean()


def reference_knn_chamfer(observed: np.ndarray, sample: np.ndarray, k: int) -> float:
    return np.sort(squared_distance_matrix(observed, sample), axis=1)[:, :k].mean()


@pytest.fixture
def random_clouds() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (
        0.1 * torch.randn(4, 150, 3, generator=generator, dtype=torch.float64),
        0.1 * torch.randn(4, 90, 3, generator=generator, dtype=torch.float64),
    )


def test_chamfer_matches_brute_force(random_clouds) -> None:
    a, b = random_clouds
    expected = [reference_chamfer(x.numpy(), y.numpy()) for x, y in zip(a, b)]
    np.testing.assert_allclose(chamfer_distance(a, b).numpy(), expected, rtol=1e-12)
    assert torch.allclose(chamfer_distance(a, a), torch.zeros(4, dtype=torch.float64))


def test_knn_chamfer_matches_brute_force(random_clouds) -> None:
    samples, observed = random_clouds
    expected = [reference_knn_chamfer(observed[0].numpy(), sample.numpy(), 5) for sample in samples]
    np.testing.assert_allclose(knn_chamfer(observed[0], samples, k=5).numpy(), expected, rtol=1e-12)
    # A mask counts only the marked observed points.
    mask = torch.zeros(observed.shape[1], dtype=torch.bool)
    mask[:30] = True
    expected = [reference_knn_chamfer(observed[0, :30].numpy(), sample.numpy(), 5) for sample in samples]
    np.testing.assert_allclose(knn_chamfer(observed[0], samples, 5, mask).numpy(), expected, rtol=1e-12)


def test_brute_force_and_kd_tree_neighbour_searches_agree(random_clouds) -> None:
    # CPU uses k-d trees, CUDA the chunked brute force: both must find the same neighbours.
    queries, references = random_clouds
    for k in (1, 5):  # k = 1 takes the argmin path
        torch.testing.assert_close(chamfer._knn_kd_tree(queries, references, k), chamfer._knn_brute_force(queries, references, k))


def test_knn_chamfer_does_not_penalize_the_unobserved_part() -> None:
    whole = box_cloud((0.1, 0.08, 0.06))
    observed = whole[whole[:, 0] > 0]
    assert float(knn_chamfer(observed, whole.unsqueeze(0), k=1)) == 0.0
    assert float(chamfer_distance(observed.unsqueeze(0), whole.unsqueeze(0))) > 1e-4


def test_chamfer_is_differentiable(random_clouds) -> None:
    a, b = random_clouds
    a = a.clone().requires_grad_()
    chamfer_distance(a, b).sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


def test_diversity_is_the_mean_over_pairs(random_clouds) -> None:
    samples, _ = random_clouds
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    expected = np.mean([reference_chamfer(samples[i].numpy(), samples[j].numpy()) for i, j in pairs])
    assert pairwise_chamfer_diversity(samples, max_pairs_per_batch=4) == pytest.approx(expected, rel=1e-12)
    assert pairwise_chamfer_diversity(samples[:1].expand(3, -1, -1)) == 0.0


# --- grasp simulator --------------------------------------------------------------------------------


def test_default_finger_directions() -> None:
    directions = finger_directions(4, dtype=torch.float64)
    torch.testing.assert_close(
        directions, torch.tensor([[-1.0, 0, 0], [0, -1, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.float64), atol=1e-12, rtol=0
    )
    with_top = finger_directions(5, from_above=True, elevation_rad=0.3)
    torch.testing.assert_close(with_top.norm(dim=1), torch.ones(5))
    assert with_top[-1].tolist() == [0.0, 0.0, -1.0] and bool((with_top[:4, 2] < 0).all())


def test_box_contacts_are_on_the_faces() -> None:
    half_extents = torch.tensor([0.05, 0.03, 0.02], dtype=torch.float64)
    cloud = box_cloud(tuple((2 * half_extents).tolist()))
    finger_radius_m = 0.01
    contacts, valid = grasp_contacts(cloud.unsqueeze(0), finger_directions(4, dtype=torch.float64), finger_radius_m=finger_radius_m)
    expected = torch.tensor(
        [[0.05, 0, 0], [0, 0.03, 0], [-0.05, 0, 0], [0, -0.03, 0]], dtype=torch.float64
    )  # fingers start at +x, +y, −x, −y
    assert valid.all()
    torch.testing.assert_close(contacts[0], expected, atol=1e-9, rtol=0)
    # Fingers close on a shifted origin; each contact lies within a finger radius of a cloud point.
    origin = torch.tensor([0.01, -0.005, 0.0], dtype=torch.float64)
    shifted, _ = grasp_contacts(cloud.unsqueeze(0), finger_directions(4, dtype=torch.float64), origin, finger_radius_m)
    torch.testing.assert_close(shifted[0, 0], torch.tensor([0.05, -0.005, 0.0], dtype=torch.float64), atol=1e-9, rtol=0)
    nearest_point_distance = (cloud.unsqueeze(0) - shifted[0].unsqueeze(1)).norm(dim=-1).amin(dim=1)
    assert bool((nearest_point_distance < finger_radius_m).all())


def test_a_finger_that_touches_nothing_is_invalid() -> None:
    cloud = box_cloud((0.1, 0.1, 0.1)) + torch.tensor([0.0, 0.0, 0.2], dtype=torch.float64)  # far above the fingers
    contacts, valid = grasp_contacts(cloud.unsqueeze(0), finger_directions(4, dtype=torch.float64))
    assert not valid.any() and torch.isnan(contacts).all()


def test_grasp_scores_are_one_for_a_match_and_zero_beyond_the_length_scale() -> None:
    length_scale_m = 0.05
    observed = torch.tensor([[0.05, 0, 0], [0, 0.03, 0], [-0.05, 0, 0], [0, -0.03, 0]])
    offsets = torch.tensor([0.0, 0.01, 0.05, 0.08]).reshape(4, 1, 1) * torch.tensor([1.0, 0, 0])
    contacts = observed.unsqueeze(0) + offsets
    valid = torch.ones(4, 4, dtype=torch.bool)
    scores = grasp_score(contacts, valid, observed, length_scale_m)
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.8, 0.0, 0.0]))
    # One missed finger of four costs a quarter; both missing the same finger agree.
    valid[0, 1] = False
    assert float(grasp_score(contacts, valid, observed, length_scale_m)[0]) == pytest.approx(0.75)
    observed_missed = observed.clone()
    observed_missed[1] = math.nan
    assert float(grasp_score(contacts, valid, observed_missed, length_scale_m)[0]) == pytest.approx(1.0)


def test_grasp_domain_scores_the_ground_truth_highest() -> None:
    truth = box_cloud((0.1, 0.06, 0.04)).float()
    domain = GraspDomain.from_ground_truth(truth, finger_directions(5))
    candidates = torch.stack(
        [box_cloud((0.1, 0.06, 0.04), seed=1), box_cloud((0.14, 0.1, 0.04), seed=2), box_cloud((0.04, 0.04, 0.04), seed=3)]
    ).float()
    scores = domain.score(candidates)
    assert scores.shape == (3,) and bool(((scores >= 0) & (scores <= 1)).all())
    assert float(scores[0]) > 0.95 and float(scores[0]) > float(scores[1]) > 0 and float(scores[0]) > float(scores[2])
    assert domain.simulate(candidates).shape == (3, 5, 3)


# --- partial-cloud simulator ------------------------------------------------------------------------


def test_hyperplane_cut_keeps_one_side() -> None:
    clouds = torch.stack([box_cloud((0.1, 0.08, 0.06), seed=s) for s in range(6)])
    cut = random_hyperplane_cut(clouds, torch.Generator().manual_seed(0))
    centres = (clouds.amin(dim=1) + clouds.amax(dim=1)) / 2
    heights = ((clouds - centres.unsqueeze(1)) * cut.normals.unsqueeze(1)).sum(-1) - cut.offsets_m.unsqueeze(1)
    assert bool((heights[cut.kept] >= 0).all()) and bool((heights[~cut.kept] < 0).all())
    kept_fraction = cut.kept.double().mean(dim=1)
    assert bool(((kept_fraction > 0.2) & (kept_fraction < 0.8)).all())
    assert cut.partial(2).shape == (int(cut.kept[2].sum()), 3)
    torch.testing.assert_close(cut.normals.norm(dim=1), torch.ones(6, dtype=torch.float64))


def test_partial_cloud_score() -> None:
    whole = box_cloud((0.1, 0.08, 0.06)).float()
    observed = random_hyperplane_cut(whole.unsqueeze(0), torch.Generator().manual_seed(1)).partial(0)
    candidates = torch.stack([whole, box_cloud((0.1, 0.08, 0.06), seed=5).float(), box_cloud((0.2, 0.2, 0.2)).float()])
    scores = partial_cloud_score(observed, candidates, temperature=5000.0, k=1)
    assert float(scores[0]) == 1.0  # the cloud the observation was cut from
    assert 0.5 < float(scores[1]) < 1.0 and float(scores[2]) < 0.01
    domain_scores = PartialCloudDomain(observed, temperature=5000.0, k=5).score(candidates)
    assert bool(((domain_scores > 0) & (domain_scores <= 1)).all()) and float(domain_scores[1]) > float(domain_scores[2])
    # Capped terms: a sample that no observed point comes within the cap of scores 0 (it was exp(-τ cap²) > 0,
    # so "no sample fits" could never be answered for a partial cloud); one within reach keeps its score.
    far = whole + torch.tensor([0.3, 0.0, 0.0])
    near = whole + torch.tensor([0.03, 0.0, 0.0])
    capped = partial_cloud_score(observed, torch.stack([whole, far, near]), 5000.0, 5, 0.05)
    assert float(capped[1]) == 0.0 and float(capped[0]) > 0.9 and float(capped[2]) > 0.0
    assert float(partial_cloud_score(observed, (whole + 0.07)[None], 5000.0, 5)[0]) > 0.0  # no cap: not 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(random_clouds) -> None:
    a, b = random_clouds
    cuda = torch.device("cuda")
    torch.testing.assert_close(chamfer_distance(a.to(cuda), b.to(cuda)).cpu(), chamfer_distance(a, b))
    torch.testing.assert_close(knn_chamfer(b[0].to(cuda), a.to(cuda)).cpu(), knn_chamfer(b[0], a))
    directions = finger_directions(5, dtype=torch.float64)
    cpu_contacts, cpu_valid = grasp_contacts(a, directions, finger_radius_m=0.05)
    cuda_contacts, cuda_valid = grasp_contacts(a.to(cuda), directions.to(cuda), finger_radius_m=0.05)
    torch.testing.assert_close(cuda_contacts.cpu(), cpu_contacts, equal_nan=True)
    assert torch.equal(cuda_valid.cpu(), cpu_valid)


def test_diverse_selection_keeps_a_ruled_out_draw_only_when_nothing_consistent_is_left() -> None:
    """A draw scoring 0 lies far from the consistent ones, so by diversity it was picked (an answer held a
    25 cm-wide shape for a 6 cm grasp): now only once every draw scoring above 0 is chosen."""
    generator = torch.Generator().manual_seed(4)
    unit = torch.nn.functional.normalize(torch.randn(128, 3, generator=generator, dtype=torch.float64), dim=1)
    consistent = [(0.03 + 0.001 * index) * unit for index in range(6)]
    samples = torch.stack(consistent + [0.25 * unit, 0.3 * unit])
    scores = torch.tensor([0.9, 0.89, 0.88, 0.87, 0.86, 0.85, 0.0, 0.0], dtype=torch.float64)
    assert max(diverse_selection(samples, scores, 6, 5.0).tolist()) < 6
    assert sorted(diverse_selection(samples, scores, 7, 5.0).tolist())[:6] == list(range(6))
    assert set(diverse_selection(samples, torch.zeros(8, dtype=torch.float64), 3, 5.0).tolist()) <= set(range(8))


def test_diverse_selection_spreads_over_distinct_shapes_that_score_almost_as_well(monkeypatch) -> None:
    """Ten near-copies of one sphere score highest, ten spheres of other radii a little lower: by score
    alone the copies are kept; with a diversity weight the other shapes come in, the best one first, and
    the kept set is more diverse at a small cost in score."""
    generator = torch.Generator().manual_seed(3)
    unit = torch.nn.functional.normalize(torch.randn(256, 3, generator=generator, dtype=torch.float64), dim=1)
    copies = [0.05 * unit + 1e-4 * torch.randn(256, 3, generator=generator, dtype=torch.float64) for _ in range(10)]
    others = [(0.02 + 0.01 * index) * unit for index in range(10)]
    samples = torch.stack(copies + others)
    scores = torch.cat([0.9 + 0.001 * torch.arange(10, dtype=torch.float64), torch.full((10,), 0.85, dtype=torch.float64)])
    by_score = diverse_selection(samples, scores, 6, 0.0)
    assert sorted(by_score.tolist()) == list(range(4, 10))
    spread = diverse_selection(samples, scores, 6, 0.5)
    assert spread[0] == 9 and len(set(spread.tolist())) == 6 and any(index >= 10 for index in spread.tolist())
    assert pairwise_chamfer_diversity(samples[spread]) > 10 * pairwise_chamfer_diversity(samples[by_score])
    assert float(scores[spread].mean()) > 0.85
    # Past its deadline it keeps the best-scoring one and fills the rest by score.
    assert diverse_selection(samples, scores, 6, 0.5, deadline_at=0.0).tolist() == by_score.tolist()
    assert diverse_selection(samples, scores, 50, 0.5).tolist() == torch.argsort(scores, descending=True).tolist()
    # Distances computed in chunks of candidates choose the same.
    monkeypatch.setattr(chamfer, "SELECTION_CHUNK", 3)
    assert diverse_selection(samples, scores, 6, 0.5).tolist() == spread.tolist()
    # A deadline that passes during one pass over the candidates stops it between chunks.
    calls = {"count": 0}

    def clock() -> float:
        calls["count"] += 1
        return 0.0 if calls["count"] <= 3 else 10.0

    monkeypatch.setattr(chamfer.time, "monotonic", clock)
    stopped = diverse_selection(samples, scores, 6, 0.5, deadline_at=5.0)
    assert stopped.tolist() == by_score.tolist() and calls["count"] == 4
