"""`hiera-perception run`: labels (and embeddings) per clip of a video file, through the node's clip sampling.

The expected clips are computed here from the sampling rule alone (DESIGN.md, clip_buffer.py): clip k
samples times k * hop + i * stride from the first frame, each taking the newest frame at or before it,
and exists once the video has a frame at or after its last sample time.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from hiera_perception import cli
from hiera_perception.checkpoint import save_checkpoint
from hiera_perception.clip_buffer import EARLY_MARGIN
from hiera_perception.config import get_config
from hiera_perception.dataset import load_clip, video_format, write_video
from hiera_perception.engine import Engine
from hiera_perception.model import Hiera
from hiera_perception.video import video_fps

TINY = "hiera_tiny_8x64"
LABELS = ["wave", "idle", "approach", "recede"]
FPS = 15.0
T = 8
TOL = 1e-6  # the clip buffer's stamp tolerance


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    model = Hiera(get_config(TINY, num_classes=len(LABELS))).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.head.projection.weight, std=0.5)
    path = tmp_path_factory.mktemp("model") / "runner.pt"
    # trained at every 2nd frame of a 15 fps camera
    return save_checkpoint(path, model, labels=LABELS, model_id="runner", version=2,
                           extra={"sampling": {"frame_stride_s": 2 / FPS}})


def make_video(folder, frames: int, h: int = 60, w: int = 80, seed: int = 0):
    rng = np.random.default_rng(seed)
    # flat colours per frame (they survive lossy codecs), so every frame is a different picture
    video = np.repeat(rng.integers(0, 256, size=(frames, 1, 1, 3), dtype=np.uint8), h, axis=1).repeat(w, axis=2)
    return write_video(folder / f"clip{video_format()[0]}", video, FPS)


def expected_clips(n_frames: int, fps: float, stride: float, hop: float) -> list[tuple[float, float, float]]:
    """(sample start, first picked stamp, last picked stamp) of every clip a video of n_frames gives."""
    stamps = [i / fps for i in range(n_frames)]
    out = []
    k = 0
    while k * hop + (T - 1) * stride <= stamps[-1] + TOL:
        picked = [max(s for s in stamps if s <= k * hop + i * stride + TOL) for i in range(T)]
        out.append((k * hop, picked[0], picked[-1]))
        k += 1
    return out


def run_json(capsys, args: list[str]) -> list[dict]:
    assert cli.main(["run", *args, "--json", "--device", "cpu"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_json_clips_follow_the_models_sampling(tmp_path, capsys, model_file):
    video = make_video(tmp_path, 40)
    assert video_fps(video) == FPS
    # 4 clips, default --batch 4: the last batch ends exactly on the last clip
    rows = run_json(capsys, ["--model", str(model_file), "--video", str(video), "--top-k", "3"])
    stride = 2 / FPS
    hop = T / 2 * stride  # default: half a clip
    expected = expected_clips(40, FPS, stride, hop)
    # by hand: clips start every 8 frames and span 14, the last frame is 39 -> starts at frames 0, 8, 16, 24
    assert [round(e[1] * FPS) for e in expected] == [0, 8, 16, 24]
    assert len(rows) == len(expected)
    for n, (row, (_, start, end)) in enumerate(zip(rows, expected), 1):
        assert row["clip"] == n
        assert row["start"] == pytest.approx(start, abs=1e-4) and row["end"] == pytest.approx(end, abs=1e-4)
        assert len(row["labels"]) == len(row["scores"]) == 3 and set(row["labels"]) <= set(LABELS)
        assert row["scores"] == sorted(row["scores"], reverse=True) and 0 < sum(row["scores"]) <= 1.0 + 1e-4
        assert len(row["embedding"]) == 256
        assert row["encoder_version"] == "runner@2"

    # the very clips a data folder would give (same decoder, same sampling) -> the same embeddings
    engine = Engine(str(model_file), device="cpu", top_k=3)
    for row, (t0, _, _) in zip(rows, expected):
        res = engine.infer([list(load_clip(video, T, stride, t0, size=64))])[0]
        assert np.allclose(res.embedding, row["embedding"], atol=1e-5)
        assert res.labels == row["labels"]


def test_explicit_stride_and_hop_sample_and_hold(tmp_path, capsys, model_file):
    video = make_video(tmp_path, 31, h=90, w=60, seed=1)  # portrait frames, 2 s
    stride, hop = 0.1, 0.25  # sample times fall between 15 fps frames: each takes the frame before
    rows = run_json(capsys, ["--model", str(model_file), "--video", str(video), "--frame-stride", str(stride),
                             "--hop", str(hop), "--top-k", "2", "--batch", "3"])
    expected = expected_clips(31, FPS, stride, hop)
    assert len(expected) == 6  # the last sample k * 0.25 + 0.7 must be <= 2.0 s (frame 30): k = 0 .. 5
    assert [round(e[1] * FPS) for e in expected] == [0, 3, 7, 11, 15, 18]  # frames at or before k * 0.25 s
    assert len(rows) == len(expected)
    for row, (_, start, end) in zip(rows, expected):
        assert row["start"] == pytest.approx(start, abs=1e-4) and row["end"] == pytest.approx(end, abs=1e-4)
        assert len(row["labels"]) == 2 and len(row["embedding"]) == 256


def test_clips_go_to_the_model_batch_by_batch_however_many_one_frame_completes(tmp_path, capsys, model_file,
                                                                                monkeypatch):
    """A hop far below the frame interval makes one frame complete many clips: they all went to the model at once,
    whatever --batch said."""
    from hiera_perception.engine import Engine

    video = make_video(tmp_path, 31, seed=2)
    sizes, real = [], Engine.infer

    def infer(self, clips):
        sizes.append(len(clips))
        return real(self, clips)

    monkeypatch.setattr(Engine, "infer", infer)
    rows = run_json(capsys, ["--model", str(model_file), "--video", str(video), "--hop", "0.01", "--batch", "4"])
    assert len(rows) == sum(sizes) > 4 * 15 and max(sizes) == 4  # ~6.7 clips a frame at 15 fps, 4 at a time
    assert [r["clip"] for r in rows] == list(range(1, len(rows) + 1))


def test_text_mode_prints_one_line_per_clip(tmp_path, capsys, model_file):
    video = make_video(tmp_path, 40, seed=2)
    assert cli.main(["run", "--model", str(model_file), "--video", str(video), "--device", "cpu", "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = expected_clips(40, FPS, 2 / FPS, 8 / FPS)
    assert len(lines) == len(expected)
    pattern = re.compile(r"^\s*(\d+\.\d\d)-\s*(\d+\.\d\d)s  (\w+) (\d\.\d\d), (\w+) (\d\.\d\d)$")
    for line, (_, start, end) in zip(lines, expected):
        m = pattern.match(line)
        assert m, line
        assert float(m[1]) == pytest.approx(start, abs=0.006) and float(m[2]) == pytest.approx(end, abs=0.006)
        assert {m[3], m[5]} <= set(LABELS) and float(m[4]) >= float(m[6])


def test_a_timelapse_slower_than_one_frame_a_second_gives_its_clips(tmp_path, capsys, model_file):
    # 2 s between frames is the file's rhythm, not a gap: every frame used to reset the clip buffer ("too short")
    rng = np.random.default_rng(3)
    video = np.repeat(rng.integers(0, 256, size=(5, 1, 1, 3), dtype=np.uint8), 60, axis=1).repeat(80, axis=2)
    path = write_video(tmp_path / f"slow{video_format()[0]}", video, 0.5)
    assert video_fps(path) == pytest.approx(0.5)
    rows = run_json(capsys, ["--model", str(model_file), "--video", str(path)])
    # Clips every 8/15 s, 14/15 s long, each frame held until the next: as live, a clip whose last sample falls
    # in the first 3/4 of a frame interval after the last frame (8 s) goes out with it (5 frames are too few to
    # narrow the margin from a quarter interval), so k * 8/15 + 14/15 < 8 + 0.75 * 2: k = 0 .. 16
    stamps = [0.0, 2.0, 4.0, 6.0, 8.0]
    assert len(rows) == 17
    for k, row in enumerate(rows):
        first, last = k * 8 / FPS, k * 8 / FPS + 14 / FPS
        assert row["start"] == pytest.approx(max(s for s in stamps if s <= first + TOL), abs=1e-4)
        assert row["end"] == pytest.approx(max(s for s in stamps if s <= last + TOL), abs=1e-4)
    assert 16 * 8 / FPS + 14 / FPS < 8 + (1 - EARLY_MARGIN[1]) * 2 < 17 * 8 / FPS + 14 / FPS


def test_too_short_video_returns_1(tmp_path, capsys, model_file):
    video = make_video(tmp_path, 10)  # 0.6 s; a clip spans 14 frames (0.93 s)
    assert cli.main(["run", "--model", str(model_file), "--video", str(video), "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "too short for one clip of 8 frames" in captured.err


def test_bad_input_is_one_line_on_stderr_and_exit_1(tmp_path, capsys, model_file):
    """A user's mistake gets `hiera-perception CMD: what is wrong`, not a traceback; -v shows the traceback."""
    video = make_video(tmp_path, 30)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"not a video at all")
    cases = [
        (["--video", str(tmp_path / "missing.mp4")], "video file not found"),
        (["--video", str(corrupt)], "OpenCV cannot open video"),
        (["--video", str(video), "--model", str(tmp_path / "none.pt")], "is neither a file"),
        (["--video", str(video), "--frame-stride", "0"], "--frame-stride must be at least 0.001 s, got 0.0"),
        (["--video", str(video), "--hop", "-1"], "--hop must be at least 0.001 s, got -1.0"),
        (["--video", str(video), "--hop", "1e-9"], "--hop must be at least 0.001 s, got 1e-09"),  # asked for TB
        (["--video", str(video), "--batch", "0"], "--batch must be >= 1, got 0"),
        (["--video", str(video), "--top-k", "0"], "top_k must be >= 1"),
    ]
    for args, message in cases:
        model = [] if "--model" in args else ["--model", str(model_file)]
        assert cli.main(["run", *model, *args, "--device", "cpu"]) == 1, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("hiera-perception run: ") and message in err[-1], (args, err)
        assert not any("Traceback" in line for line in err)
    with pytest.raises(FileNotFoundError):
        cli.main(["-v", "run", "--video", str(tmp_path / "missing.mp4"), "--device", "cpu"])


def test_verbose_flag_before_bench_reaches_the_benchmarks(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["-v", "bench", "--help"])
    assert e.value.code == 0 and "engine" in capsys.readouterr().out


def test_bench_errors_are_one_line(tmp_path, capsys):
    """A bad config, model, repeat count or results file printed a traceback (an IndexError for --repeats 0, a
    TypeError for an engine run too short for one clip)."""
    cases = [(["encoder", "--configs", "nope"], "python -m benchmarks encoder: unknown model config 'nope'"),
             (["engine", "--seconds", "0.1", "--out", str(tmp_path)],
              "python -m benchmarks engine: no clip completed in --seconds 0.1 at --fps 30")]
    (tmp_path / "broken.json").write_text("{x")
    cases.append((["report", "--results", str(tmp_path)], f"python -m benchmarks report: {tmp_path / 'broken.json'}: "
                                                           "not a results file"))
    for argv, line in cases:
        assert cli.main(["bench", *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith(line) and "Traceback" not in err, err
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "encoder", "--repeats", "0"])
    assert e.value.code == 2 and "--repeats: must be >= 1, got 0" in capsys.readouterr().err
    assert not list(tmp_path.glob("engine_*"))  # no results file for a run that timed nothing
