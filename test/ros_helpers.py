"""Helpers for the node's ROS 2 tests: a test checkpoint, the node in a subprocess, a harness node that publishes
camera frames and collects ActionFeatures and /diagnostics, and the expected clip timing.

Every process of a test module shares one ROS_DOMAIN_ID of its own (`domain_id(offset)`) with discovery on
localhost only, so parallel runs and stray nodes never mix.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
ARCH = "hiera_tiny_8x64"
LABELS = ["a", "b", "c"]
FPS = 30
T0_NS = 1_700_000_000 * 10**9 + 123_456_789  # first frame's stamp: a non-round nanosecond part on purpose
FRAME_ID = "test_camera_optical"
NUM_FRAMES = 8  # ARCH's clip length
STRIDE_FRAMES, HOP_FRAMES = 2, 7.5  # frame_stride_s = 2/30, hop_s = 0.25: samples on frames or half-way between
TOP_K = 2


def spin_until(executor, done: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Spin `executor` until done() is true; whether it became true within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            return False
        executor.spin_once(timeout_sec=0.05)
    return True


def assert_config_error(domain: int, name: str, value, expected: str) -> None:
    """Building the node with parameter `name` = `value` raises ConfigError whose message contains `expected`."""
    import pytest
    import rclpy
    from rclpy.parameter import Parameter

    from hiera_perception.node import ConfigError, PerceptionNode

    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain)
    try:
        with pytest.raises(ConfigError) as e:
            PerceptionNode(context=context, parameter_overrides=[Parameter(name, value=value)])
        assert expected in str(e.value)
    finally:
        context.try_shutdown()


def domain_id(offset: int) -> int:
    """A DDS domain for one test module: the run's own (conftest.py) shifted by `offset`, in 1..101."""
    base = int(os.environ.get("ROS_DOMAIN_ID", os.getpid() % 101 + 1))
    return (base + offset) % 101 + 1


def ros_env(domain: int) -> dict[str, str]:
    """Environment for a subprocess: this venv's ROS wheels, the repo on the path, the module's domain."""
    env = dict(os.environ)
    env.update(ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", PYTHONUNBUFFERED="1",
               RCUTILS_COLORIZED_OUTPUT="0")
    # ament_index_python (launch_ros) needs the prefix the ROS wheels and our package are installed into.
    prefixes = [p for p in env.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    if sys.prefix not in prefixes:
        env["AMENT_PREFIX_PATH"] = os.pathsep.join([sys.prefix, *prefixes])
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


def make_checkpoint(path: Path, labels: list[str] = LABELS) -> Path:
    """A tiny checkpoint with a head for `labels` (random weights, fixed seed)."""
    import torch

    from hiera_perception.checkpoint import save_checkpoint
    from hiera_perception.config import get_config
    from hiera_perception.model import Hiera

    torch.manual_seed(0)
    return save_checkpoint(path, Hiera(get_config(ARCH, num_classes=len(labels))), labels=labels, model_id="test")


def write_params(path: Path, params: dict, qos_reliable_depth: int | None = None, topic: str = "/image") -> Path:
    """A params YAML for node `hiera_perception`; optionally a reliable, deep input QoS (lossless test input)."""
    import yaml

    params = dict(params)
    if qos_reliable_depth:
        params["qos_overrides"] = {topic: {"subscription": {
            "reliability": "reliable", "history": "keep_last", "depth": qos_reliable_depth}}}
    path.write_text(yaml.safe_dump({"hiera_perception": {"ros__parameters": params}}))
    return path


def node_params(checkpoint: Path, **extra) -> dict:
    """The tests' node parameters: the test checkpoint on CPU, the clip timing above, a fast diagnostics period."""
    return {"model": str(checkpoint), "device": "cpu", "top_k": TOP_K, "frame_stride_s": STRIDE_FRAMES / FPS,
            "hop_s": HOP_FRAMES / FPS, "max_gap_s": 1.0, "queue_size": 16, "diagnostics_period_s": 0.5, **extra}


def start_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`python -m hiera_perception.node ARGS` in its own process group, output to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "hiera_perception.node", *args], env=env, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen, timeout_s: float = 20.0) -> int:
    """Ctrl-C the process group (as a terminal would), then kill it if it lingers; returns the exit code."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.wait(timeout=timeout_s)


# ---------------------------------------------------------------------------------------------------- frames


def frame_stamp_ns(n: int, t0_ns: int = T0_NS) -> int:
    """Stamp of frame n of a 30 fps camera, in integer nanoseconds."""
    return t0_ns + round(n * 10**9 / FPS)


def rgb_frame(n: int, width: int = 80, height: int = 60) -> np.ndarray:
    """A deterministic [H, W, 3] uint8 frame that differs from frame to frame (a moving gradient)."""
    y, x = np.mgrid[0:height, 0:width]
    r = (x * 3 + n * 7) % 256
    g = (y * 4 + n * 5) % 256
    b = ((x + y) * 2 + n * 11) % 256
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def image_msg(frame: np.ndarray, stamp_ns: int, frame_id: str = FRAME_ID, encoding: str = "rgb8"):
    from sensor_msgs.msg import Image

    msg = Image()
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 10**9)
    msg.header.frame_id = frame_id
    msg.height, msg.width = frame.shape[:2]
    msg.encoding = encoding
    msg.step = frame.shape[1] * (frame.shape[2] if frame.ndim == 3 else 1) * frame.itemsize
    msg.data = frame.tobytes()
    return msg


def compressed_msg(frame: np.ndarray, stamp_ns: int, frame_id: str = FRAME_ID, fmt: str = "jpeg"):
    import cv2
    from sensor_msgs.msg import CompressedImage

    ok, buf = cv2.imencode(".png" if fmt == "png" else ".jpg", frame[:, :, ::-1])
    assert ok
    msg = CompressedImage()
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 10**9)
    msg.header.frame_id = frame_id
    msg.format = fmt
    msg.data = buf.tobytes()
    return msg


@dataclass(frozen=True)
class ExpectedClip:
    first: int  # frame index of the clip's first picked frame
    last: int  # ... and of its last one
    indices: tuple[int, ...]


def expected_clips(num_frames: int, stride_frames: float, hop_frames: float, n_frames: int) -> list[ExpectedClip]:
    """ClipBuffer's clips over frames 0..n_frames-1 of a steady camera anchored at frame 0.

    Sample i of clip k is at frame position k * hop + i * stride (in frame periods); it picks the newest frame at
    or before it. Choose hop and stride so no position is within rounding distance of a frame boundary except
    exactly on it (e.g. stride 2, hop 7.5).
    """
    clips = []
    k = 0
    while True:
        idx = tuple(int(np.floor(k * hop_frames + i * stride_frames + 1e-9)) for i in range(num_frames))
        if k * hop_frames + (num_frames - 1) * stride_frames > n_frames - 1 + 1e-9:
            return clips
        clips.append(ExpectedClip(idx[0], idx[-1], idx))
        k += 1


def stamp_ns(t) -> int:
    """builtin_interfaces/Time -> integer nanoseconds."""
    return t.sec * 10**9 + t.nanosec


def reference_results(checkpoint: Path, clips_frames: list[list[np.ndarray]], top_k: int):
    """What the node must publish for these clips: the same Engine on the same frames, here on CPU."""
    from hiera_perception.engine import Engine
    from hiera_perception.preprocess import crop_resize

    engine = Engine(str(checkpoint), "cpu", "fp32", top_k)
    return engine.infer([[crop_resize(f, engine.size) for f in frames] for frames in clips_frames])


def check_features(features: list, expected: list[ExpectedClip], frames: list[np.ndarray], checkpoint: Path,
                   frame_id: str, t0_ns: int = T0_NS, top_k: int = TOP_K) -> None:
    """ActionFeatures against the expected clips: exact stamps, frame_id, sizes, labels, and the embedding and
    scores the Engine computes here for the same frames."""
    from hiera_perception.config import get_config

    by_stamp = {stamp_ns(f.header.stamp): f for f in features}
    assert len(by_stamp) == len(features), "two messages with the same stamp"
    assert sorted(by_stamp) == sorted(frame_stamp_ns(c.last, t0_ns) for c in expected)
    refs = reference_results(checkpoint, [[frames[i] for i in c.indices] for c in expected], top_k)
    for clip, ref in zip(expected, refs):
        msg = by_stamp[frame_stamp_ns(clip.last, t0_ns)]
        assert stamp_ns(msg.clip_start) == frame_stamp_ns(clip.first, t0_ns)
        assert msg.header.frame_id == frame_id
        assert msg.num_frames == NUM_FRAMES
        assert msg.encoder_version == "test@0"
        assert len(msg.embedding) == get_config(ARCH).num_features
        np.testing.assert_allclose(np.asarray(msg.embedding), ref.embedding, rtol=1e-4, atol=1e-4)
        assert list(msg.labels) == ref.labels and len(msg.labels) == top_k
        assert len(msg.scores) == top_k and list(msg.scores) == sorted(msg.scores, reverse=True)
        np.testing.assert_allclose(np.asarray(msg.scores), ref.scores, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- harness


@dataclass
class Harness:
    """A node in the test process: publishes frames, collects ActionFeatures and the node's diagnostics."""

    domain: int
    node_name: str = "/hiera_perception"  # the perception node's fully qualified name (its diagnostics' prefix)
    image_topic: str = "/image"
    compressed: bool = False
    output_topic: str = "/action_features"
    depth: int = 10
    features: list = field(default_factory=list)
    diagnostics: list = field(default_factory=list)

    def __post_init__(self) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from hiera_perception_msgs.msg import ActionFeatures
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CompressedImage, Image

        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=self.domain)
        self.node = rclpy.create_node("test_harness", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        msg_type, topic = (CompressedImage, self.image_topic + "/compressed") if self.compressed else (
            Image, self.image_topic)
        # Reliable + deep: against the node's default best-effort subscription this is best effort; against the
        # reliable override the tests use, nothing is lost.
        qos = QoSProfile(depth=self.depth, reliability=ReliabilityPolicy.RELIABLE)
        self.pub = self.node.create_publisher(msg_type, topic, qos)
        self.node.create_subscription(ActionFeatures, self.output_topic, self.features.append, 100)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 100)

    def _on_diagnostics(self, msg) -> None:
        for status in msg.status:
            if status.name == f"{self.node_name}: pipeline":
                level = status.level[0] if isinstance(status.level, bytes) else int(status.level)  # byte field
                self.diagnostics.append((level, status.message, {kv.key: kv.value for kv in status.values}))

    def spin_until(self, predicate: Callable[[], bool], timeout_s: float, proc: subprocess.Popen | None = None) -> bool:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                return predicate()
            self.executor.spin_once(timeout_sec=0.02)
        return True

    def wait_connected(self, proc: subprocess.Popen | None, timeout_s: float = 60.0) -> None:
        """Until the node subscribes to our frames and we to its output, or fail with its exit code."""
        ok = self.spin_until(lambda: self.pub.get_subscription_count() > 0
                             and self.node.count_publishers(self.output_topic) > 0, timeout_s, proc)
        assert ok, f"node not connected after {timeout_s} s (exit code {proc.poll() if proc else '?'})"
        self.spin_until(lambda: False, 0.3)  # let the other side finish matching too

    def publish(self, msgs: Iterable, rate_hz: float | None = FPS) -> int:
        """Publish messages, paced at rate_hz (None: as fast as possible), spinning in between. Returns the count."""
        n = 0
        start = time.monotonic()
        for msg in msgs:
            if rate_hz:
                self.spin_until(lambda: False, start + n / rate_hz - time.monotonic())
            self.pub.publish(msg)
            n += 1
        return n

    def last_diagnostics(self) -> dict[str, str]:
        return self.diagnostics[-1][2] if self.diagnostics else {}

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self.context.try_shutdown()


def call(harness: Harness, srv_type, name: str, request, proc, timeout_s: float = 60.0):
    """Call service `name` from the harness node, spinning it (and watching the node's process) for the answer."""
    client = harness.node.create_client(srv_type, name)
    try:
        assert client.wait_for_service(timeout_sec=30.0), f"no service {name}"
        future = client.call_async(request)
        assert harness.spin_until(future.done, timeout_s, proc), f"{name}: no answer in {timeout_s} s"
        return future.result()
    finally:
        harness.node.destroy_client(client)
