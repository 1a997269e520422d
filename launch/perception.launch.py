# Copyright 2025 hiera_perception maintainers. Licensed under the Apache License, Version 2.0.
"""Start the hiera_perception node: camera topic in, /action_features out.

    ros2 launch hiera_perception perception.launch.py image_topic:=/camera/image_raw
    ros2 launch hiera_perception perception.launch.py model:=my_model.pt device:=cuda params_file:=my.yaml

Parameters come from `params_file` (default: the installed config/perception.yaml); `model`, `device` and
`adaptation`, when given, override it. Left empty they keep the file's values. Included under
PushRosNamespace("robot1") the node is /robot1/hiera_perception, and the file's `/**/hiera_perception` still
applies to it.
"""

from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

PACKAGE = "hiera_perception"


def _overrides(context) -> dict:
    """The non-empty launch arguments as typed node parameters (empty = keep the params file's value)."""
    params = {}
    for name in ("model", "device"):
        value = LaunchConfiguration(name).perform(context)
        if value:
            params[name] = value
    adaptation = LaunchConfiguration("adaptation").perform(context).strip().lower()
    if adaptation:
        if adaptation not in ("true", "false"):
            raise ValueError(f"launch argument adaptation must be true or false, got {adaptation!r}")
        params["adaptation.enabled"] = adaptation == "true"
    return params


def _node(context) -> list[Node]:
    return [Node(
        package=PACKAGE,
        executable="perception_node",
        name="hiera_perception",
        output="screen",
        parameters=[LaunchConfiguration("params_file").perform(context), _overrides(context)],
        remappings=[("image", LaunchConfiguration("image_topic"))],
    )]


def generate_launch_description() -> LaunchDescription:
    default_params = os.path.join(get_package_share_directory(PACKAGE), "config", "perception.yaml")
    return LaunchDescription([
        DeclareLaunchArgument("image_topic", default_value="/camera/image_raw",
                              description="Camera topic (sensor_msgs/Image; with input: compressed, its "
                                          "<image_topic>/compressed is read)"),
        DeclareLaunchArgument("params_file", default_value=default_params,
                              description="YAML file with the node's parameters"),
        DeclareLaunchArgument("model", default_value="",
                              description='Checkpoint path, models/ file name or config name; "" = params_file'),
        DeclareLaunchArgument("device", default_value="", description='auto | cpu | cuda | cuda:N; "" = params_file'),
        DeclareLaunchArgument("adaptation", default_value="",
                              description='On-device adaptation: true | false; "" = params_file'),
        OpaqueFunction(function=_node),
    ])
