"""hiera_perception_msgs: the public contract of DESIGN.md, and one ActionFeatures over real rclpy pub/sub."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.ros

# DESIGN.md's ActionFeatures, as rosidl names the types.
ACTION_FEATURES_FIELDS = {
    "header": "std_msgs/Header",
    "clip_start": "builtin_interfaces/Time",
    "num_frames": "uint32",
    "encoder_version": "string",
    "embedding": "sequence<float>",
    "labels": "sequence<string>",
    "scores": "sequence<float>",
}
TEACH_LABEL_REQUEST_FIELDS = {"label": "string", "seconds": "float"}
TEACH_LABEL_RESPONSE_FIELDS = {"success": "boolean", "clips_learned": "uint32", "message": "string"}


def test_action_features_fields_match_design():
    from hiera_perception_msgs.msg import ActionFeatures

    assert ActionFeatures.get_fields_and_field_types() == ACTION_FEATURES_FIELDS
    msg = ActionFeatures()
    assert (msg.num_frames, msg.encoder_version, list(msg.labels)) == (0, "", [])
    assert len(msg.embedding) == 0 and len(msg.scores) == 0


def test_teach_label_fields():
    from hiera_perception_msgs.srv import TeachLabel

    assert TeachLabel.Request.get_fields_and_field_types() == TEACH_LABEL_REQUEST_FIELDS
    assert TeachLabel.Response.get_fields_and_field_types() == TEACH_LABEL_RESPONSE_FIELDS


def test_action_features_takes_numpy_float32():
    from hiera_perception_msgs.msg import ActionFeatures

    # The node fills the embedding straight from a float32 tensor's numpy view; rosidl stores it as array('f').
    msg = ActionFeatures()
    msg.embedding = np.arange(4, dtype=np.float32)
    msg.scores = np.float32([0.5, 0.25])
    assert msg.embedding.typecode == "f" and list(msg.embedding) == [0.0, 1.0, 2.0, 3.0]
    assert list(msg.scores) == [0.5, 0.25]


def _example_message():
    from builtin_interfaces.msg import Time
    from hiera_perception_msgs.msg import ActionFeatures

    msg = ActionFeatures()
    msg.header.stamp = Time(sec=1_700_000_123, nanosec=456_000_000)
    msg.header.frame_id = "camera_optical"
    msg.clip_start = Time(sec=1_700_000_121, nanosec=990_000_000)
    msg.num_frames = 16
    msg.encoder_version = "hiera_tiny_synthetic@3"
    msg.embedding = np.linspace(-1.5, 2.5, 96, dtype=np.float32)
    msg.labels = ["waving", "clapping", "walking"]
    msg.scores = [0.75, 0.125, 0.0625]
    return msg


def test_action_features_pub_sub_roundtrip(ros_context, spin_until):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from hiera_perception_msgs.msg import ActionFeatures

    topic = "/test_msgs/action_features"
    pub_node = rclpy.create_node("test_msgs_publisher", context=ros_context)
    sub_node = rclpy.create_node("test_msgs_subscriber", context=ros_context)
    received: list = []
    subscription = sub_node.create_subscription(ActionFeatures, topic, received.append, 10)
    publisher = pub_node.create_publisher(ActionFeatures, topic, 10)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(pub_node)
    executor.add_node(sub_node)
    try:
        # Both ends must have discovered each other, or the one message may be published into the void.
        matched = spin_until(
            executor, lambda: publisher.get_subscription_count() > 0 and subscription.get_publisher_count() > 0
        )
        assert matched, "publisher and subscriber never matched"
        sent = _example_message()
        publisher.publish(sent)
        assert spin_until(executor, lambda: len(received) > 0), "no ActionFeatures received"
    finally:
        executor.shutdown()
        pub_node.destroy_node()
        sub_node.destroy_node()

    got = received[0]
    assert len(received) == 1
    assert (got.header.stamp.sec, got.header.stamp.nanosec) == (1_700_000_123, 456_000_000)
    assert got.header.frame_id == "camera_optical"
    assert (got.clip_start.sec, got.clip_start.nanosec) == (1_700_000_121, 990_000_000)
    assert got.num_frames == 16
    assert got.encoder_version == "hiera_tiny_synthetic@3"
    np.testing.assert_array_equal(np.asarray(got.embedding, dtype=np.float32), np.asarray(sent.embedding))
    assert list(got.labels) == ["waving", "clapping", "walking"]
    np.testing.assert_array_equal(np.asarray(got.scores, dtype=np.float32), np.float32([0.75, 0.125, 0.0625]))
