"""Shipped weights: safetensors files (no pickle: loading one runs no code) plus JSON metadata."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from safetensors.torch import load_file, save_file

DATA_DIR = Path(__file__).resolve().parent / "data"


ModelT = TypeVar("ModelT", bound=torch.nn.Module)


class WeightsError(RuntimeError):
    """Weights missing, unreadable or not matching the model they are loaded into."""


def metadata_path(weights_path: Path) -> Path:
    return weights_path.with_suffix(".json")


def save_weights(module: torch.nn.Module, path: Path, metadata: dict[str, Any], storage_dtype: torch.dtype = torch.float16) -> None:
    """Write the module's state (floating tensors stored as `storage_dtype`) and its metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        name: (tensor.to(storage_dtype) if tensor.is_floating_point() else tensor).detach().cpu().contiguous()
        for name, tensor in module.state_dict().items()
    }
    save_file(state, str(path))
    metadata_path(path).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


def load_weights(module: torch.nn.Module, path: Path, device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
    """Load weights into `module` (moved to device/dtype) and return the metadata; clear errors otherwise.
    `module` may be built on the meta device (see empty_model): the file's tensors then become its own."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (regenerate it with the training command in the README)")
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises several types for a corrupt header
        raise WeightsError(f"cannot read weights {path}: {error}") from error
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(name for name in expected.keys() & state.keys() if expected[name].shape != state[name].shape)
    if missing or unexpected or mismatched:
        raise WeightsError(
            f"weights {path} do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatch {mismatched[:5]}"
        )
    on_meta = any(tensor.is_meta for tensor in expected.values())
    module.load_state_dict({name: tensor.to(expected[name].dtype) for name, tensor in state.items()}, assign=on_meta)
    module.to(device=device, dtype=dtype)
    meta_file = metadata_path(path)
    return json.loads(meta_file.read_text()) if meta_file.is_file() else {}


def empty_model(build: Callable[[], ModelT]) -> ModelT:
    """build() on the meta device: no random initialisation for load_weights to overwrite (59 ms for the
    full shape VAE on the 2-core CPU, all of it holding the GIL while a node's engines load)."""
    with torch.device("meta"):
        return build()


def load_sized_model(
    path: Path,
    build: Callable[[dict[str, Any]], ModelT],
    description: str,
    regenerate_command: str,
    device: torch.device | str,
    dtype: torch.dtype,
) -> ModelT:
    """A model built from the sizes in its metadata file, loaded and in eval mode; WeightsError otherwise."""
    path = Path(path)
    meta_file = metadata_path(path)
    if not path.is_file() or not meta_file.is_file():
        raise WeightsError(
            f"{description} weights or metadata not found: {path}, {meta_file} (regenerate them with `{regenerate_command}`)"
        )
    metadata = json.loads(meta_file.read_text())
    try:
        model = empty_model(lambda: build(metadata))
    except KeyError as error:
        raise WeightsError(f"metadata {meta_file} lacks {error}") from error
    load_weights(model, path, device, dtype)
    return model.eval()
