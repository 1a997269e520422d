"""Fuzz the running node with 2,000 malformed frames among odd-but-valid ones (other encodings, padded rows,
tiny images, stamps that repeat, jump back or leap ahead), then check it is alive, still publishes exactly the
right features for a fresh good sequence, and counted every bad frame, per reason, in /diagnostics."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

import ros_helpers as rh

pytestmark = pytest.mark.ros

DOMAIN = rh.domain_id(2)
N_BAD = 2000
N_GOOD = 500


def _raw(width: int, height: int, encoding: str, data: bytes, step: int, stamp_ns: int, big_endian: bool = False):
    from sensor_msgs.msg import Image

    msg = Image(height=height, width=width, encoding=encoding, is_bigendian=int(big_endian), step=step, data=data)
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 10**9)
    msg.header.frame_id = rh.FRAME_ID
    return msg


def _bad(rng: random.Random, stamp_ns: int):
    """One malformed frame and the reason the node must count it under."""
    w, h = rng.randint(2, 40) * 2, rng.randint(1, 30)
    kind = rng.randrange(10)
    if kind == 0:
        # (not "bgr8\0": a NUL ends a DDS string, so that one arrives as a valid bgr8)
        enc = rng.choice(["", "rgb9", "jpeg", "32FC1", "8UC2", "rgb 8", "bgr8_"])
        return _raw(w, h, enc, bytes(w * h * 3), w * 3, stamp_ns), "unknown_encoding"
    if kind == 1:  # truncated: a few bytes short of step * height
        return _raw(w, h, "rgb8", bytes(w * h * 3 - rng.randint(1, w * 3)), w * 3, stamp_ns), "truncated"
    if kind == 2:  # no data at all
        return _raw(w, h, rng.choice(["rgb8", "mono8", "mono16"]), b"", w * 3, stamp_ns), "truncated"
    if kind == 3:  # a zero side
        width, height = rng.choice([(0, h), (w, 0), (0, 0)])
        return _raw(width, height, "rgb8", bytes(16), width * 3, stamp_ns), "empty_image"
    if kind == 4:  # step shorter than a row
        return _raw(w, h, "bgr8", bytes(w * h * 3), w * 3 - rng.randint(1, 5), stamp_ns), "step_too_small"
    if kind == 5:  # huge dimensions with little data behind them
        big = rng.choice([(100_000, 100_000), (20_000, 1), (1, 70_000), (16_000, 16_000)])
        return _raw(*big, "rgb8", bytes(64), big[0] * 3, stamp_ns), "too_large"
    if kind == 6:  # YUV 4:2:2 with an odd width
        return _raw(w + 1, h, "yuv422", bytes((w + 1) * h * 2), (w + 1) * 2, stamp_ns), "odd_width"
    if kind == 7:  # a step that points far past the data
        return _raw(w, h, "rgb8", bytes(w * h * 3), 2**31, stamp_ns), "truncated"
    if kind == 8:  # nanoseconds out of range: the integer stamp's NaN
        msg = _raw(w, h, "rgb8", bytes(w * h * 3), w * 3, stamp_ns)
        msg.header.stamp.nanosec = rng.choice([1_000_000_000, 2**32 - 1])
        return msg, "bad_stamp"
    msg = _raw(w, h, "rgb8", bytes(w * h * 3), w * 3, stamp_ns)  # a stamp before the epoch
    msg.header.stamp.sec = -rng.randint(1, 2**31)
    return msg, "bad_stamp"


def _odd_good(rng: random.Random, n: int, stamp_ns: int):
    """A valid but unusual frame: other encodings, padding, extra bytes, tiny or thin images."""
    frame = rh.rgb_frame(n, rng.choice([1, 2, 8, 80, 200]), rng.choice([1, 3, 60, 90]))
    h, w = frame.shape[:2]
    kind = rng.randrange(8)
    if kind == 0:
        return rh.image_msg(frame, stamp_ns)
    if kind == 1:
        return rh.image_msg(np.ascontiguousarray(frame[:, :, ::-1]), stamp_ns, encoding=rng.choice(["bgr8", "BGR8"]))
    if kind == 2:
        rgba = np.concatenate([frame, np.full((h, w, 1), 255, np.uint8)], axis=2)
        return rh.image_msg(rgba, stamp_ns, encoding=rng.choice(["rgba8", "bgra8"]))
    if kind == 3:
        return rh.image_msg(np.ascontiguousarray(frame[:, :, 1]), stamp_ns, encoding="mono8")
    if kind == 4:  # 16-bit, either byte order
        big = rng.random() < 0.5
        mono = (frame[:, :, 0].astype(np.uint16) * 257).astype(">u2" if big else "<u2")
        return _raw(w, h, "mono16", mono.tobytes(), w * 2, stamp_ns, big_endian=big)
    if kind == 5:  # padded rows
        pad = rng.randint(1, 13)
        rows = np.concatenate([frame.reshape(h, w * 3), np.zeros((h, pad), np.uint8)], axis=1)
        return _raw(w, h, "rgb8", rows.tobytes(), w * 3 + pad, stamp_ns)
    if kind == 6:  # bytes beyond step * height are ignored
        return _raw(w, h, "rgb8", frame.tobytes() + bytes(rng.randint(1, 100)), w * 3, stamp_ns)
    even = frame[:, : max(2, w - w % 2)] if w >= 2 else np.repeat(frame, 2, axis=1)
    return _raw(even.shape[1], h, "yuv422", bytes(even.shape[1] * h * 2), even.shape[1] * 2, stamp_ns)


def _fuzz_sequence(seed: int = 7):
    """N_BAD bad and N_GOOD good frames in random order on a timeline that repeats, jumps back and leaps ahead;
    also the good frames' stamps (ns), the ones the node's clip buffer sees."""
    rng = random.Random(seed)
    kinds = [True] * N_BAD + [False] * N_GOOD
    rng.shuffle(kinds)
    t = rh.T0_NS - 600 * 10**9
    msgs, reasons, good_ns = [], Counter(), []
    for n, bad in enumerate(kinds):
        if bad:
            msg, reason = _bad(rng, t)
            reasons[reason] += 1
        else:
            r = rng.random()
            if r < 0.05:
                t -= rng.randint(1, 3000) * 10**6  # backwards: a bag looping
            elif r < 0.10:
                t += rng.randint(1_100, 10_000) * 10**6  # beyond max_gap_s
            elif r > 0.03 + 0.10:
                t += 10**9 // rh.FPS  # else: the same stamp again
            msg = _odd_good(rng, n, t)
            good_ns.append(t)
        msgs.append(msg)
    return msgs, reasons, good_ns


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return rh.make_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny.pt")


def test_fuzzed_node_survives_counts_bad_frames_and_still_serves(checkpoint, tmp_path):
    from hiera_perception.config import get_config

    from hiera_perception.clip_buffer import ClipBuffer

    msgs, reasons, good_ns = _fuzz_sequence()
    assert sum(reasons.values()) == N_BAD
    n_fresh = 60
    frames = [rh.rgb_frame(i) for i in range(n_fresh)]
    fresh = [rh.image_msg(frames[i], rh.frame_stamp_ns(i)) for i in range(n_fresh)]  # after the fuzz's timeline
    expected = rh.expected_clips(rh.NUM_FRAMES, rh.STRIDE_FRAMES, rh.HOP_FRAMES, n_fresh)
    # The node's clip buffer replayed here on the stamps it gets: its counters are what /diagnostics must report.
    replica = ClipBuffer(rh.NUM_FRAMES, rh.STRIDE_FRAMES / rh.FPS, rh.HOP_FRAMES / rh.FPS, max_gap_s=1.0, frame_size=4)
    for ns in good_ns + [rh.frame_stamp_ns(i) for i in range(n_fresh)]:
        replica.push(ns // 10**9 + (ns % 10**9) * 1e-9, np.zeros((4, 4, 3), np.uint8))  # the node's stamp arithmetic
    counts = replica.counters()

    # Lossless input (reliable, deep queues on both sides), so every frame sent is a frame the node saw.
    depth = len(msgs) + n_fresh
    params = rh.write_params(tmp_path / "params.yaml", rh.node_params(checkpoint, queue_size=64),
                             qos_reliable_depth=depth)
    log = tmp_path / "node.log"
    proc = rh.start_node(["--ros-args", "--params-file", str(params)], rh.ros_env(DOMAIN), log)
    harness = rh.Harness(DOMAIN, depth=depth)
    try:
        harness.wait_connected(proc)
        sent = harness.publish(msgs, rate_hz=None)
        assert harness.spin_until(lambda: harness.last_diagnostics().get("frames_received") == str(sent), 120, proc), (
            harness.last_diagnostics(), log.read_text()[-3000:])
        during = list(harness.features)
        harness.features.clear()
        sent += harness.publish(fresh, rate_hz=None)

        def fresh_done() -> bool:
            return sum(rh.stamp_ns(f.header.stamp) >= rh.T0_NS for f in harness.features) >= len(expected)

        assert harness.spin_until(fresh_done, 60, proc), (len(harness.features), log.read_text()[-3000:])
        assert harness.spin_until(lambda: harness.last_diagnostics().get("frames_received") == str(sent), 20, proc)
        assert proc.poll() is None, "the node died"

        # Whatever the fuzz made of the odd frames is well formed.
        dim = get_config(rh.ARCH).num_features
        for f in during:
            assert (f.num_frames, len(f.embedding), len(f.labels)) == (rh.NUM_FRAMES, dim, rh.TOP_K)
            assert np.isfinite(np.asarray(f.embedding)).all()
        rh.check_features([f for f in harness.features if rh.stamp_ns(f.header.stamp) >= rh.T0_NS],
                          expected, frames, checkpoint, rh.FRAME_ID)

        diag = harness.last_diagnostics()
        assert diag["bad_frames"] == str(N_BAD)
        assert {k[len("bad_frames."):]: int(v) for k, v in diag.items() if k.startswith("bad_frames.")} == reasons
        assert int(diag["buffer_resets"]) > 0 and int(diag["duplicate_stamps"]) > 0
        assert [diag[k] for k in ("buffer_resets", "duplicate_stamps", "early_clip_misses")] == [
            str(counts[k]) for k in ("resets", "duplicates", "early_misses")]
        assert any(level == 1 for level, _, _ in harness.diagnostics), "no WARN while bad frames arrived"
    finally:
        harness.close()
        rc = rh.stop(proc)
    text = log.read_text()
    assert rc == 0 and "Traceback" not in text, text[-3000:]
    # Warnings are rate-limited: a handful, not one per bad frame.
    assert 1 <= text.count("bad frame (") < 50, text.count("bad frame (")
