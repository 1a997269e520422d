"""launch_testing test of the installed `perception.launch.py`, included under a namespace (PushRosNamespace):
the installed config/perception.yaml (given back as params_file with top_k changed and a lossless input QoS added)
still applies to /robot1/hiera_perception, and so do the model, device and adaptation arguments and the
image_topic remapping; camera frames in, ActionFeatures out on /robot1/action_features with the clip's exact
stamps, sizes and the file's label count; diagnostics named after the node; a clean exit.

Needs the package installed into the environment (`pip install .`, or colcon), like `ros2 launch` does. Runs under
pytest (the launch_testing plugin) and under `launch_test test/test_launch.py`.
"""

from __future__ import annotations

import os
import tempfile
import unittest
from pathlib import Path

import numpy as np
import pytest
import yaml

import ros_helpers as rh

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"  # this process (the test's node) and the launched node
# ament_index (get_package_share_directory) finds packages through the environment's prefix.
os.environ["AMENT_PREFIX_PATH"] = rh.ros_env(0)["AMENT_PREFIX_PATH"]

DOMAIN = rh.domain_id(3)
IMAGE_TOPIC = "/test_cam/image_raw"
NAMESPACE = "robot1"
NODE = f"/{NAMESPACE}/hiera_perception"
LABELS = [f"action_{i}" for i in range(8)]  # more classes than top_k
TOP_K = 3  # written into the params file: not the default 5, so the messages show whether the file applied
# config/perception.yaml's clip timing with a checkpoint that records none: hop_s 0.5 s, frames every 4/30 s.
HOP_FRAMES, STRIDE_FRAMES = 15, 4
_tmp = tempfile.TemporaryDirectory(prefix="hiera_perception_launch_test_")

try:
    import launch_testing
    import launch_testing.asserts
except ImportError:  # conftest.py skips this module's tests, or fails them under `make test`
    launch_testing = None


def _installed_share() -> Path:
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

    try:
        share = Path(get_package_share_directory("hiera_perception"))
    except PackageNotFoundError:
        pytest.fail("hiera_perception is not installed: `pip install --no-deps --no-build-isolation .` first")
    for installed, ours in ((share / "launch" / "perception.launch.py", rh.REPO / "launch" / "perception.launch.py"),
                            (share / "config" / "perception.yaml", rh.REPO / "config" / "perception.yaml")):
        if not installed.is_file() or installed.read_bytes() != ours.read_bytes():
            pytest.fail(f"{installed} is missing or differs from {ours}: reinstall the package")
    return share


if launch_testing is not None:

    @pytest.mark.launch_test
    @pytest.mark.ros_launch
    @pytest.mark.ros
    def generate_test_description():
        from launch import LaunchDescription
        from launch.actions import GroupAction, IncludeLaunchDescription, SetEnvironmentVariable
        from launch.launch_description_sources import PythonLaunchDescriptionSource
        from launch_ros.actions import PushRosNamespace

        share = _installed_share()
        checkpoint = rh.make_checkpoint(Path(_tmp.name) / "tiny8.pt", labels=LABELS)
        # The installed defaults under their own key, with top_k changed and a reliable input so that no frame is
        # lost on a busy machine.
        params = yaml.safe_load((share / "config" / "perception.yaml").read_text())
        node_params = params["/**/hiera_perception"]["ros__parameters"]
        node_params["top_k"] = TOP_K
        node_params["qos_overrides"] = {IMAGE_TOPIC: {"subscription": {"reliability": "reliable", "depth": 100}}}
        params_file = Path(_tmp.name) / "params.yaml"
        params_file.write_text(yaml.safe_dump(params))
        perception = IncludeLaunchDescription(
            PythonLaunchDescriptionSource(str(share / "launch" / "perception.launch.py")),
            launch_arguments={"image_topic": IMAGE_TOPIC, "params_file": str(params_file), "model": str(checkpoint),
                              "device": "cpu", "adaptation": "false"}.items())
        return LaunchDescription([
            SetEnvironmentVariable("ROS_DOMAIN_ID", str(DOMAIN)),
            GroupAction([PushRosNamespace(NAMESPACE), perception]),
            launch_testing.actions.ReadyToTest(),
        ])

    class TestActionFeatures(unittest.TestCase):

        def test_features_arrive_with_clip_stamps_sizes_and_labels(self):
            from hiera_perception.config import get_config

            harness = rh.Harness(DOMAIN, node_name=NODE, image_topic=IMAGE_TOPIC,
                                 output_topic=f"/{NAMESPACE}/action_features", depth=100)
            try:
                harness.wait_connected(None, timeout_s=90)
                n = 75  # 2.5 s at 30 fps: clips start at frames 0, 15, 30, 45 and span 28 frames
                expected = rh.expected_clips(8, STRIDE_FRAMES, HOP_FRAMES, n)
                self.assertEqual([(c.first, c.last) for c in expected], [(0, 28), (15, 43), (30, 58), (45, 73)])
                harness.publish(rh.image_msg(rh.rgb_frame(i), rh.frame_stamp_ns(i)) for i in range(n))
                self.assertTrue(harness.spin_until(lambda: len(harness.features) >= len(expected), 60),
                                f"{len(harness.features)} ActionFeatures")
                harness.spin_until(lambda: False, 0.3)  # and no more
                self.assertTrue(harness.spin_until(lambda: harness.last_diagnostics().get("clips_published")
                                                   == str(len(expected)), 10), harness.diagnostics[-1:])
            finally:
                harness.close()
            self.assertEqual([(rh.stamp_ns(m.clip_start), rh.stamp_ns(m.header.stamp)) for m in harness.features],
                             [(rh.frame_stamp_ns(c.first), rh.frame_stamp_ns(c.last)) for c in expected])
            for msg in harness.features:
                self.assertEqual(msg.header.frame_id, rh.FRAME_ID)
                self.assertEqual(msg.num_frames, 8)
                self.assertEqual(msg.encoder_version, "test@0")
                self.assertEqual(len(msg.embedding), get_config(rh.ARCH).num_features)
                self.assertTrue(np.isfinite(np.asarray(msg.embedding)).all())
                self.assertEqual(len(msg.labels), TOP_K)
                self.assertTrue(set(msg.labels) <= set(LABELS))
                self.assertEqual(len(msg.scores), TOP_K)

    @launch_testing.post_shutdown_test()
    class TestShutdown(unittest.TestCase):

        def test_node_exits_cleanly(self, proc_info, proc_output):
            launch_testing.asserts.assertExitCodes(proc_info)  # 0: Ctrl-C handled, no traceback exit
            for output in proc_output:
                self.assertNotIn("Traceback", output.text.decode(errors="replace"))
                # the shipped params file and the launch file's arguments name only parameters the node has
                self.assertNotIn("ignored parameter", output.text.decode(errors="replace"))

else:

    @pytest.mark.ros_launch
    def test_launch_stack_is_installed():
        import launch_testing  # noqa: F401 - fails here only where the launch stack is required
