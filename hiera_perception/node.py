# Copyright 2025 hiera_perception maintainers. Licensed under the Apache License, Version 2.0.
"""The ROS 2 node: camera frames in, `hiera_perception_msgs/ActionFeatures` out.

A thin adapter over the core (DESIGN.md, STYLE.md habits 1-8):

    image callback:  message -> RGB (convert.py) -> ClipBuffer.push -> bounded clip queue
    worker thread:   clip queue -> Engine.infer (batched) -> ActionFeatures on `action_features`;
                     between two batches: swaps in an adapted encoder version, records / learns taught
                     labels, feeds the adaptation replay and renders `~/reconstruction` (online.py)
    adapter thread:  MAE rounds on a shadow copy while the worker is idle (adaptation.py), optional
    timer:           counters -> /diagnostics (DiagnosticArray) + a throttled info summary
    services:        ~/teach (TeachLabel), ~/adaptation/enable (SetBool), ~/adaptation/rollback, ~/adaptation/save

Threads: main() spins a SingleThreadedExecutor, so every callback runs in one thread and the ClipBuffer
has one caller. Services that wait (for a round in progress, for a recording to end) are coroutines: their
blocking part runs in a helper thread (`_off_executor`) and the executor goes on serving the camera while
they await it. The adaptation services share a mutually exclusive group (one at a time), the teach service
has its own. Only the worker thread runs the Engine; services hand it work and wait with a bounded
timeout. The worker and the callbacks share the clip queue, the counters, `top_k` and the teach job, all
under `self._cond`.

Why not rclpy's MultiThreadedExecutor (the node's first executor): in rclpy 9.1 (Kilted) it submits a
callback that still waits for a pool thread again on every wake-up, and scans all its pending futures each
time, under the GIL. With the worker's inference competing for the GIL the list grew until the executor
thread held a core for seconds (py-spy: `_spin_once_impl` -> `Future.done`): frames were not taken, the
best-effort queue dropped them and clips stopped. Synthetic camera at 30 fps, 2 cores, runs of 25-40 s:
clips stopped for 1-3 s in 3 of 20 runs, a frame came > 0.2 s late in 7; with one executor thread, in 0
of 10 (ros2/rclpy#1452).

Shape follows ros2/examples (`main`, callback groups), ros2/demos (parameter callbacks, overridable QoS,
lost message counting) and mgonzs13/yolo_ros (one declaration block, output copies the input header).
"""

from __future__ import annotations

import array
import logging
import os
import re
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable

import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.task import Future

try:
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:  # Humble
    from rclpy.qos_event import SubscriptionEventCallbacks

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from hiera_perception_msgs.msg import ActionFeatures
from hiera_perception_msgs.srv import TeachLabel
from sensor_msgs.msg import CompressedImage, Image
from std_srvs.srv import SetBool, Trigger

from hiera_perception.adapt import decoder_state_of
from hiera_perception.checkpoint import load_model
from hiera_perception.clip_buffer import Clip, ClipBuffer
from hiera_perception.convert import BadFrame, compressed_to_rgb, image_to_rgb
from hiera_perception.engine import Engine
from hiera_perception.node_config import PARAMETERS, ConfigError, NodeConfig, config_from
from hiera_perception.online import (LiveAdaptation, TeachJob, default_adaptation_dir, default_prototypes_file,
                                     resume_serving)
from hiera_perception.ros_params import declare_all, on_parameters, spin_node, warn_unknown_parameters

__all__ = ["PerceptionNode", "NodeConfig", "ConfigError", "main"]

NODE_NAME = "hiera_perception"
_LATENCY_WINDOW = 256  # clips the latency percentiles are taken over
_WARN_EVERY_S = 5.0  # throttle of per-frame warnings
_SUMMARY_EVERY_S = 10.0  # throttle of the info summary
TEACH_MAX_S = 60.0  # longest TeachLabel recording
_TEACH_MARGIN_S = 30.0  # the teach service's wait beyond `seconds`: the last clip's inference, then the teaching


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


class PerceptionNode(Node):
    """Subscribes to `image` (or `image/compressed`), publishes ActionFeatures and /diagnostics."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self.config = config_from(declare_all(self, PARAMETERS, ConfigError))
        self.config.validate()
        warn_unknown_parameters(self)  # before the model loads: a misspelt name is seen at once
        self._core_log = _ToRosLogger(self.get_logger())
        logging.getLogger("hiera_perception").addHandler(self._core_log)
        logging.getLogger("hiera_perception").setLevel(logging.INFO)
        on_parameters(self, self._apply_parameters)  # the descriptors refuse the rest: read-only, ranges
        cfg = self.config
        # Statuses named after this node, so that two instances (front and rear camera) stay apart.
        fqn = self.get_fully_qualified_name()
        self._diagnostic_names = (f"{fqn}: pipeline", f"{fqn}: adaptation")

        try:
            base = load_model(cfg.model or None, arch=cfg.arch or None, device=cfg.device)
        except (ValueError, OSError) as e:
            raise ConfigError(f"parameter model {cfg.model or '(embedded default)'!r}: {e}") from None
        self._prototypes_file = Path(cfg.prototypes_file).expanduser() if cfg.prototypes_file \
            else default_prototypes_file(base)
        self._adaptation_dir = Path(cfg.adaptation_dir).expanduser() if cfg.adaptation_dir \
            else default_adaptation_dir(base.model_id, fqn)
        model, mae_state, reference = base, None, None
        if cfg.adaptation_enabled and cfg.adaptation_resume:
            try:
                model, mae_state, resumed = resume_serving(base, self._adaptation_dir)
            except (ValueError, OSError) as e:  # CheckpointError is a ValueError
                raise ConfigError(f"parameter adaptation.dir {str(self._adaptation_dir)!r}: cannot resume "
                                  f"(set adaptation.resume false to start from the base model): {e}") from None
            reference = base if resumed else None  # the drift guard compares with the original model
        elif cfg.adaptation_enabled:
            mae_state = decoder_state_of(base)
        try:
            self._engine = Engine(model, cfg.device, cfg.precision, cfg.top_k, str(self._prototypes_file),
                                  cuda_graph=cfg.cuda_graph, compile=cfg.compile)
        except (ValueError, OSError) as e:  # the model loaded: what fails here is the taught labels' file
            raise ConfigError(f"parameter prototypes_file {str(self._prototypes_file)!r}: {e}") from None
        stride = cfg.frame_stride_s or self._engine.frame_stride_s
        self._buffer = ClipBuffer(self._engine.num_frames, stride, cfg.hop_s, cfg.max_gap_s, self._engine.size)
        # No frame, or frames but no clip, for this long is a fault in /diagnostics: several hops, and twice
        # what the first clip after a gap takes to fill.
        self._stale_s = max(2.0, 4 * cfg.hop_s, 2 * (self._engine.num_frames - 1) * stride)
        # time.monotonic() of the last frame and of the first frame after a silence (executor thread only)
        self._last_frame = self._frames_since = time.monotonic()

        # Shared with the worker thread, guarded by _cond.
        self._cond = threading.Condition()
        self._queue: deque[Clip] = deque()
        self._stop = False
        self._top_k = cfg.top_k
        self._latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)  # seconds, last frame received -> published
        self._counts = Counter()  # frames, bad, frames_lost, queue_drops, published, inference_errors
        self._incompatible_qos: str | None = None  # the policy of the last publisher this subscription cannot hear
        self._bad: Counter[str] = Counter()  # bad frames per reason
        self._last_report = (time.monotonic(), Counter(), {})  # (time, counts, buffer counters) at the last report
        self._last_clip = time.monotonic()  # of the last clip published (or of the start)
        self._working = False  # the worker holds a batch, a swap or a teach job (the Adapter yields meanwhile)
        self._teach_job: TeachJob | None = None
        self._next_panel = 0.0  # time.monotonic() of the next ~/reconstruction image (worker only)

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
            event_callbacks=SubscriptionEventCallbacks(message_lost=self._on_message_lost,
                                                       incompatible_qos=self._on_incompatible_qos))
        self._timer = self.create_timer(cfg.diagnostics_period_s, self._report)
        self._recon_pub = self.create_publisher(Image, "~/reconstruction",
                                                QoSProfile(depth=2, reliability=ReliabilityPolicy.RELIABLE))

        # Services wait (for a round in progress, for a recording) off the executor thread (_off_executor); a
        # group per kind keeps requests of one kind in order. The model work they ask for is done by the worker.
        self._adaptation_group = MutuallyExclusiveCallbackGroup()
        self._teach_group = MutuallyExclusiveCallbackGroup()
        self._learning_services = [
            self.create_service(SetBool, "~/adaptation/enable", self._on_enable, callback_group=self._adaptation_group),
            self.create_service(Trigger, "~/adaptation/rollback", self._on_rollback,
                                callback_group=self._adaptation_group),
            self.create_service(Trigger, "~/adaptation/save", self._on_save, callback_group=self._adaptation_group),
            self.create_service(TeachLabel, "~/teach", self._on_teach, callback_group=self._teach_group),
        ]

        self._adaptation: LiveAdaptation | None = None  # set once, at start or by the enable service
        if cfg.adaptation_enabled:
            try:
                self._adaptation = self._start_adaptation(mae_state, reference)
            except (ValueError, OSError) as e:
                raise ConfigError(f"adaptation could not start (adaptation.dir {str(self._adaptation_dir)!r}): "
                                  f"{e}") from None
        del base, model, mae_state, reference  # the Adapter holds its own copies

        self._worker = threading.Thread(target=self._work, name="hiera_perception_worker", daemon=True)
        self._worker.start()
        self.get_logger().info(
            f"model {self._engine.encoder_version} on {self._engine.device} ({cfg.precision}): clips of "
            f"{self._engine.num_frames} frames every {stride:.4g} s, a new clip every {cfg.hop_s:.4g} s; "
            f"{cfg.input} input on {self._sub.topic_name}, output on {self._pub.topic_name}; adaptation "
            + (f"on, versions in {self._adaptation_dir}" if self._adaptation else "off"))

    def _start_adaptation(self, mae_state: dict | None, reference: Any) -> LiveAdaptation:
        """An Adapter on the serving model, its thread started. Raises ValueError/OSError."""
        self._adaptation_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(self._adaptation_dir, os.W_OK):
            raise OSError(f"{self._adaptation_dir} is not writable")
        live = LiveAdaptation(self._engine.model, self.config.adaptation, self._adaptation_dir, mae_state,
                              reference, busy=self._busy, notify=self._wake_worker)
        live.start()
        return live

    def _busy(self) -> bool:
        """The Adapter's yield test (its thread, no lock: a stale answer only delays or allows one step)."""
        return self._working or bool(self._queue)

    def _wake_worker(self) -> None:
        with self._cond:
            self._cond.notify()

    # ------------------------------------------------------------------ parameters

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
        if received - self._last_frame > self._stale_s:
            self._frames_since = received  # frames again after a silence: the clips start over
        self._last_frame = received
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

    def _on_incompatible_qos(self, info: Any) -> None:
        """A publisher on the input topic this subscription cannot hear (a best-effort camera against a reliable
        override, say): its frames never arrive, and /diagnostics says why instead of asking if it publishes."""
        policy = getattr(info.last_policy_kind, "name", str(info.last_policy_kind)).removeprefix("RMW_QOS_POLICY_")
        with self._cond:
            self._incompatible_qos = policy
        self.get_logger().warning(
            f"a publisher on {self._sub.topic_name} offers QoS incompatible with this subscription ({policy}): none of "
            f"its frames can arrive; match it with qos_overrides.{self._sub.topic_name}.subscription.*")

    def _on_message_lost(self, info: Any) -> None:
        """Frames the middleware reports lost before they reached us (best effort input under load)."""
        with self._cond:
            self._counts["frames_lost"] += info.total_count_change

    # ------------------------------------------------------------------ worker thread

    def _work(self) -> None:
        """Owns the Engine: take every queued clip (a batch), infer, publish; until stopped. Between two batches
        it swaps in a new adapted version and finishes a teach job whose recording time is over."""
        try:  # the first call pays for lazy initialisation; do it before frames arrive
            self._engine.infer([[np.zeros((self._engine.size, self._engine.size, 3), np.uint8)]
                                * self._engine.num_frames])
        except Exception as e:  # noqa: BLE001 - reported, and the real clips will report again
            self.get_logger().error(f"warm-up inference failed: {e}")
        while True:
            with self._cond:
                self._working = False
                # A teach job's deadline passes without a notify: wake up for it. Read again after every
                # wake-up: the notify of a new teach job finds us waiting without a deadline.
                while not self._has_work():
                    job = self._teach_job
                    self._cond.wait(None if job is None else max(0.0, job.until - time.monotonic()) + 0.01)
                if self._stop:
                    return
                batch = list(self._queue)  # everything waiting: one batched forward pass
                self._queue.clear()
                job = self._teach_job
                self._working = True
                self._engine.labeler.top_k = self._top_k
            live = self._adaptation
            if live is not None and live.pending:
                self._swap(live)
            if batch and not self._serve(batch, job, live):
                return
            if job is not None and job.due(time.monotonic()):
                job.finish(self._engine.teach, str(self._prototypes_file), self._engine.labeler.classes)
                with self._cond:
                    if self._teach_job is job:
                        self._teach_job = None
                self.get_logger().info(job.message)

    def _has_work(self) -> bool:
        """Under _cond: clips, a stop, a swap to apply, or a teach job to finish."""
        live, job = self._adaptation, self._teach_job
        return bool(self._queue) or self._stop or (live is not None and live.pending) or (
            job is not None and job.due(time.monotonic()))

    def _serve(self, batch: list[Clip], job: TeachJob | None, live: LiveAdaptation | None) -> bool:
        """Infer and publish a batch, then hand its clips to teaching and adaptation. False when shutting down."""
        try:
            if live is not None:
                live.share_cpu()
            results = self._engine.infer([clip.frames for clip in batch])
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: drop this batch, keep serving
            with self._cond:
                self._counts["inference_errors"] += len(batch)
            self.get_logger().error(f"inference failed on {len(batch)} clip(s): {e}",
                                    throttle_duration_sec=_WARN_EVERY_S)
            return True
        for clip, result in zip(batch, results):
            if not self._publish(clip, result):
                return False
        clips = [clip.frames for clip in batch]
        if job is not None:
            tops = [(r.labels[0], r.scores[0]) if r.labels else ("", 0.0) for r in results]
            job.record(clips, time.monotonic(), tops)
        if live is not None:
            try:
                live.add_clips(clips)
            except ValueError as e:  # a clip larger than the whole replay cap
                self.get_logger().warning(f"adaptation replay: {e}", throttle_duration_sec=_WARN_EVERY_S)
            self._maybe_publish_panel(live, batch[-1])
        return True

    def _swap(self, live: LiveAdaptation) -> None:
        """Worker, between two clips: serve the version the Adapter accepted (or rolled back to)."""
        try:
            version = live.apply_pending(self._engine.model)
        except Exception as e:  # noqa: BLE001 - keep serving the weights we have
            self.get_logger().error(f"could not swap in the adapted encoder: {e}")
            return
        if version is not None:
            self.get_logger().info(f"now serving {self._engine.encoder_version}")

    def _maybe_publish_panel(self, live: LiveAdaptation, clip: Clip) -> None:
        """Worker: every reconstruction_period_s, while someone listens, the latest clip's MAE panel."""
        period = self.config.adaptation_reconstruction_period_s
        now = time.monotonic()
        if period <= 0 or now < self._next_panel or self._recon_pub.get_subscription_count() == 0:
            return
        self._next_panel = now + period
        try:
            panel = live.panel(self._engine.model, clip.frames)
        except Exception as e:  # noqa: BLE001 - a picture is not worth stopping the worker
            self.get_logger().error(f"reconstruction panel failed: {e}", throttle_duration_sec=_WARN_EVERY_S)
            return
        header, _ = clip.tags[-1]
        msg = Image()
        msg.header.stamp = header.stamp
        msg.header.frame_id = self.config.frame_id or header.frame_id
        msg.height, msg.width = panel.shape[:2]
        msg.encoding, msg.step = "rgb8", panel.shape[1] * 3
        msg.data = panel.tobytes()
        try:
            self._recon_pub.publish(msg)
        except Exception as e:  # noqa: BLE001 - after Ctrl-C the context is gone
            if self.context.ok():
                self.get_logger().error(f"reconstruction publish failed: {e}", throttle_duration_sec=_WARN_EVERY_S)

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
            self._last_clip = time.monotonic()
        self.get_logger().debug(f"clip {clip.epoch}/{clip.index}: {result.labels[:1]} latency {latency * 1e3:.1f} ms")
        return True

    # ------------------------------------------------------------------ services

    async def _off_executor(self, call: Callable[[], Any]) -> Any:
        """`call()` in a helper thread, awaited: the executor thread goes on taking frames meanwhile. Its
        result, or its exception raised here."""
        done: Future = Future()

        def run() -> None:
            try:
                done.set_result(call())
            except Exception as e:  # noqa: BLE001 - handed to the awaiting service
                done.set_exception(e)
            executor = self.executor
            if executor is not None:  # resume the awaiting service now, not at the next frame
                executor.wake()

        threading.Thread(target=run, name="hiera_perception_service", daemon=True).start()
        return await done

    async def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        """Adaptation on or off. The first `true` of a node started without it builds the Adapter (from the
        serving model; no resume); the worker serves on meanwhile."""
        live = self._adaptation
        if request.data and live is None:
            try:
                live = self._adaptation = await self._off_executor(
                    lambda: self._start_adaptation(decoder_state_of(self._engine.model), None))
            except (ValueError, OSError) as e:
                response.success, response.message = False, f"adaptation could not start: {e}"
                self.get_logger().error(response.message)
                return response
        if live is not None:
            live.set_enabled(request.data)
        response.success = True
        response.message = (f"adaptation {'enabled' if request.data else 'disabled'}; serving "
                            f"{self._engine.encoder_version}")
        self.get_logger().info(response.message)
        return response

    async def _on_rollback(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        """Back to the previous kept version (or the base model). Waits for a round in progress to end."""
        live = self._adaptation
        if live is None:
            response.success, response.message = False, "adaptation is off: nothing to roll back"
            return response
        try:
            version = await self._off_executor(live.rollback)
        except Exception as e:  # noqa: BLE001 - nothing older, or latest.json unwritable: answer, keep serving
            response.success, response.message = False, f"rollback failed: {e}"
            self.get_logger().warning(response.message)
            return response
        response.success = True
        response.message = f"rolled back to version {version}; it serves from the next clip"
        self.get_logger().info(response.message)
        return response

    async def _on_save(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        """Checkpoint the deployed version now. Waits for a round in progress to end."""
        live = self._adaptation
        if live is None:
            response.success, response.message = False, "adaptation is off: nothing to save"
            return response
        try:
            path = await self._off_executor(live.save)
        except Exception as e:  # noqa: BLE001 - e.g. a full disk: answer, keep serving
            response.success, response.message = False, f"save failed: {e}"
            self.get_logger().warning(response.message)
            return response
        response.success, response.message = True, str(path)
        return response

    async def _on_teach(self, request: TeachLabel.Request, response: TeachLabel.Response) -> TeachLabel.Response:
        """Record the clips served during the next `seconds`, then the worker learns them as `label`. Answers
        when done, at most `seconds` + a margin later."""
        try:
            job = TeachJob.start(request.label, float(request.seconds), TEACH_MAX_S)
        except ValueError as e:
            response.success, response.message = False, str(e)
            return response
        with self._cond:
            if self._teach_job is not None:  # one that timed out is still being learnt
                response.success, response.message = False, f"still teaching {self._teach_job.label!r}"
                return response
            self._teach_job = job
            self._cond.notify()
        self.get_logger().info(f"recording {job.label!r} for {request.seconds:.3g} s")
        if not await self._off_executor(lambda: job.done.wait(float(request.seconds) + _TEACH_MARGIN_S)):
            response.success = False
            response.message = f"the worker did not finish teaching {job.label!r} in time (is it overloaded?)"
            return response
        response.success, response.clips_learned, response.message = job.success, job.clips_learned, job.message
        return response

    # ------------------------------------------------------------------ diagnostics

    def _report(self) -> None:
        """Publish one DiagnosticStatus with rates over the last period; WARN while frames are lost or bad, and
        while no frame, or no clip, came for `_stale_s`."""
        now = time.monotonic()
        with self._cond:
            counts, bad = Counter(self._counts), dict(self._bad)
            latencies = np.array(self._latencies, dtype=np.float64)
            depth = len(self._queue)
            last_clip = self._last_clip
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
        frame_age, clip_age = now - self._last_frame, now - max(last_clip, self._frames_since)
        if frame_age > self._stale_s:
            why = (f"a publisher there offers incompatible QoS ({self._incompatible_qos}): see qos_overrides"
                   if self._incompatible_qos else "is the camera publishing?")
            problems.append(f"no frame on {self._sub.topic_name} for {frame_age:.0f} s: {why}")
        elif clip_age > self._stale_s:
            resets = buffer["resets"] - buffer_before.get("resets", 0)
            problems.append(f"frames arrive but no clip was published for {clip_age:.0f} s" + (
                f" ({resets} clip buffer resets: stamps jumping or going back?)" if resets else ""))
        status = DiagnosticStatus(name=self._diagnostic_names[0], hardware_id=str(self._engine.device))
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
            "seconds_since_frame": f"{frame_age:.1f}" if counts["frames"] else "n/a",
            "seconds_since_clip": f"{now - last_clip:.1f}" if counts["published"] else "n/a",
            "inference_errors": counts["inference_errors"],
            "bad_frames": counts["bad"],
            **{f"bad_frames.{reason}": n for reason, n in sorted(bad.items())},
            "buffer_resets": buffer["resets"],
            "duplicate_stamps": buffer["duplicates"],
            "early_clip_misses": buffer["early_misses"],  # frames a clip returned early would have taken
            "model": self.config.model or "(embedded default)",
            "encoder_version": self._engine.encoder_version,
            "device": str(self._engine.device),
            "precision": self.config.precision,
            "adaptation": self._adaptation_state(),
            "prototypes_file": str(self._prototypes_file),
        }
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        msg = DiagnosticArray(status=[status, self._adaptation_status()])
        msg.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(msg)
        if counts["frames"]:
            self.get_logger().info(
                f"{fps:.1f} frames/s in, {clips_per_s:.2f} clips/s out, latency p50 {p50} ms p95 {p95} ms; "
                f"so far {counts['frames']} frames, {counts['frames_lost']} lost, {counts['bad']} bad, "
                f"{counts['queue_drops']} clips dropped, {buffer['resets']} clip buffer resets",
                throttle_duration_sec=_SUMMARY_EVERY_S)

    def _adaptation_state(self) -> str:
        live = self._adaptation
        return "off" if live is None else "enabled" if live.adapter.enabled.is_set() else "disabled"

    def _adaptation_status(self) -> DiagnosticStatus:
        """The Adapter's state; WARN when its last round failed (a fault, not a guard rejection)."""
        status = DiagnosticStatus(name=self._diagnostic_names[1], hardware_id=str(self._engine.device),
                                  level=DiagnosticStatus.OK)
        live = self._adaptation
        values: dict[str, Any] = {"enabled": False, "serving": self._engine.encoder_version}
        if live is None:
            status.message = "off"
        else:
            st = live.status()
            last = st["last_result"]
            values.update(
                enabled=st["enabled"], version=st["version"], rounds=st["rounds"], accepted=st["accepted"],
                rejected=st["rejected"], last_result=last, replay_clips=st["replay_clips"], replay_mb=st["replay_mb"],
                device_share=st["device_share"], decoder_warmup=st["decoder_warmup"], swap_pending=st["swap_pending"],
                trainable=self.config.adaptation.trainable, dir=st["dir"])
            if re.match(r"^\w+(Error|Exception|Interrupt)\b", last):
                status.level = DiagnosticStatus.WARN
            status.message = (f"{'enabled' if st['enabled'] else 'disabled'}, version {st['version']}, "
                              f"{st['accepted']}/{st['rounds']} rounds accepted; last: {last or 'no round yet'}")
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        return status

    # ------------------------------------------------------------------ shutdown

    def destroy_node(self) -> None:
        """Stop the Adapter's thread, stop and join the worker (it finishes the batch in hand), destroy the node."""
        live = getattr(self, "_adaptation", None)
        if live is not None:
            live.stop()
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
    return spin_node(PerceptionNode, NODE_NAME, args)


if __name__ == "__main__":
    raise SystemExit(main())
