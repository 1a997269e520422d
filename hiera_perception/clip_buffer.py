"""Timestamped frames -> fixed-rate clips, sampled on the camera's own timeline.

A clip is `num_frames` frames sampled every `frame_stride_s`; a new clip starts every `hop_s`.
After a reset the first frame's stamp is the anchor `a`, and clip k's sample times are

    t[k, i] = a + k * hop_s + i * frame_stride_s,   i = 0 .. num_frames - 1

For each sample time the clip takes the newest frame whose stamp is at or before it ("sample and
hold"), so a camera that runs slowly, unevenly or drops frames changes *which* frames are picked,
never *when* the samples are: the timeline is fixed by the anchor alone.

Clip k is complete (and `push` returns it) as soon as a frame with stamp >= t[k, last] arrives, or already at
the frame its last sample takes, when the next frame cannot come at or before t[k, last]: when this frame's stamp
plus the frame period P (the shorter of the last two intervals between frames), less a safety margin, lies past
it. Waiting for the next frame to prove it would add a whole frame period to such a clip's latency: 33 ms at
30 fps, 67 ms at 15 fps. The margin is what this camera needs: 1.5 times the most any of the last EARLY_WINDOW
frames came before it was due (at its predecessor's stamp plus P), kept between 0.05 P and 0.25 P; 0.25 P until
EARLY_WINDOW frames of the timeline have shown it. A steady camera thus completes a clip early whenever its last
sample lies in the first 95 % of a frame interval (at 15 or 25 fps with the node's stride of 0.15 s and hop of
0.5 s every other clip's falls at 75 %; a first frame stamped late moves them all), a jittery one when in the first
75 %. A frame that comes sooner after all (the camera sped up) is one the waiting rule would have taken;
`early_misses` counts them. A frame that lands after several clips' end times completes all of them at once, each
made from the frames at or before its sample times (a gap up to `max_gap_s` is bridged by holding the last frame,
not skipped).

Resets: a stamp more than `max_gap_s` after the previous one, or any stamp earlier than the
previous one (a bag looping, a simulator restarting), drops every stored frame and re-anchors on
the new frame; clips in progress are abandoned. Each reset is counted and logged at debug.

Duplicate stamps (equal to the previous frame's): the later frame replaces the earlier one (a
driver re-sending a corrected frame, or a paused simulator still rendering), and `duplicates`
counts them. A source that never sets stamps (all zero) therefore yields no clips at all, only a
growing `duplicates` count: the node should watch it.

Comparisons between stamps and sample times allow `STAMP_TOLERANCE_S` (1 us), so a frame stamped
"exactly" on a sample time (30 fps stamps n/30 against a stride of 2/30) is picked whichever way
floating-point rounding falls.

Memory: frames are stored once and clips hold references, so overlapping clips share frame
objects. A stored frame is dropped as soon as no future sample time can pick it (its successor's
stamp is at or before the next sample time that would), which bounds the store by the number of
distinct sample times in one clip window plus one, whatever the camera's frame rate. A new frame is shrunk
once (`preprocess.crop_resize(frame, frame_size)`) as it arrives if a future sample would pick it were the next
frame to come a frame period later; else it waits until the next frame shows whether it is needed. A push that
completes a clip shrinks only the frames that clip takes. So a steady camera's frames are resized between
frames, at most the newest one on the push that completes a clip, and only frames some sample picks; an
irregular camera costs a wasted resize per wrong guess.
With `shrink_newest=False` a clip takes the frame that completes it as given (the engine then resizes it on
the device, off the host's latency path, `Engine(device_resize=True)`); it is stored shrunk at the next push.
`push` takes ownership of `frame`: the caller must not modify it afterwards. The buffer never
writes into a stored array (it only swaps references), so returned clips may be handed to another
thread while pushing goes on.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from .preprocess import crop_resize

__all__ = ["Clip", "ClipBuffer", "STAMP_TOLERANCE_S", "EARLY_MARGIN", "EARLY_WINDOW", "EARLY_SAFETY", "half_clip_hop"]

log = logging.getLogger(__name__)

STAMP_TOLERANCE_S = 1e-6
# A clip completes early only when the next frame, due a period P on, would still come after its last sample if it
# came early by the margin: the observed earliness of the last EARLY_WINDOW frames times EARLY_SAFETY, within
# EARLY_MARGIN (as fractions of P; the upper bound until the window is full: a frame up to a quarter interval early,
# 8 ms at 30 fps, is then still not missed). A last sample on a frame's own time is left to that frame, which
# completes the clip as it arrives.
EARLY_MARGIN = (0.05, 0.25)
EARLY_WINDOW = 30
EARLY_SAFETY = 1.5


def half_clip_hop(num_frames: int, frame_stride_s: float) -> float:
    """A new clip every half clip, at least every frame stride: how `run` and `eval --bag` cut a recording."""
    return max(frame_stride_s, frame_stride_s * num_frames / 2)


@dataclass(frozen=True)
class Clip:
    """One complete clip. `frames[i]` is the frame picked for sample time `start + i * stride`.

    frames: num_frames arrays [S, S, 3] uint8, shared (not copied) with other clips.
    stamps: the picked frames' stamps (seconds), non-decreasing; repeats when a frame was held.
    tags: the picked frames' `tag` objects as given to `push` (e.g. the ROS header, whose exact
        integer stamp a float cannot always round-trip).
    start, end: the first and last sample times (seconds) on the timeline.
    index: k, the clip's number since the last reset; epoch: the number of resets before it.
    """

    frames: list[np.ndarray]
    stamps: list[float]
    tags: list[Any]
    start: float
    end: float
    index: int
    epoch: int

    @property
    def header_stamp(self) -> float:
        """Stamp of the clip's last picked frame (the output message's header stamp)."""
        return self.stamps[-1]

    @property
    def clip_start(self) -> float:
        """Stamp of the clip's first picked frame."""
        return self.stamps[0]

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    def array(self) -> np.ndarray:
        """The frames stacked: [T, S, S, 3] uint8 (a new array)."""
        return np.stack(self.frames)


class _Entry:
    """A stored frame; `small` says whether `frame` has been shrunk to the clip size yet, `used` whether a
    returned clip took it."""

    __slots__ = ("stamp", "frame", "tag", "small", "used")

    def __init__(self, stamp: float, frame: np.ndarray, tag: Any) -> None:
        self.stamp = stamp
        self.frame = frame
        self.tag = tag
        self.small = self.used = False


class ClipBuffer:
    """Frames in (`push`), complete clips out. Not thread-safe: one caller (the image callback)."""

    def __init__(
        self,
        num_frames: int,
        frame_stride_s: float,
        hop_s: float,
        max_gap_s: float,
        frame_size: int,
        shrink_newest: bool = True,
    ) -> None:
        if int(num_frames) != num_frames or num_frames < 1:
            raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}")
        for name, value in (("frame_stride_s", frame_stride_s), ("hop_s", hop_s), ("max_gap_s", max_gap_s)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0 seconds, got {value!r}")
        if int(frame_size) != frame_size or frame_size < 1:
            raise ValueError(f"frame_size must be an integer >= 1 pixels, got {frame_size!r}")
        self.num_frames = int(num_frames)
        self.frame_stride_s = float(frame_stride_s)
        self.hop_s = float(hop_s)
        self.max_gap_s = float(max_gap_s)
        self.frame_size = int(frame_size)
        self.shrink_newest = shrink_newest

        # Counters for diagnostics; never reset, so rates can be taken from differences.
        self.frames_in = 0  # every push
        self.duplicates = 0  # pushes whose stamp equalled the previous one (replaced it)
        self.resets = 0  # gaps and backward stamps
        self.clips_out = 0  # clips returned
        self.frames_unused = 0  # frames dropped without any clip having picked them
        self.early_misses = 0  # frames at or before the end of a clip returned early (the camera sped up)

        self._entries: deque[_Entry] = deque()  # stamps strictly increasing
        self._anchor: float | None = None
        self._next_clip = 0  # k of the next clip to complete
        self._early_end: float | None = None  # last sample time of the newest clip returned early
        self._interval: float | None = None  # between the last two frames of this timeline
        self._due: float | None = None  # when the next frame is expected: the last stamp plus the period
        self._earliness: deque[float] = deque(maxlen=EARLY_WINDOW)  # how early this timeline's frames came, >= 0

    # ------------------------------------------------------------------ public

    @property
    def clip_duration_s(self) -> float:
        """Time from a clip's first to its last sample."""
        return (self.num_frames - 1) * self.frame_stride_s

    @property
    def stored(self) -> int:
        """Number of frames held right now."""
        return len(self._entries)

    def counters(self) -> dict[str, int]:
        return {
            "frames_in": self.frames_in,
            "duplicates": self.duplicates,
            "resets": self.resets,
            "clips_out": self.clips_out,
            "frames_unused": self.frames_unused,
            "early_misses": self.early_misses,
            "stored": self.stored,
        }

    def reset(self, reason: str = "requested") -> None:
        """Forget every frame; the next push anchors a new timeline. Counted in `resets`."""
        if self._entries:
            self.resets += 1
            log.debug("clip buffer reset (%s): dropped %d frames", reason, len(self._entries))
        self._entries.clear()
        self._anchor = None
        self._next_clip = 0
        self._early_end = self._interval = self._due = None
        self._earliness.clear()

    def push(self, stamp_s: float, frame: np.ndarray, tag: Any = None) -> list[Clip]:
        """Add a frame [H, W, 3] uint8 stamped `stamp_s` (seconds); return the clips it completes.

        `tag` is carried unchanged into `Clip.tags` (pass the message header to keep its exact
        stamp and frame_id). Raises ValueError for a non-finite stamp or a frame that is not a
        non-empty [H, W, 3] uint8 array.
        """
        stamp = float(stamp_s)
        if not math.isfinite(stamp):
            raise ValueError(f"stamp must be a finite number of seconds, got {stamp_s!r}")
        if not (
            isinstance(frame, np.ndarray)
            and frame.dtype == np.uint8
            and frame.ndim == 3
            and frame.shape[2] == 3
            and frame.shape[0] > 0
            and frame.shape[1] > 0
        ):
            desc = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise ValueError(f"frame must be a non-empty [H, W, 3] uint8 array, got {desc}")
        self.frames_in += 1

        if self._entries:
            last = self._entries[-1]
            if stamp == last.stamp:
                # Keep the later frame. Clips already returned keep their own reference.
                self.duplicates += 1
                last.frame, last.tag, last.small, last.used = frame, tag, False, False
                return []
            if stamp < last.stamp:
                self.reset(f"stamp went backwards {last.stamp:.6f} -> {stamp:.6f}")
            elif stamp - last.stamp > self.max_gap_s:
                self.reset(f"gap of {stamp - last.stamp:.3f} s > max_gap_s {self.max_gap_s:.3f}")

        # When the next frame is due, from the intervals since the two frames before (the shorter: after a stall the
        # camera resumes its rhythm); unknown for a frame that anchors a new timeline.
        interval = period = None
        if self._entries:
            interval = stamp - self._entries[-1].stamp
            period = interval if self._interval is None else min(interval, self._interval)
            if self._due is not None:
                self._earliness.append(max(0.0, self._due - stamp))
        self._interval = interval
        self._due = None if period is None else stamp + period
        if self._anchor is None:
            self._anchor = stamp
            self._next_clip = 0
        elif self._needed(self._entries[-1].stamp, stamp):
            self._shrink(self._entries[-1])
        else:
            dropped = self._entries.pop()
            self.frames_unused += not dropped.used
        self._entries.append(_Entry(stamp, frame, tag))
        if self._early_end is not None and stamp <= self._early_end + STAMP_TOLERANCE_S:
            self.early_misses += 1

        clips = []
        margin = None
        while True:
            end = self._sample_time(self._next_clip, self.num_frames - 1)
            if stamp < end - STAMP_TOLERANCE_S:
                if period is None:
                    break
                if margin is None:
                    margin = self._early_margin(period)
                if stamp + (period - margin) <= end + STAMP_TOLERANCE_S:
                    break
                self._early_end = end  # the next frame is not due until after the last sample: done now
            clips.append(self._make_clip(self._next_clip))
            self._next_clip += 1
        if clips:
            self.clips_out += len(clips)
            # The future sample times moved on: frames only the returned clips used can go.
            while len(self._entries) >= 2 and not self._needed(self._entries[0].stamp, self._entries[1].stamp):
                self._entries.popleft()
        elif period is None or self._needed(stamp, stamp + period):
            # Likely picked (the next frame is expected a period on; an anchor always is): shrink it now, between
            # frames, not on the push that completes the clip. A wrong guess costs one resize.
            self._shrink(self._entries[-1])
        return clips

    # ----------------------------------------------------------------- private

    def _early_margin(self, period: float) -> float:
        """How early (seconds) the next frame may come, for the early-completion rule."""
        lo, hi = EARLY_MARGIN
        if len(self._earliness) < EARLY_WINDOW:
            return hi * period
        return min(hi * period, max(lo * period, EARLY_SAFETY * max(self._earliness)))

    def _sample_time(self, k: int, i: int) -> float:
        # The one formula for sample times: every comparison uses exactly these floats.
        assert self._anchor is not None
        return self._anchor + k * self.hop_s + i * self.frame_stride_s

    def _needed(self, lo: float, hi: float) -> bool:
        """Whether a frame stamped `lo`, followed by one stamped `hi`, is picked by a future clip.

        It is iff some sample time t of a clip k >= next_clip has lo <= t + tol < hi.
        """
        tol = STAMP_TOLERANCE_S
        for i in range(self.num_frames):
            # Smallest k >= next_clip with t[k, i] + tol >= lo; the estimate is fixed up against
            # `_sample_time` so rounding never disagrees with the comparisons in `_make_clip`.
            k = max(self._next_clip, math.ceil((lo - tol - self._anchor - i * self.frame_stride_s) / self.hop_s))
            while k > self._next_clip and self._sample_time(k - 1, i) + tol >= lo:
                k -= 1
            while self._sample_time(k, i) + tol < lo:
                k += 1
            if self._sample_time(k, i) + tol < hi:
                return True
        return False

    def _shrink(self, entry: _Entry) -> np.ndarray:
        if not entry.small:
            entry.frame = crop_resize(entry.frame, self.frame_size)
            entry.small = True
        return entry.frame

    def _make_clip(self, k: int) -> Clip:
        stamps_stored = [e.stamp for e in self._entries]
        frames, stamps, tags = [], [], []
        for i in range(self.num_frames):
            t = self._sample_time(k, i)
            j = bisect.bisect_right(stamps_stored, t + STAMP_TOLERANCE_S) - 1
            # j >= 0: the anchor frame (or a later one) is at or before every sample time, and
            # `_needed` only drops a frame when its successor is at or before the next sample.
            entry = self._entries[j]
            entry.used = True
            as_given = not self.shrink_newest and j == len(self._entries) - 1  # the newest, for the device
            frames.append(entry.frame if as_given else self._shrink(entry))
            stamps.append(entry.stamp)
            tags.append(entry.tag)
        return Clip(
            frames=frames,
            stamps=stamps,
            tags=tags,
            start=self._sample_time(k, 0),
            end=self._sample_time(k, self.num_frames - 1),
            index=k,
            epoch=self.resets,
        )
