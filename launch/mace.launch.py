"""The mace node for a real or simulated robot, optionally with robot_state_publisher and rviz.

    ros2 launch mace_ros mace.launch.py [namespace:=NS] [scene:=box] [params_file:=my_mace.yaml]
        [use_sim_time:=true] [robot_state_publisher:=true] [rviz:=true]

The node reads its defaults (config/mace.yaml) itself; `params_file` only overrides them. Under a
namespace, a parameters file keyed `mace:` does not match the node `/NS/mace`: key it `/**/mace:`
(or `/**:`). Services and topics move to `/NS/mace/...`; `/joint_states` stays absolute, as
robot_state_publisher's is remapped to it here.
"""
import re
from pathlib import Path

from ament_index_python.packages import get_package_share_directory
from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue


def boolean_argument(name: str, default: bool, description: str) -> DeclareLaunchArgument:
    """A true/false argument (as moveit_configs_utils' DeclareBooleanLaunchArg): launch refuses other values."""
    return DeclareLaunchArgument(name, default_value=str(default).lower(), choices=["true", "false"],
                                 description=description)


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        DeclareLaunchArgument("namespace", default_value="", description="ROS namespace of the nodes ('' = none)"),
        boolean_argument("use_sim_time", False, "use the /clock topic (simulation) instead of the wall clock"),
        DeclareLaunchArgument("params_file", default_value="",
                              description="parameters file overriding config/mace.yaml ('' = none)"),
        DeclareLaunchArgument("scene", default_value="",
                              description="static obstacles: a name from config/scenes/ or a YAML path ('' = none)"),
        boolean_argument("robot_state_publisher", False,
                         "start robot_state_publisher with urdf/panda.urdf (panda_* names), publishing the robot's "
                         "TF from /joint_states; leave false where the robot's driver already runs one"),
        boolean_argument("rviz", False, "start rviz2 with config/mace.rviz"),
        # The rest depends on argument values (optional files, remappings), hence a function, as moveit's launches do.
        OpaqueFunction(function=launch_setup),
    ])


def launch_setup(context: LaunchContext) -> list[Node]:
    def argument(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

    share = Path(get_package_share_directory("mace_ros"))
    namespace = argument("namespace").strip("/")
    use_sim_time = argument("use_sim_time") == "true"

    parameters: list = [Path(argument("params_file"))] if argument("params_file") else []
    overrides: dict = {"use_sim_time": use_sim_time}
    if argument("scene"):  # only when given, so that a params_file's scene stands otherwise
        # value_type=str: launch would read a scene name such as 'true' or '1' as YAML.
        overrides["scene"] = ParameterValue(argument("scene"), value_type=str)
    nodes = [Node(package="mace_ros", executable="mace_node", name="mace", namespace=namespace, output="screen",
                  parameters=[*parameters, overrides])]

    if argument("robot_state_publisher") == "true":
        robot_description = ParameterValue((share / "urdf" / "panda.urdf").read_text(), value_type=str)
        nodes.append(Node(
            package="robot_state_publisher", executable="robot_state_publisher", namespace=namespace, output="screen",
            parameters=[{"robot_description": robot_description, "use_sim_time": use_sim_time}],
            remappings=[("joint_states", "/joint_states")]))  # the topic the mace node reads

    if argument("rviz") == "true":
        rviz_config = share / "config" / "mace.rviz"
        # The config names absolute topics (/mace/..., /robot_description): under a namespace they are remapped.
        topics = re.findall(r"^\s*Value: (/\S+)\s*$", rviz_config.read_text(), flags=re.MULTILINE)
        remappings = [(topic, f"/{namespace}{topic}") for topic in topics] if namespace else []
        nodes.append(Node(
            package="rviz2", executable="rviz2", namespace=namespace, output="screen",
            arguments=["-d", str(rviz_config)], parameters=[{"use_sim_time": use_sim_time}], remappings=remappings))
    return nodes
