"""Data folders: labels.csv parsing and its errors, timeline sampling of clips, the torch ClipDataset."""

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hiera_perception.dataset import ClipDataset, Item, load_clip, read_labels_csv
from hiera_perception.preprocess import crop_resize
from hiera_perception.synth import ACTIONS, write_dataset
from hiera_perception.video import iter_frames


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """8 tiny clips, one per action: 1 s at 10 fps (stamps 0.0 .. 0.9), 32x40 (H x W)."""
    out = tmp_path_factory.mktemp("data")
    write_dataset(out, 8, seed=0, seconds=1.0, fps=10.0, size=(32, 40), progress=False)
    return out


def all_frames(path):
    return [frame for _, frame in iter_frames(path)]


def test_read_labels_csv(folder):
    items = read_labels_csv(folder)
    assert [it.label for it in items] == list(ACTIONS)
    assert all(isinstance(it, Item) and it.path.is_file() and it.path.parent == folder for it in items)
    assert read_labels_csv(folder / "labels.csv") == items


def test_load_clip_takes_the_last_frame_at_or_before_each_sample_time(folder):
    path = read_labels_csv(folder)[0].path
    frames = all_frames(path)
    assert len(frames) == 10
    clip = load_clip(path, 4, 0.2, start_s=0.1)  # times 0.1, 0.3, 0.5, 0.7 -> frames 1, 3, 5, 7
    assert clip.shape == (4, 32, 40, 3) and clip.dtype == np.uint8
    for got, index in zip(clip, (1, 3, 5, 7)):
        np.testing.assert_array_equal(got, frames[index])
    clip = load_clip(path, 5, 0.05, start_s=0.62)  # 0.62 .. 0.82: frames 6, 6, 7, 7, 8
    for got, index in zip(clip, (6, 6, 7, 7, 8)):
        np.testing.assert_array_equal(got, frames[index])
    clip = load_clip(path, 10, 0.1)  # the whole video, sample times on the stamps
    np.testing.assert_array_equal(clip, np.stack(frames))


def glitched_mjpeg(path: Path, n: int = 30, bad: int = 10) -> list[np.ndarray]:
    """An MJPG .avi of n frames whose frame `bad` has its start zeroed (OpenCV fails on that frame alone, as on a
    camera recording with one damaged frame); returns the frames written."""
    from hiera_perception.dataset import write_video

    rng = np.random.default_rng(3)
    frames = [np.ascontiguousarray(np.repeat(np.repeat(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), 4, 0), 4, 1))
              for _ in range(n)]
    write_video(path, np.stack(frames), 10.0, "MJPG")
    raw = bytearray(path.read_bytes())
    starts = [m.start() for m in re.finditer(b"\xff\xd8\xff", bytes(raw))]
    assert len(starts) == n
    raw[starts[bad] : starts[bad] + 400] = bytes(400)  # its headers and tables: OpenCV fails on it
    path.write_bytes(bytes(raw))
    return frames


def test_one_undecodable_frame_is_skipped_not_taken_for_the_end(tmp_path, caplog):
    """A damaged frame mid-file ended it: `run` called a 3 s video too short, `eval` stopped, `publish` played 10
    frames (and looped over them)."""
    path = tmp_path / "glitch.avi"
    frames = glitched_mjpeg(path)
    from hiera_perception import video

    video.log.addHandler(caplog.handler)  # the package's loggers may not propagate to the root under the ROS tests
    try:
        got = list(iter_frames(path))
    finally:
        video.log.removeHandler(caplog.handler)
    assert [round(t * 10) for t, _ in got] == [i for i in range(30) if i != 10]  # frame 10's stamp is the gap
    for (t, frame) in got:  # the rest exactly, on their own stamps
        assert np.abs(frame.astype(int) - frames[round(t * 10)]).mean() < 8  # MJPG is lossy
    assert "glitch.avi: skipped 1 undecodable frame(s)" in caplog.text
    assert [round(t * 10) for t, f in iter_frames(path, lambda t, nxt: False)] == [i for i in range(30) if i != 10]


def test_iter_frames_skips_what_is_not_wanted_and_keeps_the_rest_exact(folder):
    path = read_labels_csv(folder)[2].path
    frames = all_frames(path)
    seen = []

    def every_third(stamp, next_stamp):
        seen.append((stamp, next_stamp))
        return round(stamp * 10) % 3 == 0

    for i, (stamp, frame) in enumerate(iter_frames(path, every_third)):
        assert stamp == pytest.approx(i / 10) and (frame is None) == (i % 3 != 0)
        if frame is not None:
            np.testing.assert_array_equal(frame, frames[i])
    assert seen == [pytest.approx((i / 10, (i + 1) / 10)) for i in range(10)]  # each frame's stamp and the next one's


def test_load_clip_resizes_and_rejects_short_videos(folder):
    path = read_labels_csv(folder)[1].path
    clip = load_clip(path, 3, 0.1, size=16)
    assert clip.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(clip[2], crop_resize(all_frames(path)[2], 16))
    with pytest.raises(ValueError, match="too short.*needs a frame at 1.000 s"):
        load_clip(path, 11, 0.1)
    with pytest.raises(ValueError, match="frame_stride_s"):
        load_clip(path, 3, 0.0)


def test_write_video_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    import os

    import hiera_perception.dataset as dataset

    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(dataset.os, "fsync", fsync)
    monkeypatch.setattr(dataset.os, "replace", replace)
    path = tmp_path / "v.avi"
    dataset.write_video(path, np.zeros((2, 16, 16, 3), np.uint8), 10.0, "MJPG")
    tmp = calls[0][1]
    assert Path(tmp).parent == tmp_path and Path(tmp).name.startswith(".v.avi.") and tmp.endswith(".tmp.avi")
    assert calls == [("fsync", tmp), ("replace", tmp, str(path)), ("fsync", str(tmp_path))]  # data, then the rename
    assert len(all_frames(path)) == 2


@pytest.mark.parametrize("shape, got", [((2, 25, 32, 3), "[25, 32, 3]"), ((2, 24, 33, 3), "[24, 33, 3]"),
                                        ((0, 16, 16, 3), "no frames"), ((2, 16, 16), "[16, 16]")])
def test_write_video_refuses_what_it_cannot_write_faithfully(tmp_path, shape, got):
    """An odd size came back cropped (25x33 -> 24x32) and no frames made an unreadable file, without a word."""
    from hiera_perception.dataset import write_video

    with pytest.raises(ValueError, match=r"H and W even, got " + re.escape(got)):
        write_video(tmp_path / "v.avi", np.zeros(shape, np.uint8), 10.0, "MJPG")
    assert not list(tmp_path.iterdir())


def test_write_video_streams_frames_and_its_temporary_name_is_its_own(tmp_path):
    """Frames may come from a generator (a long video need not be in memory); a frame unlike the first is refused
    and nothing is left behind. Another writer's temporary file for the same video is not touched (they shared one
    fixed name: two runs into one folder wrote into each other's file)."""
    from hiera_perception.dataset import write_video

    frames = np.random.default_rng(0).integers(0, 256, (5, 16, 24, 3), dtype=np.uint8)
    other = tmp_path / ".v.avi.other.tmp.avi"  # a concurrent writer's, by the same naming rule
    other.write_bytes(b"theirs")
    write_video(tmp_path / "v.avi", (f for f in frames), 10.0, "MJPG")
    assert len(all_frames(tmp_path / "v.avi")) == 5 and other.read_bytes() == b"theirs"
    bad = [frames[0], frames[1][:8]]
    with pytest.raises(ValueError, match=r"every frame must be uint8 \[16, 24, 3\] like the first, got uint8 \[8, 24, 3\]"):
        write_video(tmp_path / "w.avi", iter(bad), 10.0, "MJPG")
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "v.avi"]


def test_bad_csv_errors_name_the_problem(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="labels.csv"):
        read_labels_csv(tmp_path)
    (tmp_path / "labels.csv").write_text("file,label\nclip.mp4,wave\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['path'\]; found \['file', 'label'\]"):
        read_labels_csv(tmp_path)
    video = read_labels_csv(folder)[0].path
    (tmp_path / "labels.csv").write_text(f"path,label\n{video},wave\nmissing.mp4,idle\n")
    with pytest.raises(FileNotFoundError, match="row 2 .*missing.mp4"):
        read_labels_csv(tmp_path)
    (tmp_path / "labels.csv").write_text("path,label\n,wave\n")
    with pytest.raises(ValueError, match="row 1 .*empty path"):
        read_labels_csv(tmp_path)
    (tmp_path / "labels.csv").write_text("path,label\n")
    with pytest.raises(ValueError, match="names no videos"):
        read_labels_csv(tmp_path)


def test_csv_rows_of_empty_cells_are_blank_lines_and_a_non_utf8_file_is_named(tmp_path, folder):
    """Spreadsheets save blank lines as "," (or spaces): those stopped the read with "empty path"."""
    video = read_labels_csv(folder)[0].path
    (tmp_path / "labels.csv").write_text(f"\ufeff path , label \r\n{video}, wave \r\n,\r\n   \r\n , \r\n")
    assert read_labels_csv(tmp_path) == [Item(video, "wave")]
    (tmp_path / "labels.csv").write_text("path,label\n,\n , \n")
    with pytest.raises(ValueError, match="names no videos"):
        read_labels_csv(tmp_path)
    (tmp_path / "labels.csv").write_bytes(f"path,label\n{video},caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"labels.csv is not UTF-8 \(byte \d+: invalid continuation byte\)"):
        read_labels_csv(tmp_path)


def test_clip_dataset_eval(folder):
    ds = ClipDataset(folder, num_frames=4, frame_stride_s=0.2, size=16, clips_per_video=2)
    assert ds.classes == sorted(ACTIONS) and len(ds) == 16
    clip, label = ds[3]  # video 1 (swipe_left), second of two evenly spaced clips
    assert clip.shape == (4, 16, 16, 3) and clip.dtype == torch.uint8
    assert label == ds.classes.index("swipe_left")
    assert ds.labels()[3] == label
    # Span 0.6 s of a video ending at 0.9 s: starts 0.075 and 0.225 -> frames 0,2,4,6 and 2,4,6,8.
    frames = [crop_resize(f, 16) for f in all_frames(ds.items[1].path)]
    np.testing.assert_array_equal(ds[2][0].numpy(), np.stack([frames[i] for i in (0, 2, 4, 6)]))
    np.testing.assert_array_equal(clip.numpy(), np.stack([frames[i] for i in (2, 4, 6, 8)]))
    np.testing.assert_array_equal(ds[3][0], clip)  # eval is deterministic


def test_clip_dataset_train_draws_random_starts(folder):
    ds = ClipDataset(folder, num_frames=3, frame_stride_s=0.1, size=8, train=True)
    torch.manual_seed(0)
    first = [ds[0][0] for _ in range(6)]
    torch.manual_seed(0)
    again = [ds[0][0] for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # reproducible from torch's generator
    assert len({bytes(c.numpy()) for c in first}) > 1  # but not always the same start


@pytest.mark.parametrize("train", [True, False])
def test_clip_dataset_cache_frames_gives_the_same_clips_and_decodes_each_video_once(folder, monkeypatch, train):
    """Stride 0.13 s against frames every 0.1 s: samples fall between stamps, so the cached path must take the
    same last-frame-at-or-before as load_clip does while streaming."""
    import hiera_perception.dataset as dataset

    kw = dict(num_frames=3, frame_stride_s=0.13, size=12, clips_per_video=2, train=train)
    plain, cached = ClipDataset(folder, **kw), ClipDataset(folder, **kw, cache_frames=True)
    keys = [(seed, i) for seed in range(3) for i in range(len(plain))]

    def draw(ds):
        out = []
        for seed, i in keys:
            torch.manual_seed(1000 * seed + i)
            out.append(ds[i])
        return out

    expected = draw(plain)
    reads = []
    real = dataset.iter_frames
    monkeypatch.setattr(dataset, "iter_frames", lambda path, *a: reads.append(path) or real(path, *a))
    got = draw(cached)
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(expected, got))
    assert len({bytes(c.numpy()) for c, _ in got}) > len(plain) // 2  # not one clip over and over
    assert sorted(reads) == sorted(it.path for it in plain.items)  # each video decoded once, 48 clips served
    assert cached.cached_bytes == 8 * 10 * 12 * 12 * 3 and plain.cached_bytes == 0  # 8 videos x 10 frames


def test_clip_dataset_cache_frames_warns_when_it_will_outgrow_free_memory(folder, monkeypatch, caplog):
    import hiera_perception.dataset as dataset

    need = 8 * 10 * 12 * 12 * 3  # 8 videos x 10 frames of 12 x 12 x 3, judged from the first video
    logger = logging.getLogger(dataset.__name__)  # the launch_testing plugin turns propagation off
    for free, warned in ((need, True), (2 * need, False)):
        monkeypatch.setattr(dataset, "_available_memory", lambda: free)
        caplog.clear()
        logger.addHandler(caplog.handler)
        try:
            with caplog.at_level("INFO", logger=dataset.__name__):
                ds = ClipDataset(folder, num_frames=3, frame_stride_s=0.1, size=12, cache_frames=True)
                ds[0], ds[1]
        finally:
            logger.removeHandler(caplog.handler)
        assert f"about {need / 2**30:.2f} GiB for 8 videos" in caplog.text  # said once, at the first video
        assert caplog.text.count("frame cache") == 1 + warned
        assert ("more than 80% of the" in caplog.text) == warned


@pytest.mark.parametrize("cache_frames", [False, True])
def test_a_truncated_video_gives_clips_within_the_frames_it_has(tmp_path, caplog, cache_frames):
    """A recording cut short keeps its header's frame count (20 here) while fewer frames decode: clips placed by
    the header failed as "too short" wherever a start fell late (mid-epoch, in training)."""
    import hiera_perception.dataset as dataset
    from hiera_perception.dataset import video_last_stamp, write_labels_csv, write_video

    frames = np.random.default_rng(0).integers(0, 256, (20, 64, 64, 3), dtype=np.uint8)  # frames outweigh the header
    full = write_video(tmp_path / "full.avi", frames, 10.0, "MJPG")
    data = full.read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) // 2])
    full.unlink()
    write_labels_csv(tmp_path, [("cut.avi", "wave")])
    decoded = all_frames(tmp_path / "cut.avi")
    assert video_last_stamp(tmp_path / "cut.avi") == pytest.approx(1.9) and 4 <= len(decoded) < 13
    ds = ClipDataset(tmp_path, num_frames=4, frame_stride_s=0.2, size=16, cache_frames=cache_frames)
    logger = logging.getLogger(dataset.__name__)  # the launch_testing plugin turns propagation off
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING", logger=dataset.__name__):
            clip, label = ds[0]
    finally:
        logger.removeHandler(caplog.handler)
    end = (len(decoded) - 1) / 10
    start = (end - 0.6) / 2  # the middle of the frames there are
    np.testing.assert_array_equal(clip.numpy(), load_clip(tmp_path / "cut.avi", 4, 0.2, start, size=16))
    assert label == 0 and f"last frame is at 1.900 s, but its frames end at {end:.3f} s" in caplog.text
    np.testing.assert_array_equal(ds[0][0], clip)  # later clips are placed alike


def test_clip_dataset_classes_unlabeled_and_too_short(tmp_path, folder):
    unlabeled = tmp_path / "u"
    write_dataset(unlabeled, 2, seed=1, seconds=0.3, fps=10.0, size=(16, 16), unlabeled=True, progress=False)
    ds = ClipDataset(unlabeled, num_frames=2, frame_stride_s=0.1, size=8, classes=["a", "b"])
    assert ds.classes == ["a", "b"] and ds[1][1] == -1
    with pytest.raises(ValueError, match="too short|shorter than a clip"):
        ClipDataset(unlabeled, num_frames=4, frame_stride_s=0.1, size=8)[0]
    with pytest.raises(ValueError, match="not among the classes"):
        ClipDataset(folder, num_frames=2, frame_stride_s=0.1, size=8, classes=["wave"])
