"""ros2 launch mace_ros mace.launch.py [scene:=box]: the mace node with the package's parameters."""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue


def generate_launch_description() -> LaunchDescription:
    parameters_file = os.path.join(get_package_share_directory("mace_ros"), "config", "mace.yaml")
    return LaunchDescription([
        DeclareLaunchArgument("scene", default_value="", description="config/scenes/<scene>.yaml preloaded as obstacles"),
        Node(
            package="mace_ros",
            executable="mace_node",
            name="mace",
            output="screen",
            # value_type=str keeps the default '' a string (launch would read it as YAML: null).
            parameters=[parameters_file, {"scene": ParameterValue(LaunchConfiguration("scene"), value_type=str)}],
        ),
    ])
