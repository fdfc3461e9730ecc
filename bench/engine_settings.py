"""The `--engine KEY=VALUE` option of the benchmark scripts: settings of an engine's configuration."""
from __future__ import annotations

from typing import Any

import yaml


def engine_settings(items: list[str]) -> dict[str, Any]:
    """{key: value} of `KEY=VALUE` strings, each value read as YAML (0.5, true, [1, 2], a name)."""
    settings = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise SystemExit(f"--engine takes KEY=VALUE, got {item!r}")
        settings[key] = yaml.safe_load(value)
    return settings
