"""What every node's `main` and parameter handling must survive, on real rclpy: Ctrl-C landing while the executor
builds its wait set (exit 0, no traceback), and the Humble fallbacks (no post-set parameter callbacks, no
rclpy.event_handler), emulated by hiding the newer API."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ros_helpers as rh

pytestmark = pytest.mark.ros

DOMAIN = rh.domain_id(11)


def _waitset_race_node(shutdown_while_waiting: bool):
    """A node whose executor meets an invalid context while it builds its wait set: what Ctrl-C does from rclpy's
    signal thread when it lands between the executor's context check and the wait set (~1 in 20 Ctrl-Cs)."""
    import rclpy
    from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
    from rclpy.waitable import NumberOfEntities, Waitable

    class ShutsDown(Waitable):
        """Entered by the executor right before it creates the wait set."""

        def __init__(self, context) -> None:
            super().__init__(MutuallyExclusiveCallbackGroup())
            self.context = context

        def __enter__(self) -> None:
            if shutdown_while_waiting and self.context.ok():
                self.context.shutdown()

        def __exit__(self, *exc) -> None:
            pass

        def is_ready(self, wait_set) -> bool:
            return False

        def take_data(self) -> None:
            return None

        async def execute(self, taken_data) -> None:
            pass

        def get_num_entities(self) -> NumberOfEntities:
            return NumberOfEntities()

        def add_to_wait_set(self, wait_set) -> None:
            pass

    node = rclpy.create_node("waitset_race")
    node.add_waitable(ShutsDown(node.context))
    return node


def test_spin_node_exits_0_when_the_context_dies_under_the_wait_set():
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy

    from hiera_perception.ros_params import spin_node

    # The race is real: a bare executor raises rclpy's RCLError out of spin().
    rclpy.init(args=[], domain_id=DOMAIN)
    try:
        node = _waitset_race_node(True)
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        with pytest.raises(_rclpy.RCLError, match="context is not valid"):
            executor.spin()
    finally:
        rclpy.try_shutdown()
    # spin_node treats it as the Ctrl-C it is.
    assert spin_node(lambda: _waitset_race_node(True), "waitset_race", args=[]) == 0
    assert not rclpy.ok()


def test_spin_node_reraises_an_rcl_error_while_the_context_is_ok():
    import rclpy
    from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy

    from hiera_perception.ros_params import spin_node

    def make_node():
        node = _waitset_race_node(False)

        def fail() -> None:
            raise _rclpy.RCLError("a real failure")

        node.create_timer(0.01, fail)
        return node

    with pytest.raises(_rclpy.RCLError, match="a real failure"):
        spin_node(make_node, "failing", args=[])
    assert not rclpy.ok()  # shut down all the same


@pytest.fixture
def humble(monkeypatch):
    """rclpy without post-set parameter callbacks (Humble): nodes must apply changes from their on-set callback."""
    from rclpy.node import Node

    monkeypatch.delattr(Node, "add_post_set_parameters_callback")


def test_humble_runtime_parameters_still_apply(humble, ros_context, tmp_path):
    from rclpy.parameter import Parameter

    from hiera_perception.camera import CameraPublisher
    from hiera_perception.consumer import ActionConsumer
    from hiera_perception.node import PerceptionNode

    assert not hasattr(ActionConsumer, "add_post_set_parameters_callback")
    consumer = ActionConsumer(context=ros_context)
    assert all(r.successful for r in consumer.set_parameters(
        [Parameter("threshold", value=0.8), Parameter("hysteresis_clips", value=5)]))
    assert (consumer.decider.config.threshold, consumer.decider.config.hysteresis_clips) == (0.8, 5)
    result, = consumer.set_parameters([Parameter("threshold", value=1.5)])  # out of range: refused, not applied
    assert not result.successful and consumer.decider.config.threshold == 0.8

    synthetic = CameraPublisher(context=ros_context, parameter_overrides=[Parameter("synthetic", value=True)])
    result, = synthetic.set_parameters([Parameter("fps", value=10.0)])  # its validator refuses: nothing applied
    assert not result.successful and "fixed at start" in result.reason and synthetic._fps == 30.0

    checkpoint = rh.make_checkpoint(tmp_path / "tiny.pt")
    node = PerceptionNode(context=ros_context, parameter_overrides=[
        Parameter("model", value=str(checkpoint)), Parameter("device", value="cpu")])
    try:
        result, = node.set_parameters([Parameter("top_k", value=2)])
        assert result.successful and node._top_k == 2
        result, = node.set_parameters([Parameter("hop_s", value=1.0)])
        assert not result.successful and "read-only" in result.reason
    finally:
        node.destroy_node()
        synthetic.destroy_node()
        consumer.destroy_node()


def test_node_imports_without_rclpy_event_handler():
    """Humble has rclpy.qos_event, not rclpy.event_handler. (Here qos_event re-exports event_handler: import it
    first, then hide event_handler from the node's own import.)"""
    code = ("import sys, rclpy.node, rclpy.qos_event; sys.modules['rclpy.event_handler'] = None; "
            "import hiera_perception.node as n; print(n.SubscriptionEventCallbacks.__name__)")
    out = subprocess.run([sys.executable, "-c", code], env=rh.ros_env(DOMAIN), cwd=rh.REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "SubscriptionEventCallbacks", out.stdout + out.stderr
