"""Data folders: `labels.csv` (columns path,label; an empty label means unlabeled) beside video files.

The videos may be in any format OpenCV reads; paths in the csv are relative to its folder (absolute
paths also work). A clip is sampled on the video's *timeline* exactly as the live clip buffer samples a
camera: sample k is at start_s + k * frame_stride_s, and takes the last frame whose stamp is at or
before that time. So a model sees the same clips from a file as from the robot, whatever the file's
frame rate. Writers (`write_video`, `write_labels_csv`) are here too, so every data folder is made
the way it is read.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
import torch

from hiera_perception.atomic import atomic_replace, atomic_write_text, temp_beside
from hiera_perception.preprocess import crop_resize
from hiera_perception.video import iter_frames

__all__ = [
    "LABELS_CSV", "Item", "read_labels_csv", "sample_times", "load_clip", "video_last_stamp", "ClipDataset",
    "write_labels_csv", "write_video", "video_format",
]  # fmt: skip

log = logging.getLogger(__name__)

LABELS_CSV = "labels.csv"
_EPS_S = 1e-6  # stamps and sample times are computed in floating point; equal within this counts as equal


@dataclass(frozen=True)
class Item:
    """One row of labels.csv: the video's path (resolved) and its label (None when unlabeled)."""

    path: Path
    label: str | None


def read_labels_csv(folder: str | Path) -> list[Item]:
    """The rows of `folder`/labels.csv (or of the csv file given), in file order, every video checked to exist."""
    folder = Path(folder)
    csv_path = folder if folder.is_file() else folder / LABELS_CSV
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"no {LABELS_CSV} in {folder}: a data folder holds labels.csv (columns path,label) beside its videos"
        )
    try:
        text = csv_path.read_text(encoding="utf-8-sig")  # -sig: tolerate the BOM spreadsheets write
    except UnicodeDecodeError as e:
        raise ValueError(f"{csv_path} is not UTF-8 (byte {e.start}: {e.reason}); save it as UTF-8 CSV") from None
    items: list[Item] = []
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("path", "label") if c not in columns]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}; found {columns}; expected columns path,label")
        reader.fieldnames = columns
        for row_number, row in enumerate(reader, start=1):
            where = f"{csv_path} row {row_number} (line {reader.line_num})"
            if not any((v or "").strip() for k, v in row.items() if k is not None):
                continue  # a row of empty cells (",", spaces): what spreadsheets write for a blank line
            name = (row.get("path") or "").strip()
            if not name:
                raise ValueError(f"{where}: empty path")
            path = Path(name) if Path(name).is_absolute() else csv_path.parent / name
            if not path.is_file():
                raise FileNotFoundError(f"{where}: video not found: {name} (looked for {path})")
            items.append(Item(path, (row.get("label") or "").strip() or None))
    if not items:
        raise ValueError(f"{csv_path} names no videos")
    return items


def write_labels_csv(folder: str | Path, rows: Iterable[tuple[str, str | None]]) -> Path:
    """Write folder/labels.csv atomically from (path, label or None) rows; returns its path."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("path", "label"))
    writer.writerows((str(path), label or "") for path, label in rows)
    path = Path(folder) / LABELS_CSV
    atomic_write_text(path, text.getvalue())
    return path


def write_video(path: str | Path, frames: np.ndarray | Iterable[np.ndarray], fps: float,
                fourcc: str | None = None) -> Path:
    """RGB uint8 frames [H, W, 3] of one size, H and W even (an array [T, H, W, 3], or any iterable of frames, e.g.
    a generator: then only one need be in memory) -> a video file, written under a temporary name of its own,
    fsynced and renamed into place.

    `fourcc` defaults to the one `video_format()` found to round-trip; the extension of `path` picks
    the container, so it should match (.mp4 for mp4v, .avi for MJPG).
    """
    path = Path(path)
    frames = iter(frames)
    first = next(frames, None)
    shape = [] if first is None else list(np.shape(first))
    if len(shape) != 3 or shape[2] != 3 or shape[0] % 2 or shape[1] % 2:
        # OpenCV's writers drop the last row and column of an odd size without a word; no frames: an unreadable file
        raise ValueError("write_video needs RGB frames [H, W, 3] with H and W even, got "
                         + ("no frames" if first is None else str(shape)))
    fourcc = fourcc or video_format()[1]
    fd, tmp = temp_beside(path, keep_suffix=True)  # its own name: two writers of one path never share it
    os.close(fd)
    tmp = Path(tmp)
    h, w = shape[:2]
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*fourcc), float(fps), (w, h))
    try:
        if not writer.isOpened():
            raise OSError(f"OpenCV cannot open a {fourcc} video writer for {tmp}")
        for frame in itertools.chain([first], frames):
            if np.shape(frame) != (h, w, 3) or np.asarray(frame).dtype != np.uint8:
                raise ValueError(f"write_video: every frame must be uint8 [{h}, {w}, 3] like the first, got "
                                 f"{np.asarray(frame).dtype} {list(np.shape(frame))}")
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise OSError(f"OpenCV wrote nothing to {tmp}")
        atomic_replace(tmp, path)  # fsync, rename, fsync the folder
    finally:
        writer.release()
        tmp.unlink(missing_ok=True)
    return path


_FORMAT: tuple[str, str] | None = None


def video_format() -> tuple[str, str]:
    """(extension, fourcc) this OpenCV can write *and* read back: mp4v .mp4, else MJPG .avi."""
    global _FORMAT
    if _FORMAT is None:
        _FORMAT = (".avi", "MJPG")
        frames = np.zeros((3, 32, 32, 3), np.uint8)
        with tempfile.TemporaryDirectory() as d:
            try:
                path = write_video(Path(d) / "probe.mp4", frames, 30.0, "mp4v")
                if sum(1 for _ in iter_frames(path)) == len(frames):
                    _FORMAT = (".mp4", "mp4v")
            except (OSError, ValueError):
                pass
        if _FORMAT[1] != "mp4v":
            log.warning("OpenCV cannot round-trip mp4v .mp4 here; writing MJPG .avi")
    return _FORMAT


def sample_times(num_frames: int, frame_stride_s: float, start_s: float = 0.0) -> np.ndarray:
    """The clip's sample times in seconds: start_s + k * frame_stride_s for k < num_frames."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if not frame_stride_s > 0:
        raise ValueError(f"frame_stride_s must be > 0, got {frame_stride_s}")
    if start_s < 0:
        raise ValueError(f"start_s must be >= 0, got {start_s}")
    return start_s + np.arange(num_frames) * frame_stride_s


def load_clip(
    path: str | Path, num_frames: int, frame_stride_s: float, start_s: float = 0.0, size: int | None = None
) -> np.ndarray:
    """Decode one clip: uint8 RGB [num_frames, H, W, 3] ([num_frames, size, size, 3] after crop_resize when given).

    Sample k takes the last frame with stamp <= start_s + k * frame_stride_s. The video is read once,
    up to the frame that covers the last sample time; a video that ends before it is an error.
    """
    times = sample_times(num_frames, frame_stride_s, start_s)

    def wanted(stamp: float, next_stamp: float) -> bool:
        # Frame j is taken by the samples in [stamp_j, stamp_j+1) (tolerance as in _take), and the last one
        # read by every sample left.
        return stamp >= times[-1] - _EPS_S or bool(((times >= stamp - _EPS_S) & (times < next_stamp - _EPS_S)).any())

    stamps: list[float] = []
    frames: list[np.ndarray | None] = []  # None: decoded but taken by no sample
    for stamp, frame in iter_frames(path, wanted):
        stamps.append(stamp)
        frames.append(frame if size is None or frame is None else crop_resize(frame, size))
        if stamp >= times[-1] - _EPS_S:  # this frame covers every remaining sample
            break
    return np.stack([frames[i] for i in _take(path, np.asarray(stamps), times, frame_stride_s)])


class _TooShort(ValueError):
    """A video whose frames end before a clip does; `end`: its last decoded frame's stamp (None: no frame)."""

    def __init__(self, message: str, end: float | None):
        super().__init__(message)
        self.end = end


def _take(path: str | Path, stamps: np.ndarray, times: np.ndarray, frame_stride_s: float) -> np.ndarray:
    """Index of the frame each sample time takes: the last one whose stamp is at or before it (within _EPS_S)."""
    if not len(stamps) or stamps[-1] < times[-1] - _EPS_S:
        end = float(stamps[-1]) if len(stamps) else None
        raise _TooShort(
            f"video {path} is too short: its {len(stamps)} frames end at {end or 0.0:.3f} s, but a clip of "
            f"{len(times)} frames every {frame_stride_s:.4g} s from {times[0]:.3f} s "
            f"needs a frame at {times[-1]:.3f} s",
            end,
        )
    return np.maximum(np.searchsorted(stamps, times + _EPS_S, side="right") - 1, 0)


def video_last_stamp(path: str | Path) -> float:
    """Stamp (s) of the video's last frame, from the container's frame count and rate (no decoding).

    Falls back to decoding when the container does not report a frame count.
    """
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise ValueError(f"OpenCV cannot open video {path} (unknown format or corrupt file)")
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = cap.get(cv2.CAP_PROP_FPS)
    finally:
        cap.release()
    if count > 0:
        return (count - 1) / (fps if fps and fps > 0 else 30.0)  # the same fallback rate as iter_frames
    last = None
    for last, _ in iter_frames(path):
        pass
    if last is None:
        raise ValueError(f"video {path} has no decodable frames")
    return last


def _available_memory() -> int | None:
    """Bytes the kernel says can be allocated now (MemAvailable), or None where /proc/meminfo does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class ClipDataset(torch.utils.data.Dataset):
    """Clips from a data folder: item i -> (uint8 [T, S, S, 3] crop_resize'd clip, label index or -1).

    Each video gives `clips_per_video` items. Eval (train=False) puts their starts evenly over the video
    (centred in equal slots, so one clip per video is its middle); train=True draws each start uniformly
    from torch's generator, which a DataLoader seeds per worker. There is deliberately no horizontal flip:
    it would turn swipe_left into swipe_right.

    cache_frames=True keeps every video's frames, decoded and crop_resize'd, after its first read, and
    later clips are taken from memory (the same frames, so the same clips): decoding was a third of a
    training step of the tiny model on 2 cores. It costs videos x frames x size^2 x 3 bytes in each process
    that reads (2.2 GB for the embedded model's 3000 two-second clips at 64 px).
    """

    def __init__(
        self,
        folder: str | Path,
        num_frames: int,
        frame_stride_s: float,
        size: int,
        clips_per_video: int = 1,
        train: bool = False,
        classes: Sequence[str] | None = None,
        cache_frames: bool = False,
    ):
        sample_times(num_frames, frame_stride_s)  # validates both
        if size < 1 or clips_per_video < 1:
            raise ValueError(f"size and clips_per_video must be >= 1; got {size=}, {clips_per_video=}")
        self.folder = Path(folder)
        self.items = read_labels_csv(folder)
        self.num_frames, self.frame_stride_s, self.size = num_frames, frame_stride_s, size
        self.clips_per_video, self.train = clips_per_video, train
        found = sorted({it.label for it in self.items if it.label is not None})
        if classes is None:
            classes = found
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise ValueError(f"labels {unknown} in {self.folder} are not among the classes {list(classes)}")
        self.classes = list(classes)
        self._class_index = {c: i for i, c in enumerate(self.classes)}
        self._last_stamps: dict[Path, float] = {}
        self._frames: dict[Path, tuple[np.ndarray, np.ndarray]] | None = {} if cache_frames else None

    @property
    def cached_bytes(self) -> int:
        """Bytes of decoded frames held by cache_frames (0 without it)."""
        return sum(f.nbytes for _, f in (self._frames or {}).values())

    def _check_cache_size(self, first_video_bytes: int) -> None:
        """Say, from the first video cached, what the whole cache will take, and warn when that is more than
        the memory free now: a cache that outgrows RAM ends the run an epoch in, not at its start."""
        need = first_video_bytes * len(self.items)
        free = _available_memory()
        log.info("frame cache: about %.2f GiB for %d videos (from the first), %s", need / 2**30, len(self.items),
                 "free memory unknown" if free is None else f"{free / 2**30:.1f} GiB free")
        if free is not None and need > 0.8 * free:
            log.warning("frame cache needs about %.1f GiB, more than 80%% of the %.1f GiB free: drop "
                        "cache_frames (--cache-frames) or train on fewer or shorter videos", need / 2**30, free / 2**30)

    def __len__(self) -> int:
        return len(self.items) * self.clips_per_video

    def labels(self) -> list[int]:
        """The label index (or -1) of every item, in order, without decoding anything."""
        return [self._label_index(self.items[i // self.clips_per_video]) for i in range(len(self))]

    def _label_index(self, item: Item) -> int:
        return -1 if item.label is None else self._class_index[item.label]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} clips")
        item = self.items[index // self.clips_per_video]
        if item.path not in self._last_stamps:
            self._last_stamps[item.path] = video_last_stamp(item.path)
        try:
            clip = self._clip(index, item)
        except _TooShort as e:
            if e.end is None or e.end >= self._last_stamps[item.path] - _EPS_S:
                raise
            # The container counts frames that do not decode (a truncated recording): place this clip and
            # every later one within the frames there are, instead of failing wherever a start falls late.
            log.warning("video %s: its container says its last frame is at %.3f s, but its frames end at %.3f s "
                        "(truncated?); clips are placed within those", item.path, self._last_stamps[item.path], e.end)
            self._last_stamps[item.path] = e.end
            clip = self._clip(index, item)
        return torch.from_numpy(clip), self._label_index(item)

    def _clip(self, index: int, item: Item) -> np.ndarray:
        """Clip `index` of `item`: uint8 [T, S, S, 3], placed within the video's last stamp as known now."""
        span = (self.num_frames - 1) * self.frame_stride_s
        max_start = self._last_stamps[item.path] - span
        if max_start < -_EPS_S:
            raise ValueError(
                f"video {item.path} lasts {self._last_stamps[item.path]:.3f} s, shorter than a clip of "
                f"{self.num_frames} frames every {self.frame_stride_s:.4g} s ({span:.3f} s)"
            )
        max_start = max(max_start, 0.0)
        if self.train:
            start = float(torch.rand(())) * max_start
        else:
            start = max_start * ((index % self.clips_per_video) + 0.5) / self.clips_per_video
        if self._frames is None:
            clip = load_clip(item.path, self.num_frames, self.frame_stride_s, start, size=self.size)
        else:
            if item.path not in self._frames:
                decoded = [(stamp, crop_resize(frame, self.size)) for stamp, frame in iter_frames(item.path)]
                self._frames[item.path] = (np.array([t for t, _ in decoded]),
                                           np.stack([f for _, f in decoded]) if decoded else np.empty(0, np.uint8))
                if len(self._frames) == 1:
                    self._check_cache_size(self._frames[item.path][1].nbytes)
            stamps, frames = self._frames[item.path]
            times = sample_times(self.num_frames, self.frame_stride_s, start)
            clip = frames[_take(item.path, stamps, times, self.frame_stride_s)]
        return clip
