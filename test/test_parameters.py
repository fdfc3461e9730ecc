"""config/mace.yaml (the defaults) and mace_ros/ros/parameters.py (descriptions, ranges) agree."""
from __future__ import annotations

from pathlib import Path

from mace_ros.ros.parameters import PARAMETERS, load_defaults

DEFAULTS_FILE = Path(__file__).resolve().parents[1] / "config" / "mace.yaml"


def test_every_default_is_documented_and_every_documented_parameter_has_a_default():
    defaults = load_defaults(DEFAULTS_FILE)
    assert sorted(set(defaults) - set(PARAMETERS)) == [], "document these in mace_ros/ros/parameters.py"
    assert sorted(set(PARAMETERS) - set(defaults)) == [], "give these a default in config/mace.yaml"


def test_defaults_lie_in_their_ranges_and_floats_are_written_as_floats():
    for name, value in load_defaults(DEFAULTS_FILE).items():
        spec = PARAMETERS[name]
        if spec.min_value is not None:
            assert spec.min_value <= value <= spec.max_value, name
            # The type of each default is the parameter's declared type (an integer override of a
            # double is converted, a double for an integer refused): float bounds belong to floats.
            assert isinstance(value, float) == isinstance(spec.min_value, float), name
