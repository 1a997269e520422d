"""Node latency over real ROS 2: camera frame published -> /action_features received, adaptation off and on.

Runs `hiera-perception demo` (synthetic camera at 30 fps -> perception node -> consumer, three processes,
real DDS on this machine) once per variant and keeps its summary: clips/s and latency p50/p95/p99 (the
consumer's clock minus the clip's last frame stamp). Both variants run on the same model, one after the other.

    python -m benchmarks node --seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks.common import REPO, write_result

VARIANTS = {
    "adaptation off": [],
    "adaptation on": ["--param", "adaptation.enabled=true", "--param", "adaptation.min_clips=8",
                      "--param", "adaptation.round_interval_s=1.0"],
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="", help="node model (default: the embedded one)")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--out", default=None)


def _demo(args, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "hiera_perception", "demo", "--duration", str(args.seconds), "--json",
           "--top-k", "1", *(["--model", args.model] if args.model else []), *extra]
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.seconds + 300)
    if out.returncode != 0:
        raise RuntimeError(f"demo failed ({out.returncode}): {out.stderr[-2000:]}")
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return next(line["summary"] for line in reversed(lines) if "summary" in line)


def main(args) -> None:
    rows = {}
    for name, extra in VARIANTS.items():
        rows[name] = s = _demo(args, extra)
        print(f"{name}: {s['clips']} clips, {s['clips_per_s']} clips/s, latency p50 {s['latency_p50_ms']} ms, "
              f"p95 {s['latency_p95_ms']} ms, p99 {s['latency_p99_ms']} ms")
    ratio = rows["adaptation on"]["latency_p95_ms"] / rows["adaptation off"]["latency_p95_ms"]
    table = {"columns": ["variant", "clips", "clips/s", "p50 ms", "p95 ms", "p99 ms", "camera fps"],
             "rows": [[n, s["clips"], s["clips_per_s"], s["latency_p50_ms"], s["latency_p95_ms"], s["latency_p99_ms"],
                       s["camera_fps"]] for n, s in rows.items()]}
    table["rows"].append(["p95 on / off", "", "", "", f"{ratio:.2f}x", "", ""])
    write_result("node_cpu", {"title": "Node latency over ROS 2 (frame published -> ActionFeatures received), 30 fps",
                              "seconds": args.seconds, "variants": rows, "p95_ratio_on_off": ratio, "table": table},
                 args.out)
