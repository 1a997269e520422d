"""The synthetic action world: determinism, shapes, shifts, motion that only time reveals, the CLI."""

import csv
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from hiera_perception import cli
from hiera_perception.synth import ACTIONS, SHIFTS, SyntheticCamera, _Scene, render_clip, write_dataset
from hiera_perception.video import iter_frames

SIZE = (24, 32)  # (H, W): tiny and not square


def rng(*key):
    return np.random.default_rng(list(key))


def test_action_and_shift_names():
    assert ACTIONS == (
        "wave", "swipe_left", "swipe_right", "swipe_up", "swipe_down", "approach", "circle", "idle",
    )  # fmt: skip
    assert {"none", "lighting", "blur", "noise", "color_cast", "background"} <= set(SHIFTS)


def test_same_seed_same_frames_other_seed_differs():
    a = render_clip("wave", rng(7, 3), 6, SIZE)
    b = render_clip("wave", rng(7, 3), 6, SIZE)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, render_clip("wave", rng(8, 3), 6, SIZE))
    assert not np.array_equal(a, render_clip("wave", rng(7, 4), 6, SIZE))


@pytest.mark.parametrize("action", ACTIONS)
def test_every_action_renders_rgb_uint8(action):
    clip = render_clip(action, rng(0, 1), 5, SIZE, fps=15.0)
    assert clip.shape == (5, 24, 32, 3) and clip.dtype == np.uint8
    assert clip.std() > 5  # a scene, not a blank frame


@pytest.mark.parametrize("shift", [s for s in SHIFTS if s != "none"])
def test_every_shift_changes_pixels_and_keeps_shape(shift):
    clean = render_clip("circle", rng(2, 5), 4, (40, 40))
    shifted = render_clip("circle", rng(2, 5), 4, (40, 40), shift=shift)
    assert shifted.shape == clean.shape and shifted.dtype == np.uint8
    assert not np.array_equal(shifted, clean)


def _sharpness(clip):
    return np.mean([cv2.Laplacian(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), cv2.CV_32F).var() for f in clip])


@pytest.mark.parametrize("seed", range(4))
def test_shifts_are_strong(seed):
    # Strong, not cosmetic: each shift moves its own statistic a long way from the clean clip's.
    def clip(shift):
        return render_clip("wave", rng(6, seed), 3, (64, 64), shift=shift).astype(np.float32)

    clean = clip("none")
    assert abs(clip("lighting").mean() - clean.mean()) > 25 or abs(clip("lighting").std() - clean.std()) > 15
    assert (clip("noise") - clean).std() > 20
    # (sensor noise comes after the optics and keeps some Laplacian energy: not below 0.5 for every seed)
    assert _sharpness(clip("blur").astype(np.uint8)) < 0.7 * _sharpness(clean.astype(np.uint8))
    cast = clip("color_cast").mean((0, 1, 2)) / np.maximum(clean.mean((0, 1, 2)), 1)
    assert cast.max() / cast.min() > 1.4
    assert np.abs(clip("background") - clean).mean() > 20


def test_shift_keeps_the_motion():
    # A shift draws from its own generator: the actor moves exactly as in the clean clip.
    clean, shifted = _Scene("wave", rng(4, 0), (32, 32)), _Scene("wave", rng(4, 0), (32, 32), "noise")
    t = np.linspace(0, 2, 9)
    for a, b in zip(clean.pose(t), shifted.pose(t)):
        np.testing.assert_array_equal(a, b)


def test_bad_names_are_rejected_with_the_valid_options():
    with pytest.raises(ValueError, match="swipe_left"):
        render_clip("jump", rng(0, 0), 2, SIZE)
    with pytest.raises(ValueError, match="color_cast"):
        render_clip("wave", rng(0, 0), 2, SIZE, shift="fog")


def test_moving_actions_change_more_over_time_than_idle():
    # Same generator -> same scene (background, actor, shake, noise); only the motion differs.
    def motion(clip):
        return np.abs(np.diff(clip.astype(np.float32), axis=0)).mean()

    ratios = []
    for seed in range(6):
        idle = motion(render_clip("idle", rng(1, seed), 12, (48, 48), fps=15.0))
        wave = motion(render_clip("wave", rng(1, seed), 12, (48, 48), fps=15.0))
        assert wave > idle
        ratios.append(wave / idle)
    assert np.mean(ratios) > 1.2


def _poses(action, seeds=range(16), t=np.arange(60) / 30):
    return [_Scene(action, rng(3, s), (64, 64)).pose(t) for s in seeds]


def test_trajectories_carry_the_class():
    for x, _, _, _, _ in _poses("swipe_left"):
        assert np.mean(np.diff(x) < 0) > 0.9  # leftwards, but for the wrap-around jumps
    for x, _, _, _, _ in _poses("swipe_right"):
        assert np.mean(np.diff(x) > 0) > 0.9
    for _, y, _, _, _ in _poses("swipe_up"):
        assert np.mean(np.diff(y) < 0) > 0.9  # image y points down
    for _, y, _, _, _ in _poses("swipe_down"):
        assert np.mean(np.diff(y) > 0) > 0.9
    for _, _, ls, _, _ in _poses("approach"):
        assert np.mean(np.diff(ls) > 0) > 0.95  # growing, but for the (faded out) restarts
    senses = []
    for x, y, _, _, _ in _poses("circle"):
        dx, dy = x - x.mean(), y - y.mean()
        area = np.sum(dx[:-1] * dy[1:] - dx[1:] * dy[:-1])  # > 0 is clockwise on screen (y down)
        senses.append(np.sign(area))
        assert abs(area) > 0.5 * np.pi * np.std(dx) * np.std(dy)  # a loop, not a line
    assert set(senses) == {-1, 1}  # either sense, one class
    for x, _, _, _, _ in _poses("wave"):
        assert np.sum(np.diff(np.sign(np.diff(x))) != 0) >= 2  # turns back at least twice in 2 s
    for x, y, ls, _, _ in _poses("idle"):
        assert np.ptp(x) < 5 and np.ptp(y) < 5 and np.ptp(ls) < 0.1  # jitters (64 px frame), goes nowhere


@pytest.mark.parametrize("action", ACTIONS)
def test_the_motion_is_the_same_at_every_resolution(action):
    # A 480 px camera must not see an idle actor sway 4x further in angle and scale than the 128 px training data
    # (the jitter's angle and scale terms once grew with the frame's side): positions scale, angles do not.
    t = np.linspace(0, 2, 61)
    small, big = (_Scene(action, rng(4, 1), size).pose(t) for size in ((128, 128), (480, 640)))
    side_s, side_b, off_b = 128, 480, np.array([80, 0])
    for a, b, off in ((small[0], big[0], off_b[0]), (small[1], big[1], off_b[1])):  # x, y: relative to the square
        np.testing.assert_allclose(a / side_s, (b - off) / side_b, atol=1e-9)
    for a, b in zip(small[2:], big[2:]):  # log scale, angle, opacity
        np.testing.assert_allclose(a, b, atol=1e-9)


@pytest.mark.parametrize("duration", [0.7, 2.0])
def test_a_clip_shows_one_direction_only(duration):
    # A scene of known duration fits inside one pass: no wrap, no restart, no fade, whatever the seed.
    t = np.arange(round(duration * 30)) / 30
    for s in range(40):
        sl, sr, su, sd, ap = (_Scene(a, rng(9, s), (64, 80), duration=duration).pose(t)
                              for a in ("swipe_left", "swipe_right", "swipe_up", "swipe_down", "approach"))
        assert np.all(np.diff(sl[0]) < 1.5) and np.mean(np.diff(sl[0]) < 0) > 0.8  # jitter aside, leftwards
        assert np.all(np.diff(sr[0]) > -1.5) and np.mean(np.diff(sr[0]) > 0) > 0.8
        assert np.all(np.diff(su[1]) < 1.5) and np.mean(np.diff(su[1]) < 0) > 0.8
        assert np.all(np.diff(sd[1]) > -1.5) and np.mean(np.diff(sd[1]) > 0) > 0.8
        assert np.all(np.diff(ap[2]) > 0) and np.all(ap[4] == 1.0)


def test_one_frame_does_not_tell_the_class():
    # Single-frame statistics match: scale for approach and a still actor, position for the swipes.
    seeds = range(40)
    app, still = (np.concatenate([p[2] for p in _poses(a, seeds)]) for a in ("approach", "wave"))
    # A still actor draws its one size per clip from the sweep's range: equal up to sampling noise of 40 clips.
    assert abs(app.mean() - still.mean()) < 0.25 * app.std() and abs(still.std() / app.std() - 1) < 0.15
    # slow passes: a 2 s window samples few places of one, so more clips to average the positions
    left, right = (np.concatenate([p[0] for p in _poses(a, range(160))]) / 64 for a in ("swipe_left", "swipe_right"))
    assert abs(left.mean() - right.mean()) < 0.03 and abs(left.std() - right.std()) < 0.03
    up, down = (np.concatenate([p[1] for p in _poses(a, range(160))]) / 64 for a in ("swipe_up", "swipe_down"))
    assert abs(up.mean() - down.mean()) < 0.03 and abs(up.std() - down.std()) < 0.03


def test_camera_stream_is_deterministic_and_switches_actions():
    def take(seed, n=24):
        cam = SyntheticCamera(seed=seed, size=(24, 32), fps=10.0, segment_s=(0.5, 0.8))
        return zip(*[cam.next_frame() for _ in range(n)])

    actions, frames = take(3)
    actions2, frames2 = take(3)
    assert actions == actions2 and all(np.array_equal(a, b) for a, b in zip(frames, frames2))
    assert frames[0].shape == (24, 32, 3) and frames[0].dtype == np.uint8
    segments = [a for i, a in enumerate(actions) if i == 0 or a != actions[i - 1]]
    assert len(segments) >= 3 and set(segments) <= set(ACTIONS)
    _, other = take(4)
    assert not np.array_equal(frames[0], other[0])
    # Skipping frames (a late publisher) lands on the same action and motion as rendering them all.
    every, skipping = (SyntheticCamera(seed=3, size=(24, 32), fps=10.0, segment_s=(0.5, 0.8)) for _ in range(2))
    for _ in range(21):
        every.next_frame()
    skipping.frame_index = 20
    action, frame = skipping.next_frame()
    assert action == actions[20]
    t = np.linspace(0, 1, 5)
    for a, b in zip(every._scene.pose(t), skipping._scene.pose(t)):
        np.testing.assert_array_equal(a, b)
    assert np.abs(frame.astype(int) - frames[20].astype(int)).mean() < 12  # only the sensor noise differs


def test_camera_segments_end_on_whole_passes():
    # A swipe segment is a whole number of passes (several when the drawn length holds them: the wrap between
    # two passes of one direction keeps the direction); a looming segment is one sweep, as its restart would
    # show a shrinking actor. So no clip the demo scores shows a half pass or a restart.
    cam = SyntheticCamera(seed=5, size=(48, 64), fps=30.0, segment_s=(5.0, 9.0),
                          actions=("swipe_left", "swipe_up", "approach", "wave"))
    seen, passes = {}, []
    for _ in range(12):
        cam._next_segment()
        n = cam._segment_end - cam._segment_start
        x, y, ls, _, opacity = cam._scene.pose(np.arange(n) / cam.fps)
        seen.setdefault(cam.action, []).append(n / cam.fps)
        if cam.action.startswith("swipe"):
            pos = x if cam.action == "swipe_left" else y
            k = round(n / cam.fps / cam._scene.swipe[0])
            passes.append(k)
            assert k >= 1 and abs(n / cam.fps - k * cam._scene.swipe[0]) <= 1 / cam.fps
            assert np.mean(np.diff(pos) < 0) > 0.8
            assert np.sum(np.diff(pos) >= 1.5) == k - 1, "a wrap only between two passes"
        elif cam.action == "approach":
            assert np.all(opacity == 1.0) and np.all(np.diff(ls) > 0)
            assert n / cam.fps <= cam._scene.one_pass_s + 1 / cam.fps
    assert set(seen) == {"swipe_left", "swipe_up", "approach", "wave"}
    assert max(passes) >= 2 and max(seen["approach"]) < 3.3 and min(seen["wave"]) >= 5.0


def test_cli_writes_a_balanced_data_folder(tmp_path):
    out = tmp_path / "data"
    argv = ["synth", "--out", str(out), "--clips", "16", "--seed", "1", "--seconds", "0.5", "--fps", "10",
            "--size", "40x32", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    with open(out / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16
    assert sorted(r["label"] for r in rows) == sorted(ACTIONS * 2)
    stamps, frames = zip(*iter_frames(out / rows[0]["path"]))
    assert len(frames) == 5 and frames[0].shape == (32, 40, 3)
    assert stamps[1] == pytest.approx(0.1)
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_an_interrupted_rerun_leaves_no_labels_naming_a_mix_of_runs(tmp_path, monkeypatch):
    from hiera_perception import dataset

    out = tmp_path / "data"
    common = ["synth", "--out", str(out), "--clips", "3", "--seconds", "0.3", "--fps", "10", "--size", "32",
              "--no-progress"]
    assert cli.main([*common, "--seed", "1"]) == 0
    real, written = dataset.write_video, []

    def dies_on_the_second(path, *args, **kwargs):
        if written:
            raise KeyboardInterrupt
        written.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dataset, "write_video", dies_on_the_second)
    assert cli.main([*common, "--seed", "2"]) == 130  # Ctrl-C
    # the old set is gone and the new one unfinished: no labels.csv may vouch for that folder
    assert written and not (out / "labels.csv").exists()
    assert sorted(p.name for p in out.iterdir()) == [Path(written[0]).name]


def test_cli_unlabeled_and_shifted_reproduces_the_clip(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--clips", "2", "--seed", "5", "--seconds", "0.3", "--fps", "10", "--size", "32", "--no-progress"]
    assert cli.main(["synth", "--out", str(a), "--unlabeled", "--shift", "blur", *common]) == 0
    assert cli.main(["synth", "--out", str(b), "--unlabeled", "--shift", "blur", *common]) == 0
    with open(a / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["", ""]
    for row in rows:  # the same seed writes the same video
        assert (a / row["path"]).read_bytes() == (b / row["path"]).read_bytes()
    first = [f for _, f in iter_frames(a / rows[0]["path"])]
    direct = render_clip(ACTIONS[0], rng(5, 0), 3, (32, 32), fps=10.0, shift="blur")
    # mp4 is lossy: the decoded clip is close to the rendered one, not equal.
    assert np.abs(np.stack(first).astype(int) - direct.astype(int)).mean() < 12


def test_cli_rejects_a_bad_size(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["synth", "--out", str(tmp_path), "--clips", "1", "--size", "4x4"])


def test_an_existing_data_set_is_replaced_whole(tmp_path):
    # a second, smaller synth into the same folder rewrote labels.csv for its own clips and left the first run's
    # others beside it; the set is replaced whole (a loop over seeds or shifts into one folder must keep working)
    out = tmp_path / "set"
    base = ["synth", "--out", str(out), "--seconds", "0.2", "--fps", "10", "--size", "32", "--no-progress"]
    assert cli.main(base + ["--clips", "3"]) == 0
    first = sorted(p.name for p in out.iterdir())
    (out / "notes.txt").write_text("mine")
    assert cli.main(base + ["--clips", "1", "--seed", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["labels.csv", "notes.txt", first[0]])


def test_infinite_rates_and_durations_are_refused(tmp_path, capsys):
    for option in (["--fps", "inf"], ["--seconds", "inf"], ["--fps", "nan"]):
        assert cli.main(["synth", "--out", str(tmp_path / "x"), "--clips", "1", "--no-progress", *option]) == 1
        assert "must be finite numbers > 0" in capsys.readouterr().err
    for kwargs in ({"fps": math.inf}, {"segment_s": (1.0, math.inf)}):
        with pytest.raises(ValueError, match="finite fps > 0"):
            SyntheticCamera(**kwargs)


def test_an_odd_size_is_refused_before_anything_is_written(tmp_path, capsys):
    """OpenCV's video writers drop an odd size's last row and column: 33x25 came out 32x24, silently."""
    out = tmp_path / "odd"
    assert cli.main(["synth", "--out", str(out), "--clips", "1", "--seconds", "0.2", "--fps", "10",
                     "--size", "33x25", "--no-progress"]) == 1
    assert "must be even" in capsys.readouterr().err and not out.exists()


def test_camera_mostly_keeps_the_scene_across_a_change_of_action():
    # Two in three changes happen in the same room with the same actor, who starts the new action where the old
    # one left it (when that is inside the view); the rest cut to a new scene. Both kinds must occur.
    cam = SyntheticCamera(seed=2, size=(48, 64), fps=30.0, actions=("wave", "circle", "idle", "approach"))
    kept = cut = moved = 0
    prev = None
    for _ in range(30):
        cam._next_segment()
        scene = cam._scene
        if prev is not None:
            same = scene.bg is prev[0].bg
            kept, cut = kept + same, cut + (not same)
            if same:
                assert scene.sprite is prev[0].sprite and scene.gamma == prev[0].gamma
                x, y, *_ = prev[0].pose(np.array([prev[1]]))
                inside = 16 + 0.2 * 48 <= x[0] <= 16 + 0.8 * 48 and 0.2 * 48 <= y[0] <= 0.8 * 48
                assert not inside or (scene.cx, scene.cy) == (float(x[0]), float(y[0]))
                moved += inside
        prev = (scene, (cam._segment_end - cam._segment_start) / cam.fps)
    assert kept > cut > 0 and moved > 0


@pytest.mark.parametrize("shift", SHIFTS)
def test_pieces_are_the_pixels_of_the_whole_clip(shift):
    """A long clip is rendered and written piece by piece: the pieces are exactly the clip rendered at once (the
    noise stream included), whatever their length."""
    whole = render_clip("circle", np.random.default_rng([4, 2]), 50, (48, 64), 25.0, shift)
    scene = _Scene("circle", np.random.default_rng([4, 2]), (48, 64), shift, duration=50 / 25.0)
    pieces = list(scene.frames(np.arange(50) / 25.0, chunk=7))
    assert [len(p) for p in pieces] == [7] * 7 + [1]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)


def test_a_long_clip_is_written_in_bounded_memory(tmp_path):
    """`synth --seconds 600` held the whole clip in memory as float32 (about 3.5 GB at 128 px) before writing it."""
    import tracemalloc

    tracemalloc.start()
    try:
        write_dataset(tmp_path, clips=1, seed=0, seconds=30.0, fps=30.0, size=(64, 64), progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    whole = 900 * 64 * 64 * 3 * 4  # the clip as float32: 44 MB
    assert peak < whole / 3, f"peak {peak / 2**20:.1f} MiB"  # about 6 MiB: a piece of 32 frames and the scene
    assert sum(1 for _ in iter_frames(next(tmp_path.glob("clip_000000.*")))) == 900
