"""What every benchmark shares: the machine description, interleaved timing, atomic result files."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from hiera_perception.atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def count(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= `least` (`--repeats 0` failed deep inside with an IndexError)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value
    return parse


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def commit() -> str | None:
    """The repository's commit ("+dirty" with uncommitted changes to tracked files), None outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def machine() -> dict:
    """Enough to tell two result files' machines apart."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hiera_transformer": _version("hiera-transformer"),  # the official side of ours-vs-official
        "numpy": _version("numpy"),
        "commit": commit(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device) -> dict:
    """Time each callable `repeats` times, alternating between them (and their order) so drifts in
    machine load hit all of them alike. Returns per name: median, p10, p90 (ms) and all samples."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync(device)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else reversed(names):
            sync(device)
            t0 = time.perf_counter()
            fns[n]()
            sync(device)
            samples[n].append((time.perf_counter() - t0) * 1e3)
    return {n: summary(s) for n, s in samples.items()}


def summary(ms: list[float]) -> dict:
    # inclusive: p10/p90 between the fastest and slowest sample (the default "exclusive" method extrapolates
    # beyond them for fewer than 9 samples: 6 samples 1..6 gave p10 0.7 and p90 6.3)
    q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) >= 2 else [ms[0]] * 9
    return {"median_ms": statistics.median(ms), "p10_ms": q[0], "p90_ms": q[-1], "n": len(ms),
            "samples_ms": [round(x, 3) for x in ms]}


def percentiles(ms: list[float], ps=(50, 95, 99)) -> dict:
    """Latency percentiles by the nearest-rank rule (the ceil(p/100 * n)-th smallest sample), in ms."""
    if not ms:
        return {f"p{p}_ms": None for p in ps}
    s = sorted(ms)
    return {f"p{p}_ms": s[min(len(s) - 1, max(0, math.ceil(p * len(s) / 100) - 1))] for p in ps}


def write_result(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or RESULTS)
    path = out_dir / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), "argv": sys.argv[1:], **payload}
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def oracle():
    """The official implementation (test-only dependency) via the test suite's import helper."""
    sys.path.insert(0, str(REPO / "test"))
    import oracle as o  # noqa: E402

    return o
