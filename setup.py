"""`pip install -e .` of the pure-Python library (mace_ros.core and the command line).

The ROS package is built by colcon as ament_cmake (package.xml says so): this file is not used
for that build, and the generated service types (mace_ros.srv) only exist in a colcon install.
"""
from setuptools import find_packages, setup

setup(
    name="mace_ros",
    version="0.1.0",
    description="MACE inference (collision-free IK, shape from grasping) with a ROS 2 node",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["mace_ros", "mace_ros.*"]),
    include_package_data=True,
    package_data={"mace_ros": ["**/*.safetensors", "**/*.json", "**/*.yaml"]},
    install_requires=[
        "torch==2.13.0",  # pinned: an open range pulls a multi-GB CUDA build where no torch is installed
        "numpy>=1.24",
        "scipy>=1.10",
        "PyYAML>=6.0",
        "safetensors>=0.4",
    ],
    extras_require={
        "sim": ["pybullet>=3.2", "trimesh>=4.0"],
        "plots": ["matplotlib>=3.7"],
    },
)
