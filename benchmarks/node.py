"""Node latency over real ROS 2: camera frame published -> /action_features received, adaptation off and on.

Runs `hiera-perception demo` (synthetic camera at 30 fps, or --fps -> perception node -> consumer, three processes,
real DDS on this machine) once per variant and keeps its summary: clips/s, latency p50/p95/p99 (the
consumer's clock minus the clip's last frame stamp), and the frames the node never received and the clips it cut
but never delivered (demo.DemoStats.drops). Both variants run on the same model, one after the other.

    python -m benchmarks node --seconds 90
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from benchmarks.common import REPO, write_result

VARIANTS = {
    "adaptation off": [],
    # The shipped adaptation settings (replay and probe set of 48 clips), rounds back to back: the load a robot
    # sees once its replay is full. The first round waits for 48 clips, so a run needs more than a minute.
    "adaptation on": ["--param", "adaptation.enabled=true", "--param", "adaptation.round_interval_s=1.0"],
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="", help="node model (default: the embedded one)")
    p.add_argument("--seconds", type=float, default=90.0)
    p.add_argument("--fps", type=float, default=30.0,
                   help="synthetic camera rate (default 30; results node_cpu.json, else node_cpu_<fps>fps.json)")
    p.add_argument("--repeats", type=int, default=2, help="runs per variant, interleaved (off, on, off, on, ...)")
    p.add_argument("--out", default=None)


def _demo(args, extra: list[str]) -> dict:
    # A fresh adaptation folder per run (removed after it): no run resumes what an earlier one adapted.
    with tempfile.TemporaryDirectory(prefix="hiera_node_bench_") as versions:
        return _run_demo(args, [*extra, "--param", f"adaptation.dir={versions}"])


def _run_demo(args, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "hiera_perception", "demo", "--duration", str(args.seconds), "--json",
           "--top-k", "1", "--fps", str(args.fps), *(["--model", args.model] if args.model else []), *extra]
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.seconds + 300)
    if out.returncode != 0:
        raise RuntimeError(f"demo failed ({out.returncode}): {out.stderr[-2000:]}")
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return next(line["summary"] for line in reversed(lines) if "summary" in line)


def _dropped(s: dict, what: str, of: str) -> str:
    """'n of N (x%)' from the demo's summary, '-' where it could not count them."""
    if s.get(f"{what}_dropped_share") is None:
        return "-"
    return f"{s[f'{what}_dropped']} of {s[of]} ({100 * s[f'{what}_dropped_share']:.2f}%)"


def main(args) -> None:
    runs = []  # interleaved, so a passing disturbance of the machine hits both variants alike
    for r in range(args.repeats):
        for name, extra in VARIANTS.items():
            s = _demo(args, extra)
            runs.append((name, r, s))
            print(f"{name} #{r}: {s['clips']} clips, {s['clips_per_s']} clips/s, latency p50 {s['latency_p50_ms']} ms, "
                  f"p95 {s['latency_p95_ms']} ms, p99 {s['latency_p99_ms']} ms, {s['encoder_swaps']} encoder swaps "
                  f"({' -> '.join(s['encoder_versions'])}), frames dropped {_dropped(s, 'frames', 'camera_frames')}, "
                  f"clips dropped {_dropped(s, 'clips', 'clips_cut')}")
    p95 = {n: statistics.median(s["latency_p95_ms"] for m, _, s in runs if m == n) for n in VARIANTS}
    ratio = p95["adaptation on"] / p95["adaptation off"]
    table = {"columns": ["variant", "run", "clips", "clips/s", "p50 ms", "p95 ms", "p99 ms", "camera fps",
                         "frames dropped", "clips dropped", "swaps"],
             "rows": [[n, r, s["clips"], s["clips_per_s"], s["latency_p50_ms"], s["latency_p95_ms"], s["latency_p99_ms"],
                       s["camera_fps"], _dropped(s, "frames", "camera_frames"), _dropped(s, "clips", "clips_cut"),
                       s["encoder_swaps"]] for n, r, s in runs]}
    table["rows"].append(["median p95: on / off", "", "", "", "", f"{ratio:.2f}x", "", "", "", "", ""])
    name = "node_cpu" if args.fps == 30 else f"node_cpu_{args.fps:g}fps"
    title = f"Node latency over ROS 2 (frame published -> ActionFeatures received), {args.fps:g} fps"
    write_result(name, {"title": title, "seconds": args.seconds, "fps": args.fps,
                        "runs": [{"variant": n, "run": r, **s} for n, r, s in runs],
                        "median_p95_ms": p95, "p95_ratio_on_off": ratio, "table": table}, args.out)
