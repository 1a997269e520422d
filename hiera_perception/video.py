"""Video files: frames with their timestamps, and the `run` command (labels per clip of a file)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

__all__ = ["iter_frames", "video_fps"]


def video_fps(path: str | Path) -> float:
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise ValueError(f"cannot open video {path}")
        fps = cap.get(cv2.CAP_PROP_FPS)
        return fps if fps and fps > 0 else 30.0
    finally:
        cap.release()


def iter_frames(path: str | Path) -> Iterator[tuple[float, np.ndarray]]:
    """Yield (stamp in seconds from the start, RGB uint8 [H, W, 3]) for each decodable frame.

    Stamps come from the frame index and the file's frame rate (30 when the file does not say),
    which is what every container OpenCV reads can give reliably.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"OpenCV cannot open video {path} (unknown format or corrupt file)")
    fps = cap.get(cv2.CAP_PROP_FPS)
    fps = fps if fps and fps > 0 else 30.0
    try:
        index = 0
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            yield index / fps, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        cap.release()
