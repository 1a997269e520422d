"""Engine latency without ROS: uint8 camera frames in, embedding + labels out, at a live frame rate.

Frames (synthetic camera, `--width x --height`) are stamped at `--fps` and pushed through the same
ClipBuffer and Engine the node uses; each clip's latency runs from the moment its last frame was
pushed to the moment its result exists. With `--realtime` the loop paces itself to the frame rate
(what a robot sees); without, frames come as fast as the engine allows and clips queue.

Memory rides along: resident set size sampled every second of the run (peak, start, end, and the
growth rate fitted over the run's second half, where warm-up allocations are over), and on CUDA the
peak allocated GPU memory. `--minutes` makes it a long run that shows a leak as a positive slope.

    python -m benchmarks engine --model hiera_tiny_synthetic.pt --seconds 20
    python -m benchmarks engine --model hiera_base_16x224-random --device cuda --precision bf16
    python -m benchmarks engine --minutes 10 --name engine_cpu_fp32_10min   # memory growth over a long run
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
import torch

from benchmarks.common import percentiles, write_result
from hiera_perception.clip_buffer import ClipBuffer
from hiera_perception.engine import Engine


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model source (default: the embedded model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="replay captured CUDA graphs (GPU; the Engine's default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward (GPU)")
    p.add_argument("--device-resize", action="store_true",
                   help="the frame that completes a clip is shrunk on the device, not the host (Engine device_resize)")
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--hop", type=float, default=0.25, help="seconds between clips")
    p.add_argument("--seconds", type=float, default=20.0, help="length of the simulated stream")
    p.add_argument("--minutes", type=float, default=None, help="length in minutes instead (a long memory run)")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--no-realtime", dest="realtime", action="store_false")
    p.add_argument("--name", default=None, help="results file name (default engine_<device>_<precision>)")
    p.add_argument("--out", default=None)


def rss_mb() -> float:
    """Resident set size now (MB), from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _growth(t: np.ndarray, mb: np.ndarray) -> float | None:
    """MB per minute, fitted over the second half (the first holds the allocator's warm-up)."""
    half = t >= t[-1] / 2
    return float(np.polyfit(t[half], mb[half], 1)[0]) * 60 if half.sum() >= 2 else None


def memory_summary(samples: list[tuple[float, float]], gpu: list[float] | None = None) -> dict:
    """(seconds, RSS MB) samples, and the GPU memory allocated (MB) at the same moments where there is a GPU ->
    start/end/peak and growth in MB per minute."""
    t = np.array([s[0] for s in samples])
    mb = np.array([s[1] for s in samples])
    out = {"rss_start_mb": float(mb[0]), "rss_end_mb": float(mb[-1]), "rss_max_sampled_mb": float(mb.max()),
           "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
           "rss_growth_mb_per_min": _growth(t, mb), "samples": len(samples)}
    if gpu:
        g = np.array(gpu)
        out.update(gpu_start_mb=float(g[0]), gpu_end_mb=float(g[-1]), gpu_growth_mb_per_min=_growth(t, g))
    return out


def warm_up(engine: Engine, buf: ClipBuffer, frames: list[np.ndarray], fps: float, clips: int = 3) -> None:
    """First calls allocate and pick kernels: run `clips` clips from a buffer like the measured one, so they take
    the measured clips' path (with device_resize, one full-size frame per clip, not a clip of full-size ones)."""
    done, i = 0, 0
    while done < clips:
        for clip in buf.push(i / fps, frames[i % len(frames)]):
            engine.infer([clip.frames])
            done += 1
        i += 1


def run(args) -> dict:
    if args.minutes is not None:
        args.seconds = 60.0 * args.minutes
    engine = Engine(args.model, device=args.device, precision=args.precision, cuda_graph=args.cuda_graph,
                    compile=args.compile, device_resize=args.device_resize)

    def clip_buffer() -> ClipBuffer:
        return ClipBuffer(engine.num_frames, engine.frame_stride_s, args.hop, max_gap_s=1.0, frame_size=engine.size,
                          shrink_newest=not args.device_resize)

    buf = clip_buffer()
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8) for _ in range(8)]
    warm_up(engine, clip_buffer(), frames, args.fps)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    compiled = args.compile and engine.device.type == "cuda"  # the Engine ignores compile off a GPU
    lat_ms, infer_ms, push_ms, late = [], [], [], 0
    n = int(args.seconds * args.fps)
    t_start = time.perf_counter()
    cuda = engine.device.type == "cuda"

    def gpu_mb() -> float:
        return torch.cuda.memory_allocated(engine.device) / 2**20

    mem, gpu = [(0.0, rss_mb())], [gpu_mb()] if cuda else None
    for i in range(n):
        if i % max(1, round(args.fps)) == 0 and i:  # once a second
            mem.append((time.perf_counter() - t_start, rss_mb()))
            if cuda:
                gpu.append(gpu_mb())
        due = t_start + i / args.fps
        if args.realtime:
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            elif wait < -1.0 / args.fps:
                late += 1  # the engine kept us past this frame's slot: it would be dropped live
        t_push = time.perf_counter()
        clips = buf.push(i / args.fps, frames[i % len(frames)])
        if clips:
            push_ms.append((time.perf_counter() - t_push) * 1e3)  # the completing frame's resize is on the path
        for clip in clips:
            t0 = time.perf_counter()
            engine.infer([clip.frames])
            t1 = time.perf_counter()
            infer_ms.append((t1 - t0) * 1e3)
            lat_ms.append((t1 - t_push) * 1e3)
    wall = time.perf_counter() - t_start
    if not lat_ms:
        raise ValueError(f"no clip completed in --seconds {args.seconds:g} at --fps {args.fps:g}: a clip spans "
                         f"{(engine.num_frames - 1) * engine.frame_stride_s:.2f} s; give it longer")
    mem.append((wall, rss_mb()))
    if cuda:
        gpu.append(gpu_mb())
    res = {"model": engine.encoder_version, "config": engine.model.config.name, "device": args.device,
           "precision": args.precision, "cuda_graph": engine.cuda_graph, "compile": compiled,
           "device_resize": args.device_resize,
           "fps_in": args.fps, "hop_s": args.hop, "frames": n, "clips": len(lat_ms),
           "frame_size": [args.height, args.width], "realtime": args.realtime, "frames_late": late,
           "clips_per_s": len(lat_ms) / wall, "wall_s": wall,
           "latency": percentiles(lat_ms), "infer": percentiles(infer_ms), "push": percentiles(push_ms),
           "latency_samples_ms": [round(x, 3) for x in lat_ms],  # per clip, in order: the percentiles recomputable
           "memory": memory_summary(mem, gpu)}
    if cuda:
        res["memory"]["gpu_peak_mb"] = torch.cuda.max_memory_allocated(engine.device) / 2**20
    m = res["memory"]
    growth = "-" if m["rss_growth_mb_per_min"] is None else f"{m['rss_growth_mb_per_min']:+.2f}"
    res["title"] = "Engine latency (uint8 frames in, labels out, no ROS)"
    mode = "+".join(k for k, on in (("cuda graph", engine.cuda_graph), ("compile", compiled),
                                    ("device resize", args.device_resize)) if on) or "eager"
    res["table"] = {"columns": ["model", "device", "precision", "mode", "fps in", "clips", "p50 ms", "p95 ms",
                                "p99 ms", "late frames", "minutes", "peak RSS MB", "RSS growth MB/min"],
                    "rows": [[res["config"], args.device, args.precision, mode,
                              args.fps if args.realtime else "saturated", res["clips"],
                              *(f"{res['latency'][k]:.1f}" for k in ("p50_ms", "p95_ms", "p99_ms")), late,
                              f"{wall / 60:.1f}", f"{m['rss_peak_mb']:.0f}", growth]]}
    print(f"{res['config']} {args.device} {args.precision} {mode}: {res['clips']} clips, latency p50 "
          f"{res['latency']['p50_ms']:.1f} ms, p95 {res['latency']['p95_ms']:.1f} ms, late frames {late}")
    return res


def main(args) -> None:
    write_result(args.name or f"engine_{args.device.split(':')[0]}_{args.precision}", run(args), args.out)
