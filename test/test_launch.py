"""launch/mace.launch.py without launch or launch_ros (not installable from PyPI).

The declared arguments are read from the file's syntax tree; the node set-up is run against
recording stand-ins of the launch classes, to check what each argument value produces.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest

LAUNCH_FILE = Path(__file__).resolve().parents[1] / "launch" / "mace.launch.py"
ARGUMENTS = {"namespace", "use_sim_time", "params_file", "scene", "robot_state_publisher", "rviz"}
BOOLEAN_ARGUMENTS = {"use_sim_time", "robot_state_publisher", "rviz"}


def calls(tree: ast.AST, function: str) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name) and node.func.id == function]


def test_declared_arguments():
    tree = ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))
    compile(tree, str(LAUNCH_FILE), "exec")
    # Literal names only: the DeclareLaunchArgument inside boolean_argument takes its parameter.
    plain = {call.args[0].value for call in calls(tree, "DeclareLaunchArgument") if isinstance(call.args[0], ast.Constant)}
    boolean = {ast.literal_eval(call.args[0]) for call in calls(tree, "boolean_argument")}
    assert plain | boolean == ARGUMENTS
    assert boolean == BOOLEAN_ARGUMENTS
    # boolean_argument restricts its argument to true/false and takes its default from a bool.
    helper = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == "boolean_argument")
    (declaration,) = calls(helper, "DeclareLaunchArgument")
    keywords = {keyword.arg: keyword.value for keyword in declaration.keywords}
    assert ast.literal_eval(keywords["choices"]) == ["true", "false"]
    for call in calls(tree, "boolean_argument"):
        assert isinstance(ast.literal_eval(call.args[1]), bool)


class Recorded:
    """Stands in for a launch class: keeps its arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


class LaunchConfiguration(Recorded):
    def perform(self, context: dict[str, str]) -> str:
        return context[self.args[0]]


@pytest.fixture
def launch_module(monkeypatch):
    """The launch file imported against stand-ins of launch and launch_ros."""
    stand_ins = {
        "launch": {"LaunchContext": dict, "LaunchDescription": Recorded},
        "launch.actions": {"DeclareLaunchArgument": Recorded, "OpaqueFunction": Recorded},
        "launch.substitutions": {"LaunchConfiguration": LaunchConfiguration},
        "launch_ros": {},
        "launch_ros.actions": {"Node": Recorded},
        "launch_ros.parameter_descriptions": {"ParameterValue": Recorded},
    }
    for name, attributes in stand_ins.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attributes))
    spec = importlib.util.spec_from_file_location("mace_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launched(module, **values: str) -> dict[str, Recorded]:
    """{executable: Node} that the launch file starts with these argument values (others at their defaults)."""
    (entities,) = module.generate_launch_description().args
    defaults = {entity.args[0]: entity.kwargs["default_value"] for entity in entities if entity.args}
    assert set(defaults) == ARGUMENTS
    (setup,) = [entity for entity in entities if "function" in entity.kwargs]
    nodes = setup.kwargs["function"]({**defaults, **values})
    return {node.kwargs["executable"]: node for node in nodes}


def test_defaults_start_the_mace_node_alone(launch_module):
    nodes = launched(launch_module)
    assert set(nodes) == {"mace_node"}
    mace = nodes["mace_node"].kwargs
    assert (mace["package"], mace["name"], mace["namespace"]) == ("mace_ros", "mace", "")
    assert mace["parameters"] == [{"use_sim_time": False}]  # no scene override: a params_file's scene stands


def test_every_option(launch_module, tmp_path):
    params_file = tmp_path / "my_mace.yaml"
    nodes = launched(launch_module, namespace="/robot1/", use_sim_time="true", params_file=str(params_file),
                     scene="box", robot_state_publisher="true", rviz="true")
    assert set(nodes) == {"mace_node", "robot_state_publisher", "rviz2"}
    assert {node.kwargs["namespace"] for node in nodes.values()} == {"robot1"}

    file, overrides = nodes["mace_node"].kwargs["parameters"]
    assert file == params_file
    assert overrides["use_sim_time"] is True
    assert (overrides["scene"].args, overrides["scene"].kwargs) == (("box",), {"value_type": str})

    (rsp_parameters,) = nodes["robot_state_publisher"].kwargs["parameters"]
    assert rsp_parameters["robot_description"].args[0].startswith("<?xml")
    assert rsp_parameters["use_sim_time"] is True
    assert nodes["robot_state_publisher"].kwargs["remappings"] == [("joint_states", "/joint_states")]

    rviz = nodes["rviz2"].kwargs
    assert rviz["arguments"][0] == "-d" and Path(rviz["arguments"][1]).is_file()
    remappings = dict(rviz["remappings"])
    assert remappings["/mace/ik_solutions"] == "/robot1/mace/ik_solutions"
    assert remappings["/robot_description"] == "/robot1/robot_description"


def test_rviz_without_namespace_keeps_the_config_topics(launch_module):
    assert launched(launch_module, rviz="true")["rviz2"].kwargs["remappings"] == []


def test_installed_share_files():
    """CMakeLists installs what the launch file reads (share/mace_ros/{launch,config,urdf})."""
    from ament_index_python.packages import get_package_share_directory

    share = Path(get_package_share_directory("mace_ros"))
    for path in ("launch/mace.launch.py", "config/mace.yaml", "config/mace.rviz", "urdf/panda.urdf"):
        assert (share / path).is_file(), path
