# Copyright 2025 hiera_perception maintainers. Licensed under the Apache License, Version 2.0.
"""`hiera-perception demo`: synthetic camera -> perception node -> a printer, over real ROS 2 pub/sub.

    camera_publisher (subprocess)      image (sensor_msgs/Image, 30 fps) + /camera_publisher/true_action
    hiera_perception (subprocess)      image -> action_features, on the embedded model
    demo_printer (this process)        action_features + true_action -> one line per clip, a summary at the end

Why subprocesses: each node runs exactly as a user starts it (`camera_publisher`, `perception_node`: the same
code and parameters), the pub/sub between them is real inter-process DDS, and each has its own interpreter, so
the model's Python work never holds up the camera's timer or the printer's clock (one process would share one
GIL between them). The cost is a few seconds of start-up, which `--duration` does not count.

The children get their parameters from YAML files (typed, any path) and run in their own process groups, so a
Ctrl-C reaches this process alone and it stops them in order, once each, then prints the summary; they also get
SIGTERM should this process die (PR_SET_PDEATHSIG), so no camera is left publishing. Discovery stays on this
machine (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST) in a ROS_DOMAIN_ID of the demo's own, unless the caller set them.

A clip's true action comes from the synthetic camera's `~/true_action` stamps over the clip's frames. A clip
within one action has that action; a clip spanning a change is printed as `a>b` (in order) and marked `~`. Its
top label is right if it names the action on most of its frames or one on at least a third of them
(`TRANSITION_SHARE`): such a clip really shows both, and which one the model names first is a coin toss.
The summary gives that share, the stricter majority-only share, and the share within one action, over the
clips printed after the first second.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

__all__ = ["add_arguments", "main", "DemoStats"]

log = logging.getLogger(__name__)

WARMUP_S = 1.0  # clips printed in the first second are not scored (the "after the first second")
TRANSITION_SHARE = 1 / 3  # across a change, an action on this share of the clip's frames is a right answer
_TRUTH_KEEP = 30 * 120  # true_action stamps kept: two minutes at 30 fps
# Run a node's console entry in a child. The child restores Ctrl-C (a background parent may have started it with
# SIGINT ignored) and asks for SIGTERM when its parent dies, so no node outlives the demo.
_CHILD = """\
import ctypes, os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
except (AttributeError, OSError):
    pass
if os.getppid() != {parent}:
    sys.exit(0)
from {module} import {function} as entry
sys.exit(entry())
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--video", metavar="FILE", help="a video file (looped) instead of the synthetic camera")
    src.add_argument("--camera", metavar="N", type=int, help="an OpenCV webcam instead of the synthetic camera")
    p.add_argument("--duration", type=float, default=0.0, metavar="S",
                   help="seconds to run once the first clip arrived (start-up not counted); 0 = until Ctrl-C")
    p.add_argument("--model", default="", help="model for the node (default: the embedded model)")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N (default: cpu)")
    p.add_argument("--fps", type=float, default=None, help="camera frames per second (default: 30; a video "
                   "file's own rate)")
    p.add_argument("--seed", type=int, default=0, help="synthetic stream seed (default: 0)")
    p.add_argument("--top-k", type=int, default=3, help="labels per clip (default: 3)")
    p.add_argument("--startup-timeout", type=float, default=180.0, metavar="S",
                   help="give up when no clip arrived after this many seconds (default: 180)")
    p.add_argument("--json", action="store_true", help="one JSON object per clip, and the summary as JSON")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a perception-node parameter (YAML value), e.g. --param adaptation.enabled=true; repeatable")


# ---------------------------------------------------------------------------------------------- statistics


@dataclass
class DemoStats:
    """What the summary reports. Times in seconds; stamps in integer nanoseconds."""

    first_stamp_ns: int | None = None
    received_s: list[float] = field(default_factory=list)  # monotonic arrival time per clip
    latencies_s: list[float] = field(default_factory=list)
    # (top label correct, clip within one action, top label = the majority action)
    scored: list[tuple[bool, bool, bool]] = field(default_factory=list)
    truth_stamps: int = 0
    truth_span_ns: tuple[int, int] | None = None
    versions: list[str] = field(default_factory=list)  # encoder versions in order of first appearance
    # The node's /diagnostics counters (frames_received, clips_published, queue_drops, inference_errors): its first
    # report with frames after the camera's first true_action, and its last; `final` once one came after the camera
    # stopped.
    node_first: tuple[int, dict[str, int]] | None = None  # (report stamp ns, counters)
    node_last: dict[str, int] | None = None
    frames_after_first: int = 0  # camera frames (true_action stamps) stamped after node_first's report
    stop_ns: int | None = None  # set once the camera stopped: a report stamped after it has counted everything
    final: bool = False

    def summary(self) -> dict:
        n = len(self.received_s)
        span = self.received_s[-1] - self.received_s[0] if n > 1 else 0.0
        lat = np.array(self.latencies_s) * 1e3
        single = [ok for ok, within, _ in self.scored if within]
        camera_fps = None
        if self.truth_span_ns and self.truth_stamps > 1:
            camera_fps = (self.truth_stamps - 1) / max((self.truth_span_ns[1] - self.truth_span_ns[0]) * 1e-9, 1e-9)
        drops = self.drops()
        return {
            "clips": n,
            "seconds": round(span, 3),
            "clips_per_s": round((n - 1) / span, 3) if span > 0 else None,
            "scored_clips": len(self.scored),
            "correct_share": round(sum(ok for ok, _, _ in self.scored) / len(self.scored), 4) if self.scored else None,
            "majority_correct_share": (round(sum(m for _, _, m in self.scored) / len(self.scored), 4)
                                       if self.scored else None),
            "single_action_clips": len(single),
            "single_action_correct_share": round(sum(single) / len(single), 4) if single else None,
            "latency_p50_ms": round(float(np.percentile(lat, 50)), 1) if n else None,
            "latency_p95_ms": round(float(np.percentile(lat, 95)), 1) if n else None,
            "latency_p99_ms": round(float(np.percentile(lat, 99)), 1) if n else None,
            "camera_fps": round(camera_fps, 2) if camera_fps else None,
            # adaptation: the versions served during the run; swaps = how many times a new one appeared
            "encoder_versions": self.versions,
            "encoder_swaps": max(0, len(self.versions) - 1),
            **drops,
        }

    def drops(self) -> dict:
        """Frames the camera sent that the node never received, and clips the node cut but did not publish
        (dropped from its queue, or failed), as shares. Both are counted between the node's first report with frames
        after the camera's first true_action and its report after the camera stopped, so start-up discovery is not
        counted as loss; None where that window is missing (Ctrl-C, a real camera)."""
        out = {"camera_frames": None, "frames_dropped": None, "frames_dropped_share": None,
               "clips_cut": None, "clips_dropped": None, "clips_dropped_share": None}
        if self.node_first is None or self.node_last is None or not self.final:
            return out
        (_, first), last = self.node_first, self.node_last
        if self.frames_after_first:
            sent = self.frames_after_first
            lost = max(0, sent - (last["frames_received"] - first["frames_received"]))
            out.update(camera_frames=sent, frames_dropped=lost, frames_dropped_share=round(lost / sent, 4))
        dropped = sum(last[k] - first[k] for k in ("queue_drops", "inference_errors"))
        cut = last["clips_published"] - first["clips_published"] + dropped
        if cut:
            out.update(clips_cut=cut, clips_dropped=dropped, clips_dropped_share=round(dropped / cut, 4))
        return out


def format_summary(s: dict) -> str:
    parts = [f"summary: {s['clips']} clips in {s['seconds']:.1f} s"
             + (f" ({s['clips_per_s']:.2f} clips/s)" if s["clips_per_s"] else "")]
    if s["correct_share"] is not None:
        part = (f"top label = true action for {100 * s['correct_share']:.1f}% of the {s['scored_clips']} clips "
                f"after the first second")
        if s["single_action_correct_share"] is not None:
            part += (f" ({100 * s['single_action_correct_share']:.1f}% of the {s['single_action_clips']} within "
                     f"one action; {100 * s['majority_correct_share']:.1f}% counting only the majority action of a "
                     f"change)")
        parts.append(part)
    if s["latency_p50_ms"] is not None:
        parts.append(f"latency p50 {s['latency_p50_ms']:.0f} ms, p95 {s['latency_p95_ms']:.0f} ms")
    if s["camera_fps"]:
        parts.append(f"camera {s['camera_fps']:.1f} fps")
    if s.get("frames_dropped_share") is not None:
        parts.append(f"{s['frames_dropped']} of {s['camera_frames']} frames dropped")
    if s.get("clips_dropped_share") is not None:
        parts.append(f"{s['clips_dropped']} of {s['clips_cut']} clips dropped")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- children


def _start(module: str, function: str, node: str, params: dict, workdir: Path, verbose: bool) -> subprocess.Popen:
    """`module.function()` (a node's console entry) in a child, parameters from a YAML file."""
    import yaml

    params_file = workdir / f"{node}.yaml"
    params_file.write_text(yaml.safe_dump({node: {"ros__parameters": params}}))
    env = dict(os.environ, PYTHONUNBUFFERED="1", RCUTILS_COLORIZED_OUTPUT="0")
    # The child imports the very hiera_perception this process runs, installed or from a checkout.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    out = None if verbose else open(workdir / f"{node}.log", "wb")
    try:
        return subprocess.Popen(
            [sys.executable, "-c", _CHILD.format(parent=os.getpid(), module=module, function=function),
             "--ros-args", "--params-file", str(params_file)],
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT if out else None,
            start_new_session=True)
    finally:
        if out is not None:
            out.close()


def _stop(children: dict[str, subprocess.Popen], timeout_s: float = 10.0) -> None:
    """Ctrl-C each child once (the camera first), then SIGKILL what is left after `timeout_s`."""
    for proc in children.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout_s
    for name, proc in children.items():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s of Ctrl-C: killing it", name, timeout_s)
            proc.kill()
            proc.wait()


def _log_tail(workdir: Path, node: str, lines: int = 20) -> str:
    path = workdir / f"{node}.log"
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------- the printer


def _make_printer(args: argparse.Namespace, stats: DemoStats):
    """The printer node: true_action stamps in, one line per ActionFeatures out (stdout)."""
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    from diagnostic_msgs.msg import DiagnosticArray

    from hiera_perception.camera import parse_true_action
    from hiera_perception_msgs.msg import ActionFeatures
    from std_msgs.msg import String

    truth: deque[tuple[int, str]] = deque(maxlen=_TRUTH_KEEP)  # (stamp ns, action), in stamp order

    def on_truth(msg: String) -> None:
        try:
            action, stamp = parse_true_action(msg.data)
        except ValueError as e:
            log.warning("%s", e)
            return
        truth.append((stamp, action))
        stats.truth_stamps += 1
        if stats.node_first is not None and stamp > stats.node_first[0]:
            stats.frames_after_first += 1
        first = stats.truth_span_ns[0] if stats.truth_span_ns else stamp
        stats.truth_span_ns = (first, stamp)

    def true_action(start_ns: int, end_ns: int) -> tuple[str | None, set[str], str | None]:
        """(what to print: the action, or `a>b` across a change; the labels counted right; the majority action)."""
        frames = [a for s, a in truth if start_ns <= s <= end_ns]
        if not frames:
            return None, set(), None
        seen = Counter(frames)
        majority = seen.most_common(1)[0][0]
        accepted = {majority} | {a for a, n in seen.items() if n >= TRANSITION_SHARE * len(frames)}
        order = [a for i, a in enumerate(frames) if i == 0 or frames[i - 1] != a]
        return ">".join(order), accepted, majority

    def on_features(msg: ActionFeatures) -> None:
        now_ns = printer.get_clock().now().nanoseconds
        stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        start = msg.clip_start.sec * 10**9 + msg.clip_start.nanosec
        latency_s = (now_ns - stamp) * 1e-9
        if stats.first_stamp_ns is None:
            stats.first_stamp_ns = stamp
        t = (stamp - stats.first_stamp_ns) * 1e-9
        stats.received_s.append(time.monotonic())
        stats.latencies_s.append(latency_s)
        if not stats.versions or stats.versions[-1] != msg.encoder_version:
            stats.versions.append(msg.encoder_version)
        labels, scores = list(msg.labels), [float(s) for s in msg.scores]
        actual, accepted, majority = true_action(start, stamp) if args.synthetic else (None, set(), None)
        within = actual is None or ">" not in actual
        correct = bool(labels) and labels[0] in accepted
        if actual is not None and round(t, 2) >= WARMUP_S:  # as printed: a reader can recount the share
            stats.scored.append((correct, within, bool(labels) and labels[0] == majority))
        if args.json:
            print(json.dumps({"t": round(t, 3), "true": actual, "single_action": within, "labels": labels,
                              "scores": [round(s, 4) for s in scores], "encoder_version": msg.encoder_version,
                              "latency_ms": round(latency_s * 1e3, 1)}), flush=True)
            return
        top = "  ".join(f"{lb} {sc:.2f}" for lb, sc in zip(labels, scores)) or "(no labels: model without a head)"
        mark = "" if actual is None else ("ok" if correct else "XX") + ("" if within else " ~")
        print(f"{t:7.2f}s  true {actual or '-':<11} | {top:<48} | {msg.encoder_version} | "
              f"{latency_s * 1e3:5.0f} ms  {mark}", flush=True)

    def on_diagnostics(msg: DiagnosticArray) -> None:
        status = next((st for st in msg.status if st.name.endswith(": pipeline")), None)
        if status is None:
            return
        values = {kv.key: kv.value for kv in status.values}
        try:
            counts = {k: int(values[k]) for k in ("frames_received", "clips_published", "queue_drops",
                                                  "inference_errors")}
        except (KeyError, ValueError):
            return
        stats.node_last = counts
        stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        if stats.node_first is None and truth and counts["frames_received"]:
            # The window opens once the node has frames (its subscription matched the camera: discovery can take
            # seconds under load, and frames sent before it are no loss). Frames already seen stamped after this
            # report: their true_action overtook it.
            stats.node_first = (stamp, counts)
            stats.frames_after_first = sum(1 for s, _ in truth if s > stamp)
        if stats.stop_ns is not None and stamp > stats.stop_ns:
            stats.final = True

    printer = Node("demo_printer")
    reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    printer.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
    printer.create_subscription(ActionFeatures, "action_features", on_features, reliable)
    printer.create_subscription(String, "/camera_publisher/true_action", on_truth,
                                QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE))
    return printer


# ---------------------------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if not (args.duration >= 0 and args.startup_timeout > 0):  # NaN too: it passed `< 0` and switched limits off
        raise ValueError(f"--duration must be >= 0 and --startup-timeout > 0, got {args.duration}, "
                         f"{args.startup_timeout}")
    args.synthetic = args.video is None and args.camera is None
    missing = [m for m in ("rclpy", "sensor_msgs", "hiera_perception_msgs") if importlib.util.find_spec(m) is None]
    if missing:
        log.error("the demo needs ROS 2 Python packages that do not import here: %s (`make venv` installs them; "
                  "on a ROS 2 install, source it and build hiera_perception_msgs)", ", ".join(missing))
        return 1
    if args.video is not None:
        from hiera_perception.video import check_video_file

        check_video_file(args.video)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.SystemRandom().randint(60, 90)))
    log.info("ROS_DOMAIN_ID=%s, discovery %s (watch: ROS_DOMAIN_ID=%s ros2 topic echo /action_features)",
             os.environ["ROS_DOMAIN_ID"], os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"], os.environ["ROS_DOMAIN_ID"])

    camera = {"frame_id": "camera", "fps": float(args.fps if args.fps is not None else (0.0 if args.video else 30.0))}
    if args.video is not None:
        camera.update(video_path=str(Path(args.video).resolve()), loop=True)
    elif args.camera is not None:
        camera.update(camera_index=int(args.camera))
    else:
        camera.update(synthetic=True, synthetic_seed=int(args.seed))
    node = {"model": str(args.model), "device": str(args.device), "top_k": int(args.top_k)}
    for item in args.param:
        name, sep, value = item.partition("=")
        parts = name.strip().split(".")  # adaptation.enabled -> {adaptation: {enabled: ...}} in the YAML
        if not sep or not all(parts):
            raise ValueError(f"--param takes NAME=VALUE (NAME may be dotted, e.g. adaptation.enabled), got {item!r}")
        _check_node_parameter(name.strip())
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ValueError(f"--param {item!r}: the value is not YAML ({' '.join(str(e).split())})") from None
        target = node
        for g in parts[:-1]:  # the names are the node's own: a group is never also a value
            target = target.setdefault(g, {})
        target[parts[-1]] = parsed

    stats = DemoStats()
    verbose = bool(getattr(args, "verbose", False))
    with _sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="hiera_demo_") as tmp:
        workdir = Path(tmp)
        if not node["model"]:
            node["model"] = _embedded_or_untrained(workdir)
        _say_taught_labels(node["model"])
        children: dict[str, subprocess.Popen] = {}
        try:
            # Children first, before rclpy starts threads here: the node (slow to import torch), then the camera.
            children["hiera_perception"] = _start("hiera_perception.node", "main", "hiera_perception", node,
                                                  workdir, verbose)
            children["camera_publisher"] = _start("hiera_perception.camera", "node_main", "camera_publisher",
                                                  camera, workdir, verbose)
            return _run(args, stats, children, workdir)
        except KeyboardInterrupt:
            return 0
        finally:
            # Stop the camera first, so the node is not fed while it shuts down.
            _stop(dict(reversed(list(children.items()))))
            if stats.received_s or stats.scored:
                s = stats.summary()
                print(json.dumps({"summary": s}) if args.json else format_summary(s), flush=True)


def _say_taught_labels(model: str) -> None:
    """Labels taught beside the model change what it names (a label taught from idle-looking clips takes idle's):
    the demo says they are in play, and how to take one back."""
    from hiera_perception.labeler import prototypes_path

    path = prototypes_path(model)
    try:
        names = list(json.loads(path.read_text())["labels"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # none, or unreadable: the node reports that itself
    if names:
        log.warning("the model also serves %d taught label(s): %s (from %s; `hiera-perception teach --forget NAME` "
                    "removes one)", len(names), ", ".join(names), path)


def _check_node_parameter(name: str) -> None:
    """A misspelt name would reach the node's params file, where the node would only warn about it."""
    from hiera_perception.node_config import PARAMETERS  # torch: only when --param is used
    from hiera_perception.ros_params import unknown_parameter

    if problem := unknown_parameter(name, PARAMETERS, "the perception node"):
        raise ValueError(f"--param {problem}" + ("" if problem.endswith("?)") else " (see config/perception.yaml)"))


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (`timeout`, systemd, `docker stop`) ends the demo as Ctrl-C does: the children are stopped, the
    summary printed and the temporary folder removed. By default it killed the process before any of that."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _embedded_or_untrained(workdir: Path) -> str:
    """The embedded model's path; while none is shipped, an untrained one with the synthetic action names, said
    loudly, so the demo still shows the whole pipeline (its labels are then chance, and the summary says so)."""
    from hiera_perception.checkpoint import DEFAULT_MODEL, MODELS_DIR

    if (MODELS_DIR / DEFAULT_MODEL).is_file():
        return str(MODELS_DIR / DEFAULT_MODEL)
    import torch

    from hiera_perception.checkpoint import save_checkpoint
    from hiera_perception.config import get_config
    from hiera_perception.model import Hiera
    from hiera_perception.synth import ACTIONS

    log.warning("no trained embedded model is shipped yet (%s): the demo runs the real pipeline on an UNTRAINED "
                "model, so its labels are chance", MODELS_DIR / DEFAULT_MODEL)
    torch.manual_seed(0)
    model = Hiera(get_config("hiera_tiny_8x64", num_classes=len(ACTIONS)))
    return str(save_checkpoint(workdir / "untrained.pt", model, labels=list(ACTIONS), model_id="untrained",
                               extra={"sampling": {"frame_stride_s": 0.1}}))


def _final_counts(executor, printer, children: dict[str, subprocess.Popen], stats: DemoStats,
                  timeout_s: float = 5.0) -> None:
    """Stop the camera, then wait for a node report stamped after it (every frame sent is in or lost by then)
    and for the clips still in the node's queue."""
    camera = children["camera_publisher"]
    camera.send_signal(signal.SIGINT)
    try:
        camera.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return  # _stop kills it; the counts stay incomplete
    # transport takes milliseconds: a report 0.2 s after the last frame has counted it
    stats.stop_ns = printer.get_clock().now().nanoseconds + 200_000_000
    deadline = time.monotonic() + timeout_s
    while not stats.final and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.1)


def _run(args: argparse.Namespace, stats: DemoStats, children: dict[str, subprocess.Popen], workdir: Path) -> int:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    # No rclpy signal handler: Ctrl-C raises KeyboardInterrupt here, and main() stops the children itself.
    # Not `with rclpy.init()`: a context manager only since Kilted.
    rclpy.init(args=[], signal_handler_options=SignalHandlerOptions.NO)
    try:
        printer = _make_printer(args, stats)
        executor = SingleThreadedExecutor()
        executor.add_node(printer)
        started = time.monotonic()
        log.info("starting the camera and the perception node (model %s)...", args.model or "embedded")
        try:
            while True:
                executor.spin_once(timeout_sec=0.1)
                for name, proc in children.items():
                    if proc.poll() is not None:
                        log.error("%s exited with code %s\n%s", name, proc.returncode, _log_tail(workdir, name))
                        return 1
                now = time.monotonic()
                if not stats.received_s:
                    if now - started > args.startup_timeout:
                        log.error("no action_features after %.0f s\n%s", args.startup_timeout,
                                  _log_tail(workdir, "hiera_perception"))
                        return 1
                elif args.duration and now - stats.received_s[0] >= args.duration:
                    _final_counts(executor, printer, children, stats)
                    return 0
        finally:
            printer.destroy_node()
    finally:
        rclpy.try_shutdown()
