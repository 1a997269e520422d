"""rosbag2 recordings as data: the camera frames of a bag, and its unlabeled clips for pretrain / adapt.

Bags are read with the pure-Python `rosbags` package (no ROS install needed; sqlite3 and mcap storage,
definitions taken from the bag itself, or Humble's for the sqlite3 bags of Humble and older, which carry
none), and images are converted by `convert.image_to_rgb` / `convert.compressed_to_rgb`, the node's own
conversion, so a bag gives a model exactly the frames the node would. Clips are cut by
`clip_buffer.ClipBuffer`, the node's own timeline sampling.

Stamps: a frame's time is its header stamp (when the camera took it), or the time the bag recorded the
message when the header stamp is zero (drivers that never set it). Frames that cannot be converted are
skipped and counted per reason, as the node counts them.
"""

from __future__ import annotations

import collections
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from hiera_perception.clip_buffer import ClipBuffer
from hiera_perception.convert import BadFrame, compressed_to_rgb, image_to_rgb

__all__ = ["IMAGE_TYPES", "bag_image_topics", "iter_bag_frames", "BagClips"]

log = logging.getLogger(__name__)

IMAGE_TYPES = {
    "sensor_msgs/msg/Image": image_to_rgb,
    "sensor_msgs/msg/CompressedImage": compressed_to_rgb,
}


def _open(path: str | os.PathLike):
    try:
        from rosbags.highlevel import AnyReader
        from rosbags.typesys import Stores, get_typestore
    except ImportError as e:  # a core dependency for bags only
        raise ImportError("reading rosbag2 needs the `rosbags` package: pip install rosbags") from e
    path = Path(path)
    if path.is_file() and path.suffix in (".db3", ".mcap"):
        path = path.parent  # a bag is its folder (metadata.yaml beside the storage files)
    if not (path / "metadata.yaml").is_file():
        raise FileNotFoundError(f"{path} is not a rosbag2 folder (no metadata.yaml)")
    # sqlite3 bags before Iron (Humble's) store no message definitions: read them with Humble's, which for
    # Image, CompressedImage and Header are every ROS 2 release's. Bags that carry definitions use their own.
    return AnyReader([path], default_typestore=get_typestore(Stores.ROS2_HUMBLE))


def bag_image_topics(path: str | os.PathLike) -> dict[str, str]:
    """Image topics of a bag: topic -> message type (Image or CompressedImage)."""
    with _open(path) as reader:
        return {c.topic: c.msgtype for c in reader.connections if c.msgtype in IMAGE_TYPES}


def iter_bag_frames(path: str | os.PathLike, topic: str) -> Iterator[tuple[float, np.ndarray]]:
    """Yield (stamp in seconds, RGB uint8 [H, W, 3]) for each convertible image on `topic`, in bag order."""
    skipped: collections.Counter[str] = collections.Counter()
    count = 0
    with _open(path) as reader:
        conns = [c for c in reader.connections if c.topic == topic]
        if not conns:
            found = sorted({f"{c.topic} ({c.msgtype})" for c in reader.connections})
            raise ValueError(f"no topic {topic!r} in bag {path}; it has: {', '.join(found) or 'no topics'}")
        bad = sorted({c.msgtype for c in conns if c.msgtype not in IMAGE_TYPES})
        if bad:
            raise ValueError(f"topic {topic!r} in {path} carries {bad[0]}, not one of {sorted(IMAGE_TYPES)}")
        for conn, recorded_ns, raw in reader.messages(connections=conns):
            msg = reader.deserialize(raw, conn.msgtype)
            try:
                frame = IMAGE_TYPES[conn.msgtype](msg)
            except BadFrame as e:
                skipped[e.reason] += 1
                log.debug("%s: skipped a frame: %s", topic, e)
                continue
            stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
            count += 1
            yield (stamp if stamp > 0 else recorded_ns * 1e-9), frame
    if skipped:
        log.warning("%s in %s: %d frames read, %d skipped (%s)", topic, path, count, sum(skipped.values()),
                    ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())))


class BagClips(torch.utils.data.Dataset):
    """The clips of one image topic of a bag (None: its only one), cut as the node cuts them: item i ->
    (uint8 [T, S, S, 3], -1).

    Clips of `num_frames` frames every `frame_stride_s`, a new one every `hop_s` (default: every
    `frame_stride_s`, so overlapping clips see every sample phase); a gap over `max_gap_s` or a stamp
    going backwards restarts the timeline. Frames are held once, at `size` px, shared by the clips
    that use them. The label is always -1: a bag carries no labels.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        topic: str | None,
        num_frames: int,
        frame_stride_s: float,
        size: int,
        hop_s: float | None = None,
        max_gap_s: float | None = None,
    ):
        if topic is None:  # a bag of one camera needs no --topic
            topics = sorted(bag_image_topics(path))
            if not topics:  # no --topic can help: say what the bag does hold
                with _open(path) as reader:
                    found = sorted({f"{c.topic} ({c.msgtype})" for c in reader.connections})
                raise ValueError(f"bag {path} has no image topic ({' or '.join(sorted(IMAGE_TYPES))}); "
                                 f"it has: {', '.join(found) or 'no topics'}")
            if len(topics) > 1:
                raise ValueError(f"bag {path} has image topics {topics}: name one with --topic")
            topic = topics[0]
        hop_s = frame_stride_s if hop_s is None else hop_s
        max_gap_s = max(1.0, 4 * frame_stride_s) if max_gap_s is None else max_gap_s
        buffer = ClipBuffer(num_frames, frame_stride_s, hop_s, max_gap_s, size)
        self.frames: list[np.ndarray] = []
        self.clips: list[tuple[int, ...]] = []  # indices into self.frames
        index: dict[int, int] = {}  # id(frame array) -> its index; the arrays stay alive in self.frames
        for stamp, frame in iter_bag_frames(path, topic):
            for clip in buffer.push(stamp, frame):
                ids = []
                for f in clip.frames:
                    if id(f) not in index:
                        index[id(f)] = len(self.frames)
                        self.frames.append(f)
                    ids.append(index[id(f)])
                self.clips.append(tuple(ids))
        if not self.clips:
            raise ValueError(f"topic {topic!r} in bag {path} gives no clip of {num_frames} frames every "
                             f"{frame_stride_s:.4g} s ({buffer.frames_in} frames, {buffer.resets} timeline resets)")
        self.path, self.topic = Path(path), topic
        log.info("%s %s: %d clips from %d frames", path, topic, len(self.clips), buffer.frames_in)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.stack([self.frames[j] for j in self.clips[index]])), -1
