"""What every benchmark shares: the machine description, interleaved timing, atomic result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from hiera_perception.atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


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
    q = statistics.quantiles(ms, n=10) if len(ms) >= 2 else [ms[0]] * 9
    return {"median_ms": statistics.median(ms), "p10_ms": q[0], "p90_ms": q[-1], "n": len(ms),
            "samples_ms": [round(x, 3) for x in ms]}


def percentiles(ms: list[float], ps=(50, 95, 99)) -> dict:
    """Latency percentiles by the nearest-rank rule, in ms."""
    if not ms:
        return {f"p{p}_ms": None for p in ps}
    s = sorted(ms)
    return {f"p{p}_ms": s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))] for p in ps}


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
