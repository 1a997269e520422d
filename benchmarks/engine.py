"""Engine latency without ROS: uint8 camera frames in, embedding + labels out, at a live frame rate.

Frames (synthetic camera, `--width x --height`) are stamped at `--fps` and pushed through the same
ClipBuffer and Engine the node uses; each clip's latency runs from the moment its last frame was
pushed to the moment its result exists. With `--realtime` the loop paces itself to the frame rate
(what a robot sees); without, frames come as fast as the engine allows and clips queue.

    python -m benchmarks engine --model hiera_tiny_synthetic.pt --seconds 20
    python -m benchmarks engine --model hiera_base_16x224 --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import percentiles, write_result
from hiera_perception.clip_buffer import ClipBuffer
from hiera_perception.engine import Engine


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model source (default: the embedded model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--hop", type=float, default=0.25, help="seconds between clips")
    p.add_argument("--seconds", type=float, default=20.0, help="length of the simulated stream")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--no-realtime", dest="realtime", action="store_false")
    p.add_argument("--name", default=None, help="results file name (default engine_<device>_<precision>)")
    p.add_argument("--out", default=None)


def run(args) -> dict:
    engine = Engine(args.model, device=args.device, precision=args.precision)
    buf = ClipBuffer(engine.num_frames, engine.frame_stride_s, args.hop, max_gap_s=1.0, frame_size=engine.size)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8) for _ in range(8)]
    for _ in range(3):  # warm-up: first calls allocate and pick kernels
        engine.infer([[frames[0]] * engine.num_frames])
    lat_ms, infer_ms, late = [], [], 0
    n = int(args.seconds * args.fps)
    t_start = time.perf_counter()
    for i in range(n):
        due = t_start + i / args.fps
        if args.realtime:
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            elif wait < -1.0 / args.fps:
                late += 1  # the engine kept us past this frame's slot: it would be dropped live
        t_push = time.perf_counter()
        for clip in buf.push(i / args.fps, frames[i % len(frames)]):
            t0 = time.perf_counter()
            engine.infer([clip.frames])
            t1 = time.perf_counter()
            infer_ms.append((t1 - t0) * 1e3)
            lat_ms.append((t1 - t_push) * 1e3)
    wall = time.perf_counter() - t_start
    res = {"model": engine.encoder_version, "config": engine.model.config.name, "device": args.device,
           "precision": args.precision, "fps_in": args.fps, "hop_s": args.hop, "frames": n, "clips": len(lat_ms),
           "frame_size": [args.height, args.width], "realtime": args.realtime, "frames_late": late,
           "clips_per_s": len(lat_ms) / wall, "wall_s": wall,
           "latency": percentiles(lat_ms), "infer": percentiles(infer_ms)}
    res["title"] = "Engine latency (uint8 frames in, labels out, no ROS)"
    res["table"] = {"columns": ["model", "device", "precision", "fps in", "clips", "p50 ms", "p95 ms", "p99 ms", "late frames"],
                    "rows": [[res["config"], args.device, args.precision, args.fps, res["clips"],
                              *(f"{res['latency'][k]:.1f}" for k in ("p50_ms", "p95_ms", "p99_ms")), late]]}
    print(f"{res['config']} {args.device} {args.precision}: {res['clips']} clips, latency p50 "
          f"{res['latency']['p50_ms']:.1f} ms, p95 {res['latency']['p95_ms']:.1f} ms, late frames {late}")
    return res


def main(args) -> None:
    write_result(args.name or f"engine_{args.device.split(':')[0]}_{args.precision}", run(args), args.out)
