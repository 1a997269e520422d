# Copyright 2025 hiera_perception maintainers. Licensed under the Apache License, Version 2.0.
"""action_consumer: the downstream example, /action_features in, a robot command and spoken-style events out.

  action_features (ActionFeatures) -> ActionDecider -> cmd_vel (geometry_msgs/Twist, steadily at rate_hz)
                                                    -> events  (std_msgs/String, one line when the action changes,
                                                               e.g. "someone is waving (0.93)")

`ActionDecider` is the whole decision, a plain class with no ROS in it (tested without a graph):
- a clip counts for its top label only when that label's score reaches `threshold`; below it the clip says
  "no clear action";
- hysteresis: the acted-on action changes only after `hysteresis_clips` consecutive clips agree (on a label,
  or on "no clear action", which means stop), so one noisy clip moves nothing;
- no clip for `timeout_s` (the perception node or the camera went away): stop at once.
Labels without a command, and "no clear action", mean stop (all zeros). The label -> command map and phrases come
from parameters, usually config/consumer.yaml:
`ros2 run hiera_perception action_consumer --ros-args --params-file config/consumer.yaml`.
Shape follows ros2/examples (minimal_subscriber, main) and ros2/demos (parameter callbacks).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import (InvalidParameterTypeException, InvalidParameterValueException,
                              ParameterUninitializedException)
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.qos_overriding_options import QoSOverridingOptions

from geometry_msgs.msg import Twist
from hiera_perception_msgs.msg import ActionFeatures
from std_msgs.msg import String

from hiera_perception.ros_params import describe as _desc
from hiera_perception.ros_params import on_parameters, spin_node, warn_unknown_parameters

__all__ = ["ActionDecider", "ConsumerConfig", "ActionConsumer", "STOP", "main"]

NODE_NAME = "action_consumer"
Command = tuple[float, float, float, float, float, float]  # linear x, y, z, angular x, y, z
STOP: Command = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class ConsumerConfig:
    threshold: float = 0.6  # a clip's top score must reach this to count for its label
    hysteresis_clips: int = 3  # consecutive agreeing clips before the action changes
    timeout_s: float = 1.5  # no clip for this long -> stop
    commands: Mapping[str, Command] = field(default_factory=dict)  # label -> Twist as 6 numbers
    phrases: Mapping[str, str] = field(default_factory=dict)  # label -> "someone is waving"

    def validate(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.hysteresis_clips < 1:
            raise ValueError(f"hysteresis_clips must be >= 1, got {self.hysteresis_clips}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        for label, cmd in self.commands.items():
            if len(cmd) != 6:
                raise ValueError(f"command of {label!r} needs 6 numbers (linear x y z, angular x y z), got {list(cmd)}")

    def phrase(self, label: str) -> str:
        return self.phrases.get(label) or f"someone is doing {label.replace('_', ' ')}"


class ActionDecider:
    """Clips in, the action to act on out. Times are seconds on any one clock the caller keeps to."""

    def __init__(self, config: ConsumerConfig):
        self._streak: deque[float] = deque(maxlen=1)  # top scores of the latest clips that agree (see config)
        self.config = config
        self.action: str | None = None  # the action acted on; None = stop
        self._candidate: str | None = None  # what the latest clips agree on (None = no clear action)
        self._last_clip_s: float | None = None  # None: no clip since start or since the last timeout

    @property
    def config(self) -> ConsumerConfig:
        return self._config

    @config.setter
    def config(self, config: ConsumerConfig) -> None:
        """Validated. The streak keeps the largest hysteresis_clips set so far: a streak that reached the
        hysteresis in force made its candidate the action, and then its scores no longer matter, so the
        decisions are those of an unbounded streak."""
        config.validate()
        self._config = config
        self._streak = deque(self._streak, maxlen=max(config.hysteresis_clips, self._streak.maxlen))

    @property
    def command(self) -> Command:
        """The robot command now: the acted-on action's, or STOP."""
        return tuple(self.config.commands.get(self.action, STOP)) if self.action else STOP  # type: ignore[return-value]

    def on_clip(self, labels: Sequence[str], scores: Sequence[float], now_s: float) -> str | None:
        """One clip's top-k (best first). Returns the event line when the acted-on action changes, else None."""
        self._last_clip_s = now_s
        confident = bool(labels) and len(scores) > 0 and scores[0] >= self.config.threshold
        candidate = labels[0] if confident else None
        if candidate != self._candidate:
            self._candidate = candidate
            self._streak.clear()
        self._streak.append(float(scores[0]) if confident else 0.0)
        if len(self._streak) < self.config.hysteresis_clips or candidate == self.action:
            return None
        previous, self.action = self.action, candidate
        if candidate is None:
            return f"no clear action any more (was: {self.config.phrase(previous)})"
        n = self.config.hysteresis_clips
        score = sum(list(self._streak)[-n:]) / n
        return f"{self.config.phrase(candidate)} ({score:.2f})"

    def on_tick(self, now_s: float) -> str | None:
        """Call regularly: stops at once when no clip came for `timeout_s`; returns the event line then."""
        if self._last_clip_s is None or now_s - self._last_clip_s < self.config.timeout_s:
            return None
        self._last_clip_s, self._candidate = None, None
        self._streak.clear()
        previous, self.action = self.action, None
        event = f"no action features for {self.config.timeout_s:g} s"
        return f"{event}; stopping (was: {self.config.phrase(previous)})" if previous else event


# ---------------------------------------------------------------------------------------------- node




_DEFAULTS = ConsumerConfig()
# name -> (default, descriptor); the first three can change at run time. Per label (from `labels`), the node also
# declares commands.<label> (6 doubles) and phrases.<label> (a string).
PARAMETERS: dict[str, tuple[Any, ParameterDescriptor]] = {
    "threshold": (_DEFAULTS.threshold, _desc("A clip counts for its top label only with a score >= this", 0.0, 1.0)),
    "hysteresis_clips": (_DEFAULTS.hysteresis_clips, _desc("Consecutive agreeing clips before the command changes",
                                                           1, 100)),
    "timeout_s": (_DEFAULTS.timeout_s, _desc("Stop when no action_features came for this long", 0.05, 60.0)),
    "rate_hz": (10.0, _desc("cmd_vel publishing rate (a steady stream, as base controllers with a watchdog expect)",
                            0.5, 100.0, read_only=True)),
    "labels": (Parameter.Type.STRING_ARRAY, _desc("Labels with a command (commands.<label>) and a phrase "
                                                  "(phrases.<label>); other labels mean stop", read_only=True)),
}
_RUNTIME = ("threshold", "hysteresis_clips", "timeout_s")


class ActionConsumer(Node):
    """action_features -> cmd_vel (Twist) and events (String)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        try:
            for name, (default, descriptor) in PARAMETERS.items():
                self.declare_parameter(name, default, descriptor)
            try:
                labels = list(self.get_parameter("labels").value or [])
            except ParameterUninitializedException:  # declared by type only, and not given
                labels = []
            if dupes := sorted({lb for lb in labels if labels.count(lb) > 1}):
                raise ValueError(f"parameter labels: listed more than once: {', '.join(dupes)}")
            for label in labels:
                self.declare_parameter(f"commands.{label}", list(STOP), _desc(
                    f"Twist for {label!r}: [linear x, y, z, angular x, y, z] (m/s, rad/s)", read_only=True))
                self.declare_parameter(f"phrases.{label}", "", _desc(
                    f"Event phrase for {label!r}, e.g. 'someone is waving'; '' = a generic one", read_only=True))
        except (InvalidParameterValueException, InvalidParameterTypeException) as e:
            raise ValueError(str(e)) from None
        config = ConsumerConfig(
            threshold=self.get_parameter("threshold").value,
            hysteresis_clips=self.get_parameter("hysteresis_clips").value,
            timeout_s=self.get_parameter("timeout_s").value,
            commands={lb: tuple(self.get_parameter(f"commands.{lb}").value) for lb in labels},
            phrases={lb: self.get_parameter(f"phrases.{lb}").value for lb in labels},
        )
        self.decider = ActionDecider(config)  # raises ValueError naming a bad command
        on_parameters(self, self._apply_parameters)  # ranges and read-only are checked by the descriptors
        if any(p.startswith(("commands.", "phrases.")) for p in warn_unknown_parameters(self)):
            self.get_logger().warning("commands.<label> and phrases.<label> count only for a label listed in "
                                      "`labels`")
        if not labels:
            self.get_logger().warning("no labels configured: every action means stop "
                                      "(pass --params-file config/consumer.yaml)")

        # One single-threaded executor runs the subscription and the timer, one at a time: no locks needed.
        self._cmd_pub = self.create_publisher(Twist, "cmd_vel", 10)
        self._event_pub = self.create_publisher(String, "events", 10)
        # Reliable, as the perception node publishes; `qos_overrides./action_features.subscription.*` change it (to
        # match a node whose output was overridden to best effort, which a reliable subscriber never hears).
        self._sub = self.create_subscription(
            ActionFeatures, "action_features", self._on_features,
            QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE),
            qos_overriding_options=QoSOverridingOptions.with_default_policies())
        self._timer = self.create_timer(1.0 / self.get_parameter("rate_hz").value, self._on_timer)
        self.get_logger().info(f"{len(labels)} labels with commands; threshold {config.threshold:g}, "
                               f"hysteresis {config.hysteresis_clips} clips, timeout {config.timeout_s:g} s")

    def _now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _apply_parameters(self, params: list[Parameter]) -> None:
        changes = {p.name: p.value for p in params if p.name in _RUNTIME}
        if changes:
            self.decider.config = replace(self.decider.config, **changes)
            self.get_logger().info(f"now {changes}")

    def _on_features(self, msg: ActionFeatures) -> None:
        event = self.decider.on_clip(list(msg.labels), list(msg.scores), self._now_s())
        self.get_logger().debug(f"clip {list(msg.labels[:1])} {list(msg.scores[:1])} -> {self.decider.action}")
        if event:
            self._emit(event)
            self._publish_command()  # a change goes out at once, not at the next tick

    def _on_timer(self) -> None:
        event = self.decider.on_tick(self._now_s())
        if event:
            self._emit(event)
        self._publish_command()

    def _emit(self, event: str) -> None:
        self.get_logger().info(event)
        self._event_pub.publish(String(data=event))

    def _publish_command(self) -> None:
        lx, ly, lz, ax, ay, az = self.decider.command
        msg = Twist()
        msg.linear.x, msg.linear.y, msg.linear.z = float(lx), float(ly), float(lz)
        msg.angular.x, msg.angular.y, msg.angular.z = float(ax), float(ay), float(az)
        self._cmd_pub.publish(msg)


def main(args: list[str] | None = None) -> int:
    """The `action_consumer` console script."""
    return spin_node(ActionConsumer, NODE_NAME, args)


if __name__ == "__main__":
    raise SystemExit(main())
