"""Where the package's configuration lives, in a source checkout and in a colcon install."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

PACKAGE_NAME = "mace_ros"


def config_dir() -> Path:
    """The `config/` folder: `$MACE_ROS_CONFIG_DIR`, the source tree's, or `<prefix>/share/mace_ros/config`."""
    override = os.environ.get("MACE_ROS_CONFIG_DIR")
    if override:
        return Path(override)
    package_dir = Path(__file__).resolve().parents[1]
    source_tree = package_dir.parent / "config"
    if source_tree.is_dir():
        return source_tree
    # Installed: <prefix>/lib/pythonX.Y/site-packages/mace_ros -> <prefix>/share/mace_ros/config
    for parent in package_dir.parents:
        candidate = parent / "share" / PACKAGE_NAME / "config"
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"cannot find the {PACKAGE_NAME} config folder; set MACE_ROS_CONFIG_DIR")


def scene_path(name: str) -> Path:
    """Path of a shipped scene (`config/scenes/<name>.yaml`), or `name` itself if it is a file."""
    if Path(name).is_file():
        return Path(name)
    path = config_dir() / "scenes" / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in (config_dir() / "scenes").glob("*.yaml"))
        raise FileNotFoundError(f"unknown scene '{name}'; shipped scenes: {', '.join(available)}")
    return path


def default_parameters(section: str) -> dict[str, Any]:
    """Defaults of one section (`ik`, `shape`) of config/mace.yaml, the single source of defaults."""
    with (config_dir() / "mace.yaml").open() as stream:
        parameters = yaml.safe_load(stream)["mace"]["ros__parameters"]
    return dict(parameters[section])
