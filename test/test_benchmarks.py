"""The benchmark entry point runs and writes what the README table is rendered from (speed is not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_engine_benchmark_writes_latency_and_memory(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks", "engine", "--model", "hiera_tiny_8x64", "--seconds", "3",
           "--width", "160", "--height", "120", "--out", str(tmp_path), "--name", "engine_test"]
    subprocess.run(cmd, cwd=REPO, check=True, timeout=300, capture_output=True)
    res = json.loads((tmp_path / "engine_test.json").read_text())
    assert res["frames"] == 90 and res["clips"] > 0 and res["machine"]["cores"] >= 1
    lat = res["latency"]
    assert 0 < lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"]
    mem = res["memory"]
    assert mem["samples"] >= 3 and 0 < mem["rss_start_mb"] <= mem["rss_peak_mb"]
    assert mem["rss_max_sampled_mb"] <= mem["rss_peak_mb"] + 1  # the kernel's high-water mark bounds the samples
    assert isinstance(mem["rss_growth_mb_per_min"], float)
    assert len(res["table"]["rows"][0]) == len(res["table"]["columns"])
