# Copyright 2025 hiera_perception maintainers. Licensed under the Apache License, Version 2.0.
"""The ROS 2 node: camera frames in, `hiera_perception_msgs/ActionFeatures` out.

A thin adapter over the core (DESIGN.md, STYLE.md habits 1-8):

    image callback:  message -> RGB (convert.py) -> ClipBuffer.push -> bounded clip queue
    worker thread:   clip queue -> Engine.infer (batched) -> ActionFeatures on `action_features`
    timer:           counters -> /diagnostics (DiagnosticArray) + a throttled info summary

Threads: `rclpy.spin` runs the image callback, the diagnostics timer and the parameter callbacks
one at a time (the node's default mutually exclusive callback group on a single-threaded
executor), so the ClipBuffer has one caller. The worker thread is the only user of the Engine.
The two share the clip queue, the counters and `top_k`, all under `self._cond`.

Shape follows ros2/examples (`main`), ros2/demos (parameter callbacks, overridable QoS, lost
message counting) and mgonzs13/yolo_ros (one declaration block, output copies the input header).
"""

from __future__ import annotations

import array
import logging
import re
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.executors import ExternalShutdownException
from rclpy.logging import get_logger
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.qos_overriding_options import QoSOverridingOptions

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from hiera_perception_msgs.msg import ActionFeatures
from sensor_msgs.msg import CompressedImage, Image

from hiera_perception.checkpoint import load_model
from hiera_perception.clip_buffer import Clip, ClipBuffer
from hiera_perception.convert import BadFrame, compressed_to_rgb, image_to_rgb
from hiera_perception.engine import PRECISIONS, Engine

__all__ = ["PerceptionNode", "NodeConfig", "ConfigError", "main"]

NODE_NAME = "hiera_perception"
DIAGNOSTIC_NAME = "hiera_perception: pipeline"
INPUTS = ("raw", "compressed")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_LATENCY_WINDOW = 256  # clips the latency percentiles are taken over
_WARN_EVERY_S = 5.0  # throttle of per-frame warnings
_SUMMARY_EVERY_S = 10.0  # throttle of the info summary


class _ToRosLogger(logging.Handler):
    """Shows the core's `logging` records (it never imports rclpy) through the node's logger: console and /rosout."""

    def __init__(self, ros_logger: Any) -> None:
        super().__init__(logging.INFO)
        self._ros_logger = ros_logger

    def emit(self, record: logging.LogRecord) -> None:
        log = self._ros_logger
        level = record.levelno
        emit = log.error if level >= logging.ERROR else log.warning if level >= logging.WARNING else log.info
        emit(f"{record.name}: {record.getMessage()}")


class ConfigError(ValueError):
    """A parameter value the node cannot run with; the message names the parameter and value."""


@dataclass(frozen=True)
class NodeConfig:
    model: str
    arch: str
    device: str
    precision: str
    top_k: int
    frame_stride_s: float
    hop_s: float
    max_gap_s: float
    queue_size: int
    input: str
    output_topic: str
    diagnostics_period_s: float
    frame_id: str
    adaptation_enabled: bool

    def validate(self) -> None:
        """Checks the descriptors cannot express; ranges and types are enforced on declaration."""
        if not _DEVICE_RE.match(self.device):
            raise ConfigError(f"parameter device: {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"parameter precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.input not in INPUTS:
            raise ConfigError(f"parameter input: {self.input!r} is not one of {', '.join(INPUTS)}")
        if not self.output_topic.strip():
            raise ConfigError("parameter output_topic: must not be empty")
        if self.device.startswith("cuda"):
            import torch

            index = int(self.device.partition(":")[2] or 0)
            if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                raise ConfigError(f"parameter device: {self.device!r} but this machine has "
                                  f"{torch.cuda.device_count()} CUDA device(s); use auto or cpu")


def _desc(description: str, lo: float | None = None, hi: float | None = None,
          read_only: bool = False) -> ParameterDescriptor:
    d = ParameterDescriptor(description=description, read_only=read_only)
    if isinstance(lo, int) and isinstance(hi, int):
        d.integer_range = [IntegerRange(from_value=lo, to_value=hi, step=1)]
    elif lo is not None:
        d.floating_point_range = [FloatingPointRange(from_value=float(lo), to_value=float(hi), step=0.0)]
    return d


# name -> (default, descriptor). Only top_k can change at run time; the rest need a restart.
PARAMETERS: dict[str, tuple[Any, ParameterDescriptor]] = {
    "model": ("", _desc('Checkpoint file, a file name in models/, a fetched official name, or a config name '
                        '(random weights); "" = the embedded default model')),
    "arch": ("", _desc('Config name for an official .pth checkpoint (e.g. hiera_base_16x224); "" = from the file')),
    "device": ("auto", _desc("auto (cuda when available), cpu, cuda or cuda:N")),
    "precision": ("fp32", _desc(f"Inference precision: {' | '.join(PRECISIONS)}")),
    "top_k": (5, _desc("Labels (best first) in each message; can change at run time", 1, 1000)),
    "frame_stride_s": (0.0, _desc("Seconds between a clip's frames on the camera timeline; 0 = the model's own",
                                  0.0, 10.0)),
    "hop_s": (0.5, _desc("Seconds between the starts of consecutive clips", 0.01, 60.0)),
    "max_gap_s": (1.0, _desc("A gap between frame stamps longer than this restarts the clip", 0.01, 3600.0)),
    "queue_size": (4, _desc("Clips waiting for the model; when full the oldest is dropped (counted)", 1, 256)),
    "input": ("raw", _desc("raw: sensor_msgs/Image on `image`; compressed: sensor_msgs/CompressedImage on "
                           "`image/compressed` (the base topic `image` is what you remap)")),
    "output_topic": ("action_features", _desc("Topic of the hiera_perception_msgs/ActionFeatures output")),
    "diagnostics_period_s": (1.0, _desc("Seconds between /diagnostics reports", 0.1, 3600.0)),
    "frame_id": ("", _desc('Output header.frame_id; "" = the camera\'s frame_id')),
    "adaptation.enabled": (False, _desc("On-device adaptation (not in this version yet: true only warns)")),
}


class PerceptionNode(Node):
    """Subscribes to `image` (or `image/compressed`), publishes ActionFeatures and /diagnostics."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        for name, (default, descriptor) in PARAMETERS.items():
            try:
                self.declare_parameter(name, default, descriptor)
            except (InvalidParameterValueException, InvalidParameterTypeException) as e:
                hint = " (write floats with a decimal point, e.g. 1.0)" if isinstance(default, float) else ""
                raise ConfigError(f"parameter {name}: {e.args[0] if e.args else e}{hint}") from None
        self.config = NodeConfig(**{name.replace(".", "_"): self.get_parameter(name).value for name in PARAMETERS})
        self.config.validate()
        self._core_log = _ToRosLogger(self.get_logger())
        logging.getLogger("hiera_perception").addHandler(self._core_log)
        logging.getLogger("hiera_perception").setLevel(logging.INFO)
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        cfg = self.config

        try:
            model = load_model(cfg.model or None, arch=cfg.arch or None, device=cfg.device)
            self._engine = Engine(model, cfg.device, cfg.precision, cfg.top_k)
        except (ValueError, OSError) as e:
            raise ConfigError(f"parameter model {cfg.model or '(embedded default)'!r}: {e}") from None
        stride = cfg.frame_stride_s or self._engine.frame_stride_s
        self._buffer = ClipBuffer(self._engine.num_frames, stride, cfg.hop_s, cfg.max_gap_s, self._engine.size)

        # Shared with the worker thread, guarded by _cond.
        self._cond = threading.Condition()
        self._queue: deque[Clip] = deque()
        self._stop = False
        self._top_k = cfg.top_k
        self._latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)  # seconds, last frame received -> published
        self._counts = Counter()  # frames, bad, frames_lost, queue_drops, published, inference_errors
        self._bad: Counter[str] = Counter()  # bad frames per reason
        self._last_report = (time.monotonic(), Counter(), {})  # (time, counts, buffer counters) at the last report

        self._pub = self.create_publisher(
            ActionFeatures, cfg.output_topic, QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE),
            qos_overriding_options=QoSOverridingOptions.with_default_policies())
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # The camera topic follows image_transport: remap the base topic `image`; compressed frames are on
        # <base>/compressed, so the suffix goes on after remapping.
        if cfg.input == "raw":
            msg_type, topic, self._convert = Image, "image", image_to_rgb
        else:
            msg_type, topic = CompressedImage, self.resolve_topic_name("image") + "/compressed"
            self._convert = compressed_to_rgb
        self._sub = self.create_subscription(
            msg_type, topic, self._on_image, qos_profile_sensor_data,
            qos_overriding_options=QoSOverridingOptions.with_default_policies(),
            event_callbacks=SubscriptionEventCallbacks(message_lost=self._on_message_lost))
        self._timer = self.create_timer(cfg.diagnostics_period_s, self._report)

        self._worker = threading.Thread(target=self._work, name="hiera_perception_worker", daemon=True)
        self._worker.start()
        if cfg.adaptation_enabled:
            self.get_logger().warning("adaptation.enabled is true, but this version of the node has no on-device "
                                      "adaptation yet: serving the model as loaded")
        self.get_logger().info(
            f"model {self._engine.encoder_version} on {self._engine.device} ({cfg.precision}): clips of "
            f"{self._engine.num_frames} frames every {stride:.4g} s, a new clip every {cfg.hop_s:.4g} s; "
            f"{cfg.input} input on {self._sub.topic_name}, output on {self._pub.topic_name}")

    # ------------------------------------------------------------------ parameters

    def _validate_parameters(self, params: list[Parameter]) -> SetParametersResult:
        for p in params:
            if p.name == "top_k":
                if not (isinstance(p.value, int) and 1 <= p.value <= 1000):
                    return SetParametersResult(successful=False, reason=f"top_k must be 1..1000, got {p.value!r}")
            elif p.name in PARAMETERS:
                return SetParametersResult(
                    successful=False,
                    reason=f"{p.name} cannot change while the node runs (restart it with the new value)")
        return SetParametersResult(successful=True)

    def _apply_parameters(self, params: list[Parameter]) -> None:
        for p in params:
            if p.name == "top_k":
                with self._cond:
                    self._top_k = p.value
                self.get_logger().info(f"top_k is now {p.value}")

    # ------------------------------------------------------------------ image callback

    def _on_image(self, msg: Image | CompressedImage) -> None:
        """Convert, push, enqueue finished clips. Never raises: every failure is a counted bad frame."""
        received = time.monotonic()
        try:
            stamp = msg.header.stamp
            if stamp.sec < 0 or stamp.nanosec >= 1_000_000_000:
                raise BadFrame("bad_stamp")
            rgb = self._convert(msg)
            clips = self._buffer.push(stamp.sec + stamp.nanosec * 1e-9, rgb, (msg.header, received))
        except Exception as e:  # noqa: BLE001 - a callback must never raise; BadFrame/ValueError are the usual
            reason = e.reason if isinstance(e, BadFrame) else type(e).__name__
            with self._cond:
                self._counts["frames"] += 1
                self._counts["bad"] += 1
                self._bad[reason] += 1
                total = self._counts["bad"]
            self.get_logger().warning(f"bad frame ({reason}): {e}; {total} bad frames so far",
                                      throttle_duration_sec=_WARN_EVERY_S)
            return
        self.get_logger().debug(f"frame {stamp.sec}.{stamp.nanosec:09d} {rgb.shape} -> {len(clips)} clip(s)")
        with self._cond:
            self._counts["frames"] += 1
            for clip in clips:
                if len(self._queue) >= self.config.queue_size:
                    self._queue.popleft()
                    self._counts["queue_drops"] += 1
                self._queue.append(clip)
            if clips:
                self._cond.notify()

    def _on_message_lost(self, info: Any) -> None:
        """Frames the middleware reports lost before they reached us (best effort input under load)."""
        with self._cond:
            self._counts["frames_lost"] += info.total_count_change

    # ------------------------------------------------------------------ worker thread

    def _work(self) -> None:
        """Owns the Engine: take every queued clip (a batch), infer, publish; until stopped."""
        try:  # the first call pays for lazy initialisation; do it before frames arrive
            self._engine.infer([[np.zeros((self._engine.size, self._engine.size, 3), np.uint8)]
                                * self._engine.num_frames])
        except Exception as e:  # noqa: BLE001 - reported, and the real clips will report again
            self.get_logger().error(f"warm-up inference failed: {e}")
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stop)
                if self._stop:
                    return
                batch = list(self._queue)  # everything waiting: one batched forward pass
                self._queue.clear()
                self._engine.labeler.top_k = self._top_k
            try:
                results = self._engine.infer([clip.frames for clip in batch])
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: drop this batch, keep serving
                with self._cond:
                    self._counts["inference_errors"] += len(batch)
                self.get_logger().error(f"inference failed on {len(batch)} clip(s): {e}",
                                        throttle_duration_sec=_WARN_EVERY_S)
                continue
            for clip, result in zip(batch, results):
                if not self._publish(clip, result):
                    return

    def _publish(self, clip: Clip, result: Any) -> bool:
        """Publish one clip's result; False when the node is shutting down (the worker then stops)."""
        first_header, _ = clip.tags[0]
        last_header, received = clip.tags[-1]
        msg = ActionFeatures()
        msg.header.stamp = last_header.stamp
        msg.header.frame_id = self.config.frame_id or last_header.frame_id
        msg.clip_start = first_header.stamp
        msg.num_frames = clip.num_frames
        msg.encoder_version = self._engine.encoder_version
        msg.embedding = array.array("f", np.ascontiguousarray(result.embedding, np.float32).tobytes())
        msg.labels = list(result.labels)
        msg.scores = array.array("f", result.scores)
        try:
            self._pub.publish(msg)
        except Exception as e:  # noqa: BLE001 - after Ctrl-C the context is gone: stop quietly
            if not self.context.ok():
                return False
            self.get_logger().error(f"publish failed: {e}", throttle_duration_sec=_WARN_EVERY_S)
            return True
        latency = time.monotonic() - received
        with self._cond:
            self._counts["published"] += 1
            self._latencies.append(latency)
        self.get_logger().debug(f"clip {clip.epoch}/{clip.index}: {result.labels[:1]} latency {latency * 1e3:.1f} ms")
        return True

    # ------------------------------------------------------------------ diagnostics

    def _report(self) -> None:
        """Publish one DiagnosticStatus with rates over the last period; WARN while frames are lost or bad."""
        now = time.monotonic()
        with self._cond:
            counts, bad = Counter(self._counts), dict(self._bad)
            latencies = np.array(self._latencies, dtype=np.float64)
            depth = len(self._queue)
        buffer = self._buffer.counters()
        then, before, buffer_before = self._last_report
        self._last_report = (now, counts, buffer)
        dt = max(now - then, 1e-9)
        delta = counts - before  # Counter subtraction keeps positive differences
        fps, clips_per_s = delta["frames"] / dt, delta["published"] / dt
        p50 = p95 = "n/a"
        if latencies.size:
            p50, p95 = (f"{v:.1f}" for v in np.percentile(latencies, [50, 95]) * 1e3)

        problems = []
        if delta["queue_drops"]:
            problems.append(f"{delta['queue_drops']} clips dropped (model too slow for hop_s)")
        if delta["frames_lost"]:
            problems.append(f"{delta['frames_lost']} frames lost in transport")
        if delta["bad"]:
            problems.append(f"{delta['bad']} bad frames")
        if delta["inference_errors"]:
            problems.append(f"{delta['inference_errors']} clips failed inference")
        good = delta["frames"] - delta["bad"]
        if good and buffer["duplicates"] - buffer_before.get("duplicates", 0) == good:
            problems.append("every frame had its predecessor's stamp: is the camera stamping its frames?")
        status = DiagnosticStatus(name=DIAGNOSTIC_NAME, hardware_id=str(self._engine.device))
        if problems:
            status.level, status.message = DiagnosticStatus.WARN, "; ".join(problems)
        elif counts["frames"] == 0:
            status.level, status.message = DiagnosticStatus.OK, "waiting for frames"
        else:
            status.level, status.message = DiagnosticStatus.OK, f"{clips_per_s:.2f} clips/s"
        values = {
            "input_fps": f"{fps:.2f}",
            "clips_per_s": f"{clips_per_s:.2f}",
            "latency_p50_ms": p50,
            "latency_p95_ms": p95,
            "frames_received": counts["frames"],
            "clips_published": counts["published"],
            "frames_lost": counts["frames_lost"],
            "queue_drops": counts["queue_drops"],
            "queue_depth": depth,
            "inference_errors": counts["inference_errors"],
            "bad_frames": counts["bad"],
            **{f"bad_frames.{reason}": n for reason, n in sorted(bad.items())},
            "buffer_resets": buffer["resets"],
            "duplicate_stamps": buffer["duplicates"],
            "model": self.config.model or "(embedded default)",
            "encoder_version": self._engine.encoder_version,
            "device": str(self._engine.device),
            "precision": self.config.precision,
            "adaptation": "requested, not available" if self.config.adaptation_enabled else "off",
        }
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(msg)
        if counts["frames"]:
            self.get_logger().info(
                f"{fps:.1f} frames/s in, {clips_per_s:.2f} clips/s out, latency p50 {p50} ms p95 {p95} ms; "
                f"so far {counts['frames']} frames, {counts['frames_lost']} lost, {counts['bad']} bad, "
                f"{counts['queue_drops']} clips dropped, {buffer['resets']} clip buffer resets",
                throttle_duration_sec=_SUMMARY_EVERY_S)

    # ------------------------------------------------------------------ shutdown

    def destroy_node(self) -> None:
        """Stop and join the worker (it finishes the batch in hand), then destroy the node."""
        worker = getattr(self, "_worker", None)  # absent when __init__ failed part way
        if worker is not None:
            with self._cond:
                self._stop = True
                self._cond.notify_all()
            worker.join(timeout=30.0)
        if hasattr(self, "_core_log"):
            logging.getLogger("hiera_perception").removeHandler(self._core_log)
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    try:
        with rclpy.init(args=args):
            try:
                node = PerceptionNode()
            except ConfigError as e:
                get_logger(NODE_NAME).fatal(str(e))
                return 2
            try:
                rclpy.spin(node)
            finally:
                node.destroy_node()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
