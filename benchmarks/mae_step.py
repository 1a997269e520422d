"""One MAE training step (forward + backward + AdamW), ours against the official, mask ratio 0.9.

Both models start from the same weights and see the same clips and the same masks.
    python -m benchmarks mae_step --device cpu --configs hiera_tiny_8x64 hiera_base_16x224
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from benchmarks.common import interleaved, oracle, write_result
from hiera_perception.checkpoint import filter_official_state_dict
from hiera_perception.config import get_config
from hiera_perception.mae import HieraMAE


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", nargs="+", default=["hiera_tiny_8x64", "hiera_base_16x224"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mask-ratio", type=float, default=0.9)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--name", default=None, help="results file name (default mae_step_<device>_<precision>)")
    p.add_argument("--compile", action="store_true", help="also time ours with torch.compile on the forward")
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
        amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
               else contextlib.nullcontext())

        def step(model, opt, fwd):
            def f():
                with amp:
                    loss = fwd(model)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return f

        opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-6)
        opt_off = torch.optim.AdamW(official.parameters(), lr=1e-6)
        fns = {
            "ours": step(ours, opt_ours, lambda m: m.forward_keep(x, keep).loss),
            "official": step(official, opt_off, lambda m: m(x, mask=keep)[0]),
        }
        if args.compile:
            fwd = torch.compile(ours.forward_keep)
            fns["ours_compiled"] = step(ours, opt_ours, lambda m: fwd(x, keep).loss)
        res = interleaved(fns, args.repeats, args.warmup, device)
        row = {"config": name, "batch": args.batch, "mask_ratio": args.mask_ratio, **res,
               "speedup_vs_official": res["official"]["median_ms"] / res["ours"]["median_ms"]}
        if "ours_compiled" in res:
            row["speedup_ours_compiled_vs_official"] = res["official"]["median_ms"] / res["ours_compiled"]["median_ms"]
        print(f"{name} MAE step b={args.batch}: " + ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in res.items())
              + f", ours x{row['speedup_vs_official']:.2f}")
        rows.append(row)
        del official, ours, opt_ours, opt_off, fns
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"device": args.device, "precision": args.precision, "rows": rows}


def main(args) -> None:
    write_result(args.name or f"mae_step_{torch.device(args.device).type}_{args.precision}", run(args), args.out)
