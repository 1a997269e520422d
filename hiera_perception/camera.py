# Copyright 2025 hiera_perception maintainers. Licensed under the Apache License, Version 2.0.
"""camera_publisher: a video file, a webcam or the synthetic camera as a `sensor_msgs/Image` (rgb8) topic.

One source per node (`video_path`, `camera_index` or `synthetic`), published on `image` (remap it) at `fps`,
kept by a timer; `header.stamp` is the node's ROS clock when the frame was obtained (for the synthetic camera,
the time its frame shows: the tick's due time), `frame_id` a parameter.
The synthetic camera (hiera_perception.synth.SyntheticCamera) also publishes the action it renders on
`~/true_action` (std_msgs/String `"<action> <sec>.<nanosec>"`, the stamp of the frame it belongs to, since
String has no header), which is how the demo scores itself.

Also the `hiera-perception publish` command (`add_arguments` / `main`), which runs this node in-process;
`node_main` is the `camera_publisher` console script (ros2/examples shape).
Shape follows ros2/examples minimal_publisher, ros2/demos (parameter callbacks, overridable QoS) and the
usual camera drivers (usb_cam, image_tools cam2image): a timer paces capture, images go out as they are.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import cv2
import numpy as np
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.exceptions import InvalidTopicNameException
from rclpy.logging import get_logger
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.task import Future
from rclpy.time import Time
from rclpy.validate_topic_name import validate_topic_name

from sensor_msgs.msg import Image
from std_msgs.msg import String

from hiera_perception.ros_params import declare_all, describe, on_parameters, spin_node, warn_unknown_parameters
from hiera_perception.synth import SEGMENT_S, SyntheticCamera
from hiera_perception.video import FrameReader, check_video_file

__all__ = ["CameraPublisher", "CameraConfig", "format_true_action", "parse_true_action", "node_main",
           "add_arguments", "main"]

NODE_NAME = "camera_publisher"
log = logging.getLogger(__name__)
MAX_FPS = 240.0
MIN_FPS = 0.01  # a frame every 100 s; far slower overflows the timer's integer nanoseconds
_WARN_EVERY_S = 5.0
_SUMMARY_EVERY_S = 10.0
_FAILURES_BEFORE_REOPEN = 30  # consecutive failed webcam reads before the device is opened again


def format_true_action(action: str, sec: int, nanosec: int) -> str:
    """The `~/true_action` payload: the action and the stamp of the frame that shows it."""
    return f"{action} {sec}.{nanosec:09d}"


def parse_true_action(data: str) -> tuple[str, int]:
    """`"wave 1712.000000033"` -> ("wave", stamp in integer nanoseconds)."""
    action, _, stamp = data.rpartition(" ")
    sec, _, nanosec = stamp.partition(".")
    if not action or not sec.isdigit() or len(nanosec) != 9 or not nanosec.isdigit():
        raise ValueError(f"true_action {data!r} is not '<action> <sec>.<9-digit nanosec>'")
    return action, int(sec) * 1_000_000_000 + int(nanosec)


# ---------------------------------------------------------------------------------------------- sources


class FrameSource(Protocol):
    fps: float  # the source's own rate (what fps=0 means)

    def read(self) -> tuple[np.ndarray | None, str | None]:
        """(RGB uint8 [H, W, 3] or None when no frame came, the true action or None)."""

    def close(self) -> None: ...


def _fps_problem(fps: float) -> str | None:
    """Why `fps` cannot pace the timer, or None: 0 (the source's own rate) or MIN_FPS .. MAX_FPS."""
    if fps == 0.0 or MIN_FPS <= fps <= MAX_FPS:
        return None
    return f"fps must be 0 (the source's rate) or in [{MIN_FPS:g}, {MAX_FPS:g}], got {fps:g}"


def _source_fps(cap: cv2.VideoCapture) -> float:
    """The rate a file or webcam reports, or 30 when it reports none or one outside MIN_FPS .. MAX_FPS (some
    containers give their time base, e.g. 1000): fps=0 runs the timer at it, which must stay in the fps range."""
    fps = cap.get(cv2.CAP_PROP_FPS)
    return fps if fps and MIN_FPS <= fps <= MAX_FPS else 30.0


class _VideoSource:
    def __init__(self, path: str, loop: bool):
        self.path, self.loop = path, loop
        self._frames = FrameReader(self._open())
        self.fps = _source_fps(self._frames.cap)
        self.ended = False

    def _open(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(self.path)
        if not cap.isOpened():
            raise ValueError(f"parameter video_path: OpenCV cannot open {self.path!r} "
                             "(missing, unknown format or corrupt)")
        return cap

    def read(self) -> tuple[np.ndarray | None, str | None]:
        frame = self._frames.read()  # past undecodable frames: one glitch no longer ends (or restarts) the file
        if frame is None and self.loop:
            # Reopening is what works for every container; seeking to frame 0 does not in some.
            self.close()
            try:
                self._frames = FrameReader(self._open())
            except ValueError:  # the file went away or broke while it played: a failed read, tried again next tick
                self._frames = FrameReader(cv2.VideoCapture())
                return None, None
            frame = self._frames.read()
        if frame is None:
            self.ended = True
            return None, None
        return frame[1], None

    def close(self) -> None:
        if self._frames.skipped:
            log.warning("%s: skipped %d undecodable frame(s)", self.path, self._frames.skipped)
            self._frames.skipped = 0
        self._frames.cap.release()


class _WebcamSource:
    def __init__(self, index: int, width: int, height: int):
        self.index, self.width, self.height = index, width, height
        self._failures = 0
        self._cap = self._open()
        self.fps = _source_fps(self._cap)
        self.ended = False

    def _open(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(self.index)
        if not cap.isOpened():
            raise ValueError(f"parameter camera_index: OpenCV cannot open camera {self.index}")
        if self.width and self.height:  # a request: the driver picks its nearest mode
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        # V4L2 queues 4 frames by default: a timer a little slower than the camera would read (and stamp
        # "now") frames up to 4 periods old. One buffer keeps each read the newest; backends without it ignore it.
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        return cap

    def read(self) -> tuple[np.ndarray | None, str | None]:
        ok, bgr = self._cap.read()
        if ok:
            self._failures = 0
            return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), None
        self._failures += 1
        if self._failures % _FAILURES_BEFORE_REOPEN == 0:  # unplugged and back, or a stuck driver
            self._cap.release()
            try:
                self._cap = self._open()
            except ValueError:
                self._cap = cv2.VideoCapture()  # stays closed; the next round tries again
        return None, None

    def close(self) -> None:
        self._cap.release()


class _SyntheticSource:
    def __init__(self, seed: int, size: tuple[int, int], fps: float, segment_s: tuple[float, float], shift: str):
        self.camera = SyntheticCamera(seed=seed, size=size, fps=fps, segment_s=segment_s, shift=shift)
        self.fps = fps
        self.ended = False

    def skip(self, frames: int) -> None:
        # The stream is a function of the frame index: moving the index on keeps its motion in real time when
        # the timer fell behind (the skipped frames are counted as late by the node).
        self.camera.frame_index += frames

    def read(self) -> tuple[np.ndarray | None, str | None]:
        action, frame = self.camera.next_frame()
        return frame, action

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- node




_desc = functools.partial(describe, read_only=True)  # only fps changes at run time

# name -> (default, descriptor). Only fps can change at run time; the source needs a restart.
PARAMETERS: dict[str, tuple[Any, ParameterDescriptor]] = {
    "video_path": ("", _desc("Video file to publish (any format OpenCV reads); one source only")),
    "camera_index": (-1, _desc("OpenCV camera index (0 = /dev/video0); -1 = no webcam", -1, 63)),
    "synthetic": (False, _desc("Publish the synthetic action camera (and its true action on ~/true_action)")),
    "fps": (30.0, _desc("Frames per second published; 0 = the source's own rate (synthetic: fixed at start)",
                        0.0, MAX_FPS, read_only=False)),
    "loop": (False, _desc("Start the video file again at its end (stamps keep increasing)")),
    "frame_id": ("camera", _desc("header.frame_id of every image")),
    "width": (0, _desc("Output width in pixels (webcam: requested from the driver); 0 = the source's", 0, 8192)),
    "height": (0, _desc("Output height in pixels; 0 = the source's (synthetic: 160 x 120)", 0, 8192)),
    "synthetic_seed": (0, _desc("Seed of the synthetic stream (the same seed gives the same stream)", 0, 2**31 - 1)),
    "synthetic_segment_s": (list(SEGMENT_S), _desc("Synthetic camera: [min, max] seconds each action lasts")),
    "synthetic_shift": ("none", _desc("Synthetic camera: distribution shift (none, lighting, blur, noise, "
                                      "color_cast, background)")),
}


@dataclass(frozen=True)
class CameraConfig:
    video_path: str
    camera_index: int
    synthetic: bool
    fps: float
    loop: bool
    frame_id: str
    width: int
    height: int
    synthetic_seed: int
    synthetic_segment_s: tuple[float, float]
    synthetic_shift: str

    def validate(self) -> None:
        chosen = [n for n, on in (("video_path", bool(self.video_path)), ("camera_index", self.camera_index >= 0),
                                  ("synthetic", self.synthetic)) if on]
        if len(chosen) != 1:
            raise ValueError(f"set exactly one source of video_path, camera_index >= 0, synthetic; got "
                             f"{', '.join(chosen) or 'none'}")
        if (self.width == 0) != (self.height == 0):
            raise ValueError(f"parameters width/height: both 0 or both > 0, got {self.width} x {self.height}")
        if (why := _fps_problem(self.fps)) is not None:
            raise ValueError(f"parameter {why}")
        seg = self.synthetic_segment_s
        if len(seg) != 2 or not 0 < seg[0] <= seg[1] < math.inf:
            raise ValueError(f"parameter synthetic_segment_s: [min, max] with 0 < min <= max, got {list(seg)}")
        if self.synthetic:
            from hiera_perception.synth import SHIFTS

            if self.synthetic_shift not in SHIFTS:
                raise ValueError(f"parameter synthetic_shift: {self.synthetic_shift!r} is not one of "
                                 f"{', '.join(SHIFTS)}")


class CameraPublisher(Node):
    """Publishes one source's frames on `image` (sensor_msgs/Image, rgb8) at `fps`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        values = declare_all(self, PARAMETERS)
        values["synthetic_segment_s"] = tuple(values["synthetic_segment_s"])
        self.config = cfg = CameraConfig(**values)
        cfg.validate()
        size = (cfg.height, cfg.width) if cfg.width else (120, 160)
        if cfg.video_path:
            self._source: FrameSource = _VideoSource(cfg.video_path, cfg.loop)
        elif cfg.camera_index >= 0:
            self._source = _WebcamSource(cfg.camera_index, cfg.width, cfg.height)
        else:
            self._source = _SyntheticSource(cfg.synthetic_seed, size, cfg.fps or 30.0, cfg.synthetic_segment_s,
                                            cfg.synthetic_shift)
        self._resize = (cfg.width, cfg.height) if cfg.width and not cfg.synthetic else None
        self.finished = Future()  # done when a non-looping video ends
        self.counts = {"published": 0, "late": 0, "read_failures": 0}

        # Reliable suits every subscriber (best-effort ones too); `qos_overrides./image.publisher.*` change it.
        self._pub = self.create_publisher(
            Image, "image", QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE),
            qos_overriding_options=QoSOverridingOptions.with_default_policies())
        self._truth_pub = self.create_publisher(String, "~/true_action", 30) if cfg.synthetic else None
        self._timer = None
        self._start_timer(cfg.fps)
        on_parameters(self, self._apply_parameters, self._validate_parameters)
        warn_unknown_parameters(self)
        source = cfg.video_path or (f"camera {cfg.camera_index}" if cfg.camera_index >= 0 else "synthetic camera")
        self.get_logger().info(f"publishing {source} on {self._pub.topic_name} at {self._fps:.4g} fps, "
                               f"frame_id {cfg.frame_id!r}")

    # ------------------------------------------------------------------ pacing

    def _start_timer(self, fps: float) -> None:
        self._fps = fps or self._source.fps
        if self._timer is not None:
            self.destroy_timer(self._timer)
        self._period_ns = int(round(1e9 / self._fps))
        self._t0_ns = self.get_clock().now().nanoseconds
        self._ticks = 0
        self._timer = self.create_timer(1.0 / self._fps, self._tick)

    def _validate_parameters(self, params: list[Parameter]) -> SetParametersResult:
        for p in params:
            if p.name == "fps" and self.config.synthetic:
                # Its motion and action lengths are laid out in frames of the rate it started with.
                return SetParametersResult(successful=False, reason="the synthetic camera's fps is fixed at start")
            if p.name == "fps" and (why := _fps_problem(p.value)) is not None:
                return SetParametersResult(successful=False, reason=why)
        return SetParametersResult(successful=True)

    def _apply_parameters(self, params: list[Parameter]) -> None:
        for p in params:
            if p.name == "fps":
                self._start_timer(p.value)
                self.get_logger().info(f"fps is now {self._fps:.4g}")

    # ------------------------------------------------------------------ capture

    def _tick(self) -> None:
        # Ticks the timer could not keep (a busy machine) are counted; the synthetic stream skips them so its
        # motion stays in real time, a file or webcam just goes on with its next frame.
        # Tick k is due at t0 + (k + 1) periods; every whole period past that is a frame the timer skipped.
        elapsed = self.get_clock().now().nanoseconds - self._t0_ns
        late = max(0, (elapsed - (self._ticks + 1) * self._period_ns) // self._period_ns)
        self._ticks += 1 + late
        if late:
            self.counts["late"] += late
            if isinstance(self._source, _SyntheticSource):
                self._source.skip(late)
            self.get_logger().debug(f"{late} frame period(s) late")
        frame, action = self._source.read()
        if isinstance(self._source, _SyntheticSource):
            # Its frame shows the tick's due time (late ticks are skipped to keep it so): stamp that, as a camera's
            # capture clock would, not when the timer and the render got to it. A stamp that jittered by the render
            # placed the node's whole sample grid late in the frame interval whenever the frame it anchored on was
            # a slow one, and every clip then waited a frame (a 33 ms longer p50 for the whole run).
            stamp = Time(nanoseconds=self._t0_ns + self._ticks * self._period_ns,
                         clock_type=self.get_clock().clock_type).to_msg()
        else:
            stamp = self.get_clock().now().to_msg()  # at capture: right after the frame was obtained
        if frame is None:
            if self._source.ended:
                self.get_logger().info(f"end of {self.config.video_path}: {self.counts['published']} frames published")
                self.destroy_timer(self._timer)
                self.finished.set_result(True)
            else:
                self.counts["read_failures"] += 1
                self.get_logger().warning(f"no frame from the camera ({self.counts['read_failures']} failed reads)",
                                          throttle_duration_sec=_WARN_EVERY_S)
            return
        if self._resize is not None and frame.shape[1::-1] != self._resize:
            frame = cv2.resize(frame, self._resize, interpolation=cv2.INTER_AREA)
        msg = Image()
        msg.header.stamp = stamp
        msg.header.frame_id = self.config.frame_id
        msg.height, msg.width = frame.shape[:2]
        msg.encoding = "rgb8"
        msg.is_bigendian = 0
        msg.step = msg.width * 3
        msg.data = np.ascontiguousarray(frame).tobytes()
        self._pub.publish(msg)
        if action is not None and self._truth_pub is not None:
            self._truth_pub.publish(String(data=format_true_action(action, stamp.sec, stamp.nanosec)))
        self.counts["published"] += 1
        self.get_logger().info(
            f"{self.counts['published']} frames published, {self.counts['late']} late, "
            f"{self.counts['read_failures']} failed reads", throttle_duration_sec=_SUMMARY_EVERY_S)

    def destroy_node(self) -> None:
        source = getattr(self, "_source", None)
        if source is not None:
            source.close()
        super().destroy_node()


def run(argv: Sequence[str] | None = None, **node_kwargs: Any) -> int:
    """rclpy.init with `argv`, the node until Ctrl-C (or the end of a non-looping video); 0, or 2 on bad parameters."""
    nodes: list[CameraPublisher] = []

    def make() -> CameraPublisher:
        nodes.append(CameraPublisher(**node_kwargs))
        return nodes[-1]

    rc = spin_node(make, NODE_NAME, list(argv) if argv is not None else None, until=lambda node: node.finished)
    if nodes:  # the final count (the running one is throttled), once the node is gone: nothing left for rosout
        counts = nodes[-1].counts
        get_logger(NODE_NAME).info(f"stopped: {counts['published']} frames published, {counts['late']} late, "
                                   f"{counts['read_failures']} failed reads")
    return rc


def node_main(args: list[str] | None = None) -> int:
    """The `camera_publisher` console script: `camera_publisher --ros-args -p video_path:=FILE ...`."""
    return run(args)


# ---------------------------------------------------------------------------------------------------
# `hiera-perception publish`


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", metavar="FILE", help="video file (any format OpenCV reads)")
    src.add_argument("--camera", metavar="N", type=int, help="OpenCV camera index (0 = /dev/video0)")
    src.add_argument("--synthetic", action="store_true", help="the synthetic action camera")
    p.add_argument("--fps", type=float, default=None,
                   help="frames per second (default: the file's or camera's own rate; synthetic 30)")
    p.add_argument("--topic", default="image", help="image topic (default: image)")
    p.add_argument("--loop", action="store_true", help="play the video file again at its end")
    p.add_argument("--frame-id", default="camera", help="header.frame_id (default: camera)")
    p.add_argument("--size", metavar="WxH", default=None, help="output size, e.g. 640x480 (default: the source's)")
    p.add_argument("--seed", type=int, default=0, help="synthetic stream seed (default: 0)")


def parameters_from_args(args: argparse.Namespace) -> list[Parameter]:
    """The node's parameters for the `publish` flags (typed, so a file named "1" stays a string)."""
    params = [Parameter("frame_id", value=args.frame_id), Parameter("loop", value=bool(args.loop))]
    if args.video is not None:
        params.append(Parameter("video_path", value=str(args.video)))
    elif args.camera is not None:
        params.append(Parameter("camera_index", value=int(args.camera)))
    else:
        params += [Parameter("synthetic", value=True), Parameter("synthetic_seed", value=int(args.seed))]
    fps = args.fps if args.fps is not None else (30.0 if args.synthetic else 0.0)
    if _fps_problem(fps) is not None or (fps == 0.0 and args.synthetic):  # the synthetic camera has no own rate
        raise ValueError(f"--fps must be in [{MIN_FPS:g}, {MAX_FPS:g}], got {args.fps}")
    params.append(Parameter("fps", value=float(fps)))
    if args.size:
        w, _, h = args.size.lower().partition("x")
        if not (w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
            raise ValueError(f"--size must be WIDTHxHEIGHT, e.g. 640x480, got {args.size!r}")
        params += [Parameter("width", value=int(w)), Parameter("height", value=int(h))]
    return params


def main(args: argparse.Namespace) -> int:
    if args.video is not None:  # said as `run` says it, before any ROS start
        check_video_file(args.video)
    params = parameters_from_args(args)
    try:
        validate_topic_name(args.topic)
    except InvalidTopicNameException:
        raise ValueError(f"--topic {args.topic!r} is not a valid ROS topic name") from None
    log.info("publishing on %s until Ctrl-C", args.topic)
    # The node publishes on `image`; --topic is a remap, exactly what `--ros-args -r image:=TOPIC` does.
    return run([], parameter_overrides=params, cli_args=["--ros-args", "-r", f"image:={args.topic}"])


if __name__ == "__main__":
    raise SystemExit(node_main())
