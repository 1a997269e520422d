"""The perception node on real ROS 2, in a subprocess: camera frames in at 30 fps, ActionFeatures out with the
clip's exact stamps, sizes and labels (and the very embedding the Engine computes for those frames); compressed
input; top_k at run time; a clean Ctrl-C; bad parameters stop it with a clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ros_helpers as rh

pytestmark = pytest.mark.ros

DOMAIN = rh.domain_id(1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return rh.make_checkpoint(tmp_path_factory.mktemp("node") / "tiny.pt")


def test_raw_input_features_stamps_and_runtime_top_k(checkpoint, tmp_path):
    from rclpy.parameter import Parameter
    from rclpy.parameter_client import AsyncParameterClient

    params = rh.write_params(tmp_path / "params.yaml", rh.node_params(checkpoint), qos_reliable_depth=200)
    log = tmp_path / "node.log"
    # a misspelt name (ignored, as ROS does) is named in a warning
    proc = rh.start_node(["--ros-args", "--params-file", str(params), "-p", "top_kk:=2"], rh.ros_env(DOMAIN), log)
    harness = rh.Harness(DOMAIN)
    try:
        harness.wait_connected(proc)
        n = 60  # 2 s of camera: clips k = 0..6
        frames = [rh.rgb_frame(i) for i in range(n)]
        expected = rh.expected_clips(rh.NUM_FRAMES, rh.STRIDE_FRAMES, rh.HOP_FRAMES, n)
        assert len(expected) == 7
        harness.publish(rh.image_msg(frames[i], rh.frame_stamp_ns(i)) for i in range(n))
        assert harness.spin_until(lambda: len(harness.features) >= len(expected), 60, proc), log.read_text()
        harness.spin_until(lambda: False, 0.3)  # nothing more may come
        rh.check_features(harness.features, expected, frames, checkpoint, rh.FRAME_ID)

        # Diagnostics see every frame, no loss, and a latency.
        assert harness.spin_until(lambda: harness.last_diagnostics().get("frames_received") == str(n), 10, proc)
        diag = harness.last_diagnostics()
        assert (diag["bad_frames"], diag["queue_drops"], diag["clips_published"]) == ("0", "0", str(len(expected)))
        assert float(diag["latency_p50_ms"]) > 0 and diag["encoder_version"] == "test@0"
        assert harness.diagnostics[-1][0] == 0  # OK

        # top_k changes at run time; the rest is read at start, and says so: read-only (rejected with a reason).
        client = AsyncParameterClient(harness.node, "hiera_perception")
        assert client.wait_for_services(10.0)
        names = ["top_k", "hop_s", "model", "adaptation.enabled", "adaptation.lr"]
        future = client.describe_parameters(names)
        assert harness.spin_until(future.done, 10, proc)
        assert [d.read_only for d in future.result().descriptors] == [False, True, True, True, True]
        future = client.set_parameters([Parameter("top_k", value=1), Parameter("hop_s", value=1.0)])
        assert harness.spin_until(future.done, 10, proc)
        top_k_result, hop_result = future.result().results
        assert top_k_result.successful
        assert not hop_result.successful and hop_result.reason == "Trying to set a read-only parameter: hop_s."
        harness.features.clear()
        more = [rh.rgb_frame(i) for i in range(n, n + 20)]  # continues the timeline: clips k = 7, 8
        harness.publish(rh.image_msg(more[i - n], rh.frame_stamp_ns(i)) for i in range(n, n + 20))
        assert harness.spin_until(lambda: len(harness.features) >= 2, 30, proc)
        assert [len(f.labels) for f in harness.features] == [1, 1]
        later = rh.expected_clips(rh.NUM_FRAMES, rh.STRIDE_FRAMES, rh.HOP_FRAMES, n + 20)[len(expected):]
        assert [rh.stamp_ns(f.header.stamp) for f in harness.features] == [rh.frame_stamp_ns(c.last) for c in later]
    finally:
        harness.close()
        rc = rh.stop(proc)
    text = log.read_text()
    assert rc == 0 and "Traceback" not in text, text  # Ctrl-C: clean exit, no traceback
    assert "ignored parameter top_kk: not a parameter of this node (did you mean top_k?)" in text, text
    assert text.count("ignored parameter") == 1, text  # the params file's own names are all the node's


def test_compressed_input_remap_frame_id_override_and_bad_frames(checkpoint, tmp_path):
    topic = "/cam/image_raw"
    params = rh.write_params(tmp_path / "params.yaml",
                             rh.node_params(checkpoint, input="compressed", frame_id="override"),
                             qos_reliable_depth=200, topic=topic + "/compressed")
    log = tmp_path / "node.log"
    proc = rh.start_node(["--ros-args", "--params-file", str(params), "-r", f"image:={topic}"], rh.ros_env(DOMAIN), log)
    harness = rh.Harness(DOMAIN, image_topic=topic, compressed=True)
    try:
        harness.wait_connected(proc)
        n = 30  # clips k = 0, 1
        frames = [rh.rgb_frame(i) for i in range(n)]
        expected = rh.expected_clips(rh.NUM_FRAMES, rh.STRIDE_FRAMES, rh.HOP_FRAMES, n)
        msgs = [rh.compressed_msg(frames[i], rh.frame_stamp_ns(i), fmt="png") for i in range(n)]  # lossless
        empty = rh.compressed_msg(frames[0], rh.frame_stamp_ns(3))
        empty.data = b""
        garbage = rh.compressed_msg(frames[0], rh.frame_stamp_ns(5))
        garbage.data = bytes(range(256)) * 4
        cut = rh.compressed_msg(frames[0], rh.frame_stamp_ns(7), fmt="jpeg")
        cut.data = bytes(cut.data)[: len(cut.data) // 2]
        msgs[3:3], msgs[6:6], msgs[9:9] = [empty], [garbage], [cut]  # bad frames between the good ones
        harness.publish(msgs)
        assert harness.spin_until(lambda: len(harness.features) >= len(expected), 60, proc), log.read_text()
        rh.check_features(harness.features, expected, frames, checkpoint, "override")
        assert harness.spin_until(lambda: harness.last_diagnostics().get("frames_received") == str(n + 3), 10, proc)
        level, message, diag = harness.diagnostics[-1]
        assert diag["bad_frames"] == "3"
        assert {k: v for k, v in diag.items() if k.startswith("bad_frames.")} == {
            "bad_frames.empty_data": "1", "bad_frames.undecodable": "1", "bad_frames.truncated": "1"}
    finally:
        harness.close()
        rc = rh.stop(proc)
    assert rc == 0, log.read_text()


def test_bad_parameter_exits_with_clear_error():
    proc = subprocess.run([sys.executable, "-m", "hiera_perception.node", "--ros-args", "-p", "hop_s:=1"],
                          env=rh.ros_env(DOMAIN), cwd=rh.REPO, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "[FATAL]" in out and "parameter hop_s" in out and "write floats with a decimal point" in out, out
    assert "Traceback" not in out, out


@pytest.mark.parametrize("name, value, expected", [
    ("top_k", 0, "parameter top_k"),
    ("queue_size", 100_000, "parameter queue_size"),
    ("device", "gpu", "parameter device: 'gpu' is not one of auto, cpu, cuda, cuda:N"),
    ("precision", "fp16", "parameter precision: 'fp16' is not one of fp32, bf16"),
    ("input", "jpeg", "parameter input: 'jpeg' is not one of raw, compressed"),
    ("output_topic", " ", "parameter output_topic: must not be empty"),
    ("model", "/nonexistent/model.pt", "parameter model '/nonexistent/model.pt'"),
])
def test_bad_parameter_values_are_named(name, value, expected):
    rh.assert_config_error(DOMAIN, name, value, expected)


def test_without_a_camera_teach_answers_and_diagnostics_warn(checkpoint, tmp_path):
    """No frame ever: a teach request ends when its recording does (the worker used to wait for it without a
    deadline, and every later request got "still teaching"), and /diagnostics turns WARN."""
    from hiera_perception_msgs.srv import TeachLabel

    params = rh.write_params(tmp_path / "params.yaml", rh.node_params(
        checkpoint, prototypes_file=str(tmp_path / "taught.json")))
    log = tmp_path / "node.log"
    proc = rh.start_node(["--ros-args", "--params-file", str(params)], rh.ros_env(DOMAIN), log)
    harness = rh.Harness(DOMAIN)
    try:
        harness.wait_connected(proc)
        for label in ("x", "y"):
            request = TeachLabel.Request(label=label, seconds=0.5)
            answer = rh.call(harness, TeachLabel, "/hiera_perception/teach", request, proc, timeout_s=20)
            assert (answer.success, answer.clips_learned, answer.message) == (
                False, 0, f"no clips were served while recording {label!r}: is the camera publishing?"), log.read_text()
        assert harness.spin_until(lambda: harness.diagnostics and harness.diagnostics[-1][0] == 1, 20, proc)
        _, message, diag = harness.diagnostics[-1]
        assert message.startswith("no frame on /image for ") and message.endswith("is the camera publishing?")
        assert (diag["frames_received"], diag["seconds_since_frame"]) == ("0", "n/a")
    finally:
        harness.close()
        rc = rh.stop(proc)
    assert rc == 0, log.read_text()


def test_a_publisher_it_cannot_hear_is_named_in_diagnostics(checkpoint, tmp_path):
    """A best-effort camera against a reliable subscription (an override): no frame ever arrives, and /diagnostics
    asked whether the camera publishes. It names the QoS mismatch and where to change it."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    try:
        from rclpy.event_handler import PublisherEventCallbacks
    except ImportError:  # Humble
        from rclpy.qos_event import PublisherEventCallbacks
    params = rh.write_params(tmp_path / "params.yaml", rh.node_params(checkpoint), qos_reliable_depth=10)
    log = tmp_path / "node.log"
    proc = rh.start_node(["--ros-args", "--params-file", str(params)], rh.ros_env(DOMAIN), log)
    harness = rh.Harness(DOMAIN)
    try:
        harness.wait_connected(proc)
        camera = harness.node.create_publisher(  # rclpy's own report of the mismatch here is a DeprecationWarning
            Image, "/image", QoSProfile(depth=5, reliability=ReliabilityPolicy.BEST_EFFORT),
            event_callbacks=PublisherEventCallbacks(incompatible_qos=lambda info: None))

        def named() -> bool:
            camera.publish(rh.image_msg(rh.rgb_frame(0), rh.T0_NS))
            return any(lv == 1 and "offers incompatible QoS (RELIABILITY): see qos_overrides" in m
                       for lv, m, _ in harness.diagnostics)
        assert harness.spin_until(named, 30, proc), (harness.diagnostics[-3:], log.read_text()[-2000:])
        assert harness.last_diagnostics()["frames_received"] == "0"
    finally:
        harness.close()
        rh.stop(proc)
    assert "offers QoS incompatible with this subscription (RELIABILITY)" in log.read_text()


def test_diagnostics_warn_while_frames_or_clips_stop_and_recover(checkpoint, tmp_path):
    """WARN when the camera goes quiet after its first frames, and when frames come but form no clip (every stamp
    jumps past max_gap_s, so each frame restarts the clip); OK again as soon as clips flow."""
    params = rh.write_params(tmp_path / "params.yaml", rh.node_params(checkpoint), qos_reliable_depth=200)
    log = tmp_path / "node.log"
    proc = rh.start_node(["--ros-args", "--params-file", str(params)], rh.ros_env(DOMAIN), log)
    harness = rh.Harness(DOMAIN)
    n = 0  # frames sent so far; frame n's stamp is stamps[n]
    stamps: list[int] = []

    def send(count: int, jump_s: float = 0.0) -> None:
        nonlocal n
        msgs = []
        for _ in range(count):
            stamps.append(stamps[-1] + round(10**9 / rh.FPS + jump_s * 10**9) if stamps else rh.T0_NS)
            msgs.append(rh.image_msg(rh.rgb_frame(n), stamps[-1]))
            n += 1
        harness.publish(msgs)

    def report_after(sent: int, level: int):
        """Spin until a report that counted every frame sent has `level`; that report."""
        def seen():
            return any(lv == level and d.get("frames_received") == str(sent) for lv, _, d in harness.diagnostics)
        assert harness.spin_until(seen, 20, proc), (harness.diagnostics[-3:], log.read_text()[-2000:])
        return next(r for r in reversed(harness.diagnostics) if r[0] == level and r[2]["frames_received"] == str(sent))

    try:
        harness.wait_connected(proc)
        send(30)
        assert int(report_after(30, 0)[2]["clips_published"]) > 0

        # The camera stops: WARN, naming the topic.
        _, message, diag = report_after(30, 1)
        assert message.startswith("no frame on /image for ") and float(diag["seconds_since_frame"]) > 2.0
        # ... and comes back.
        harness.diagnostics.clear()
        send(30)
        report_after(60, 0)

        # Frames without clips: each stamp jumps 2 s (max_gap_s is 1 s).
        harness.diagnostics.clear()
        while not any(lv == 1 and m.startswith("frames arrive but no clip") for lv, m, _ in harness.diagnostics):
            assert n < 60 + 10 * rh.FPS, (harness.diagnostics[-3:], log.read_text()[-2000:])
            send(15, jump_s=2.0)
        message = next(m for lv, m, _ in reversed(harness.diagnostics) if lv == 1)
        assert "clip buffer resets: stamps jumping or going back?" in message
        # Steady stamps again: clips, OK.
        harness.diagnostics.clear()
        send(30)
        report_after(n, 0)
    finally:
        harness.close()
        rc = rh.stop(proc)
    assert rc == 0, log.read_text()


def test_two_nodes_keep_apart_diagnostics_and_adaptation_folders(checkpoint, tmp_path, monkeypatch):
    """Front and rear cameras: statuses named after each node; adaptation folders per node (the default node's
    where it always was)."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from hiera_perception.node import PerceptionNode

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    adaptation = tmp_path / "state" / "hiera_perception" / "adaptation" / "test"
    overrides = [Parameter("model", value=str(checkpoint)), Parameter("device", value="cpu"),
                 Parameter("diagnostics_period_s", value=0.2)]
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=DOMAIN)
    nodes = []
    try:
        for kwargs in ({}, {"namespace": "robot1"}, {"cli_args": ["--ros-args", "-r", "__node:=rear"]}):
            nodes.append(PerceptionNode(context=context, parameter_overrides=overrides, **kwargs))
        names = [node.get_fully_qualified_name() for node in nodes]
        assert names == ["/hiera_perception", "/robot1/hiera_perception", "/rear"]
        assert [node._adaptation_dir for node in nodes] == [
            adaptation, adaptation / "robot1" / "hiera_perception", adaptation / "rear"]

        listener = rclpy.create_node("listener", context=context)
        seen: set[str] = set()
        listener.create_subscription(DiagnosticArray, "/diagnostics",
                                     lambda msg: seen.update(s.name for s in msg.status), 50)
        executor = SingleThreadedExecutor(context=context)
        for node in [*nodes, listener]:
            executor.add_node(node)
        expected = {f"{name}: {part}" for name in names for part in ("pipeline", "adaptation")}
        assert rh.spin_until(executor, lambda: expected <= seen, 20), seen
    finally:
        for node in nodes:
            node.destroy_node()
        context.try_shutdown()
