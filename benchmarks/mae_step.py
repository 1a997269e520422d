"""One MAE training step (forward + backward + AdamW), ours against the official, mask ratio 0.9.

Both models start from the same weights and see the same clips and the same masks.
    python -m benchmarks mae_step --device cpu --configs hiera_tiny_8x64 hiera_base_16x224
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch

from benchmarks.common import count, interleaved, oracle, write_result
from hiera_perception.checkpoint import filter_official_state_dict
from hiera_perception.config import get_config
from hiera_perception.cuda_graph import CudaGraphStep
from hiera_perception.mae import HieraMAE


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", nargs="+", default=["hiera_tiny_8x64", "hiera_base_16x224"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mask-ratio", type=float, default=0.9)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--repeats", type=count(1), default=6)
    p.add_argument("--warmup", type=count(0), default=1)
    p.add_argument("--name", default=None, help="results file name (default mae_step_<device>_<precision>)")
    p.add_argument("--compile", action="store_true", help="also time ours with torch.compile on the forward")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also time ours as a captured CUDA graph (forward + backward + AdamW; CUDA only)")
    p.add_argument("--out", default=None)


def run(args) -> dict:
    o = oracle()
    device = torch.device(args.device)
    rows = []
    for name in args.configs:
        cfg = get_config(name)
        torch.manual_seed(0)
        official = o.official_mae(cfg).to(device).train()
        ours = HieraMAE(cfg).to(device).train()
        ours.load_state_dict(filter_official_state_dict(official.state_dict(), ours))
        x = torch.randn(args.batch, 3, *cfg.input_size, device=device)
        keep = ours.encoder.random_keep(args.batch, args.mask_ratio, device=device)
        n_keep = ours.encoder.units_kept(args.mask_ratio)

        def amp(cache: bool = True):  # a graph must not keep autocast's weight copies from its capture
            return (torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache) if args.precision == "bf16"
                    else contextlib.nullcontext())

        def step(model, opt, fwd):
            def f():
                with amp():
                    loss = fwd(model)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return f

        opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-6)
        opt_off = torch.optim.AdamW(official.parameters(), lr=1e-6)
        fns = {
            "ours": step(ours, opt_ours, lambda m: m.forward_keep(x, keep, n_keep).loss),
            "official": step(official, opt_off, lambda m: m(x, mask=keep)[0]),
        }
        if args.compile:
            fwd = torch.compile(ours.forward_keep)
            fns["ours_compiled"] = step(ours, opt_ours, lambda m: fwd(x, keep, n_keep).loss)
        if args.cuda_graph and device.type == "cuda":
            twin = copy.deepcopy(ours)  # its own weights and gradients: the graph owns their memory

            def loss_fn(x_, keep_):
                with amp(cache=False):
                    return twin.forward_keep(x_, keep_, n_keep).loss

            graph = CudaGraphStep(loss_fn, torch.optim.AdamW(twin.parameters(), lr=1e-6, capturable=True), x, keep)
            fns["ours_graph"] = lambda: graph(x, keep)
        res = interleaved(fns, args.repeats, args.warmup, device)
        row = {"config": name, "batch": args.batch, "mask_ratio": args.mask_ratio, **res,
               "speedup_vs_official": res["official"]["median_ms"] / res["ours"]["median_ms"]}
        for variant in ("ours_compiled", "ours_graph"):
            if variant in res:
                row[f"speedup_{variant}_vs_official"] = res["official"]["median_ms"] / res[variant]["median_ms"]
        print(f"{name} MAE step b={args.batch}: " + ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in res.items())
              + f", ours x{row['speedup_vs_official']:.2f}")
        rows.append(row)
        del official, ours, opt_ours, opt_off, fns
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"device": args.device, "precision": args.precision, "rows": rows}


def main(args) -> None:
    write_result(args.name or f"mae_step_{torch.device(args.device).type}_{args.precision}", run(args), args.out)
