"""`python -m mace_ros shape --output`: the samples written as NPZ and PLY."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mace_ros.__main__ import main, write_shapes

CONTACTS = "0,0.04,0;0,-0.04,0"  # a Panda hand grasp (the default fingers)


def read_ply(path):
    """(header lines, vertices) of a binary little-endian PLY as write_shapes writes it."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    types = {"float": "<f4", "uint": "<u4"}
    dtype = [(line.split()[2], types[line.split()[1]]) for line in header if line.startswith("property")]
    count = int(next(line for line in header if line.startswith("element vertex")).split()[2])
    vertices = np.frombuffer(data[end:], dtype=dtype)
    assert vertices.shape[0] == count
    return header, vertices


def test_write_shapes_npz_and_ply_hold_every_sample(tmp_path):
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(3, 5, 3)).astype(np.float32)
    scores = np.array([0.9, 0.5, 0.1])
    contacts, origin = np.zeros((2, 3)), np.array([0.5, 0.0, 0.1])
    write_shapes(tmp_path / "s.npz", samples, scores, contacts, origin)
    with np.load(tmp_path / "s.npz") as npz:
        np.testing.assert_array_equal(npz["samples"], samples)
        np.testing.assert_array_equal(npz["scores"], scores)
        np.testing.assert_array_equal(npz["object_origin"], origin)
        assert npz["contacts"].shape == (2, 3)
    write_shapes(tmp_path / "s.ply", samples, scores, contacts, origin)
    header, vertices = read_ply(tmp_path / "s.ply")
    assert header[:2] == ["ply", "format binary_little_endian 1.0"]
    assert vertices.dtype.names == ("x", "y", "z", "sample_index", "score")
    for index in range(3):
        mine = vertices[vertices["sample_index"] == index]
        np.testing.assert_array_equal(np.stack([mine["x"], mine["y"], mine["z"]], axis=1), samples[index])
        assert np.all(mine["score"] == np.float32(scores[index]))


def test_shape_command_writes_its_samples(tmp_path, capsys):
    for name in ("shapes.npz", "shapes.ply"):
        code = main(["--tuning-iterations", "3", "--num-samples", "4", "--timeout", "30", "shape",
                     "--contacts", CONTACTS, "--output", str(tmp_path / name)])
        report = json.loads(capsys.readouterr().out)
        assert report["output"] == str(tmp_path / name)
        assert code == (0 if report["success"] else 1)
        if name.endswith(".npz"):
            with np.load(tmp_path / name) as npz:
                assert npz["samples"].ndim == 3 and npz["samples"].shape[0] == 4 and npz["samples"].shape[2] == 3
                np.testing.assert_allclose(npz["scores"], report["scores"], atol=1e-4)
        else:
            _, vertices = read_ply(tmp_path / name)
            assert sorted(set(vertices["sample_index"].tolist())) == [0, 1, 2, 3]


def test_shape_command_refuses_another_output_format_before_inferring(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "mace_ros", "shape", "--contacts", CONTACTS, "--output", str(tmp_path / "shapes.obj")],
        capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert "--output must end in .npz or .ply" in completed.stderr
    assert not (tmp_path / "shapes.obj").exists()
