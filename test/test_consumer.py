"""The action_consumer example: its decision (threshold, hysteresis, timeout) and the node on real rclpy."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

# consumer.py is a ROS-layer file (it imports rclpy), so even its plain decision class needs ROS installed.
pytestmark = pytest.mark.ros

ROOT = Path(__file__).resolve().parent.parent
WAVE = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
LEFT = (0.0, 0.0, 0.0, 0.0, 0.0, 0.5)


@pytest.fixture(scope="module", autouse=True)
def _domain(own_ros_domain):
    """This module's own DDS domain (conftest.py)."""


def _decider(**kw):
    from hiera_perception.consumer import ActionDecider, ConsumerConfig

    cfg = dict(threshold=0.6, hysteresis_clips=3, timeout_s=1.0, commands={"wave": WAVE, "swipe_left": LEFT},
               phrases={"wave": "someone is waving"})
    return ActionDecider(ConsumerConfig(**{**cfg, **kw}))


def test_hysteresis_needs_n_consecutive_confident_clips():
    from hiera_perception.consumer import STOP

    d = _decider()
    assert d.on_clip(["swipe_left"], [0.9], 0.0) is None
    assert d.on_clip(["swipe_left"], [0.8], 0.1) is None
    assert (d.action, d.command) == (None, STOP)
    assert d.on_clip(["swipe_left", "wave"], [0.7, 0.2], 0.2) == "someone is doing swipe left (0.80)"
    assert (d.action, d.command) == ("swipe_left", LEFT)
    # One noisy clip (another label) moves nothing, and restarts the count of the newcomer.
    assert d.on_clip(["wave"], [0.95], 0.3) is None
    assert d.on_clip(["swipe_left"], [0.9], 0.4) is None
    assert d.on_clip(["wave"], [0.95], 0.5) is None
    assert d.on_clip(["wave"], [0.91], 0.6) is None
    assert d.command == LEFT
    assert d.on_clip(["wave"], [0.93], 0.7) == "someone is waving (0.93)"
    assert d.command == WAVE
    assert d.on_clip(["wave"], [0.99], 0.8) is None, "no event while the action stays the same"


def test_below_threshold_counts_as_no_clear_action_and_stops_after_n():
    from hiera_perception.consumer import STOP

    d = _decider(hysteresis_clips=2)
    d.on_clip(["swipe_left"], [0.9], 0.0)
    assert d.on_clip(["swipe_left"], [0.9], 0.1) is not None and d.command == LEFT
    assert d.on_clip(["swipe_left"], [0.59], 0.2) is None, "one unsure clip moves nothing"
    assert d.on_clip(["wave"], [0.61], 0.3) is None
    assert d.on_clip([], [], 0.4) is None  # a model without a head: no label at all
    assert d.command == LEFT
    assert d.on_clip(["wave"], [0.3], 0.5) == "no clear action any more (was: someone is doing swipe left)"
    assert (d.action, d.command) == (None, STOP)
    # Confident clips of a label without a command: acted on (an event), and the command is stop.
    d.on_clip(["idle"], [0.9], 0.6)
    assert d.on_clip(["idle"], [0.7], 0.7) == "someone is doing idle (0.80)" and d.command == STOP


def test_timeout_stops_at_once_then_needs_n_clips_again():
    from hiera_perception.consumer import STOP

    d = _decider(hysteresis_clips=1, timeout_s=1.0)
    assert d.on_tick(5.0) is None, "no clip yet: nothing to time out"
    assert d.on_clip(["swipe_left"], [0.9], 10.0) is not None and d.command == LEFT
    assert d.on_tick(10.99) is None and d.command == LEFT
    assert d.on_tick(11.0) == "no action features for 1 s; stopping (was: someone is doing swipe left)"
    assert d.command == STOP
    assert d.on_tick(20.0) is None, "one event per silence"
    assert d.on_clip(["swipe_left"], [0.9], 21.0) is not None and d.command == LEFT


class _UnboundedDecider:
    """ActionDecider's rules with the streak as an unbounded list (how it was): the reference for the bound."""

    def __init__(self, config):
        self.config, self.action, self._candidate, self._streak, self._last = config, None, None, [], None

    def on_clip(self, labels, scores, now_s):
        self._last = now_s
        confident = bool(labels) and len(scores) > 0 and scores[0] >= self.config.threshold
        candidate = labels[0] if confident else None
        if candidate != self._candidate:
            self._candidate, self._streak = candidate, []
        self._streak.append(float(scores[0]) if confident else 0.0)
        h = self.config.hysteresis_clips
        if len(self._streak) < h or candidate == self.action:
            return None
        previous, self.action = self.action, candidate
        if candidate is None:
            return f"no clear action any more (was: {self.config.phrase(previous)})"
        return f"{self.config.phrase(candidate)} ({sum(self._streak[-h:]) / h:.2f})"

    def on_tick(self, now_s):
        if self._last is None or now_s - self._last < self.config.timeout_s:
            return None
        self._last, self._candidate, self._streak = None, None, []
        previous, self.action = self.action, None
        event = f"no action features for {self.config.timeout_s:g} s"
        return f"{event}; stopping (was: {self.config.phrase(previous)})" if previous else event


def test_streak_is_bounded_and_decides_as_an_unbounded_one():
    import random
    from dataclasses import replace

    d = _decider()
    for i in range(100_000):  # a steady action: the streak used to grow by one per clip
        d.on_clip(["wave"], [0.9], i * 0.5)
    assert d.action == "wave" and len(d._streak) == 3

    # Hysteresis lowered, then raised again, between two clips: the streak of 4 still counts as 4.
    d = _decider(hysteresis_clips=5)
    ref = _UnboundedDecider(d.config)
    for i in range(4):
        assert d.on_clip(["swipe_left"], [0.9], float(i)) is ref.on_clip(["swipe_left"], [0.9], float(i)) is None
    for h in (3, 5):
        d.config = ref.config = replace(d.config, hysteresis_clips=h)
    assert d.on_clip(["swipe_left"], [0.9], 4.0) == ref.on_clip(["swipe_left"], [0.9], 4.0) == (
        "someone is doing swipe left (0.90)")

    # The same events as the unbounded streak, over noisy clips, silences and hysteresis changed at run time.
    rng = random.Random(0)
    d = _decider()
    ref = _UnboundedDecider(d.config)
    now = 0.0
    for step in range(20_000):
        r = rng.random()
        if r < 0.02:
            config = replace(d.config, hysteresis_clips=rng.randint(1, 8))
            d.config = ref.config = config
            continue
        now += 2.0 if r < 0.03 else 0.1
        if r < 0.1:
            assert d.on_tick(now) == ref.on_tick(now), step
            continue
        labels = [rng.choice(["wave", "swipe_left", "idle"])] if rng.random() < 0.95 else []
        scores = [rng.choice([0.3, 0.7, 0.8, 0.95])] if labels else []
        for _ in range(rng.choice([1, 1, 2, 5, 12])):  # runs of the same clip
            assert d.on_clip(labels, scores, now) == ref.on_clip(labels, scores, now), step
            assert d.action == ref.action
        assert len(d._streak) <= 8  # the largest hysteresis_clips set


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="threshold must be in \\[0, 1\\], got 1.5"):
        _decider(threshold=1.5)
    with pytest.raises(ValueError, match="command of 'wave' needs 6 numbers"):
        _decider(commands={"wave": (0.0, 1.0)})


def test_shipped_yaml_is_a_valid_config():
    from hiera_perception.consumer import ActionDecider, ConsumerConfig
    from hiera_perception.synth import ACTIONS

    params = yaml.safe_load((ROOT / "config" / "consumer.yaml").read_text())["/**/action_consumer"]["ros__parameters"]
    assert set(params["labels"]) == set(ACTIONS) == set(params["commands"]) == set(params["phrases"])
    assert all(isinstance(v, float) for cmd in params["commands"].values() for v in cmd), "ROS needs 1.0, not 1"
    d = ActionDecider(ConsumerConfig(threshold=params["threshold"], hysteresis_clips=params["hysteresis_clips"],
                                     timeout_s=params["timeout_s"], commands=params["commands"],
                                     phrases=params["phrases"]))
    for i in range(params["hysteresis_clips"]):
        event = d.on_clip(["swipe_right"], [0.9], float(i))
    assert event == "someone swipes to the right (0.90)" and d.command[5] == -0.5


def test_node_turns_features_into_cmd_vel_and_events():
    """The node with the shipped params file, fed ActionFeatures over real DDS."""
    import rclpy
    from geometry_msgs.msg import Twist
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from std_msgs.msg import String

    from hiera_perception.consumer import ActionConsumer
    from hiera_perception_msgs.msg import ActionFeatures

    context = rclpy.Context()
    rclpy.init(context=context, args=["--ros-args", "--params-file", str(ROOT / "config" / "consumer.yaml"),
                                      "-p", "timeout_s:=0.5"])
    try:
        consumer = ActionConsumer(context=context)
        assert list(consumer.get_parameter("commands.swipe_left").value) == list(LEFT)
        peer = Node("peer", context=context)
        reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        pub = peer.create_publisher(ActionFeatures, "action_features", reliable)
        events: list[str] = []
        twists: list[Twist] = []
        peer.create_subscription(String, "events", lambda m: events.append(m.data), reliable)
        peer.create_subscription(Twist, "cmd_vel", twists.append, reliable)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(consumer)
        executor.add_node(peer)

        def spin_until(pred, timeout_s=15.0):
            deadline = time.monotonic() + timeout_s
            while not pred() and time.monotonic() < deadline:
                executor.spin_once(timeout_sec=0.02)
            return pred()

        assert spin_until(lambda: pub.get_subscription_count() == 1 and len(twists) >= 1)

        def send(label, score):
            pub.publish(ActionFeatures(labels=[label, "wave"], scores=[score, 1.0 - score], num_frames=8))
            spin_until(lambda: False, 0.05)

        for _ in range(2):
            send("swipe_left", 0.9)
        assert events == [] and twists[-1].angular.z == 0.0, "two clips are not enough with hysteresis 3"
        send("swipe_left", 0.8)
        assert spin_until(lambda: events == ["someone swipes to the left (0.87)"])
        assert spin_until(lambda: twists[-1].angular.z == 0.5)
        # Silence: stop after timeout_s, with an event.
        assert spin_until(lambda: len(events) == 2, 5.0), events
        assert events[1].startswith("no action features for 0.5 s; stopping")
        assert spin_until(lambda: twists[-1].angular.z == 0.0)
    finally:
        context.try_shutdown()


def test_params_file_applies_under_a_namespace():
    """config/consumer.yaml's `/**/action_consumer` reaches /robot1/action_consumer too."""
    import rclpy

    from hiera_perception.consumer import ActionConsumer

    context = rclpy.Context()
    rclpy.init(context=context, args=["--ros-args", "--params-file", str(ROOT / "config" / "consumer.yaml")])
    try:
        consumer = ActionConsumer(context=context, namespace="robot1")
        assert consumer.get_fully_qualified_name() == "/robot1/action_consumer"
        assert list(consumer.get_parameter("commands.swipe_left").value) == list(LEFT)
        assert "swipe_left" in consumer.decider.config.commands
    finally:
        context.try_shutdown()


def test_node_parameters_without_a_file_and_with_a_bad_command():
    import rclpy
    from rclpy.parameter import Parameter
    from rclpy.qos import ReliabilityPolicy

    from hiera_perception.consumer import ActionConsumer

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        plain = ActionConsumer(context=context)
        assert plain.decider.config.commands == {} and plain.decider.config.threshold == 0.6
        assert plain._sub.qos_profile.reliability == ReliabilityPolicy.RELIABLE
        plain.destroy_node()
        with pytest.raises(ValueError, match="command of 'wave' needs 6 numbers"):
            ActionConsumer(context=context, parameter_overrides=[
                Parameter("labels", value=["wave"]), Parameter("commands.wave", value=[0.0, 1.0])])
        # the subscription's QoS follows qos_overrides, to match a node whose output was overridden
        best = ActionConsumer(context=context, parameter_overrides=[
            Parameter("qos_overrides./action_features.subscription.reliability", value="best_effort")])
        assert best._sub.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT
        best.destroy_node()
        # a label listed twice declared its commands.<label> twice: ParameterAlreadyDeclaredException, a traceback
        with pytest.raises(ValueError, match="parameter labels: listed more than once: wave"):
            ActionConsumer(context=context, parameter_overrides=[Parameter("labels", value=["wave", "idle", "wave"])])
    finally:
        context.try_shutdown()


def test_parameters_it_never_declares_are_named_in_a_warning():
    """ROS ignores a parameter a node does not declare, silently: a command for a label missing from `labels`, or a
    misspelt name, did nothing without a word. The shipped file draws no warning."""
    import rclpy
    from rclpy.parameter import Parameter

    from hiera_perception.consumer import ActionConsumer
    from hiera_perception.ros_params import warn_unknown_parameters

    context = rclpy.Context()
    rclpy.init(context=context, args=["--ros-args", "--params-file", str(ROOT / "config" / "consumer.yaml")])
    try:
        shipped = ActionConsumer(context=context)
        assert warn_unknown_parameters(shipped) == []
        shipped.destroy_node()
        node = ActionConsumer(context=context, parameter_overrides=[
            Parameter("commands.jump", value=[0.0] * 6), Parameter("phrases.wavee", value="hi"),
            Parameter("treshold", value=0.5),
            Parameter("use_sim_time", value=False),
            Parameter("qos_overrides./action_features.subscription.depth", value=5)])
        assert warn_unknown_parameters(node) == [
            "commands.jump: not a parameter of this node",
            "phrases.wavee: not a parameter of this node (did you mean phrases.wave?)",
            "treshold: not a parameter of this node (did you mean threshold?)"]
        assert node.decider.config.threshold == 0.6  # and nothing of it was applied
    finally:
        context.try_shutdown()
