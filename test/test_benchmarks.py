"""The benchmark entry point runs and writes what the README table is rendered from (speed is not asserted)."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def test_engine_benchmark_writes_latency_and_memory(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks", "engine", "--model", "hiera_tiny_8x64", "--seconds", "4",
           "--width", "160", "--height", "120", "--out", str(tmp_path), "--name", "engine_test", "--compile"]
    subprocess.run(cmd, cwd=REPO, check=True, timeout=300, capture_output=True)
    res = json.loads((tmp_path / "engine_test.json").read_text())
    assert res["frames"] == 120 and res["clips"] > 0 and res["machine"]["cores"] >= 1
    assert res["compile"] is False and res["table"]["rows"][0][3] == "eager"  # on CPU the Engine compiles nothing
    lat = res["latency"]
    assert 0 < lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"]
    mem = res["memory"]
    assert mem["samples"] >= 3 and 0 < mem["rss_start_mb"] <= mem["rss_peak_mb"]
    assert mem["rss_max_sampled_mb"] <= mem["rss_peak_mb"] + 1  # the kernel's high-water mark bounds the samples
    assert isinstance(mem["rss_growth_mb_per_min"], float)
    assert len(res["table"]["rows"][0]) == len(res["table"]["columns"])
    from benchmarks.common import percentiles

    assert len(res["latency_samples_ms"]) == res["clips"]  # the stored samples give back the reported percentiles
    assert percentiles(res["latency_samples_ms"]) == pytest.approx(lat, abs=1e-3)


def test_memory_growth_is_fitted_over_the_second_half_for_rss_and_gpu():
    from benchmarks.engine import memory_summary

    t = [0.0, 30.0, 60.0, 90.0, 120.0]
    rss = [(s, 500.0 + (100.0 if s == 0 else 0.0) + s / 60) for s in t]  # warm-up spike, then +1 MB/min
    gpu = [800.0, 800.0, 801.0, 802.0, 803.0]  # +2 MB/min from the middle on
    m = memory_summary(rss, gpu)
    assert m["rss_growth_mb_per_min"] == pytest.approx(1.0) and m["gpu_growth_mb_per_min"] == pytest.approx(2.0)
    assert (m["rss_start_mb"], m["gpu_start_mb"], m["gpu_end_mb"], m["samples"]) == (600.0, 800.0, 803.0, 5)
    assert "gpu_growth_mb_per_min" not in memory_summary(rss)


def test_latency_percentiles_are_nearest_rank():
    from benchmarks.common import percentiles

    # the ceil(p/100 * n)-th smallest: of 32 clips p95 is the 31st (round() gave the 30th), p99 the largest
    assert percentiles([float(x) for x in range(32, 0, -1)]) == {"p50_ms": 16, "p95_ms": 31, "p99_ms": 32}
    assert percentiles(list(range(1, 13)))["p95_ms"] == 12  # 11.4 -> 12th (round() gave the 11th)
    assert percentiles(list(range(1, 101))) == {"p50_ms": 50, "p95_ms": 95, "p99_ms": 99}
    assert percentiles([7.0]) == {"p50_ms": 7.0, "p95_ms": 7.0, "p99_ms": 7.0}
    assert percentiles([]) == {"p50_ms": None, "p95_ms": None, "p99_ms": None}


def test_speed_summary_p10_p90_stay_within_the_samples():
    from benchmarks.common import summary

    # 6 repeats (the mae_step default): the "exclusive" quantiles gave p10 0.7 and p90 6.3, outside the samples
    s = summary([6.0, 1.0, 5.0, 2.0, 4.0, 3.0])
    assert s["p10_ms"] == pytest.approx(1.5) and s["p90_ms"] == pytest.approx(5.5) and s["median_ms"] == 3.5
    for ms in ([1.0, 2.0], [3.0, 1.0, 2.0], [float(x) for x in range(20)]):
        s = summary(ms)
        assert min(ms) <= s["p10_ms"] <= s["median_ms"] <= s["p90_ms"] <= max(ms)


def test_result_metadata_names_the_commit_and_the_official_version():
    from benchmarks.common import machine

    m = machine()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert m["commit"].split("+")[0] == head.stdout.strip()
    assert "hiera_transformer" in m and m["torch"] == torch.__version__


def test_engine_warm_up_takes_the_path_of_the_measured_clips():
    # With device_resize the measured clips carry one full-size frame (the newest); a warm-up on clips of full-size
    # frames left that path (its host staging buffer, a one-frame resize) to the first measured clip.
    import numpy as np

    from benchmarks.engine import warm_up
    from hiera_perception.clip_buffer import ClipBuffer
    from hiera_perception.engine import Engine

    engine = Engine("hiera_tiny_8x64", device="cpu", device_resize=True)

    def buf():
        return ClipBuffer(engine.num_frames, engine.frame_stride_s, 0.25, max_gap_s=1.0, frame_size=engine.size,
                          shrink_newest=False)

    frames = [np.random.default_rng(i).integers(0, 256, (120, 160, 3), dtype=np.uint8) for i in range(2)]
    warm_up(engine, buf(), frames, 30.0)
    warmed = set(engine._staging)
    measured, i = buf(), 0
    while not (clips := measured.push(i / 30.0, frames[i % 2])):
        i += 1
    engine.infer([clips[0].frames])
    assert warmed and set(engine._staging) == warmed


def test_recovered_counts_only_a_loss_beyond_the_test_sets_noise():
    from benchmarks.adaptation import MIN_LOSS, recovered

    assert recovered(0.97, 0.66, 0.80) == pytest.approx(14 / 31)
    assert recovered(0.97, 0.90, 0.86) == pytest.approx(-4 / 7)  # adaptation can also lose ground
    assert recovered(0.97, 0.96, 0.975) is None  # 2 of 200 clips lost: no ratio, no place in the mean
    assert recovered(0.97, 0.98, 0.97) is None and recovered(0.97, 0.97 - MIN_LOSS / 2, 0.97) is None


def test_adaptation_benchmark_bookkeeping(always_wave, tmp_path):
    # A head that always says "wave": every balanced set scores exactly 1/8 before and after adaptation (which
    # moves the encoder, not the head), so nothing was lost and nothing recovered. Two worker processes (--jobs 2).
    cmd = [sys.executable, "-m", "benchmarks", "adaptation", "--model", str(always_wave), "--shifts", "blur", "noise",
           "--test-clips", "8", "--adapt-clips", "20", "--rounds", "2", "--repeats", "2", "--jobs", "2", "--work", str(tmp_path / "work"),
           "--out", str(tmp_path), "--name", "adaptation_test"]
    subprocess.run(cmd, cwd=REPO, check=True, timeout=600, capture_output=True)
    res = json.loads((tmp_path / "adaptation_test.json").read_text())
    assert [r["shift"] for r in res["rows"]] == ["blur", "noise"]
    for r in res["rows"]:
        assert r["clean"] == r["before"] == r["after"] == r["clean_after"] == 1 / 8
        assert r["recovered"] is None and r["clean_drop_points"] == 0
        assert -1.0 <= r["drift_cosine"] <= 1.0 + 1e-6 and r["accepted"] + r["rejected"] <= 2 * 2
        assert len(r["runs"]) == 2 and r["recovered_range"] is None
    # adapt and test sets never share a clip: different seeds, and the adapt sets carry no labels; each repeat
    # adapts on clips of its own
    work = tmp_path / "work"
    pools = [work / f"adapt_blur_{r}" for r in (0, 1)]
    assert all("wave" not in (p / "labels.csv").read_text() for p in pools)
    first = [next(p for p in sorted(pool.iterdir()) if p.name.startswith("clip_")).read_bytes() for pool in pools]
    assert first[0] != first[1]
    assert len(res["table"]["rows"]) == 3 and res["mean"]["recovered"] is None
    assert res["jobs"] == 2 and res["threads_per_job"] == 1
    assert all((work / f"adapted_{s}_{r}.pt").is_file() for s in ("blur", "noise") for r in (0, 1))


def test_encoder_benchmark_batches_per_config_and_the_report_renders_them(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks", "encoder", "--configs", "hiera_tiny_8x64@2,3", "--batch", "1",
           "--repeats", "2", "--warmup", "0", "--out", str(tmp_path), "--name", "encoder_test"]
    subprocess.run(cmd, cwd=REPO, check=True, timeout=300, capture_output=True)
    res = json.loads((tmp_path / "encoder_test.json").read_text())
    assert [(r["config"], r["batch"]) for r in res["rows"]] == [("hiera_tiny_8x64", 2), ("hiera_tiny_8x64", 3)]
    for r in res["rows"]:
        assert r["ours_clips_per_s"] == r["batch"] * 1e3 / r["ours"]["median_ms"] and r["speedup_vs_official"] > 0

    from benchmarks.report import render

    rows = [line for line in render(tmp_path).splitlines() if line.startswith("| hiera_tiny_8x64 |")]
    assert [line.split(" | ")[1] for line in rows] == ["2", "3"]
    assert all(float(line.split(" | ")[-1].rstrip(" |")) > 0 for line in rows)  # ours clips/s


def test_encoder_benchmark_saves_each_row_as_it_is_timed():
    # gpu.sh cuts a step at its time budget: the rows timed before the cut must already be on disk.
    import argparse

    from benchmarks import encoder

    p = argparse.ArgumentParser()
    encoder.add_arguments(p)
    args = p.parse_args(["--configs", "hiera_tiny_8x64@1,2", "--repeats", "1", "--warmup", "0"])
    saved = []
    result = encoder.run(args, save=lambda r: saved.append([(row["config"], row["batch"]) for row in r["rows"]]))
    assert saved == [[("hiera_tiny_8x64", 1)], [("hiera_tiny_8x64", 1), ("hiera_tiny_8x64", 2)]]
    assert [(r["config"], r["batch"]) for r in result["rows"]] == saved[-1]


def test_gpu_script_dry_run_on_cpu_writes_every_result(tmp_path):
    # The GPU set is prepared here so a lent GPU session only has to run it: every step must run and write.
    out = subprocess.run(["bash", "benchmarks/gpu.sh", "--device", "cpu", "--dry-run"], cwd=REPO, timeout=900,
                         capture_output=True, text=True, env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "!! failed" not in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    with tarfile.open(tmp_path / "gpu_results.tar.gz") as tar:
        names = sorted(Path(n).name for n in tar.getnames() if n.endswith(".json"))
    assert names == sorted([
        "encoder_cpu_bf16.json", "encoder_cpu_fp32.json", "encoder_cpu_bf16_compile.json",
        "mae_step_cpu_bf16.json", "mae_step_cpu_bf16_compile.json", "engine_cpu_bf16.json",
        "engine_cpu_bf16_graph.json", "engine_cpu_bf16_graph_saturated.json", "engine_cpu_bf16_graph_compile.json",
        "engine_cpu_bf16_graph_device_resize.json", "engine_cpu_bf16_graph_compile_device_resize.json",
        "encoder_cpu_fp32_throughput.json", "encoder_cpu_bf16_small.json", "encoder_cpu_fp32_small.json"])
    for name in names:
        res = json.loads((tmp_path / "results" / name).read_text())
        assert res["machine"]["torch"] == torch.__version__ and res["device"] == "cpu"


def test_gpu_script_survives_a_failed_pip_and_keeps_to_its_time_budget(tmp_path):
    # On the GPU machine a pip that refuses (an externally managed Python) stopped the whole set under `set -e`; the
    # set keeps to GPU_BUDGET_S (here 0: every step skipped) and still packs the tarball the device tool brings back.
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "gpu.sh").write_text((REPO / "benchmarks" / "gpu.sh").read_text())
    (tmp_path / ".gpu_wheels").mkdir()
    (tmp_path / ".gpu_wheels" / "hiera_transformer-0.1.4-py3-none-any.whl").write_bytes(b"")
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nif [ "$1 $2" = "-m pip" ]; then echo "error: externally-managed-environment" >&2; '
                    f'exit 1; fi\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    run = subprocess.run(["bash", "benchmarks/gpu.sh", "--device", "cpu"], cwd=tmp_path, timeout=120, capture_output=True,
                         text=True, env={**os.environ, "OUT": str(out), "PYTHON": str(fake), "GPU_BUDGET_S": "0"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "!! pip install of .gpu_wheels failed" in run.stdout
    assert "\n== " not in run.stdout and run.stdout.count("!! skipped (time budget") == 14
    with tarfile.open(out / "gpu_results.tar.gz") as tar:
        assert not [n for n in tar.getnames() if n.endswith(".json")]
