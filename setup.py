"""Packaging of hiera_perception (ament_python): the same setup.py serves `colcon build` and `pip install .`."""

import os
import re
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "hiera_perception"
# Console scripts that ROS tools start by name (`ros2 run`, launch_ros `Node(executable=...)`). Each gets a shim in
# lib/hiera_perception/ (tools/ros_exec/NAME) that runs bin/NAME, because pip ignores setup.cfg's install_scripts.
ROS_EXECUTABLES = ["perception_node", "camera_publisher", "action_consumer"]  # the others link to the first


def _version() -> str:
    # package.xml is the one place the version lives (colcon and rosdep read it from there).
    with open("package.xml", encoding="utf-8") as f:
        return re.search(r"<version>([^<]+)</version>", f.read()).group(1).strip()


def _files(pattern: str) -> list[str]:
    # Plain files only, so empty folders (or a stray subfolder) never break the build.
    return sorted(p for p in glob(pattern) if os.path.isfile(p))


setup(
    name=PACKAGE,
    version=_version(),
    description="Hiera video action perception for ROS 2",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=[PACKAGE, PACKAGE + ".*"]),
    package_data={PACKAGE: ["data/*"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", _files("launch/*.py")),
        (f"share/{PACKAGE}/config", _files("config/*.yaml")),
        # Not the run-time state the node and the CLI write beside a model in a writable models/ folder (labels
        # taught in a checkout, `<model>.prototypes.json`): an install would ship it and load it as its own.
        (f"share/{PACKAGE}/models", [p for p in _files("models/*") if not p.endswith(".prototypes.json")]),
        (f"lib/{PACKAGE}", [f"tools/ros_exec/{name}" for name in ROS_EXECUTABLES]),
    ],
    # Runtime dependencies are installed from requirements*.txt (pip) or package.xml (rosdep): torch needs its
    # pinned CPU/CUDA build and rclpy comes from a ROS 2 install or the ros-* wheels, which pip can't choose here.
    install_requires=[],
    zip_safe=False,
    entry_points={
        "console_scripts": [
            "hiera-perception = hiera_perception.cli:main",
            "perception_node = hiera_perception.node:main",
            "camera_publisher = hiera_perception.camera:node_main",
            "action_consumer = hiera_perception.consumer:main",
        ],
    },
)
