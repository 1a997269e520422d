"""Video files: frames with their timestamps, and the `run` command (labels per clip of a file)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

__all__ = ["check_video_file", "iter_frames", "video_fps", "FrameReader"]

log = logging.getLogger(__name__)
MIN_STEP_S = 1e-3  # the least --frame-stride / --hop of `run`
MAX_BAD_FRAMES = 30  # undecodable frames in a row taken for the end, where the container does not count its frames


def check_video_file(path: str | Path) -> Path:
    """`path` if it names a file; else FileNotFoundError saying what is there instead."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}" + (" (that is a folder)" if path.is_dir() else ""))
    return path


def _open(path: str | Path) -> tuple[cv2.VideoCapture, float]:
    """(an open capture, the frame rate: 30 when the file does not say); clear errors for a bad or missing file."""
    path = check_video_file(path)
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"OpenCV cannot open video {path} (unknown format or corrupt file)")
    fps = cap.get(cv2.CAP_PROP_FPS)
    return cap, fps if fps and fps > 0 else 30.0


def video_fps(path: str | Path) -> float:
    cap, fps = _open(path)
    cap.release()
    return fps


class FrameReader:
    """Frames of an open capture one by one, past undecodable ones: a damaged frame mid-file (a glitch in an
    MJPEG stream, a broken GOP) is skipped and counted, not taken for the end of the file. The end is where the
    container's frame count says, or MAX_BAD_FRAMES failures in a row where it does not count (raw MJPEG reports
    nonsense)."""

    def __init__(self, cap: cv2.VideoCapture):
        self.cap = cap
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self.count = int(count) if 0 < count < 1e8 else None
        self.index = 0  # of the next frame in the file
        self.skipped = 0

    def _more(self, bad: int) -> bool:
        return self.index < self.count if self.count is not None else bad < MAX_BAD_FRAMES

    def grab(self) -> int | None:
        """Move to the next decodable frame; its index, or None at the end."""
        bad = 0
        while not self.cap.grab():
            bad += 1
            self.index += 1
            if not self._more(bad):
                return None
        self.skipped += bad
        self.index += 1
        return self.index - 1

    def read(self) -> tuple[int, np.ndarray] | None:
        """(index, RGB uint8 [H, W, 3]) of the next decodable frame, or None at the end."""
        while (index := self.grab()) is not None:
            ok, bgr = self.cap.retrieve()
            if ok:
                return index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            self.skipped += 1
        return None


def iter_frames(path: str | Path, wanted: Callable[[float, float], bool] | None = None
                ) -> Iterator[tuple[float, np.ndarray | None]]:
    """Yield (stamp in seconds from the start, RGB uint8 [H, W, 3]) for each decodable frame.

    Stamps come from the frame index and the file's frame rate (30 when the file does not say),
    which is what every container OpenCV reads can give reliably; an undecodable frame is skipped (its stamp
    too) and counted in a warning. With `wanted(stamp, next_stamp)`, a frame it refuses is decoded but not
    converted or copied out, and comes as (stamp, None): a training clip reads 8 of some 45 frames.
    """
    cap, fps = _open(path)
    frames = FrameReader(cap)
    try:
        while (index := frames.grab()) is not None:
            stamp = index / fps
            if wanted is not None and not wanted(stamp, (index + 1) / fps):
                yield stamp, None
                continue
            ok, bgr = cap.retrieve()
            if not ok:
                frames.skipped += 1
                continue
            yield stamp, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()
        if frames.skipped:
            log.warning("%s: skipped %d undecodable frame(s)", path, frames.skipped)


# ---------------------------------------------------------------------------------------------------
# `hiera-perception run`: the model on a video file, clip by clip, no ROS


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="model file, official .pth (with --arch), fetched name or config "
                   "(default: the embedded model)")
    p.add_argument("--arch", default=None, help="config name of an official .pth, e.g. hiera_base_16x224")
    p.add_argument("--video", required=True, help="video file (any format OpenCV reads)")
    p.add_argument("--frame-stride", type=float, default=None, help="seconds between a clip's frames "
                   "(default: what the model was trained with)")
    p.add_argument("--hop", type=float, default=None, help="seconds between clip starts (default: half a clip)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--prototypes", default=None, help="taught-labels file, as given to teach (default: where teach "
                   "keeps them for the model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--batch", type=int, default=4, help="clips per forward pass")
    p.add_argument("--json", action="store_true", help="one JSON object per clip (with the embedding) on stdout")


def main(args) -> int:
    import json
    import sys

    from tqdm import tqdm

    from hiera_perception.checkpoint import load_model
    from hiera_perception.clip_buffer import ClipBuffer, half_clip_hop
    from hiera_perception.engine import Engine

    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    for flag, value in (("--frame-stride", args.frame_stride), ("--hop", args.hop)):
        # a millisecond: below it one frame completes thousands of identical clips (1e-9 asked for terabytes)
        if value is not None and not value >= MIN_STEP_S:
            raise ValueError(f"{flag} must be at least {MIN_STEP_S:g} s, got {value}")
    engine = Engine(load_model(args.model, arch=args.arch, device=args.device), args.device, args.precision, args.top_k,
                    prototypes_file=args.prototypes)
    stride = args.frame_stride or engine.frame_stride_s
    hop = args.hop or half_clip_hop(engine.num_frames, stride)
    cap, fps = _open(args.video)
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    cap.release()
    # A file loses no frames: its own frame interval is never a gap (a 0.5 fps timelapse reset on every frame)
    buffer = ClipBuffer(engine.num_frames, stride, hop, max_gap_s=max(1.0, 4 * stride, 2.0 / fps),
                        frame_size=engine.size)

    pending = []
    n = 0

    def flush() -> None:
        """The pending clips through the model, --batch at a time (one frame can complete several clips)."""
        nonlocal n
        batch = pending[: args.batch]  # none: the last batch ended exactly on a clip, or the video held none
        for clip, res in zip(batch, engine.infer([c.frames for c in batch])):
            n += 1
            if args.json:
                print(json.dumps({"clip": n, "start": round(clip.clip_start, 4), "end": round(clip.header_stamp, 4),
                                  "labels": res.labels, "scores": [round(s, 5) for s in res.scores],
                                  "encoder_version": engine.encoder_version, "embedding": res.embedding.tolist()}))
            else:
                top = ", ".join(f"{label} {score:.2f}" for label, score in zip(res.labels, res.scores)) or "(no head)"
                print(f"{clip.clip_start:8.2f}-{clip.header_stamp:6.2f}s  {top}")
        del pending[: len(batch)]

    for stamp, frame in tqdm(iter_frames(args.video), total=total, unit="frame", desc="run", file=sys.stderr,
                             disable=None):
        pending.extend(buffer.push(stamp, frame))
        while len(pending) >= args.batch:
            flush()
    while pending:
        flush()
    if n == 0:
        print(f"{args.video}: too short for one clip of {engine.num_frames} frames every {stride:.3f}s",
              file=sys.stderr)
        return 1
    return 0
