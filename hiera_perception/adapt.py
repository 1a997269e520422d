"""`hiera-perception adapt`: unlabeled MAE adaptation offline, with the node's own Adapter.

    hiera-perception adapt --model M.pt --data DIR --out M2.pt [--rounds N --steps-per-round K ...]
    hiera-perception adapt --model M.pt --bag BAG --topic /camera/image_raw --out M2.pt

The clips of a data folder (random starts on each video's timeline, labels ignored) or of a rosbag2's
camera topic (cut as the node cuts them) stream into `adaptation.Adapter` as a camera would feed it,
and rounds run synchronously (`run_round(wait=False)`: no inference to yield to). The guard, the
version numbering and the trainable parameters are exactly the node's (`adaptation.py`). The output
is our checkpoint of the deployed HieraMAE (encoder *and* decoder), so it serves as a model and can
adapt further; the model's clip timing, labels and taught labels (copied beside it) carry over. A
reconstruction PNG beside it shows the same clip before (top) and after (bottom) adaptation.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from hiera_perception import weights
from hiera_perception.adaptation import AdaptationConfig, Adapter
from hiera_perception.atomic import atomic_write_bytes, check_writable
from hiera_perception.checkpoint import load_model, mae_state
from hiera_perception.labeler import prototypes_path
from hiera_perception.model import Hiera
from hiera_perception.reconstruction import reconstruction_panel, save_png

__all__ = ["AdaptSummary", "adapt_offline", "clip_stream", "decoder_state_of", "png_path", "add_arguments", "main"]

log = logging.getLogger(__name__)

# AdaptationConfig fields that mean nothing offline: no inference to share the device with, no thread,
# no versions on disk (the output is one file), and the seed comes from --seed.
_ONLINE_ONLY = ("max_device_share", "round_interval_s", "keep_versions", "seed")
_HELP = {
    "lr": "AdamW learning rate", "weight_decay": "AdamW weight decay", "mask_ratio": "share of mask units dropped",
    "steps_per_round": "MAE steps between two guard checks", "batch_size": "clips per MAE step",
    "grad_clip": "gradient norm clip", "trainable": "which encoder parameters train: all | norms | late",
    "train_decoder": "train the decoder too", "replay_mb": "replay buffer cap in MB",
    "min_clips": "clips in the replay before the first round", "probe_clips": "clips of the fixed probe set",
    "min_probe_cosine": "reject a round whose probe embeddings' mean cosine to the input model is below this",
    "max_loss_increase": "reject a round whose probe MAE loss + mean/variance alignment exceeds the deployed one's "
                         "by this fraction",
    "align_weight": "weight of the embedding-statistics alignment (mean/variance and per-class means) beside the "
                    "MAE loss (0: MAE alone)",
    "align_momentum": "running average of the camera's embedding statistics over its batches (kept across rounds)",
    "decoder_warmup_rounds": "rounds training a fresh decoder alone (models without decoder weights)",
    "stage_weight": "weight of each encoder stage's token mean/variance alignment with the training clips' (0: off)",
    "threads": "CPU threads of the adaptation steps (0: torch's default)",
    "blend": "what is written is original + blend x (adapted - original) (weight-space ensembling; 1: adapted)",
}


@dataclass
class AdaptSummary:
    out: Path
    png: Path
    rounds: int = 0
    accepted: int = 0
    rejected: int = 0
    warmup: int = 0
    version: int = 0
    clips: int = 0
    probe_loss_before: float = math.nan  # probe MAE loss + mean/variance alignment of the input model
    probe_loss_after: float = math.nan  # ... of the written one
    probe_mae_before: float = math.nan  # its MAE part
    probe_mae_after: float = math.nan
    probe_cosine: float = 1.0  # mean cosine of the written model's probe embeddings to the input model's
    reasons: Counter = field(default_factory=Counter)  # rejections per kind: loss rose | drift | a fault

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(out=str(self.out), png=str(self.png), reasons=dict(self.reasons))
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _reason_kind(reason: str) -> str:
    """A rejection's kind for the summary: loss rose | drift | the fault's exception type."""
    if reason.startswith("probe loss rose"):
        return "loss rose"
    if reason.startswith("embedding drift"):
        return "drift"
    return reason.split(":")[0]


def png_path(out: str | os.PathLike) -> Path:
    """Where the run's reconstruction PNG goes: `<out without suffix>.reconstruction.png`."""
    out = Path(out)
    return out.with_name(out.stem + ".reconstruction.png")


def decoder_state_of(model: Hiera) -> dict[str, torch.Tensor] | None:
    """The HieraMAE state of the checkpoint `model` was loaded from, when it holds decoder weights: our MAE
    checkpoints (e.g. the embedded model) or an official MAE file (fetched, or a path); None otherwise (the
    Adapter then warms a fresh decoder up). An official decoder fits: the MAE pools as the official one."""
    source = getattr(model, "source_path", None)
    entry = weights.find_entry(str(getattr(model, "model_id", "")))
    if not source and entry is not None and entry.kind == "mae":  # a fetched official MAE, loaded by name
        source = weights.resolve(entry.name)
    if not source:
        return None
    try:
        return mae_state(source, model.config)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError; it served a moment ago: changed since
        log.warning("decoder weights of %s unreadable (%s); a fresh decoder is warmed up", source, e)
        return None


def clip_stream(num_frames: int, frame_stride_s: float, size: int, data: str | None = None, bag: str | None = None,
                topic: str | None = None, seed: int = 0) -> Iterator[np.ndarray]:
    """Endless uint8 clips [T, S, S, 3]: shuffled passes over a data folder (a random start per video and pass)
    or over a bag topic's clips. Deterministic for a seed."""
    if (data is None) == (bag is None):
        raise ValueError("give exactly one clip source: a data folder or a bag")
    if bag is not None:
        from hiera_perception.bag import BagClips

        ds = BagClips(bag, topic, num_frames, frame_stride_s, size)
    else:
        from hiera_perception.dataset import ClipDataset

        ds = ClipDataset(data, num_frames, frame_stride_s, size, clips_per_video=1, train=True)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)  # ClipDataset draws its random starts from torch's generator
    while True:
        for i in rng.permutation(len(ds)):
            yield ds[int(i)][0].numpy()


def adapt_offline(
    model: str | Hiera | None,
    out: str | os.PathLike,
    *,
    data: str | None = None,
    bag: str | None = None,
    topic: str | None = None,
    config: AdaptationConfig | None = None,
    rounds: int = 10,
    clips_per_round: int | None = None,
    device: str = "auto",
    progress: bool = True,
    model_id: str | None = None,
) -> AdaptSummary:
    """Adapt `model` (a loaded Hiera, or anything `load_model` takes) on unlabeled clips; write `out` and its PNG.

    The output is a model of its own, `model_id` (default: `out`'s file name): it publishes its own
    encoder_version and a node serving it keeps its own adaptation folder (under the input's id, its version
    numbers would name other weights than the input's and a node's resume pointer would be shared).

    Each round first streams `clips_per_round` new clips (default: batch_size) into the replay, then runs one
    Adapter round. A model without decoder weights first spends `decoder_warmup_rounds` extra rounds training
    its decoder. Returns the figures of the run.
    """
    from tqdm import tqdm

    config = config or AdaptationConfig()
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    clips_per_round = config.batch_size if clips_per_round is None else clips_per_round
    if clips_per_round < 0:
        raise ValueError(f"clips_per_round must be >= 0, got {clips_per_round}")
    if config.threads:  # offline, the adapter is the only work: the whole process runs on that many threads
        torch.set_num_threads(config.threads)
    if not isinstance(model, Hiera):
        model = load_model(model, device=device)
    model.eval()
    mae_state = decoder_state_of(model)
    T, S = model.config.input_size[0], model.config.input_size[1]
    stride = float(getattr(model, "sampling", {}).get("frame_stride_s", 4 / 30))
    stream = clip_stream(T, stride, S, data=data, bag=bag, topic=topic, seed=config.seed)
    adapter = Adapter(model, config, mae_state=mae_state, version=int(getattr(model, "version", 0)),
                      model_id=model_id or Path(out).stem)
    before = copy.deepcopy(adapter.mae)  # the input model with its decoder, for the PNG
    summary = AdaptSummary(Path(out), png_path(out), version=adapter.version)
    total = rounds + (config.decoder_warmup_rounds if adapter.decoder_warmup else 0)
    if adapter.decoder_warmup:
        log.info("%s has no decoder weights: %d warm-up rounds train a fresh decoder first",
                 getattr(model, "source_path", None) or model.config.name, config.decoder_warmup_rounds)

    while len(adapter.replay) < config.min_clips:
        adapter.add_clip(next(stream))
        summary.clips += 1
    bar = tqdm(range(total), desc="adapt", unit="round", disable=None if progress else True)
    for _ in bar:
        for _ in range(clips_per_round):
            adapter.add_clip(next(stream))
            summary.clips += 1
        res = adapter.run_round(wait=False)
        summary.rounds += 1
        if math.isnan(summary.probe_loss_before):
            summary.probe_loss_before = summary.probe_loss_after = res.probe_loss_before
            summary.probe_mae_before = summary.probe_mae_after = res.probe_mae_before
        if res.accepted:
            summary.accepted += 1
            summary.probe_loss_after, summary.probe_cosine = res.probe_loss_after, res.probe_cosine
            summary.probe_mae_after = res.probe_mae_after
        elif res.reason.startswith("decoder warm-up"):
            summary.warmup += 1
            # the encoder is still the input model's; the comparisons start from its trained decoder
            summary.probe_loss_before = summary.probe_loss_after = res.probe_loss_after
            summary.probe_mae_before = summary.probe_mae_after = res.probe_mae_after
            before = copy.deepcopy(adapter.mae)
        else:
            summary.rejected += 1
            summary.reasons[_reason_kind(res.reason)] += 1
        bar.set_postfix(v=adapter.version, ok=summary.accepted, rej=summary.rejected,
                        loss=f"{summary.probe_loss_after:.4f}", cos=f"{summary.probe_cosine:.3f}")
    summary.version = adapter.version

    # After every round the shadow equals what is deployed (accepted: it became it; rejected: reset to it).
    adapter.write(summary.out, extra={"adaptation": {**summary.to_dict(), "config": dataclasses.asdict(config),
                                                     "source": data or bag, "topic": topic}})
    source = getattr(model, "source_path", None)
    if source and prototypes_path(source).is_file():  # the guard keeps embeddings close: taught labels stay valid
        atomic_write_bytes(prototypes_path(summary.out), prototypes_path(source).read_bytes())
    probe = adapter.replay.first(1)[0]
    rows = [reconstruction_panel(m, probe, mask_ratio=config.mask_ratio, seed=config.seed) for m in (before, adapter.mae)]
    gap = np.full((2, rows[0].shape[1], 3), 255, np.uint8)
    save_png(summary.png, np.concatenate([rows[0], gap, rows[1]]), scale=max(1, 256 // S))
    return summary


# ---------------------------------------------------------------------------------------------------
# The command


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="data folder (labels.csv beside the videos); labels are ignored")
    src.add_argument("--bag", help="rosbag2 folder (or its .db3/.mcap file)")
    p.add_argument("--topic", default=None, help="image topic in --bag (default: its only image topic)")
    p.add_argument("--model", default=None, help="model to adapt (default: the embedded one)")
    p.add_argument("--out", required=True, help="adapted checkpoint to write (a PNG goes beside it)")
    p.add_argument("--model-id", default=None, help="model id stored in the output, published as its encoder_version "
                   "(default: the --out file's name)")
    p.add_argument("--rounds", type=int, default=10, help="adaptation rounds (default 10)")
    p.add_argument("--clips-per-round", type=int, default=None,
                   help="new clips streamed into the replay before each round (default: --batch-size)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks, the probe set and the replay order "
                   "(the run is a function of it; default 0)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_config_arguments(p)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """A flag per AdaptationConfig field the offline run uses (`--lr`, `--probe-clips`, ...), defaults from it."""
    g = p.add_argument_group("adaptation settings (AdaptationConfig, as the node's adaptation.* parameters)")
    for f in dataclasses.fields(AdaptationConfig):
        if f.name in _ONLINE_ONLY:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{_HELP.get(f.name, f.name)} (default {f.default})"
        if isinstance(f.default, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            g.add_argument(flag, type=type(f.default), default=f.default, help=help_text)


def config_from(args: argparse.Namespace, **fixed) -> AdaptationConfig:
    """The AdaptationConfig of `add_config_arguments`' flags, with `fixed` fields (e.g. seed) on top.
    Raises ValueError on a bad value."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(AdaptationConfig) if f.name not in _ONLINE_ONLY}
    return AdaptationConfig(**{**values, **fixed})


def main(args: argparse.Namespace) -> int:
    try:
        if Path(args.out).exists():
            log.warning("--out %s exists and is replaced when the run ends", args.out)
        check_writable(args.out)  # now, not after the rounds
        config = config_from(args, seed=args.seed)
        s = adapt_offline(args.model, args.out, data=args.data, bag=args.bag, topic=args.topic, config=config,
                          rounds=args.rounds, clips_per_round=args.clips_per_round, device=args.device,
                          model_id=args.model_id)
    except (ValueError, OSError, ImportError) as e:
        raise SystemExit(f"adapt: {e}") from None
    if args.json:
        print(json.dumps(s.to_dict(), indent=2))
        return 0
    reasons = ", ".join(f"{k} {v}" for k, v in s.reasons.most_common()) or "none"
    print(f"{s.rounds} rounds ({s.warmup} decoder warm-up): {s.accepted} accepted, {s.rejected} rejected "
          f"(reasons: {reasons}); version {s.version}")
    print(f"probe loss {s.probe_loss_before:.4f} -> {s.probe_loss_after:.4f} (MAE {s.probe_mae_before:.4f} -> "
          f"{s.probe_mae_after:.4f}), "
          f"embedding cosine to the input model {s.probe_cosine:.4f}; {s.clips} clips")
    print(f"wrote {s.out} and {s.png}")
    return 0
