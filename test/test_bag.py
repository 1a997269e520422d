"""rosbag2 input: frames and stamps out of a bag the test writes with rosbags, and clips cut as the node cuts them."""

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rosbags")

from hiera_perception.bag import BagClips, bag_image_topics, iter_bag_frames  # noqa: E402
from hiera_perception.clip_buffer import ClipBuffer  # noqa: E402


def _frame(i: int, h: int = 24, w: int = 32) -> np.ndarray:
    """A frame that names its index: every pixel differs per frame, rows and channels too."""
    f = np.zeros((h, w, 3), np.uint8)
    f[..., 0] = i
    f[..., 1] = np.arange(h, dtype=np.uint8)[:, None]
    f[..., 2] = np.arange(w, dtype=np.uint8)[None, :]
    return f


def write_bag(path: Path, frames: list[np.ndarray], stamps: list[float], topic: str = "/camera/image_raw",
              header_stamps: bool = True, extra_topic: bool = True) -> None:
    """A rosbag2 (sqlite3) with sensor_msgs/Image rgb8 on `topic`; message i recorded 5 ms after its stamp."""
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    Image, Header = store.types["sensor_msgs/msg/Image"], store.types["std_msgs/msg/Header"]
    Time, String = store.types["builtin_interfaces/msg/Time"], store.types["std_msgs/msg/String"]
    with Writer(path, version=9) as writer:
        conn = writer.add_connection(topic, Image.__msgtype__, typestore=store)
        other = writer.add_connection("/chatter", String.__msgtype__, typestore=store) if extra_topic else None
        for frame, t in zip(frames, stamps):
            ns = round(t * 1e9)
            stamp = Time(sec=ns // 10**9, nanosec=ns % 10**9) if header_stamps else Time(sec=0, nanosec=0)
            h, w = frame.shape[:2]
            msg = Image(header=Header(stamp=stamp, frame_id="cam"), height=h, width=w, encoding="rgb8",
                        is_bigendian=0, step=w * 3, data=frame.reshape(-1).copy())
            writer.write(conn, ns + 5_000_000, store.serialize_cdr(msg, Image.__msgtype__))
            if other is not None:
                writer.write(other, ns + 6_000_000, store.serialize_cdr(String(data="hi"), String.__msgtype__))


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    """30 frames at 10 Hz starting at t = 100 s."""
    path = tmp_path_factory.mktemp("bags") / "cam"
    frames = [_frame(i) for i in range(30)]
    stamps = [100.0 + i / 10 for i in range(30)]
    write_bag(path, frames, stamps)
    return path, frames, stamps


def test_frames_and_header_stamps(bag):
    path, frames, stamps = bag
    assert bag_image_topics(path) == {"/camera/image_raw": "sensor_msgs/msg/Image"}
    got = list(iter_bag_frames(path, "/camera/image_raw"))
    assert len(got) == 30
    for (stamp, frame), want, t in zip(got, frames, stamps):
        assert stamp == pytest.approx(t, abs=1e-9)
        assert frame.dtype == np.uint8 and frame.shape == (24, 32, 3)
        np.testing.assert_array_equal(frame, want)
    # the storage file works as the path too
    db = next(path.glob("*.db3"))
    assert len(list(iter_bag_frames(db, "/camera/image_raw"))) == 30


def test_zero_header_stamps_fall_back_to_record_time(tmp_path):
    path = tmp_path / "nostamp"
    write_bag(path, [_frame(i) for i in range(3)], [5.0, 5.1, 5.2], header_stamps=False, extra_topic=False)
    assert [s for s, _ in iter_bag_frames(path, "/camera/image_raw")] == pytest.approx([5.005, 5.105, 5.205])


def test_a_bag_without_message_definitions_reads(tmp_path):
    """Humble's sqlite3 bags store no message definitions (rosbag2 added them in Iron): they read all the same."""
    import sqlite3

    path = tmp_path / "humble"
    write_bag(path, [_frame(i) for i in range(3)], [7.0, 7.1, 7.2])
    con = sqlite3.connect(next(path.glob("*.db3")))
    with con:
        con.execute("DELETE FROM message_definitions")  # what a Humble bag has: none
    con.close()
    assert bag_image_topics(path) == {"/camera/image_raw": "sensor_msgs/msg/Image"}
    got = list(iter_bag_frames(path, "/camera/image_raw"))
    assert [s for s, _ in got] == pytest.approx([7.0, 7.1, 7.2], abs=1e-9)
    for i, (_, frame) in enumerate(got):
        np.testing.assert_array_equal(frame, _frame(i))


def test_bad_topics_are_named(bag, tmp_path):
    path = bag[0]
    with pytest.raises(ValueError, match=r"no topic '/nope'.*/camera/image_raw"):
        list(iter_bag_frames(path, "/nope"))
    with pytest.raises(ValueError, match="std_msgs/msg/String"):
        list(iter_bag_frames(path, "/chatter"))
    with pytest.raises(FileNotFoundError, match="not a rosbag2"):
        list(iter_bag_frames(tmp_path, "/camera/image_raw"))
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    String = store.types["std_msgs/msg/String"]
    chatter = tmp_path / "chatter"
    with Writer(chatter, version=9) as writer:
        conn = writer.add_connection("/chatter", String.__msgtype__, typestore=store)
        writer.write(conn, 1, store.serialize_cdr(String(data="hi"), String.__msgtype__))
    # no --topic can help here: the error says what the bag holds instead of asking for one
    with pytest.raises(ValueError, match=r"bag .*chatter has no image topic \(sensor_msgs/msg/CompressedImage or "
                                         r"sensor_msgs/msg/Image\); it has: /chatter \(std_msgs/msg/String\)$"):
        BagClips(chatter, None, 2, 0.1, 8)


def test_bag_clips_match_the_clip_buffer(bag):
    path, frames, stamps = bag
    ds = BagClips(path, "/camera/image_raw", num_frames=4, frame_stride_s=0.2, size=16, hop_s=0.5)
    buffer = ClipBuffer(4, 0.2, 0.5, 1.0, 16)
    want = [c.array() for f, t in zip(frames, stamps) for c in buffer.push(t, f)]
    # clip k samples 100 + 0.5 k + 0.2 i: the last one that fits in 102.9 s starts at 102.0 (k = 4)
    assert len(ds) == len(want) == 5
    for i, w in enumerate(want):
        clip, label = ds[i]
        assert label == -1 and clip.dtype.is_floating_point is False and tuple(clip.shape) == (4, 16, 16, 3)
        np.testing.assert_array_equal(clip.numpy(), w)
    # frame indices picked: the red channel of a frame is its index (crop_resize keeps a flat channel flat)
    assert [int(ds[1][0][i, 0, 0, 0]) for i in range(4)] == [5, 7, 9, 11]
    assert len(ds.frames) <= 30  # each frame held once


def test_bag_serves_pretrain(bag, tmp_path):
    from hiera_perception.checkpoint import load_checkpoint
    from hiera_perception.train import train

    path = bag[0]
    args = _pretrain_args(bag=str(path), topic="/camera/image_raw", out=str(tmp_path / "mae.pt"))
    result = train(args)
    assert result.complete and result.step == 2
    ck = load_checkpoint(tmp_path / "mae.pt")
    assert ck.extra["train"]["data"] == str(path) and ck.extra["sampling"] == {"frame_stride_s": 0.1}


def _pretrain_args(**kw):
    import argparse

    from hiera_perception.train import _check, add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p, "pretrain")
    argv = ["--bag", kw["bag"], "--topic", kw["topic"], "--out", kw["out"], "--config", "hiera_tiny_8x64",
            "--steps", "2", "--batch", "2", "--no-progress"]
    args = p.parse_args(argv)
    _check(args)
    return args


def test_teach_from_a_bag_learns_every_clip_as_the_label(bag, tmp_path):
    """Record someone doing an action, teach it: every clip of the bag's (only) camera topic is an example."""
    import json

    import torch

    from hiera_perception import cli
    from hiera_perception.checkpoint import save_checkpoint
    from hiera_perception.config import get_config
    from hiera_perception.labeler import prototypes_path
    from hiera_perception.model import Hiera

    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "robot.pt", Hiera(get_config("hiera_tiny_8x64")), model_id="robot",
                            extra={"sampling": {"frame_stride_s": 0.1}})
    args = ["teach", "--model", str(model), "--bag", str(bag[0]), "--device", "cpu"]
    with pytest.raises(SystemExit, match="teach --bag needs --label"):
        cli.main(args)
    assert cli.main(args + ["--label", "handshake"]) == 0  # no --topic: the bag has one image topic
    clips = len(BagClips(bag[0], None, 8, 0.1, 64))
    assert clips == 23  # 30 frames at 10 Hz, a clip per stride from 0.7 s on
    taught = json.loads(prototypes_path(model).read_text())["labels"]
    assert list(taught) == ["handshake"] and taught["handshake"]["count"] == clips
