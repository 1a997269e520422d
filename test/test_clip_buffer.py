"""ClipBuffer: sampling on the stamps' timeline, resets, duplicates, shared frames, bounded memory."""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import pytest

import hiera_perception.clip_buffer as cb
from hiera_perception.clip_buffer import (EARLY_MARGIN, EARLY_SAFETY, EARLY_WINDOW, STAMP_TOLERANCE_S, Clip,
                                         ClipBuffer)

S = 4  # frames pushed at the clip size are stored as given, so identity checks see our objects


def frame(value: int, size: int = S) -> np.ndarray:
    return np.full((size, size, 3), value % 256, np.uint8)


def feed(buf: ClipBuffer, stamps, size: int = S) -> tuple[list[Clip], list[np.ndarray]]:
    clips, frames = [], []
    for n, t in enumerate(stamps):
        f = frame(n, size)
        frames.append(f)
        clips += buf.push(t, f, tag=n)
    return clips, frames


def test_regular_30fps_exact_samples():
    # T=4, a sample every 2nd frame, a new clip every 4th frame: clip k = frames 4k, 4k+2, 4k+4, 4k+6.
    buf = ClipBuffer(num_frames=4, frame_stride_s=2 / 30, hop_s=4 / 30, max_gap_s=0.5, frame_size=S)
    stamps = [100.0 + n / 30 for n in range(31)]
    emitted_at = []
    clips = []
    for n, t in enumerate(stamps):
        out = buf.push(t, frame(n), tag=n)
        emitted_at += [n] * len(out)
        clips += out
    assert len(clips) == 7  # clip 6 ends at frame 30
    assert emitted_at == [6, 10, 14, 18, 22, 26, 30]
    for k, clip in enumerate(clips):
        picked = [4 * k + 2 * i for i in range(4)]
        assert clip.tags == picked
        assert clip.stamps == [stamps[n] for n in picked]
        assert [int(f[0, 0, 0]) for f in clip.frames] == picked
        assert clip.header_stamp == stamps[picked[-1]]
        assert clip.clip_start == stamps[picked[0]]
        assert clip.start == pytest.approx(100.0 + k * 4 / 30, abs=1e-9)
        assert clip.end == pytest.approx(100.0 + k * 4 / 30 + 6 / 30, abs=1e-9)
        assert clip.index == k and clip.epoch == 0 and clip.num_frames == 4
        assert clip.array().shape == (4, S, S, 3)
    assert buf.clips_out == 7 and buf.frames_in == 31 and buf.resets == 0


def test_uneven_stamps_hand_computed():
    # samples: clip 0 at 0.0 0.1 0.2, clip 1 at 0.2 0.3 0.4, clip 2 at 0.4 0.5 0.6
    buf = ClipBuffer(num_frames=3, frame_stride_s=0.1, hop_s=0.2, max_gap_s=1.0, frame_size=S)
    stamps = [0.0, 0.07, 0.13, 0.21, 0.24, 0.33, 0.38, 0.45, 0.52, 0.61]
    out = [buf.push(t, frame(n), tag=n) for n, t in enumerate(stamps)]
    # clip 1 completes at 0.38, early: the frame period is 0.05 s, so the next frame is not due before its last
    # sample (0.38 + 0.75 x 0.05 > 0.4); at 0.33 it was (0.33 + 0.75 x 0.09 < 0.4)
    assert [len(o) for o in out] == [0, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    assert buf.early_misses == 0
    c0, c1, c2 = out[3][0], out[6][0], out[9][0]
    assert c0.stamps == [0.0, 0.07, 0.13]
    assert c1.stamps == [0.13, 0.24, 0.38]
    assert c2.stamps == [0.38, 0.45, 0.52]
    assert (c0.start, c0.end) == (0.0, pytest.approx(0.2))
    assert c2.header_stamp == 0.52 and c2.clip_start == 0.38


def test_dropped_frames_never_shift_sample_times():
    buf = ClipBuffer(num_frames=4, frame_stride_s=0.1, hop_s=0.2, max_gap_s=0.5, frame_size=S)
    full = [round(n * 0.05, 6) for n in range(60)]  # 20 fps
    dropped = {3, 4, 5, 11, 17, 18, 30, 31, 32, 33, 41}
    stamps = [t for n, t in enumerate(full) if n not in dropped]
    clips, _ = feed(buf, stamps)
    assert len(clips) == 14  # clip 13 ends at 2.6 + 0.3 = 2.9 <= 2.95
    for k, clip in enumerate(clips):
        assert clip.start == pytest.approx(0.2 * k, abs=1e-12)
        for i, st in enumerate(clip.stamps):
            t = 0.2 * k + 0.1 * i
            assert st == max(s for s in stamps if s <= t + 1e-9)
    # hand check across the 0.15-0.25 hole: clip 0 samples 0, .1, .2, .3 -> 0.0, 0.1, 0.1 (held), 0.3
    assert clips[0].stamps == [0.0, 0.1, 0.1, 0.3]


def test_gap_resets_and_reanchors(caplog):
    buf = ClipBuffer(num_frames=3, frame_stride_s=0.1, hop_s=0.1, max_gap_s=0.5, frame_size=S)
    first, _ = feed(buf, [0.0, 0.1, 0.2, 0.25])  # clip 0 at 0.2; clip 1 (0.1 .. 0.3) in progress
    assert len(first) == 1
    # The handler goes on the module's logger itself: the launch_testing pytest plugin installs a
    # logger class with propagate=False, so records would never reach caplog's root handler.
    logger = logging.getLogger(cb.__name__)
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("DEBUG", logger=cb.__name__):
            assert buf.push(0.9, frame(9)) == []  # 0.65 s > max_gap_s: clip 1 abandoned, new anchor 0.9
    finally:
        logger.removeHandler(caplog.handler)
    assert buf.resets == 1 and buf.stored == 1
    assert any("gap" in r.getMessage() for r in caplog.records)
    out = buf.push(1.0, frame(10)) + buf.push(1.1, frame(11))
    assert len(out) == 1
    assert out[0].start == 0.9 and out[0].stamps == [0.9, 1.0, 1.1]
    assert out[0].index == 0 and out[0].epoch == 1
    # exactly max_gap_s is not a gap
    assert buf.push(1.6, frame(12)) and buf.resets == 1


def test_backwards_stamp_resets():
    buf = ClipBuffer(num_frames=2, frame_stride_s=0.1, hop_s=0.1, max_gap_s=0.5, frame_size=S)
    a, _ = feed(buf, [50.0, 50.1, 50.2])
    assert [c.stamps for c in a] == [[50.0, 50.1], [50.1, 50.2]]
    assert buf.push(0.0, frame(1)) == []  # bag looped
    assert buf.resets == 1
    b = buf.push(0.1, frame(2))
    assert len(b) == 1 and b[0].stamps == [0.0, 0.1] and b[0].start == 0.0 and b[0].epoch == 1
    assert buf.push(0.05, frame(3)) == [] and buf.resets == 2  # even a small step back resets


def test_gap_under_max_spanning_several_hops_emits_each_clip():
    buf = ClipBuffer(num_frames=2, frame_stride_s=0.1, hop_s=0.1, max_gap_s=1.0, frame_size=S)
    assert len(buf.push(0.0, frame(0))) == 0
    assert len(buf.push(0.1, frame(1))) == 1
    # completes the clips ending at 0.2, 0.3, 0.4, 0.5, and the one ending at 0.6 early: the frame period is taken
    # as 0.1 s (the shorter of the last two intervals: a stall is no rhythm), so the next frame is due at 0.65
    late = buf.push(0.55, frame(2))
    assert [c.index for c in late] == [1, 2, 3, 4, 5]
    assert [c.stamps for c in late] == [[0.1, 0.1]] * 4 + [[0.1, 0.55]]  # held last frame, nothing skipped
    assert buf.early_misses == 0
    # the camera sped up: 0.6 is the frame the waiting rule would have given clip 5's last sample; it is counted
    assert buf.push(0.6, frame(3)) == [] and buf.early_misses == 1
    nxt = buf.push(0.7, frame(4))  # clip 6 (samples 0.6, 0.7): from 0.6 the next frame was due at 0.65
    assert [c.stamps for c in nxt] == [[0.6, 0.7]] and buf.early_misses == 1 and buf.resets == 0


def test_overlapping_clips_share_frame_objects():
    buf = ClipBuffer(num_frames=4, frame_stride_s=0.1, hop_s=0.2, max_gap_s=0.5, frame_size=8)
    clips, _ = feed(buf, [n * 0.1 for n in range(12)], size=32)  # big frames: shrunk on arrival
    assert len(clips) == 5  # clip k ends at 0.2 k + 0.3 <= 1.1
    for a, b in zip(clips, clips[1:]):
        assert a.frames[2] is b.frames[0] and a.frames[3] is b.frames[1]
    for c in clips:
        assert all(f.shape == (8, 8, 3) and f.dtype == np.uint8 for f in c.frames)
    assert int(clips[1].frames[0][0, 0, 0]) == 2


def test_duplicate_stamp_keeps_later_frame():
    buf = ClipBuffer(num_frames=2, frame_stride_s=0.1, hop_s=0.1, max_gap_s=0.5, frame_size=S)
    buf.push(0.0, frame(0), tag="a")
    later = frame(7)
    assert buf.push(0.0, later, tag="b") == []
    out = buf.push(0.1, frame(1), tag="c")
    assert buf.duplicates == 1 and buf.resets == 0 and buf.frames_in == 3
    assert out[0].tags == ["b", "c"] and out[0].frames[0] is later
    # a duplicate of a frame a returned clip already used leaves that clip alone
    buf.push(0.1, frame(9), tag="d")
    assert out[0].tags == ["b", "c"] and int(out[0].frames[1][0, 0, 0]) == 1
    nxt = buf.push(0.2, frame(2), tag="e")
    assert nxt[0].tags == ["d", "e"]


def test_all_zero_stamps_yield_no_clip_only_duplicates():
    buf = ClipBuffer(num_frames=2, frame_stride_s=0.1, hop_s=0.1, max_gap_s=0.5, frame_size=S)
    clips, _ = feed(buf, [0.0] * 50)
    assert clips == [] and buf.duplicates == 49 and buf.stored == 1


def test_single_frame_clips_and_hop_longer_than_clip():
    buf = ClipBuffer(num_frames=1, frame_stride_s=0.1, hop_s=0.25, max_gap_s=0.5, frame_size=S)
    clips, _ = feed(buf, [n * 0.1 for n in range(11)])
    # samples 0, .25, .5, .75, 1.0 -> frames 0.0, 0.2, 0.5, 0.7, 1.0
    assert [c.stamps[0] for c in clips] == pytest.approx([0.0, 0.2, 0.5, 0.7, 1.0])
    assert buf.frames_unused == 6


def _reference(pushes, T, stride, hop, max_gap):
    """Every (push index, clip) the semantics call for, from the whole history, by brute force."""
    tol = STAMP_TOLERANCE_S
    lo, hi = EARLY_MARGIN
    expected, epoch_start, anchor, k, prev, intervals, dues, late = [], 0, None, 0, None, [], [], []
    for n, t in enumerate(pushes):
        if t == prev:
            continue  # a duplicate only replaces the frame
        if prev is not None and (t < prev or t - prev > max_gap):
            epoch_start, anchor = n, None
        if anchor is None:
            anchor, k, intervals, dues, late = t, 0, [], [], []
        else:
            intervals.append(t - prev)
        if len(dues) >= 2:  # this frame was due at the one before's stamp plus the period then
            late.append(max(0.0, dues[-1] - t))
        prev = t
        period = min(intervals[-2:]) if intervals else None  # the next frame is due a period on
        dues.append(None if period is None else t + period)
        if period is not None:  # how early the next frame may come: what the last frames did, with a safety factor
            seen = late[-EARLY_WINDOW:]
            margin = hi * period if len(seen) < EARLY_WINDOW else min(hi * period, max(lo * period,
                                                                                        EARLY_SAFETY * max(seen)))
        while (t >= anchor + k * hop + (T - 1) * stride - tol
               or period is not None and t + (period - margin) > anchor + k * hop + (T - 1) * stride + tol):
            picked = []
            for i in range(T):
                s = anchor + k * hop + i * stride
                picked.append(max(m for m in range(epoch_start, n + 1) if pushes[m] <= s + tol))
            expected.append((n, picked))
            k += 1
    return expected


@pytest.mark.parametrize("seed", range(6))
def test_random_streams_match_brute_force(seed):
    rng = random.Random(seed)
    T, stride, hop, max_gap = rng.choice(
        [(1, 0.1, 0.1, 0.4), (3, 0.07, 0.1, 0.3), (4, 0.1, 0.2, 0.5), (2, 0.2, 0.5, 1.0)]
    )
    t, pushes = 1000.0, []
    for _ in range(400):
        r = rng.random()
        if r < 0.05:
            pass  # duplicate stamp
        elif r < 0.08:
            t += rng.uniform(max_gap * 1.1, 3.0)  # gap
        elif r < 0.10:
            t -= rng.uniform(0.01, 5.0)  # backwards
        else:
            t += rng.uniform(0.005, max_gap * 0.9)
        pushes.append(round(t, 6))
    buf = ClipBuffer(T, stride, hop, max_gap, frame_size=S)
    got = []
    for n, s in enumerate(pushes):
        got += [(n, c.tags) for c in buf.push(s, frame(n), tag=n)]
    assert got == _reference(pushes, T, stride, hop, max_gap)
    assert buf.clips_out == len(got) and buf.frames_in == 400


@pytest.mark.parametrize("seed", range(6))
def test_camera_like_streams_match_brute_force(seed):
    # A camera's rhythm (steady, jittered by a random amount, dropping and repeating frames, now and then
    # speeding up): the early-completion margin narrows and widens with it, and every clip still equals the
    # reference's, pushed by the same frame.
    rng = random.Random(100 + seed)
    fps = rng.choice([10.0, 12.5, 15.0, 25.0, 29.97, 30.0])
    T, stride, hop = rng.choice([(8, 0.15, 0.5), (4, 0.1, 0.3), (16, 4 / 30, 0.25)])
    jitter = rng.choice([0.0, 0.0003, 0.001, 0.004])
    n, t, pushes = 0, 1000.0 + rng.random(), []
    while not pushes or pushes[-1] < t + 40:
        n += 1 + (rng.random() < 0.03)  # a dropped frame
        if rng.random() < 0.001:
            fps = min(60.0, fps * 2)  # the camera speeds up
        stamp = round(t + n / fps + rng.uniform(-jitter, jitter), 6)
        pushes += [stamp] * (2 if rng.random() < 0.01 else 1)
    buf = ClipBuffer(T, stride, hop, max_gap_s=1.0, frame_size=S)
    got = []
    for i, stamp in enumerate(pushes):
        got += [(i, c.tags) for c in buf.push(stamp, frame(i), tag=i)]
    assert got == _reference(pushes, T, stride, hop, 1.0)
    assert buf.clips_out == len(got) > 70


def test_memory_bounded_over_10000_frames(monkeypatch):
    resized = []
    real = cb.crop_resize

    def counting(f, size):
        resized.append(f)  # kept alive so ids stay unique
        return real(f, size)

    monkeypatch.setattr(cb, "crop_resize", counting)
    T, stride, hop = 8, 2 / 30, 4 / 30
    buf = ClipBuffer(T, stride, hop, max_gap_s=0.5, frame_size=2)
    rng = random.Random(0)
    big = np.zeros((6, 8, 3), np.uint8)  # read-only use: the buffer never writes frames
    t, peak, picked = 0.0, 0, {}
    for _ in range(10_000):
        t += rng.choice([1 / 30, 1 / 30, 1 / 30, 2 / 30, 1 / 120])  # jitter, drops, bursts
        for c in buf.push(t, big.copy()):
            picked.update({id(f): f for f in c.frames})  # values keep ids unique
        peak = max(peak, buf.stored)
    # a clip window spans 8 sample times, the next clip's first sample is within it: <= T + 2 held
    assert peak <= T + 2
    assert buf.resets == 0 and buf.clips_out > 2000
    # each frame resized at most once, every picked one among them
    assert len(resized) == len({id(f) for f in resized}) >= len(picked)
    assert buf.frames_unused > 3000
    assert buf.frames_in == 10_000
    # ... and a jittery camera wastes few: a frame is shrunk on arrival when one frame interval on would pick it,
    # and here the next interval differs from the last one most of the time
    assert len(resized) - len(picked) <= 0.1 * buf.frames_in

    # the bound does not grow with the frame rate
    fast = ClipBuffer(T, stride, hop, max_gap_s=0.5, frame_size=2)
    for n in range(3000):
        fast.push(n / 1000, big)
        assert fast.stored <= T + 2


@pytest.mark.parametrize("fps, T, stride, hop", [(30, 16, 4 / 30, 0.25), (30, 8, 0.15, 0.5), (25, 4, 0.1, 0.3),
                                                  (60, 8, 2 / 30, 0.5)])
@pytest.mark.parametrize("shrink_newest", [True, False])
def test_steady_camera_is_resized_between_frames(monkeypatch, fps, T, stride, hop, shrink_newest):
    # A steady camera's frames are shrunk as they arrive, only those some sample picks: the push that completes
    # a clip resizes at most the frame it just got, and only when the clip takes it (never with shrink_newest off).
    real, resized = cb.crop_resize, []
    monkeypatch.setattr(cb, "crop_resize", lambda f, size: resized.append(id(f)) or real(f, size))
    buf = ClipBuffer(T, stride, hop, max_gap_s=0.5, frame_size=2, shrink_newest=shrink_newest)
    frames, picked, completing = [], set(), 0
    for n in range(10 * fps):
        frames.append(np.zeros((6, 8, 3), np.uint8))  # kept alive: ids stay unique
        before = len(resized)
        clips = buf.push(n / fps, frames[n], tag=n)
        picked.update(t for c in clips for t in c.tags)
        if clips:
            completing += 1
            takes_it = shrink_newest and any(c.tags[-1] == n for c in clips)
            assert resized[before:] == ([id(frames[n])] if takes_it else [])
    assert completing == buf.clips_out > 10  # hop > a frame: one clip per completing push
    window = math.ceil(((T - 1) * stride + hop) * fps) + 1
    waiting = {id(f) for f in frames[-window:]}  # may be picked by the clips in progress
    assert set(resized) <= {id(frames[t]) for t in picked} | waiting
    # each once; with shrink_newest off a frame only the clip it completed took is never shrunk on the host
    assert len(resized) == len(set(resized)) >= len(picked) - (0 if shrink_newest else buf.clips_out)


@pytest.mark.parametrize("fps, T, stride, hop", [(30, 8, 0.15, 0.5), (30, 16, 4 / 30, 0.25), (25, 4, 0.1, 0.3),
                                                  (60, 8, 2 / 30, 0.5), (15, 8, 0.15, 0.5), (25, 8, 0.15, 0.5),
                                                  (10, 8, 0.15, 0.5)])
@pytest.mark.parametrize("first_late", [0.0, 0.3, 0.4])
def test_steady_camera_clips_go_out_with_their_last_frame(fps, T, stride, hop, first_late):
    # A steady camera: every clip is returned by the push of the frame its last sample takes, or, when that sample
    # falls in the last quarter of a frame period, by the next one (within a quarter period of the sample); once
    # EARLY_WINDOW frames have shown the camera steady, in the last 5 % only. At 15 and 25 fps the node's timing
    # puts every other clip's last sample at 75 %, and a first frame stamped late (the anchor) shifts them all:
    # those clips waited a whole frame (67 ms at 15 fps). Each clip holds exactly what sample-and-hold over the
    # whole stream gives (no early completion is ever wrong).
    buf = ClipBuffer(T, stride, hop, max_gap_s=0.5, frame_size=S)
    stamps = [100.0 + (n + (first_late if n == 0 else 0)) / fps for n in range(8 * fps)]
    waited = []
    for n, t in enumerate(stamps):
        for c in buf.push(t, frame(n), tag=n):
            steady = n >= EARLY_WINDOW + 2  # the window holds the earliness of frames 2 .. n
            margin = (EARLY_MARGIN[0] if steady else EARLY_MARGIN[1]) / fps
            assert c.tags[-1] == n or (c.tags[-1] == n - 1 and t - c.end <= margin + 1e-9)
            if steady and c.tags[-1] != n:
                waited.append(c.index)
            for i, picked in enumerate(c.tags):
                sample = c.start + i * stride
                assert picked == max(m for m, s in enumerate(stamps) if s <= sample + STAMP_TOLERANCE_S)
    assert buf.clips_out == math.floor((stamps[-1] - stamps[0] - (T - 1) * stride) / hop + 1e-9) + 1
    assert buf.early_misses == 0
    # no last sample of these falls in the last 5 % of a frame interval: none waits once the window is full
    assert waited == []


def test_invalid_arguments():
    with pytest.raises(ValueError, match="num_frames"):
        ClipBuffer(0, 0.1, 0.1, 0.5, 4)
    with pytest.raises(ValueError, match="hop_s"):
        ClipBuffer(2, 0.1, 0.0, 0.5, 4)
    with pytest.raises(ValueError, match="frame_stride_s"):
        ClipBuffer(2, math.nan, 0.1, 0.5, 4)
    with pytest.raises(ValueError, match="frame_size"):
        ClipBuffer(2, 0.1, 0.1, 0.5, 0)
    buf = ClipBuffer(2, 0.1, 0.1, 0.5, 4)
    with pytest.raises(ValueError, match="stamp"):
        buf.push(math.inf, frame(0))
    with pytest.raises(ValueError, match="uint8"):
        buf.push(0.0, np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        buf.push(0.0, np.zeros((4, 4, 3), np.float32))
    assert buf.frames_in == 0


def test_counters_and_explicit_reset():
    buf = ClipBuffer(2, 0.1, 0.1, 0.5, S)
    feed(buf, [0.0, 0.1, 0.2])
    assert buf.counters() == {
        "frames_in": 3, "duplicates": 0, "resets": 0, "clips_out": 2, "frames_unused": 0, "early_misses": 0,
        "stored": 1,
    }
    buf.reset("sim time reset")
    assert buf.resets == 1 and buf.stored == 0
    out = buf.push(5.0, frame(0)) + buf.push(5.1, frame(1))
    assert len(out) == 1 and out[0].start == 5.0 and out[0].epoch == 1


def test_shrink_newest_false_hands_the_completing_frame_over_as_given():
    # Same stream both ways: the same clips and counters; only the frame that completes a clip differs, given at
    # camera size (the engine shrinks it on the device), and it is stored shrunk once the next frame comes.
    rng = random.Random(3)
    stamps, t = [], 0.0
    for _ in range(300):
        t += rng.choice([1 / 30, 1 / 30, 2 / 30, 1 / 120])
        stamps.append(t)
    frames = [np.full((6, 8, 3), n % 256, np.uint8) for n in range(len(stamps))]
    shrunk = ClipBuffer(4, 2 / 30, 4 / 30, max_gap_s=0.5, frame_size=2)
    as_given = ClipBuffer(4, 2 / 30, 4 / 30, max_gap_s=0.5, frame_size=2, shrink_newest=False)
    for n, (t, f) in enumerate(zip(stamps, frames)):
        a, b = shrunk.push(t, f, tag=n), as_given.push(t, f, tag=n)
        assert [c.tags for c in a] == [c.tags for c in b]
        for x, y in zip(a, b):
            *older, newest = y.frames
            assert (newest is f) == (y.tags[-1] == n)  # the frame pushed now, untouched, when the clip takes it
            assert all(g.shape == (2, 2, 3) for g in older) and all(g.shape == (2, 2, 3) for g in x.frames)
            assert all(np.array_equal(g, cb.crop_resize(h, 2)) for g, h in zip(x.frames, y.frames))
    assert shrunk.counters() == as_given.counters() and shrunk.clips_out > 50
    assert all(e.frame.shape == (2, 2, 3) for e in list(as_given._entries)[:-1])
