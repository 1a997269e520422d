"""Encoder forward: ours against the official eager Hiera, same weights, same process, interleaved.

    python -m benchmarks encoder --device cpu --configs hiera_tiny_8x64 hiera_base_16x224 --batch 1
Results: benchmarks/results/encoder_<device>_<precision>.json (speed-up = official median / ours).
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from benchmarks.common import count, interleaved, oracle, write_result
from hiera_perception.config import get_config
from hiera_perception.cuda_graph import CudaGraph
from hiera_perception.model import Hiera


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", nargs="+", default=["hiera_tiny_8x64", "hiera_base_16x224"],
                   help="configs; NAME@8,16 gives that config its own batch sizes")
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--name", default=None, help="results file name (default encoder_<device>_<precision>)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--repeats", type=count(1), default=10)
    p.add_argument("--warmup", type=count(0), default=2)
    p.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    p.add_argument("--cuda-graph", action="store_true", help="also time ours replayed from a CUDA graph (GPU)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")


def run(args, save=None) -> dict:
    """Time every config and batch; `save(result)` after each row, so a run cut short keeps the rows it timed."""
    o = oracle()
    device = torch.device(args.device)
    rows = []
    for item in args.configs:
        name, _, own = item.partition("@")
        batches = [int(b) for b in own.split(",")] if own else args.batch
        cfg = get_config(name, num_classes=400)
        torch.manual_seed(0)
        official = o.official_hiera(cfg).to(device).eval()
        ours = Hiera(cfg).to(device).eval()
        ours.load_state_dict(official.state_dict())
        fns_models = {"ours": ours, "official": official}
        if args.compile:
            fns_models["ours_compiled"] = torch.compile(ours)
        for b in batches:
            x = torch.randn(b, 3, *cfg.input_size, device=device)
            amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                   else contextlib.nullcontext())

            def call(m):
                def f():
                    with torch.inference_mode(), amp:
                        return m(x)
                return f

            fns = {k: call(m) for k, m in fns_models.items()}
            if args.cuda_graph and device.type == "cuda":
                def forward(inp, m=ours):
                    with (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
                          if args.precision == "bf16" else contextlib.nullcontext()):
                        out = m(inp)
                    return out.embedding, out.logits
                graph = CudaGraph(forward, x)
                fns["ours_graph"] = lambda: graph(x)
            res = interleaved(fns, args.repeats, args.warmup, device)
            row = {"config": name, "batch": b, **{k: v for k, v in res.items()},
                   "speedup_vs_official": res["official"]["median_ms"] / res["ours"]["median_ms"],
                   "ours_clips_per_s": b * 1e3 / res["ours"]["median_ms"],
                   "official_clips_per_s": b * 1e3 / res["official"]["median_ms"]}
            for k in ("ours_compiled", "ours_graph"):
                if k in res:
                    row[f"speedup_{k}_vs_official"] = res["official"]["median_ms"] / res[k]["median_ms"]
            print(f"{name} b={b} {args.precision}: " + ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in res.items())
                  + f", ours x{row['speedup_vs_official']:.2f}")
            rows.append(row)
            if save is not None:
                save({"device": args.device, "precision": args.precision, "rows": rows})
            del fns
        del official, ours, fns_models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"device": args.device, "precision": args.precision, "rows": rows}


def main(args) -> None:
    name = args.name or f"encoder_{torch.device(args.device).type}_{args.precision}"
    run(args, save=lambda result: write_result(name, result, args.out))
