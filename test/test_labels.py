"""The README's user path, end to end on real ROS 2: a video file published with `hiera-perception publish --video`,
the node on the embedded model, and /action_features naming the actions the video shows.

The video is the synthetic camera's stream written to a file, so every frame's true action is known; each
published frame is named by its bytes and stamp, so each ActionFeatures message maps back to the frames it
covers by its `clip_start` and `header.stamp`. Skipped until the embedded model ships (models/).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import ros_helpers as rh

pytestmark = pytest.mark.ros

DOMAIN = rh.domain_id(7)
SECONDS, FPS = 20, 30


def _embedded() -> bool:
    from hiera_perception.checkpoint import DEFAULT_MODEL, MODELS_DIR

    return (MODELS_DIR / DEFAULT_MODEL).is_file()


@pytest.mark.skipif(not _embedded(), reason="the embedded model is not in models/ yet")
def test_published_video_gets_the_labels_of_its_actions(tmp_path):
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from hiera_perception.dataset import video_format, write_video
    from hiera_perception.synth import SyntheticCamera
    from hiera_perception.video import iter_frames

    cam = SyntheticCamera(seed=11, size=(120, 160), fps=FPS)
    truth, frames = zip(*[cam.next_frame() for _ in range(SECONDS * FPS)])
    ext, fourcc = video_format()
    video = write_video(tmp_path / f"actions{ext}", np.stack(frames), FPS, fourcc)
    # the publisher sends frames as OpenCV decodes them: their bytes name the frame (sensor noise makes each unique)
    decoded = {f.tobytes(): i for i, (_, f) in enumerate(iter_frames(video))}
    assert len(decoded) == len(frames)

    params = rh.write_params(tmp_path / "params.yaml", {"device": "cpu", "top_k": 3}, qos_reliable_depth=100)
    env = rh.ros_env(DOMAIN)
    proc = rh.start_node(["--ros-args", "--params-file", str(params)], env, tmp_path / "node.log")
    harness = rh.Harness(DOMAIN)
    index: dict[int, int] = {}  # stamp -> frame index of the file (the first frames may go before we match)
    harness.node.create_subscription(
        Image, "/image", lambda m: index.__setitem__(rh.stamp_ns(m.header.stamp), decoded[bytes(m.data)]),
        QoSProfile(depth=500, reliability=ReliabilityPolicy.RELIABLE))
    publisher = None
    try:
        harness.wait_connected(proc)
        publisher = subprocess.Popen([sys.executable, "-m", "hiera_perception", "publish", "--video", str(video),
                                      "--topic", "/image", "--fps", str(FPS)], env=env, cwd=rh.REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert harness.spin_until(lambda: publisher.poll() is not None, SECONDS + 60, proc), "publish did not end"
        assert publisher.returncode == 0, publisher.stdout.read()[-3000:]
        harness.spin_until(lambda: False, 3.0)  # the last clips
    finally:
        if publisher is not None and publisher.poll() is None:
            publisher.kill()
        harness.close()
        rc = rh.stop(proc)
    log = (tmp_path / "node.log").read_text()
    assert rc == 0, log
    # DDS discovery of the new publisher process can take a few seconds: its first frames reach nobody
    assert len(index) >= 0.6 * len(frames) and sorted(index.values()) == list(index.values())  # in order

    scored = []
    for f in harness.features:
        first, last = index.get(rh.stamp_ns(f.clip_start)), index.get(rh.stamp_ns(f.header.stamp))
        if first is None or last is None:  # a frame published before this listener matched
            continue
        shown = set(truth[first : last + 1])
        if len(shown) == 1:  # a clip across an action change has no one true label
            scored.append((f.labels[0], truth[first]))
    # a clip every 0.5 s once the first is full (1.05 s), less the frames sent while the publisher was matching
    assert len(harness.features) >= 2 * (SECONDS - 8), len(harness.features)
    assert len(scored) >= 12, scored
    correct = sum(label == true for label, true in scored)
    # 96% held-out; here all of one idle segment can go to approach when a loaded machine delays the publisher's
    # frames (seen once at 16/21 with a benchmark running beside the tests), so 75%: chance is 12.5%
    assert correct >= 0.75 * len(scored), f"{correct} of {len(scored)} right: {scored}"
    assert len({true for _, true in scored}) >= 3, "the video shows several actions"
