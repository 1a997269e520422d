"""The node learning at run time, on real ROS 2 (the node in a subprocess, a camera at 30 fps from this process):

* adaptation on a tiny MAE checkpoint with fast, permissive settings: the published encoder_version rises
  (test@0, then test@1, ...), ~/reconstruction publishes input | masked | reconstruction images, /diagnostics
  carries the adaptation status, ~/adaptation/enable toggles it, ~/adaptation/rollback brings an older version
  back into the messages, ~/adaptation/save writes a checkpoint, and a restarted node resumes the last version;
* ~/teach on a headless model: two labels taught from two scenes, then each scene is labelled with its own;
  the enable service starts adaptation on a node that began without it;
* adaptation parameters are validated and named.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

import ros_helpers as rh

pytestmark = pytest.mark.ros

DOMAIN = rh.domain_id(7)
NODE = "/hiera_perception"
ADAPTATION = f"{NODE}: adaptation"
FAST = {  # every round accepted (a permissive guard), small and quick
    "enabled": True, "resume": False, "min_clips": 4, "probe_clips": 2, "steps_per_round": 2, "batch_size": 2,
    "lr": 1e-3, "min_probe_cosine": -1.0, "max_loss_increase": 100.0, "round_interval_s": 0.2,
    "max_device_share": 1.0, "reconstruction_period_s": 0.5,
}


def mae_checkpoint(path, num_classes: int = len(rh.LABELS)):
    """A tiny HieraMAE checkpoint (decoder included, so adaptation needs no warm-up) with a head for rh.LABELS."""
    from hiera_perception.checkpoint import save_checkpoint
    from hiera_perception.config import get_config
    from hiera_perception.mae import HieraMAE
    from hiera_perception.model import Hiera

    torch.manual_seed(0)
    encoder = Hiera(get_config(rh.ARCH, num_classes=num_classes))
    return save_checkpoint(path, HieraMAE(encoder.config, encoder=encoder), labels=rh.LABELS[:num_classes],
                           model_id="test")


def version(features) -> int:
    return int(features.encoder_version.rpartition("@")[2])


class Camera:
    """Frames at 30 fps on the harness's publisher, on one continuous timeline, while spinning."""

    def __init__(self, harness: rh.Harness, proc) -> None:
        self.harness, self.proc, self.n = harness, proc, 0

    def run(self, until, timeout_s: float, frame: np.ndarray | None = None) -> bool:
        start = time.monotonic()
        k = 0
        while not until():
            if time.monotonic() - start > timeout_s or self.proc.poll() is not None:
                return until()
            picture = rh.rgb_frame(self.n) if frame is None else frame
            self.harness.pub.publish(rh.image_msg(picture, rh.frame_stamp_ns(self.n)))
            self.n += 1
            k += 1
            self.harness.executor.spin_once(timeout_sec=0)
            self.harness.spin_until(lambda: False, start + k / rh.FPS - time.monotonic())
        return True

    def gap(self, seconds: float = 2.0) -> int:
        """Skip `seconds` of the timeline (> max_gap_s: the clip buffer restarts); the next frame's stamp (ns)."""
        self.n += int(seconds * rh.FPS)
        return rh.frame_stamp_ns(self.n)


class Listener:
    """The adaptation DiagnosticStatus values and the ~/reconstruction images, as they arrive."""

    def __init__(self, harness: rh.Harness) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from sensor_msgs.msg import Image

        self.status: list[dict[str, str]] = []
        self.images: list = []
        harness.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 100)
        harness.node.create_subscription(Image, f"{NODE}/reconstruction", self.images.append, 10)

    def _on_diagnostics(self, msg) -> None:
        for s in msg.status:
            if s.name == ADAPTATION:
                self.status.append({kv.key: kv.value for kv in s.values})

    def last(self) -> dict[str, str]:
        return self.status[-1] if self.status else {}


def test_adaptation_versions_rollback_enable_save_reconstruction_and_resume(tmp_path):
    from std_srvs.srv import SetBool, Trigger

    from hiera_perception.checkpoint import load_checkpoint

    checkpoint = mae_checkpoint(tmp_path / "mae.pt")
    versions = tmp_path / "versions"
    params = rh.node_params(checkpoint, adaptation={**FAST, "dir": str(versions)})
    proc = rh.start_node(["--ros-args", "--params-file", str(rh.write_params(tmp_path / "p.yaml", params, 200))],
                         rh.ros_env(DOMAIN), tmp_path / "node.log")
    harness = rh.Harness(DOMAIN)
    listen = Listener(harness)
    camera = Camera(harness, proc)
    log = tmp_path / "node.log"
    try:
        harness.wait_connected(proc)
        # The version rises in the published messages while the camera runs.
        assert camera.run(lambda: any(version(f) >= 1 for f in harness.features), 120), log.read_text()
        seen = [version(f) for f in harness.features]
        assert seen[0] == 0 and seen == sorted(seen), seen
        assert all(f.encoder_version.startswith("test@") for f in harness.features)

        # ~/reconstruction: input | masked | reconstruction of a served clip, stamped like it
        assert camera.run(lambda: listen.images and listen.last().get("accepted", "0") != "0", 30), log.read_text()
        img = listen.images[-1]
        assert (img.height, img.width, img.encoding, img.step) == (64, 3 * 64 + 4, "rgb8", (3 * 64 + 4) * 3)
        assert len(img.data) == img.height * img.step
        assert img.header.frame_id == rh.FRAME_ID
        assert rh.stamp_ns(img.header.stamp) in {rh.stamp_ns(f.header.stamp) for f in harness.features}

        diag = listen.last()
        assert diag["enabled"] == "True" and int(diag["version"]) >= 1 and int(diag["accepted"]) >= 1
        assert int(diag["replay_clips"]) >= 4 and diag["dir"] == str(versions) and diag["trainable"] == "all"
        assert diag["last_result"] and diag["serving"].startswith("test@")
        assert diag["decoder_warmup"] == "False"  # the checkpoint's own decoder adapts from the first round

        # Off: no more rounds after the one in progress; the status says so.
        res = rh.call(harness, SetBool, f"{NODE}/adaptation/enable", SetBool.Request(data=False), proc)
        assert res.success and "disabled" in res.message
        assert harness.spin_until(lambda: listen.last().get("enabled") == "False", 10, proc)

        # Rollback: an older version serves again, from the next clip on. (It waits for a round in progress; with
        # adaptation off no other starts, so the files on disk are every version accepted.)
        res = rh.call(harness, Trigger, f"{NODE}/adaptation/rollback", Trigger.Request(), proc)
        assert res.success, res.message
        back = int(res.message.split("rolled back to version ")[1].split(";")[0])
        assert back < max(int(p.stem.rpartition("@")[2]) for p in versions.glob("test@*.pt"))
        harness.features.clear()
        assert camera.run(lambda: any(version(f) == back for f in harness.features), 30), log.read_text()
        first = next(i for i, f in enumerate(harness.features) if version(f) == back)
        assert camera.run(lambda: len(harness.features) >= first + 4, 30)
        assert {version(f) for f in harness.features[first:]} == {back}  # disabled: it stays

        # Save: the deployed version as a checkpoint in the versions folder.
        res = rh.call(harness, Trigger, f"{NODE}/adaptation/save", Trigger.Request(), proc)
        assert res.success and res.message == str(versions / f"test@{back}.pt"), res.message
        saved = load_checkpoint(res.message)
        assert (saved.model_id, saved.version) == ("test", back)
        assert any(k.startswith("decoder_") for k in saved.model_state)

        # On again: adaptation goes on from the rolled-back weights, under a new number.
        kept = max(int(p.stem.rpartition("@")[2]) for p in versions.glob("test@*.pt"))
        res = rh.call(harness, SetBool, f"{NODE}/adaptation/enable", SetBool.Request(data=True), proc)
        assert res.success and "enabled" in res.message
        assert harness.spin_until(lambda: listen.last().get("enabled") == "True", 10, proc)
        assert camera.run(lambda: any(version(f) > kept for f in harness.features), 60), log.read_text()
    finally:
        harness.close()
        rc = rh.stop(proc)
    text = log.read_text()
    assert rc == 0 and "Traceback" not in text, text

    # A restarted node resumes the last accepted version (latest.json), and adapts on from there.
    latest = json.loads((versions / "latest.json").read_text())["version"]
    assert latest > kept
    params = rh.node_params(checkpoint, adaptation={**FAST, "dir": str(versions), "resume": True, "min_clips": 1000})
    proc = rh.start_node(["--ros-args", "--params-file", str(rh.write_params(tmp_path / "p2.yaml", params, 200))],
                         rh.ros_env(DOMAIN), tmp_path / "node2.log")
    harness = rh.Harness(DOMAIN)
    camera = Camera(harness, proc)
    try:
        harness.wait_connected(proc)
        assert camera.run(lambda: len(harness.features) >= 2, 60), (tmp_path / "node2.log").read_text()
        assert {f.encoder_version for f in harness.features} == {f"test@{latest}"}
    finally:
        harness.close()
        rc = rh.stop(proc)
    assert rc == 0, (tmp_path / "node2.log").read_text()


def test_teach_labels_then_recognise_them_and_enable_adaptation_later(tmp_path):
    from hiera_perception_msgs.srv import TeachLabel
    from std_srvs.srv import SetBool, Trigger

    checkpoint = mae_checkpoint(tmp_path / "headless.pt", num_classes=0)  # labels come from teaching only
    prototypes = tmp_path / "taught" / "labels.json"
    params = rh.node_params(checkpoint, prototypes_file=str(prototypes),
                            adaptation={"dir": str(tmp_path / "versions")})
    log = tmp_path / "node.log"
    proc = rh.start_node(["--ros-args", "--params-file", str(rh.write_params(tmp_path / "p.yaml", params, 200))],
                         rh.ros_env(DOMAIN), log)
    harness = rh.Harness(DOMAIN)
    camera = Camera(harness, proc)
    scenes = {"red": rh.rgb_frame(0), "blue": np.ascontiguousarray(rh.rgb_frame(40)[::-1])}  # two still scenes
    try:
        harness.wait_connected(proc)
        for name, bad in (("", 1.0), ("x", 0.0), ("x", 61.0)):
            res = rh.call(harness, TeachLabel, f"{NODE}/teach", TeachLabel.Request(label=name, seconds=bad), proc)
            assert not res.success and res.clips_learned == 0 and res.message

        client = harness.node.create_client(TeachLabel, f"{NODE}/teach")
        assert client.wait_for_service(timeout_sec=30.0)
        for name, frame in scenes.items():
            camera.gap()  # a new timeline: no clip mixes two scenes
            future = client.call_async(TeachLabel.Request(label=name, seconds=1.5))
            assert camera.run(future.done, 60, frame), log.read_text()
            res = future.result()
            assert res.success and res.clips_learned >= 2 and name in res.message, res.message
            harness.spin_until(lambda: False, 1.0)  # the scene's last clips are served before the next request
        taught = json.loads(prototypes.read_text())
        assert sorted(taught["labels"]) == ["blue", "red"] and taught["dim"] == 256

        # Each scene is now recognised as its own label (the node publishes taught labels like head labels).
        for name, frame in scenes.items():
            start = camera.gap()
            mine = lambda: [f for f in harness.features if rh.stamp_ns(f.header.stamp) >= start]  # noqa: E731
            assert camera.run(lambda: len(mine()) >= 3, 30, frame), log.read_text()
            assert all(list(f.labels) == [name, *({"red", "blue"} - {name})] for f in mine()), [
                (list(f.labels), list(f.scores)) for f in mine()]

        # Adaptation was off at start: rollback has nothing to do; enable starts it (a headless checkpoint
        # without decoder weights: the decoder warms up first).
        res = rh.call(harness, Trigger, f"{NODE}/adaptation/rollback", Trigger.Request(), proc)
        assert not res.success and "adaptation is off" in res.message
        res = rh.call(harness, SetBool, f"{NODE}/adaptation/enable", SetBool.Request(data=True), proc)
        assert res.success and "enabled" in res.message, res.message
        res = rh.call(harness, Trigger, f"{NODE}/adaptation/rollback", Trigger.Request(), proc)
        assert not res.success and "base model (version 0)" in res.message
    finally:
        harness.close()
        rc = rh.stop(proc)
    text = log.read_text()
    assert rc == 0 and "Traceback" not in text, text


@pytest.mark.parametrize("name, value, expected", [
    ("adaptation.trainable", "some", "parameter adaptation.trainable must be one of ('all', 'norms', 'late')"),
    ("adaptation.mask_ratio", 1.5, "parameter adaptation.mask_ratio"),
    ("adaptation.steps_per_round", 0, "parameter adaptation.steps_per_round"),
    ("adaptation.lr", 1, "write floats with a decimal point"),
])
def test_bad_adaptation_parameters_are_named(name, value, expected):
    rh.assert_config_error(DOMAIN, name, value, expected)


def test_adaptation_enabled_is_not_a_runtime_parameter(tmp_path):
    import rclpy
    from rclpy.parameter import Parameter

    from hiera_perception.node import PerceptionNode

    checkpoint = mae_checkpoint(tmp_path / "mae.pt")
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=DOMAIN)
    try:
        node = PerceptionNode(context=context, parameter_overrides=[
            Parameter("model", value=str(checkpoint)), Parameter("device", value="cpu")])
        try:
            result, = node.set_parameters([Parameter("adaptation.enabled", value=True)])
            assert not result.successful and "read-only parameter: adaptation.enabled" in result.reason
            assert "~/adaptation/enable" in node.describe_parameter("adaptation.enabled").description
            assert node.get_parameter("adaptation.dir").value == ""
            assert node._prototypes_file == checkpoint.with_name("mae.pt.prototypes.json")  # beside the model
        finally:
            node.destroy_node()
    finally:
        context.try_shutdown()


def test_params_file_lists_every_parameter_with_its_default():
    import yaml

    from hiera_perception.node_config import PARAMETERS

    params = yaml.safe_load((rh.REPO / "config" / "perception.yaml").read_text())
    params = params["/**/hiera_perception"]["ros__parameters"]  # any namespace
    flat = {}

    def walk(prefix: str, tree: dict) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                flat[prefix + key] = value

    walk("", params)
    assert set(flat) == set(PARAMETERS)
    for name, (default, _) in PARAMETERS.items():
        assert type(flat[name]) is type(default) and flat[name] == default, name
