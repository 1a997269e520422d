"""Training: MAE pre-training (`pretrain`) and supervised fine-tuning (`finetune`), one loop for both.

    pretrain: unlabeled clips (a data folder or a rosbag2) -> HieraMAE, loss = masked-patch MSE
    finetune: labelled clips (a data folder) -> Hiera + a classification head, loss = cross-entropy
              (+ --mae-weight x the MAE loss of the same clips: a HieraMAE whose encoder is the classifier)

The recipe follows the Hiera / MAE papers at toy scale (Ryali et al. 2023; He et al. 2022;
Feichtenhofer et al. 2022): AdamW, linear warm-up then cosine decay, no weight decay on biases, norms
and position embeddings, optional layer-wise lr decay when fine-tuning (Bao et al., BEiT 2021). The only
augmentation is the clip's random start on the video's timeline (`dataset.ClipDataset`): no horizontal
flip, which would swap swipe_left and swipe_right.

Joint training (`finetune --mae-weight W`, Sun et al., "Test-Time Training", ICML 2020): the classifier's
encoder also serves an MAE decoder and both losses train it, so the features the head reads are ones the
MAE loss shapes; on-robot adaptation then moves, with MAE steps alone, what the head reads. The decoder
comes from an MAE --init (else it is fresh) and is written with the model, as `pretrain` writes it.

Determinism and exact resume: every random draw is a function of (seed, ...) alone. Epoch e's clip order
is a permutation seeded by (seed, e); item i of epoch e draws its random start under torch's RNG seeded
by (seed, e, i), in whichever DataLoader worker loads it; step s on rank r seeds torch's RNG and the
mask generator with (seed, r, s). So a run resumed from a checkpoint at step s takes exactly the steps
the uninterrupted run would have (bit-identical on CPU), with no RNG state to save.

Checkpoints (`checkpoint.save_checkpoint`, atomic) every `--ckpt-every` steps and at `--stop-at` carry
the optimizer, scheduler and step in `extra["train_state"]`, so `--resume` continues from `--out`. The
finished model is written without that state (weights, labels, clip timing, a `train` summary) and with
its embedding statistics over up to `STATS_CLIPS` training clips (`feature_stats`, what adaptation aligns with).

Several processes: `torchrun --nproc_per_node N -m hiera_perception pretrain ...` sets WORLD_SIZE; the
group uses nccl on CUDA and gloo on CPU, each rank reads its own share of every epoch's order
(`--batch` is per process), gradients are averaged by DistributedDataParallel, and only rank 0 writes
files and shows progress.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hiera_perception import checkpoint, weights
from hiera_perception.adaptation import STATS_CLIPS, feature_stats
from hiera_perception.atomic import check_writable
from hiera_perception.checkpoint import (CheckpointError, load_checkpoint, load_model, load_official, resolve_device,
                                         save_checkpoint)
from hiera_perception.config import CONFIGS, get_config
from hiera_perception.mae import HieraMAE
from hiera_perception.model import Hiera
from hiera_perception.preprocess import normalize

__all__ = ["COMMANDS", "TrainResult", "train", "clips_to_input", "add_arguments", "main"]

log = logging.getLogger(__name__)

COMMANDS = ("pretrain", "finetune")
DEFAULT_FRAME_STRIDE_S = 0.1  # 8 frames span 0.7 s: long enough to see a wave or a swipe


@dataclass
class TrainResult:
    out: Path
    step: int  # steps done in total (including those before a resume)
    total_steps: int
    losses: list[float] = field(default_factory=list)  # this run's per-step losses (averaged over ranks)
    complete: bool = False


# ---------------------------------------------------------------------------------------------------
# Randomness, processes, input


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence: nearby tuples give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class _Procs:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_processes(device: str) -> _Procs:
    """One process, or this rank of a torchrun group (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world <= 1:
        return _Procs(0, 1, dev)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return _Procs(dist.get_rank(), dist.get_world_size(), dev)


def clips_to_input(
    clips: torch.Tensor, mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A batch of crop_resize'd uint8 clips [B, T, S, S, 3] -> normalised model input [B, 3, T, S, S]."""
    return normalize(clips.to(device, non_blocking=True), mean, std)


class _Keyed(torch.utils.data.Dataset):
    """Item (index, epoch) of `base`, loaded under torch's RNG seeded by (seed, epoch, index)."""

    def __init__(self, base: torch.utils.data.Dataset, indices: Sequence[int], seed: int):
        self.base, self.indices, self.seed = base, list(indices), seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream stays untouched
            # The CPU generator alone, which is what fork_rng restores and the item draws from:
            # torch.manual_seed would also queue a seed for every lazy device backend, ~1 ms a call.
            torch.default_generator.manual_seed(_seed(self.seed, epoch, index))
            return self.base[self.indices[index]]


class _EpochBatches(torch.utils.data.Sampler):
    """This rank's batches of one epoch: a seeded permutation, shared out like DistributedSampler
    (padded by wrapping so every rank gets as many), full batches only, the first `skip` left out."""

    def __init__(self, n: int, batch: int, procs: _Procs, seed: int):
        self.n, self.batch, self.procs, self.seed = n, batch, procs, seed
        self.per_rank = math.ceil(n / procs.world)
        self.steps_per_epoch = self.per_rank // batch
        if self.steps_per_epoch < 1:
            raise ValueError(f"--batch {batch} x {procs.world} process(es) is more than the {n} clips of an epoch; "
                             f"lower --batch or raise --clips-per-video")
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.steps_per_epoch - self.skip

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=g).tolist()
        order += order[: self.per_rank * self.procs.world - self.n]
        mine = order[self.procs.rank :: self.procs.world]
        for b in range(self.skip, self.steps_per_epoch):
            yield [(i, self.epoch) for i in mine[b * self.batch : (b + 1) * self.batch]]


# ---------------------------------------------------------------------------------------------------
# Models and optimisation


def _load_init(source: str, arch: str | None) -> tuple[torch.nn.Module, dict]:
    """An --init source -> (Hiera or HieraMAE with its weights, metadata: labels, model_id, sampling, kind)."""
    path = Path(source)
    if not path.is_file() and (checkpoint.MODELS_DIR / source).is_file():  # where load_model looks next
        path = checkpoint.MODELS_DIR / source
    if not path.is_file():
        path = weights.resolve(source) or path  # a fetched official checkpoint's name
    if not path.is_file():  # a config name: random weights (load_model warns), trained under the config's name
        enc = load_model(source, device="cpu").train()
        return enc, {"labels": [], "model_id": "", "sampling": {}, "history": [], "kind": "encoder"}
    try:
        ck = load_checkpoint(path)
    except CheckpointError as e:
        if "not a hiera_perception checkpoint" not in str(e):
            raise
        entry = weights.entry_for_path(path)
        arch = arch or (entry.config if entry else None)
        if arch is None:
            raise ValueError(f"{path} is an official checkpoint: name its config with --arch, one of "
                             f"{', '.join(CONFIGS)}")
        # an official MAE keeps its decoder and its encoder's pooling (mae_q_pool); a fine-tuned file is an encoder
        model = load_official(path, arch, mae=None).train()
        kind = "mae" if isinstance(model, HieraMAE) else "encoder"
        labels = weights.kinetics400_labels() if model.config.num_classes == 400 else []
        return model, {"labels": labels, "model_id": arch, "sampling": {}, "history": [], "kind": kind}
    enc = Hiera(ck.config)
    history = list(ck.extra.get("history", [])) + ([ck.extra["train"]] if "train" in ck.extra else [])
    meta = {"labels": ck.labels, "model_id": ck.model_id, "sampling": dict(ck.extra.get("sampling", {})),
            "history": history}
    if any(k.startswith("decoder_") for k in ck.model_state):
        model = HieraMAE(ck.config, encoder=enc)
        model.load_state_dict(ck.model_state)
        return model, {**meta, "kind": "mae"}
    enc.load_state_dict(ck.model_state)
    return enc, {**meta, "kind": "encoder"}


def _classifier(enc: Hiera, num_classes: int, keep_head: bool) -> Hiera:
    """The encoder's weights under a head of `num_classes`, with the query pooling its registered config
    serves with (an official MAE encoder pools once less than the classifier; pooling has no weights)."""
    cfg = enc.config
    registered = CONFIGS.get(cfg.name, cfg)  # pooling and head init as the registered config serves/trains
    model = Hiera(cfg.replace(num_classes=num_classes, q_pool=registered.q_pool,
                              head_init_scale=registered.head_init_scale))
    state = {k: v for k, v in enc.state_dict().items() if keep_head or not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise ValueError(f"init weights do not fit {cfg.name}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model


def _param_groups(model: torch.nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases, norms, position embeddings and the mask token; with layer_decay < 1
    the lr of encoder layer l (0 = patch embedding, L = final norm and head) is scaled by decay**(L - l)."""
    enc = model.encoder if isinstance(model, HieraMAE) else model
    prefix = "encoder." if isinstance(model, HieraMAE) else ""
    last = len(enc.blocks) + 1
    no_decay = {prefix + n for n in enc.no_weight_decay()} | {"mask_token", "decoder_pos_embed"}

    def layer(name: str) -> int:
        name = name[len(prefix) :] if name.startswith(prefix) else name
        if name.startswith(("patch_embed", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return last  # final norm, head, and every MAE decoder part

    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        decay = p.ndim > 1 and name not in no_decay
        lid = layer(name)
        g = groups.setdefault((lid, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                             "lr": lr * layer_decay ** (last - lid)})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def _schedule(total: int, warmup: int):
    """lr multiplier at step s: linear warm-up over `warmup` steps, then cosine from 1 to 0 at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * t))

    return f


def _feature_stats(enc: Hiera, clips: "_Keyed", classes: list[str], labels: list[str], device: torch.device,
                   batch: int) -> dict:
    """The trained encoder's embedding statistics over up to STATS_CLIPS of its training clips, evenly spread;
    per head class too when every clip's label (`classes[y]`, y < 0: none) is one of the head's `labels`."""
    picks = sorted({round(i * (len(clips) - 1) / max(1, min(len(clips), STATS_CLIPS) - 1))
                    for i in range(min(len(clips), STATS_CLIPS))})
    head = {name: i for i, name in enumerate(labels)} if enc.config.num_classes == len(labels) else {}

    def batches():
        for i in range(0, len(picks), batch):
            items = [clips[(k, 0)] for k in picks[i : i + batch]]
            x = clips_to_input(torch.stack([c for c, _ in items]), enc.config.mean, enc.config.std, device)
            names = [classes[int(y)] if 0 <= int(y) < len(classes) else None for _, y in items]
            yield x, (torch.tensor([head[n] for n in names]) if head and all(n in head for n in names) else None)

    return feature_stats(enc, batches())


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[None]:
    """Ctrl-C inside waits for the end of the block: an optimizer update and its step count are one, so the
    checkpoint Ctrl-C writes is a step boundary (interrupted between the two, it held step s+1's weights and Adam
    moments under step s, and a resume repeated a step). Main thread only; elsewhere a plain block."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def _set_frozen(model: Hiera, frozen: bool) -> None:
    """Freeze (or unfreeze) everything but the classification head."""
    for name, p in model.named_parameters():
        p.requires_grad_(not frozen or name.startswith("head."))


# ---------------------------------------------------------------------------------------------------
# Data


def _dataset(args, cfg, stride: float, labelled: bool):
    """(dataset of (uint8 [T, S, S, 3], label index) items, the indices to train on, class names)."""
    T, S = cfg.input_size[0], cfg.input_size[1]
    if getattr(args, "bag", None):
        from hiera_perception.bag import BagClips

        if labelled:
            raise ValueError("finetune needs labelled clips: give --data DIR (a bag has no labels)")
        ds = BagClips(args.bag, args.topic, T, stride, S)  # no --topic: the bag's only image topic
        return ds, list(range(len(ds))), []
    from hiera_perception.dataset import ClipDataset

    ds = ClipDataset(args.data, T, stride, S, clips_per_video=args.clips_per_video, train=True,
                     cache_frames=args.cache_frames)
    labels = ds.labels()
    indices = [i for i, y in enumerate(labels) if y >= 0] if labelled else list(range(len(ds)))
    if labelled and not indices:
        raise ValueError(f"{args.data}: labels.csv gives no labels; finetune needs labelled clips")
    if labelled and len(indices) < len(ds):
        log.warning("%s: %d of %d clips are unlabelled and left out", args.data, len(ds) - len(indices), len(ds))
    if labelled and args.only_classes:
        unknown = sorted(set(args.only_classes) - set(ds.classes))
        if unknown:
            raise ValueError(f"--only-classes {unknown} not in {args.data}'s classes {ds.classes}")
        keep = {ds.classes.index(c) for c in args.only_classes}
        indices = [i for i in indices if labels[i] in keep]
        log.info("--only-classes: %d clips of %s (the head keeps all %d classes)", len(indices),
                 ",".join(args.only_classes), len(ds.classes))
    return ds, indices, ds.classes


@torch.inference_mode()
def _val_accuracy(model: Hiera, folder: str, stride: float, classes: list[str], device: torch.device) -> float:
    """Top-1 accuracy on the middle clip of every labelled video in `folder` (a quick check while training;
    `hiera-perception eval` is the full report)."""
    from hiera_perception.dataset import ClipDataset

    cfg = model.config
    ds = ClipDataset(folder, cfg.input_size[0], stride, cfg.input_size[1], classes=classes)
    loader = torch.utils.data.DataLoader(ds, batch_size=32)
    was_training = model.training
    model.eval()
    correct = total = 0
    for clips, y in loader:
        keep = y >= 0
        logits = model(clips_to_input(clips[keep], cfg.mean, cfg.std, device)).logits
        correct += int((logits.argmax(1).cpu() == y[keep]).sum())
        total += int(keep.sum())
    model.train(was_training)
    return correct / max(total, 1)


# ---------------------------------------------------------------------------------------------------
# The loop


def _build(args, command: str) -> tuple[torch.nn.Module, dict, dict | None]:
    """(model, metadata, train_state) for a fresh run or a resumed one."""
    if args.resume and Path(args.out).is_file():
        ck = load_checkpoint(args.out)
        state = ck.extra.get("train_state")
        enc = Hiera(ck.config)
        model = HieraMAE(ck.config, encoder=enc) if command == "pretrain" or _joint(args) else enc
        model.load_state_dict(ck.model_state)
        meta = {"labels": ck.labels, "model_id": ck.model_id, "sampling": dict(ck.extra.get("sampling", {})),
                "train": ck.extra.get("train", {}), "history": list(ck.extra.get("history", []))}
        return model, meta, state if state is not None else {"finished": True}
    if args.resume:
        log.info("--resume: %s does not exist yet, starting afresh", args.out)
    meta = {"labels": [], "model_id": "", "sampling": {}, "history": []}
    if args.init:
        model, meta = _load_init(args.init, args.arch)
    elif command == "pretrain" and args.config:
        model = HieraMAE(get_config(args.config))  # MAE's own initialisation, its encoder pooling mae_q_pool times
    elif command == "finetune":
        model = Hiera(get_config(args.config or "hiera_tiny_8x64"))
    else:
        raise ValueError("pretrain needs --config NAME (a fresh model) or --init CKPT")
    if command == "pretrain" and isinstance(model, Hiera):
        model = HieraMAE(model.config, encoder=model)  # a fresh decoder on these encoder weights
    return model, meta, None


def _prepare(model, enc: Hiera, args, meta: dict, state: dict | None, classes: list[str]):
    """(model, its encoder, label names): a head for finetune, the parameters each command leaves alone."""
    if args.command == "finetune":
        if state is None:
            decoder = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")} \
                if _joint(args) and isinstance(model, HieraMAE) else {}
            model = enc = _classifier(enc, len(classes), keep_head=meta["labels"] == classes)
            if _joint(args):
                model = HieraMAE(enc.config, encoder=enc)  # a fresh decoder, or the --init's below
                if decoder:
                    model.load_state_dict({**model.state_dict(), **decoder})
                else:
                    log.info("--mae-weight: %s has no MAE decoder; training a fresh one", args.init or "a new model")
        elif meta["labels"] != classes:
            raise ValueError(f"{args.out} was trained on classes {meta['labels']}, {args.data} has {classes}")
        return model, enc, classes
    enc.norm.requires_grad_(False)  # MAE uses its own fused norm; the encoder's norm and head stay as they are
    if enc.head is not None:
        enc.head.requires_grad_(False)
    if args.freeze_encoder:  # align a decoder with a trained encoder (e.g. after fine-tuning)
        enc.requires_grad_(False)
    return model, enc, meta["labels"]


def _joint(args) -> bool:
    return args.command == "finetune" and args.mae_weight > 0


class _JointLoss(torch.nn.Module):
    """finetune --mae-weight: (logits, MAE loss) of a batch in one forward, so DDP syncs gradients once."""

    def __init__(self, mae: HieraMAE):
        super().__init__()
        self.mae = mae

    def forward(self, x: torch.Tensor, mask_ratio: float, generator: torch.Generator):
        return self.mae.encoder(x).logits, self.mae(x, mask_ratio=mask_ratio, generator=generator).loss


def train(args: argparse.Namespace) -> TrainResult:
    """Run `args.command` ("pretrain" or "finetune") to completion, `--stop-at`, or from `--resume`."""
    command = args.command
    if command not in COMMANDS:
        raise ValueError(f"unknown training command {command!r}; valid: {COMMANDS}")
    procs = _init_processes(args.device)
    try:
        return _train(args, command, procs)
    finally:
        if procs.world > 1:
            dist.destroy_process_group()


def _train(args, command: str, procs: _Procs) -> TrainResult:
    out = Path(args.out)
    torch.manual_seed(_seed(args.seed))  # the initial weights (every rank alike; a resume overwrites them)
    model, meta, state = _build(args, command)
    if state is not None and state.get("finished"):
        done = meta["train"].get("steps", 0)
        log.info("%s is a finished run (%s steps); nothing to resume", out, done)
        if args.steps and args.steps != done:  # a finished schedule does not stretch: its lr has decayed to 0
            log.warning("--steps %d ignored: a finished run keeps its schedule; to train on, start a new run from "
                        "it: --init %s --out NEW.pt", args.steps, out)
        return TrainResult(out, done, done, complete=True)
    enc = model.encoder if isinstance(model, HieraMAE) else model
    stride = float(args.frame_stride if args.frame_stride is not None
                   else meta["sampling"].get("frame_stride_s") or DEFAULT_FRAME_STRIDE_S)
    ds, indices, classes = _dataset(args, enc.config, stride, labelled=command == "finetune")
    model, enc, labels = _prepare(model, enc, args, meta, state, classes)
    # A new run is a new model: named after its file unless told (with --init's id, a fine-tuned copy of the
    # embedded model published the same encoder_version and shared its adaptation folder); a resumed run keeps its id.
    model_id = args.model_id or (meta["model_id"] if state else "") or out.stem
    model.to(procs.device).train()

    batches = _EpochBatches(len(indices), args.batch, procs, args.seed)
    total = state["total_steps"] if state else (args.steps or args.epochs * batches.steps_per_epoch)
    if state and args.steps and args.steps != total:
        log.warning("--resume keeps the run's schedule of %d steps (ignoring --steps %d)", total, args.steps)
    optimizer = torch.optim.AdamW(_param_groups(model, args.lr, args.weight_decay, args.layer_decay),
                                  betas=(0.9, 0.95) if command == "pretrain" else (0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total, max(1, round(args.warmup * total))))
    step = 0
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        log.info("resuming %s at step %d of %d", out, step, total)
    unfreeze_epoch = 0 if command == "pretrain" else (math.inf if args.freeze_encoder else args.unfreeze_after)

    loader_ds = _Keyed(ds, indices, args.seed)
    mask_gen = torch.Generator(procs.device)
    summary = {
        "command": command, "data": str(args.bag or args.data), "topic": args.topic, "init": args.init,
        "seed": args.seed, "steps": total, "batch": args.batch, "world_size": procs.world, "lr": args.lr,
        "weight_decay": args.weight_decay, "warmup": args.warmup, "clips": len(indices),
        "clips_per_video": args.clips_per_video, "steps_per_epoch": batches.steps_per_epoch,
    }
    joint = _joint(args)
    if command == "pretrain":
        summary.update(mask_ratio=args.mask_ratio, freeze_encoder=bool(args.freeze_encoder))
    else:
        summary.update(label_smoothing=args.label_smoothing, layer_decay=args.layer_decay, classes=labels,
                       only_classes=args.only_classes,
                       freeze_encoder=bool(args.freeze_encoder), unfreeze_after=args.unfreeze_after)
        if joint:
            summary.update(mae_weight=args.mae_weight, mask_ratio=args.mask_ratio)

    def save(final: bool, loss: float | None) -> None:
        if not procs.main:
            return
        extra = {"sampling": {"frame_stride_s": stride}, "train": {**summary, "step": step, "final_loss": loss},
                 "history": meta["history"]}  # the earlier stages' summaries (pretrain before finetune, ...)
        if not final:
            extra["train_state"] = {"step": step, "total_steps": total, "optimizer": optimizer.state_dict(),
                                    "scheduler": scheduler.state_dict()}
        elif len(indices) >= 2:  # what on-robot adaptation aligns the camera's embeddings with
            extra["feature_stats"] = _feature_stats(enc, loader_ds, classes, labels, procs.device, args.batch)
        save_checkpoint(out, model, labels=labels, model_id=model_id, version=0, step=step, extra=extra)

    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, desc=command, unit="step", file=sys.stderr,
               disable=not procs.main or args.no_progress)
    losses: list[float] = []
    stop_at = min(total, args.stop_at) if args.stop_at is not None else total
    ddp: torch.nn.Module | None = None
    frozen: bool | None = None
    t_run = time.monotonic()
    try:
        while step < stop_at:
            epoch, skip = divmod(step, batches.steps_per_epoch)
            if command == "finetune" and frozen != (epoch < unfreeze_epoch):
                frozen = epoch < unfreeze_epoch
                _set_frozen(enc, frozen)  # a joint run's decoder always trains
                ddp = None  # DDP registers the parameters that need gradients when it is built
                if procs.main and 0 < unfreeze_epoch == epoch:  # not on a resume past it
                    log.info("epoch %d: encoder unfrozen", epoch)
            if ddp is None:
                net = _JointLoss(model) if joint else model
                ddp = torch.nn.parallel.DistributedDataParallel(net) if procs.world > 1 else net
            batches.set_epoch(epoch, skip)
            loader = torch.utils.data.DataLoader(loader_ds, batch_sampler=batches, num_workers=args.workers,
                                                 pin_memory=procs.device.type == "cuda")
            epoch_loss, epoch_n, epoch_mae, correct, seen, t0 = 0.0, 0, 0.0, 0, 0, time.monotonic()
            for clips, y in loader:
                torch.manual_seed(_seed(args.seed, procs.rank, step))  # dropout, drop-path
                mask_gen.manual_seed(_seed(args.seed, procs.rank, step, 1))
                x = clips_to_input(clips, enc.config.mean, enc.config.std, procs.device)
                if command == "pretrain":
                    loss = ddp(x, mask_ratio=args.mask_ratio, generator=mask_gen).loss
                else:
                    y = y.to(procs.device)
                    if joint:
                        logits, mae_loss = ddp(x, args.mask_ratio, mask_gen)
                        epoch_mae += float(mae_loss.detach())  # this rank's, for the epoch log
                    else:
                        logits, mae_loss = ddp(x).logits, 0.0
                    loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing) + args.mae_weight * mae_loss
                    correct += int((logits.argmax(1) == y).sum())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if args.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], args.clip_grad)
                with _deferred_interrupt():
                    optimizer.step()
                    scheduler.step()
                    step += 1
                value = loss.detach()
                if procs.world > 1:
                    dist.all_reduce(value)
                    value /= procs.world
                value = float(value)
                if not math.isfinite(value):
                    raise FloatingPointError(f"{command}: loss is {value} at step {step}; lower --lr")
                losses.append(value)
                epoch_loss, epoch_n, seen = epoch_loss + value, epoch_n + 1, seen + len(clips) * procs.world
                bar.update(1)
                bar.set_postfix(loss=f"{epoch_loss / epoch_n:.4f}", clips_s=f"{seen / (time.monotonic() - t0):.1f}",
                                lr=f"{scheduler.get_last_lr()[-1]:.2e}", epoch=epoch)
                if step >= stop_at:
                    break
                if args.ckpt_every and step % args.ckpt_every == 0:
                    save(False, value)
            if epoch_n and procs.main and (step % batches.steps_per_epoch == 0 or step == stop_at):
                msg = f"{command} epoch {epoch}: step {step}/{total} loss {epoch_loss / epoch_n:.4f}"
                if command == "finetune":
                    msg += f" train acc {correct / (epoch_n * args.batch):.3f}"  # this rank's share
                    if joint:
                        msg += f" mae loss {epoch_mae / epoch_n:.4f}"
                    if args.val and (step % batches.steps_per_epoch == 0 or step == total):
                        msg += f" val acc {_val_accuracy(enc, args.val, stride, labels, procs.device):.3f}"
                if epoch == 0 and getattr(ds, "cached_bytes", 0):
                    msg += f", frame cache {ds.cached_bytes / 2**30:.2f} GiB"
                log.info("%s, %.1f clips/s", msg, seen / max(time.monotonic() - t0, 1e-9))
    except KeyboardInterrupt:  # Ctrl-C: keep what was trained, resumable, and say so
        bar.close()
        if procs.main and step > 0:
            save(False, losses[-1] if losses else None)
            log.warning("interrupted at step %d of %d: %s holds it; continue with --resume", step, total, out)
        raise
    bar.close()
    complete = step >= total
    save(complete, losses[-1] if losses else None)
    if procs.main:
        log.info("%s: %s after %d/%d steps (%.0f s) -> %s", command, "done" if complete else "stopped", step,
                 total, time.monotonic() - t_run, out)
    return TrainResult(out, step, total, losses, complete)


# ---------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser, command: str | None = None) -> None:
    """Options of `pretrain` or `finetune` (told by `command`, else by the sub-parser's name)."""
    command = command or parser.prog.split()[-1]
    if command not in COMMANDS:
        raise ValueError(f"add_arguments: command must be one of {COMMANDS}, got {command!r}")
    pre = command == "pretrain"
    data = parser.add_argument_group("data")
    src = data.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="data folder (labels.csv beside the videos)" + ("; labels are ignored" if pre else ""))
    if pre:
        src.add_argument("--bag", help="rosbag2 folder (or file) to take unlabeled clips from")
        data.add_argument("--topic", help="image topic in --bag (sensor_msgs/Image or CompressedImage; default: "
                          "its only image topic)")
    data.add_argument("--frame-stride", type=float, default=None,
                      help=f"seconds between a clip's frames (default: --init's, else {DEFAULT_FRAME_STRIDE_S})")
    data.add_argument("--clips-per-video", type=int, default=1, help="random clips per video per epoch (default 1)")
    data.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    data.add_argument("--cache-frames", action="store_true",
                      help="keep every video's decoded, resized frames in memory after its first read (with "
                           "--data, --workers 0): later epochs decode nothing; RAM: videos x frames x size^2 x 3 B")
    m = parser.add_argument_group("model")
    m.add_argument("--config", choices=list(CONFIGS), default=None,
                   help="start from random weights of this config" + ("" if pre else " (default hiera_tiny_8x64)"))
    m.add_argument("--init", default=None, help="start from this checkpoint: ours (MAE or encoder) or an official "
                   ".pth with --arch" + ("" if pre else "; an MAE checkpoint gives its encoder"))
    m.add_argument("--arch", default=None, help="config name of an official .pth given to --init")
    m.add_argument("--out", required=True, help="checkpoint to write (atomically; also every --ckpt-every steps)")
    m.add_argument("--model-id", default=None, help="model id stored in the checkpoint, published as its "
                   "encoder_version (default: the --out file's name)")
    o = parser.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=10, help="passes over the data (default 10)")
    o.add_argument("--steps", type=int, default=None, help="total optimizer steps (overrides --epochs)")
    o.add_argument("--batch", type=int, default=16, help="clips per step per process (default 16)")
    o.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    o.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    o.add_argument("--warmup", type=float, default=0.05, help="fraction of steps warming up (default 0.05)")
    o.add_argument("--clip-grad", type=float, default=1.0, help="gradient norm clip, 0 = off (default 1.0)")
    o.add_argument("--layer-decay", type=float, default=1.0, help=argparse.SUPPRESS if pre else
                   "layer-wise lr decay (e.g. 0.75; default 1.0 = off)")
    o.add_argument("--mask-ratio", type=float, default=0.9, help="share of mask units dropped (default 0.9)"
                   + ("" if pre else "; with --mae-weight"))
    if pre:
        o.add_argument("--freeze-encoder", action="store_true",
                       help="train only the decoder (align it with a trained encoder given to --init)")
    else:
        o.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing (default 0.1)")
        fz = o.add_mutually_exclusive_group()
        fz.add_argument("--freeze-encoder", action="store_true", help="train the head only (a linear probe)")
        fz.add_argument("--unfreeze-after", type=int, default=0, metavar="N",
                        help="train the head only for the first N epochs, then everything (default 0)")
        o.add_argument("--mae-weight", type=float, default=0.0, metavar="W",
                       help="joint training: cross-entropy + W x the MAE loss on the same clips, through one "
                            "encoder, with the --init's MAE decoder (or a fresh one); 0 = off (default)")
        o.add_argument("--val", default=None, help="data folder whose accuracy is logged after every epoch")
        o.add_argument("--only-classes", default=None, metavar="A,B",
                       type=lambda v: [c.strip() for c in v.split(",") if c.strip()],
                       help="train on the clips of these classes only; the head keeps every class (a curriculum "
                            "stage: chain stages with --init)")
    r = parser.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0, help="the run is a function of the seed (default 0)")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda (torchrun: each rank its LOCAL_RANK GPU)")
    r.add_argument("--ckpt-every", type=int, default=500, help="write a resumable checkpoint every N steps (0 = off)")
    r.add_argument("--resume", action="store_true", help="continue the run saved in --out (starts afresh if absent)")
    r.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop after this step with a resumable checkpoint (time-sliced training)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar (epoch summaries are still logged)")
    parser.set_defaults(command=command)


def _check(args: argparse.Namespace) -> None:
    for name in ("batch", "epochs", "clips_per_video"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    for name in ("frame_stride", "stop_at"):  # None: the default; 0 would mean nothing
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not args.lr > 0:  # a negative lr climbs the loss; lr 0 trains nothing
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    for name in ("weight_decay", "clip_grad"):  # clip_grad 0 = off
        if not getattr(args, name) >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0.0 < args.layer_decay <= 1.0:  # below 0 the layers' lrs alternate in sign
        raise ValueError(f"--layer-decay must be in (0, 1], got {args.layer_decay}")
    if not 0.0 <= args.warmup < 1.0:
        raise ValueError(f"--warmup is a fraction of the steps in [0, 1), got {args.warmup}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.cache_frames and (args.workers or getattr(args, "bag", None)):
        # a worker's cache would die with it at the end of every epoch
        raise ValueError("--cache-frames caches in the training process: it needs --data and --workers 0")
    if args.config and args.init:
        raise ValueError("give --config (fresh weights) or --init (a checkpoint), not both")
    if Path(args.out).exists() and not args.resume:  # a re-run meant to continue would train over it
        log.warning("--out %s exists and is replaced at this run's first checkpoint (--resume continues it "
                    "instead)", args.out)
    check_writable(args.out)  # now, not at the first checkpoint
    for name in ("bag", "topic", "label_smoothing", "val", "only_classes"):
        if not hasattr(args, name):
            setattr(args, name, None)
    args.mae_weight = getattr(args, "mae_weight", 0.0)  # finetune only
    if args.command == "finetune":
        args.unfreeze_after = getattr(args, "unfreeze_after", 0) or 0
        if args.label_smoothing is not None and not 0.0 <= args.label_smoothing < 1.0:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
        if args.mae_weight < 0:
            raise ValueError(f"--mae-weight must be >= 0, got {args.mae_weight}")
        if args.mae_weight and args.freeze_encoder:
            raise ValueError("--mae-weight trains the encoder with the MAE loss; it cannot go with --freeze-encoder")
    if not 0.0 <= args.mask_ratio < 1.0:
        raise ValueError(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")


def main(args: argparse.Namespace) -> int:
    _check(args)
    result = train(args)
    return 0 if result.step > 0 or result.complete else 1


if __name__ == "__main__":  # `python -m hiera_perception.train pretrain ...` (torchrun -m takes this too): the CLI's
    from hiera_perception.cli import main as cli_main

    sys.exit(cli_main(sys.argv[1:]))
