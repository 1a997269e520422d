"""camera_publisher on real rclpy: a video file the test writes, the synthetic camera, and `publish`'s main."""

from __future__ import annotations

import argparse
import os
import re
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from hiera_perception.video import iter_frames
from ros_helpers import spin_until

pytestmark = pytest.mark.ros

W, H, N = 64, 48, 24


@pytest.fixture(scope="module", autouse=True)
def _domain(own_ros_domain):
    """This module's own DDS domain (conftest.py)."""


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """A 24-frame MJPG video whose frames all differ, and its frames as OpenCV decodes them."""
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (W, H))
    for i in range(N):
        frame = np.full((H, W, 3), (20 + 9 * i, 200 - 7 * i, 90), np.uint8)
        cv2.rectangle(frame, (2 * i, 10), (2 * i + 12, 30), (255, 255, 255), -1)
        writer.write(frame)
    writer.release()
    decoded = [f for _, f in iter_frames(path)]
    assert len(decoded) == N
    return path, decoded


def _collect(node, topic: str, msg_type, out: list) -> object:
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    return node.create_subscription(msg_type, topic, out.append, reliable)


def _frame_index(msg, decoded: list[np.ndarray]) -> int:
    img = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width, 3)
    hits = [i for i, f in enumerate(decoded) if np.array_equal(f, img)]
    assert len(hits) == 1, "each published frame is exactly one decoded frame of the file"
    return hits[0]


def test_true_action_format_round_trips():
    from hiera_perception.camera import format_true_action, parse_true_action

    assert format_true_action("swipe_left", 12, 3) == "swipe_left 12.000000003"
    assert parse_true_action("swipe_left 12.000000003") == ("swipe_left", 12_000_000_003)
    with pytest.raises(ValueError, match="not '<action>"):
        parse_true_action("wave 12.5")


def test_config_needs_exactly_one_source():
    from hiera_perception.camera import CameraConfig

    base = dict(video_path="", camera_index=-1, synthetic=False, fps=30.0, loop=False, frame_id="c", width=0,
                height=0, synthetic_seed=0, synthetic_segment_s=(3.0, 6.0), synthetic_shift="none")
    with pytest.raises(ValueError, match="exactly one source.*none"):
        CameraConfig(**base).validate()
    with pytest.raises(ValueError, match="exactly one source.*video_path, synthetic"):
        CameraConfig(**{**base, "video_path": "a.mp4", "synthetic": True}).validate()
    with pytest.raises(ValueError, match="width/height"):
        CameraConfig(**{**base, "synthetic": True, "width": 64}).validate()
    with pytest.raises(ValueError, match="synthetic_shift: 'fog' is not one of"):
        CameraConfig(**{**base, "synthetic": True, "synthetic_shift": "fog"}).validate()
    CameraConfig(**{**base, "camera_index": 0}).validate()


def test_video_rate_past_max_fps_is_not_believed(tmp_path):
    # fps=0 publishes at the file's own rate: a header saying 1000 fps ran the timer at 1000 Hz, past MAX_FPS
    from hiera_perception.camera import MAX_FPS, _VideoSource

    rates = {}
    for fps in (1000.0, 15.0, MAX_FPS):
        path = tmp_path / f"{fps:g}.avi"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (W, H))
        writer.write(np.zeros((H, W, 3), np.uint8))
        writer.release()
        source = _VideoSource(str(path), loop=False)
        rates[fps] = source.fps
        source.close()
    assert rates == {1000.0: 30.0, 15.0: 15.0, MAX_FPS: MAX_FPS}


def test_a_rate_too_slow_for_the_timer_is_refused_at_start_at_run_time_and_by_publish(video):
    # fps 1e-12 is inside the descriptor's [0, 240] but its timer period overflows: the node died with a traceback,
    # at start or on one `ros2 param set`.
    import rclpy
    from rclpy.parameter import Parameter

    from hiera_perception import camera

    parser = argparse.ArgumentParser()
    camera.add_arguments(parser)
    with pytest.raises(ValueError, match=r"--fps must be in \[0.01, 240\], got 1e-12"):
        camera.parameters_from_args(parser.parse_args(["--video", "v.avi", "--fps", "1e-12"]))
    path, _ = video
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        with pytest.raises(ValueError, match=r"parameter fps must be 0 \(the source's rate\) or in \[0.01, 240\]"):
            camera.CameraPublisher(context=context, parameter_overrides=[
                Parameter("video_path", value=str(path)), Parameter("fps", value=1e-12)])
        node = camera.CameraPublisher(context=context, parameter_overrides=[Parameter("video_path", value=str(path))])
        result = node.set_parameters([Parameter("fps", value=1e-12)])[0]
        assert not result.successful and "got 1e-12" in result.reason and node._fps == 30.0
        assert node.set_parameters([Parameter("fps", value=0.01)])[0].successful and node._fps == 0.01
        node.destroy_node()
    finally:
        context.try_shutdown()


def test_the_decimal_point_hint_is_for_integers_only(video):
    import rclpy
    from rclpy.parameter import Parameter

    from hiera_perception.camera import CameraPublisher

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        for value, hint in ((1, True), ("abc", False)):  # `fps:=1` is the YAML slip; `fps:=abc` is not
            with pytest.raises(ValueError, match="parameter fps") as info:
                CameraPublisher(context=context, parameter_overrides=[
                    Parameter("video_path", value=str(video[0])), Parameter("fps", value=value)])
            assert ("write floats with a decimal point" in str(info.value)) == hint, str(info.value)
    finally:
        context.try_shutdown()


def test_a_looping_video_that_becomes_unreadable_is_a_failed_read_not_a_crash(video, tmp_path):
    from hiera_perception.camera import _VideoSource

    path = tmp_path / "clip.avi"
    path.write_bytes(video[0].read_bytes())
    source = _VideoSource(str(path), loop=True)
    assert sum(source.read()[0] is not None for _ in range(N)) == N
    path.unlink()  # deleted (or replaced) while it played: the reopen at its end fails
    assert source.read() == (None, None) and not source.ended
    assert source.read() == (None, None) and not source.ended  # tried again on every tick
    path.write_bytes(video[0].read_bytes())
    assert source.read()[0] is not None  # and plays again once it is back
    source.close()


def test_a_damaged_frame_is_skipped_not_the_end_of_the_video(tmp_path):
    """publish stopped at the first undecodable frame, and with --loop replayed the frames before it forever."""
    from test_dataset import glitched_mjpeg

    from hiera_perception.camera import _VideoSource

    path = tmp_path / "glitch.avi"
    glitched_mjpeg(path, n=30, bad=10)
    once = _VideoSource(str(path), loop=False)
    assert sum(once.read()[0] is not None for _ in range(31)) == 29 and once.ended
    once.close()
    looping = _VideoSource(str(path), loop=True)
    assert sum(looping.read()[0] is not None for _ in range(3 * 29)) == 3 * 29 and not looping.ended
    looping.close()


def test_publish_names_a_missing_video_as_run_does(tmp_path, capsys):
    from hiera_perception import cli

    assert cli.main(["publish", "--video", str(tmp_path / "none.mp4")]) == 1
    assert capsys.readouterr().err.strip() == f"hiera-perception publish: video file not found: {tmp_path / 'none.mp4'}"
    assert cli.main(["publish", "--video", str(tmp_path)]) == 1
    assert "(that is a folder)" in capsys.readouterr().err


def test_bad_ros_arguments_and_topics_are_one_fatal_line(video):
    # rclpy.init refused them with an RCLError traceback (a bad -p, a missing params file, a bad remap or topic)
    import subprocess
    import sys

    from ros_helpers import REPO, ros_env

    env = ros_env(int(os.environ["ROS_DOMAIN_ID"]))  # this module's (the autouse fixture)
    cases = [
        (["-m", "hiera_perception.camera", "--ros-args", "-p", "fps"], 2, "bad ROS arguments"),
        (["-m", "hiera_perception.camera", "--ros-args", "--params-file", "/nonexistent.yaml"], 2,
         "bad ROS arguments"),
        (["-m", "hiera_perception.camera", "--ros-args", "-r", "image:=bad topic"], 2, "bad ROS arguments"),
        (["-m", "hiera_perception", "publish", "--video", str(video[0]), "--topic", "bad@topic"], 1,
         "--topic 'bad@topic' is not a valid ROS topic name"),
    ]
    for argv, code, message in cases:
        out = subprocess.run([sys.executable, *argv], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == code and message in out.stderr + out.stdout, (argv, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr, (argv, out.stderr)


def test_webcam_asks_for_one_buffer_and_reopens_after_failures(monkeypatch):
    # No camera here: a stand-in capture records what the source asks of OpenCV.
    from hiera_perception import camera

    opened = []

    class Capture:
        def __init__(self, index):
            self.props, self.frames = {}, [np.zeros((4, 6, 3), np.uint8)]
            opened.append(self)

        def isOpened(self):
            return True

        def set(self, prop, value):
            self.props[prop] = value
            return True

        def get(self, prop):
            return 30.0 if prop == cv2.CAP_PROP_FPS else 0.0

        def read(self):
            return (True, self.frames.pop()) if self.frames else (False, None)

        def release(self):
            pass

    monkeypatch.setattr(camera.cv2, "VideoCapture", Capture)
    src = camera._WebcamSource(0, 640, 480)
    assert opened[0].props == {cv2.CAP_PROP_FRAME_WIDTH: 640, cv2.CAP_PROP_FRAME_HEIGHT: 480, cv2.CAP_PROP_BUFFERSIZE: 1}
    assert src.read()[0].shape == (4, 6, 3)
    for _ in range(camera._FAILURES_BEFORE_REOPEN):
        assert src.read() == (None, None)
    assert len(opened) == 2 and opened[1].props[cv2.CAP_PROP_BUFFERSIZE] == 1


def test_video_file_frames_arrive_in_order_with_increasing_stamps(video):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image

    from hiera_perception.camera import CameraPublisher

    path, decoded = video
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        camera = CameraPublisher(context=context, parameter_overrides=[
            Parameter("video_path", value=str(path)), Parameter("fps", value=60.0), Parameter("loop", value=True),
            Parameter("frame_id", value="test_cam")])
        listener = Node("listener", context=context)
        got: list[Image] = []
        _collect(listener, "image", Image, got)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(camera)
        executor.add_node(listener)
        assert spin_until(executor, lambda: len(got) >= N + 12, 30.0), f"only {len(got)} frames in 30 s"
    finally:
        context.try_shutdown()

    for msg in got:
        assert (msg.encoding, msg.width, msg.height, msg.step, msg.is_bigendian) == ("rgb8", W, H, W * 3, 0)
        assert len(msg.data) == W * H * 3 and msg.header.frame_id == "test_cam"
    stamps = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for m in got]
    assert all(b > a for a, b in zip(stamps, stamps[1:])), "stamps strictly increase, across the loop too"
    index = [_frame_index(m, decoded) for m in got]
    assert all(b == (a + 1) % N for a, b in zip(index, index[1:])), f"frames in file order, looping: {index}"
    assert 0 in index[1:], "the file looped"


def test_synthetic_camera_publishes_true_action_with_each_frame_stamp():
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from hiera_perception.camera import CameraPublisher, parse_true_action
    from hiera_perception.synth import ACTIONS

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        camera = CameraPublisher(context=context, parameter_overrides=[
            Parameter("synthetic", value=True), Parameter("synthetic_seed", value=3)])
        listener = Node("listener", context=context)
        images: list[Image] = []
        truths: list[String] = []
        _collect(listener, "image", Image, images)
        _collect(listener, "/camera_publisher/true_action", String, truths)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(camera)
        executor.add_node(listener)
        assert spin_until(executor, lambda: len(images) >= 15 and len(truths) >= 15, 30.0)
    finally:
        context.try_shutdown()

    truth = {stamp: action for action, stamp in (parse_true_action(m.data) for m in truths)}
    assert set(truth.values()) <= set(ACTIONS)
    for msg in images:
        assert (msg.encoding, msg.width, msg.height, len(msg.data)) == ("rgb8", 160, 120, 160 * 120 * 3)
    # Each topic is discovered on its own, so the first frames may lack their pair; the rest never do.
    stamps = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for m in images]
    assert sum(s in truth for s in stamps) >= 10
    # stamped with the time each frame shows, on the camera's grid: whole periods apart, whatever the timer's jitter
    period = int(round(1e9 / 30))
    assert all(b > a and (b - a) % period == 0 for a, b in zip(stamps, stamps[1:])), stamps


def test_publish_command_remaps_the_topic_and_ends_with_the_video(video, capfd):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from sensor_msgs.msg import Image

    from hiera_perception import camera

    path, decoded = video
    parser = argparse.ArgumentParser()
    camera.add_arguments(parser)
    args = parser.parse_args(["--video", str(path), "--fps", "15", "--topic", "/test_cam/image_raw", "--size", "32x24"])

    # The listener spins on a context of its own in a thread; the command owns the default context here.
    context = rclpy.Context()
    rclpy.init(context=context)
    got: list[Image] = []
    stop = threading.Event()
    listener = Node("listener", context=context)
    _collect(listener, "/test_cam/image_raw", Image, got)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(listener)
    thread = threading.Thread(target=lambda: spin_until(executor, stop.is_set, 60.0), daemon=True)
    thread.start()
    try:
        assert camera.main(args) == 0  # returns at the end of the (non-looping) file
        time.sleep(0.3)  # the last frames in flight
    finally:
        stop.set()
        thread.join(10.0)
        context.try_shutdown()
    assert 0 < len(got) <= N, "frames came on the remapped topic, the file played once"
    assert all((m.width, m.height, m.encoding) == (32, 24, "rgb8") for m in got)
    err = capfd.readouterr().err
    assert re.search(rf"stopped: {N} frames published, \d+ late, 0 failed reads", err), err  # the final count
    assert "rosout" not in err, err  # logged once the node is gone, not through its closed rosout publisher
