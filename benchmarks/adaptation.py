"""Shift benchmark: how much of the accuracy a distribution shift takes away does MAE adaptation win back?

For every shift `synth --shift` renders (SHIFTS minus "none"): the model is scored on labelled shifted
clips (before), adapted with `adapt` on *other* unlabeled shifted clips (a different seed: adapt and
test never share a clip), and scored again on the shifted clips (after) and on clean clips (does it
forget?). Drift is the mean cosine between the adapted and the original model's embeddings of the clean
clips. Recovered = (after - before) / (clean - before): the share of the shift's loss won back, for a shift
that costs at least MIN_LOSS of accuracy (a smaller loss is the test sets' noise, and a ratio of noise says
nothing: the table shows "-" and the mean leaves it out).

    python -m benchmarks adaptation                       # the embedded model, every shift
    python -m benchmarks adaptation --shifts blur noise --rounds 20
    python -m benchmarks adaptation --repeats 3 --jobs 2   # what the README quotes

`--jobs N` runs the adaptation runs in N processes of one CPU thread each: the adapter's steps are one clip
at a time, which a second thread hardly speeds up (on 2 cores a round took 12-14 s on 2 threads, about 8 s on
one thread beside a second run), so two one-thread runs side by side take about a third of the time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import logging
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import write_result
from hiera_perception.adapt import adapt_offline, add_config_arguments, config_from
from hiera_perception.adaptation import AdaptationConfig
from hiera_perception.dataset import ClipDataset
from hiera_perception.engine import Engine
from hiera_perception.evaluate import evaluate
from hiera_perception.synth import SHIFTS, write_dataset


# Two 200-clip test sets near 97% accuracy differ by ~1.7 points (one standard error) by chance alone. With
# test seed 500, blur cost 2 of 200 clips and its three runs "recovered" 0%, 150% and 150%.
MIN_LOSS = 0.05


def recovered(clean: float, before: float, after: float) -> float | None:
    """Share of the shift's loss won back, or None for a shift that cost less than MIN_LOSS."""
    lost = clean - before
    return (after - before) / lost if lost >= MIN_LOSS else None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model source (default: the embedded model)")
    p.add_argument("--shifts", nargs="+", default=[s for s in SHIFTS if s != "none"], choices=SHIFTS[1:])
    p.add_argument("--test-clips", type=int, default=200, help="labelled clips per test set (default 200)")
    p.add_argument("--adapt-clips", type=int, default=200, help="unlabeled clips to adapt on (default 200)")
    p.add_argument("--rounds", type=int, default=20, help="adaptation rounds per shift (default 20)")
    p.add_argument("--seed", type=int, default=7, help="test clips use this seed, adapt clips seed + 1 + repeat")
    p.add_argument("--repeats", type=int, default=1, help="adaptation runs per shift, averaged (default 1)")
    p.add_argument("--jobs", type=int, default=1,
                   help="adaptation runs at once, each in a process of its own on one CPU thread (default 1: in this "
                        "process, on torch's threads)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", default=None, help="folder for data and adapted models (default: a temporary one)")
    p.add_argument("--name", default="adaptation_cpu", help="results file name")
    p.add_argument("--out", default=None)
    add_config_arguments(p)  # the adapter's settings, as `hiera-perception adapt` takes them


def embeddings(engine: Engine, folder: Path, batch: int = 16) -> np.ndarray:
    ds = ClipDataset(folder, engine.num_frames, engine.frame_stride_s, engine.size)
    out = []
    for start in range(0, len(ds), batch):
        clips = [list(ds[i][0].numpy()) for i in range(start, min(len(ds), start + batch))]
        out += [r.embedding for r in engine.infer(clips)]
    return np.stack(out)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.mean(np.sum(a * b, axis=1)))


def _accuracy(engine: Engine, folder: Path) -> float:
    return evaluate(engine, folder, batch=16)["accuracy"]


def _worker_init() -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")


def adapt_run(args, config: AdaptationConfig, work: Path, shift: str, r: int) -> dict:
    """Repeat r of a shift: adapt on its own unlabeled clips with `config` (its seed is r), then score the adapted
    model on the shifted test clips and the clean ones; with the clean clips' embeddings for the drift."""
    summary = adapt_offline(args.model, work / f"adapted_{shift}_{r}.pt", data=str(work / f"adapt_{shift}_{r}"),
                            config=config, rounds=args.rounds, device=args.device, progress=False)
    adapted = Engine(str(summary.out), device=args.device)
    return {"after": _accuracy(adapted, work / f"test_{shift}"), "clean_after": _accuracy(adapted, work / "clean"),
            "clean_embeddings": embeddings(adapted, work / "clean"), "version": summary.version,
            "accepted": summary.accepted, "rejected": summary.rejected, "reasons": dict(summary.reasons)}


def run(args, work: Path) -> dict:
    if args.repeats < 1 or args.jobs < 1:
        raise ValueError(f"--repeats and --jobs must be >= 1, got {args.repeats}, {args.jobs}")
    config = config_from(args)  # a bad setting fails here, before the data and the base model's scores
    base = Engine(args.model, device=args.device)
    size = max(128, 2 * base.size)  # rendered larger than the model's input, as the camera's frames are

    def data(name: str, shift: str, clips: int, seed: int, unlabeled: bool = False) -> Path:
        folder = work / name
        if not (folder / "labels.csv").exists():
            write_dataset(folder, clips, seed, shift=shift, size=(size, size), unlabeled=unlabeled,
                          progress=False)
        return folder

    clean = data("clean", "none", args.test_clips, args.seed)
    base_clean = _accuracy(base, clean)
    base_emb = embeddings(base, clean)
    print(f"{base.encoder_version}: clean accuracy {base_clean:.3f}", flush=True)
    before = {}
    for shift in args.shifts:
        before[shift] = _accuracy(base, data(f"test_{shift}", shift, args.test_clips, args.seed))
        for r in range(args.repeats):
            data(f"adapt_{shift}_{r}", shift, args.adapt_clips, args.seed + 1 + r, unlabeled=True)
    todo = [(shift, r) for shift in args.shifts for r in range(args.repeats)]
    calls = [(args, dataclasses.replace(config, seed=r), work, shift, r) for shift, r in todo]
    t0 = time.monotonic()
    # spawned, not forked: a forked child of a process that has run OpenMP kernels can hang in its first one
    pool = (concurrent.futures.ProcessPoolExecutor(args.jobs, multiprocessing.get_context("spawn"),
                                                   initializer=_worker_init) if args.jobs > 1 else None)
    by_shift: dict[str, list[dict]] = {shift: [] for shift in args.shifts}
    try:
        results = (pool.map if pool else map)(adapt_run, *zip(*calls))  # in order, whoever ran them
        for (shift, r), x in zip(todo, results):
            x["recovered"] = recovered(base_clean, before[shift], x["after"])
            x["clean_drop_points"] = 100 * (base_clean - x["clean_after"])
            x["drift_cosine"] = mean_cosine(x.pop("clean_embeddings"), base_emb)
            by_shift[shift].append(x)
            rec = "-" if x["recovered"] is None else f"{100 * x['recovered']:.0f}%"
            print(f"{shift} #{r}: {before[shift]:.3f} -> {x['after']:.3f} (recovered {rec}), clean {base_clean:.3f} "
                  f"-> {x['clean_after']:.3f}, drift cosine {x['drift_cosine']:.4f}, "
                  f"{x['accepted']}/{x['accepted'] + x['rejected']} rounds accepted", flush=True)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    seconds = time.monotonic() - t0
    rows = []
    for shift, runs in by_shift.items():
        # The test clips are fixed, so the mean of `after` and the mean of `recovered` tell the same.
        rec = [x["recovered"] for x in runs if x["recovered"] is not None]
        rows.append({"shift": shift, "clean": base_clean, "before": before[shift],
                     "after": float(np.mean([x["after"] for x in runs])),
                     "recovered": float(np.mean(rec)) if rec else None,
                     "recovered_range": [min(rec), max(rec)] if rec else None,
                     "clean_after": float(np.mean([x["clean_after"] for x in runs])),
                     "clean_drop_points": float(np.mean([x["clean_drop_points"] for x in runs])),
                     "drift_cosine": float(np.mean([x["drift_cosine"] for x in runs])),
                     "accepted": sum(x["accepted"] for x in runs),
                     "rejected": sum(x["rejected"] for x in runs), "runs": runs})
    rec = [r["recovered"] for r in rows if r["recovered"] is not None]
    mean = {"recovered": float(np.mean(rec)) if rec else None,
            "clean_drop_points": float(np.mean([r["clean_drop_points"] for r in rows])),
            "before": float(np.mean([r["before"] for r in rows])), "after": float(np.mean([r["after"] for r in rows]))}

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    def recovered_cell(r):
        if r["recovered"] is None:
            return "-"
        lo, hi = r["recovered_range"]
        return f"{100 * r['recovered']:.0f}%" + (f" ({100 * lo:.0f} to {100 * hi:.0f})" if len(r["runs"]) > 1 else "")

    table_rows = [[r["shift"], pct(r["clean"]), pct(r["before"]), pct(r["after"]), recovered_cell(r), pct(r["clean_after"]),
                   f"{r['drift_cosine']:.4f}", f"{r['accepted']}/{r['accepted'] + r['rejected']}"] for r in rows]
    table_rows.append(["**mean**", pct(base_clean), pct(mean["before"]), pct(mean["after"]),
                       "-" if mean["recovered"] is None else f"**{100 * mean['recovered']:.0f}%**",
                       f"{-mean['clean_drop_points']:+.1f} pts", "", ""])
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "seed"}  # seed: the repeat's
    return {"model": base.encoder_version, "device": args.device, "rounds": args.rounds, "adaptation": settings,
            "jobs": args.jobs, "threads_per_job": 1 if args.jobs > 1 else torch.get_num_threads(),
            "adapt_seconds": seconds,
            "test_clips": args.test_clips, "adapt_clips": args.adapt_clips,
            "seed": args.seed, "repeats": args.repeats, "rows": rows, "mean": mean,
            "title": f"Adaptation under shift (accuracy %, {args.test_clips} test clips per set, adapted on "
                     f"{args.adapt_clips} other unlabeled clips, {args.rounds} rounds"
                     + (f"; mean of {args.repeats} adaptation runs per shift, range in brackets" if args.repeats > 1
                        else "") + ")",
            "table": {"columns": ["shift", "clean", "shifted before", "shifted after", "recovered", "clean after",
                                  "drift cosine", "accepted rounds"], "rows": table_rows}}


def main(args) -> None:
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        write_result(args.name, run(args, Path(args.work)), args.out)
        return
    with tempfile.TemporaryDirectory(prefix="hiera_adaptation_bench_") as d:
        write_result(args.name, run(args, Path(d)), args.out)
