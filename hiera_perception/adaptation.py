"""On-device MAE adaptation: the encoder keeps learning from the robot's own camera, safely.

Test-time training with masked autoencoders: Gandelsman, Sun, Chen, Efros, "Test-Time Training with
Masked Autoencoders", NeurIPS 2022; Wang, Sun, et al., "Test-Time Training on Video Streams", 2023;
feature alignment as in Liu et al., "TTT++: When Does Self-Supervised Test-Time Training Fail or
Thrive?", NeurIPS 2021, and, stage by stage, Mirza et al., "ActMAD: Activation Matching to Align
Distributions for Test-Time-Training", CVPR 2023.

    clips -> ReplayBuffer (bounded in MB) -> Adapter: MAE steps on a *shadow* copy of the encoder, in
    its own thread, only while inference is idle and within a share of the device -> Guard on a fixed
    probe set (MAE loss + mean/variance and stage alignment must not rise, embedding cosine to the original model
    >= threshold, all finite) -> accepted: the version that serves, original + blend x (shadow - original)
    (WiSE-FT), is checkpointed atomically and handed to `on_accept` (the serving side swaps it in between two
    clips), and the shadow trains on from where it is | rejected: the shadow returns to the deployed weights.

The classifier head and the final norm are never trained (MAE does not use them), so head labels and
taught prototypes stay meaningful while the trunk adapts. Faults inside a round (NaN loss, an
exception, out of memory) reject the round and leave the deployed weights and checkpoints intact.

The objective is the MAE loss plus, when the model carries its training clips' embedding statistics
(`feature_stats`, written by every completed `train` run), `align_weight` times the distance of the
camera's embedding statistics to them: the per-dimension mean and variance of the step's batch, and the
mean of the clips the head confidently gives each class (pseudo-labels) against that class's training
mean, each a running average over the camera's batches that lives across rounds (a rejected round's batches
leave it) (TTT++; the class term as in TTAC, Su et al., NeurIPS 2022). The mean and variance are compared with
what the training clips would have in the camera's class mix (the head's probabilities, averaged), not in their
own: a robot's camera shows one action for minutes, and pulling its statistics to those of all the actions
together moved features the head reads. On a clean camera showing only idle (the embedded model, 12 videos), one
round aligned to the training mix passed the guard and took accuracy on those clips from 92 to 48%; with the mix's
target every round was rejected and accuracy stayed. The guard judges the probe set against the mix of the original
model's view of it, fixed with the probe set. MAE alone lowered its loss but not
the error on this package's embedded model when it was trained supervised only: its steps moved features
the head reads (TTT++ saw the same). The alignment keeps what the head reads where training left it; MAE
keeps the encoder describing the new images. `align_weight: 0` is MAE alone. The embedded model is now
also trained jointly with the MAE loss (`finetune --mae-weight`, Sun et al., TTT 2020), which the head
then reads through.

`stage_weight` adds the same kind of term inside the trunk: each stage's per-channel token mean and variance
over the batch against the training clips' (`feature_stats["stages"]`), in units of the training spread
(ActMAD). The pooled embedding hardly tells a shifted camera from a clean one (on 100 clips of the shift
benchmark's test sets, the embedded model's mean/variance distance to its training statistics was 62 under the
lighting shift against 73 for clean clips, both estimation noise), while the first stage's statistics are far
off under the shifts that hurt (3.9 lighting, 11.0 colour cast, 86 cluttered backgrounds against 0.29 clean):
the term tells the early layers what to undo.

The guard judges the whole objective except the class term, not the MAE loss alone: the probe MAE loss moved by
0.01-3% from round to round whatever a round did. Judged by it alone, one shift-benchmark run per shift
(commit 06a5aa3) recovered about as much (32% against 30%) and lost more clean accuracy (3.0 points against
2.0; adapting to blur, which costs no accuracy, lost 3.0 against 0.5); single runs, so rough figures.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from hiera_perception.atomic import atomic_write_text
from hiera_perception.checkpoint import load_checkpoint, save_checkpoint, shape_mismatches, weights_sha256
from hiera_perception.mae import HieraMAE
from hiera_perception.model import Hiera
from hiera_perception.preprocess import preprocess_clip

__all__ = ["AdaptationConfig", "ReplayBuffer", "Adapter", "RoundResult", "TRAINABLE", "STATS_CLIPS", "CONFIDENT",
           "feature_stats", "alignment_distance", "lineage", "mismatch"]

log = logging.getLogger(__name__)
TRAINABLE = ("all", "norms", "late")
STATS_CLIPS = 512  # training clips behind a model's feature_stats
CONFIDENT = 0.5  # a clip's pseudo-label (the head's top class) counts for its class at this probability or more
SHARE_WINDOW_S = 2.0  # max_device_share holds over any stretch this long: idle time saves no credit beyond it
MAX_PARENTS = 64  # ancestors a version file lists (rollback walks them; older ones are long pruned)


def lineage(base: Hiera) -> str:
    """The weights every adapted version starts from (sha256 over them): versions of another base, e.g. of a
    rebuilt model file with the same model id, are never resumed or rolled back to."""
    return weights_sha256(base.state_dict())


def mismatch(extra: dict, config, base: Hiera, base_sha: str | None = None) -> str | None:
    """Why a version file (its `extra` and network config) cannot serve for `base`, or None when it can. Files
    written before lineages were recorded carry none: their network must fit."""
    if config != base.config:
        fields = [f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(base.config, f.name)]
        return f"its network differs from the served {base.config.name} in {', '.join(fields)}"
    recorded = extra.get("base_weights_sha256")
    if recorded is not None and recorded != (base_sha or lineage(base)):
        return "it was adapted from other weights (the model file was rebuilt or replaced since)"
    return None


def stage_moments(model: Hiera, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """[B, 3, T, H, W] -> the pooled embedding [B, C] (as `forward_features`) and, per stage, each clip's first
    and second moments of its tokens, per channel: [B, 2, C_stage]."""
    tokens, inter = model.forward_tokens(x, return_intermediates=True)
    moments = [torch.stack([t.mean(1), t.pow(2).mean(1)], 1) for t in (i.flatten(1, -2).float() for i in inter)]
    return model.pool(tokens), moments


def stage_distance(mean: torch.Tensor, var: torch.Tensor, source: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Distance of a stage's token statistics (per-channel mean, variance [C]) to the source's, in units of the
    source's spread (stages differ in scale by orders of magnitude), averaged over channels."""
    std = source[1].clamp_min(1e-6).sqrt()
    return (((mean - source[0]) / std) ** 2 + (var / std**2 - 1) ** 2).mean()


def _stage_stats(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-clip moments [B, 2, C] -> per-channel mean and variance over all the clips' tokens."""
    m = moments.mean(0)
    return m[0], (m[1] - m[0] ** 2).clamp_min(0)


@torch.inference_mode()
def feature_stats(model: Hiera, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]]) -> dict:
    """Statistics of `model`'s embeddings over (input [B, 3, T, H, W], head class index [B] or None) batches:
    per-dimension mean and variance, and with labels each head class's mean embedding ("class_mean", None for
    a class without clips) and clip count ("class_clips"). What adaptation aligns the camera's embeddings with (JSON-able, kept in extra)."""
    was_training = model.training
    model.eval()
    embs, moments, ys = [], [], []
    for x, y in batches:
        e, m = stage_moments(model, x)
        embs.append(e.float().cpu())
        moments.append([t.cpu() for t in m])
        ys.append(None if y is None else torch.as_tensor(y).cpu())
    model.train(was_training)
    emb = torch.cat(embs)
    if len(emb) < 2:
        raise ValueError(f"feature statistics need at least 2 clips, got {len(emb)}")
    stats = {"mean": emb.mean(0).tolist(), "var": emb.var(0).tolist(), "clips": len(emb)}
    stats["stages"] = [dict(zip(("mean", "var"), (t.tolist() for t in _stage_stats(torch.cat(m)))))
                       for m in zip(*moments)]
    if model.config.num_classes and all(y is not None for y in ys):
        y = torch.cat(ys)
        stats["class_mean"] = [emb[y == k].mean(0).tolist() if bool((y == k).any()) else None
                               for k in range(model.config.num_classes)]
        stats["class_clips"] = [int((y == k).sum()) for k in range(model.config.num_classes)]
    return stats


def alignment_distance(mean: torch.Tensor, var: torch.Tensor, source: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Squared distance of embedding statistics (mean, variance [C]) to the source's, summed over dimensions."""
    return ((mean - source[0]) ** 2).sum() + ((var - source[1]) ** 2).sum()


@dataclass
class AdaptationConfig:
    lr: float = 2e-5  # at 1e-4 the embedded model's embeddings drifted past the guard within a round
    weight_decay: float = 0.0  # decay would pull weights to zero, away from the model that works
    mask_ratio: float = 0.75
    steps_per_round: int = 20
    batch_size: int = 8  # the alignment term estimates a variance from the batch
    grad_clip: float = 1.0
    trainable: str = "all"  # "all" trunk parameters, "norms" (LayerNorms only), "late" (last stage + norms)
    train_decoder: bool = True
    replay_mb: float = 256.0  # must hold min_clips: 48 clips of 16 x 224 x 224 px are 116 MB
    # The first probe_clips clips are the guard's probe set. 48 against 16: 37 against 31% recovered on the shift
    # benchmark (3 runs per shift, blend 1.0; the 16-clip run is adaptation_cpu.json at commit ccb58c3), mostly on
    # the milder shifts; fewer clips judge a round by their class mix.
    min_clips: int = 48  # replay size before the first round
    probe_clips: int = 48
    align_weight: float = 1.0  # feature-alignment term beside the MAE loss (0: MAE alone; needs feature_stats)
    align_momentum: float = 0.9  # running average of the camera's embedding statistics (kept across rounds)
    # Every stage's per-channel token mean/variance against the training clips' (ActMAD). On the shift benchmark
    # (3 runs per shift, mean recovered; 0 = without it): lighting 31 / 35 / 43% at weights 0 / 10 / 30, colour
    # cast 59 / 73 / 78%, cluttered backgrounds 23 / 34 / 32%, noise 60 / 62 / 63%; clean -1.6 / -1.1 / -1.1 points.
    stage_weight: float = 30.0
    # Mean cosine of the probe clips' embeddings to the original model's embeddings of the same clips. Under a
    # strong shift those are the wrong embeddings and correcting it moves them (0.5-0.8 on the lighting shift,
    # lower on the cluttered backgrounds); 0.3 still stops a runaway, and the alignment term keeps the
    # statistics where training left them.
    min_probe_cosine: float = 0.3
    max_loss_increase: float = 0.0  # candidate probe objective <= deployed * (1 + this)
    max_device_share: float = 0.5  # of wall time spent in adaptation steps
    threads: int = 0  # intra-op CPU threads of the adapter's thread (per thread; serving gets the rest); 0 = torch's
    round_interval_s: float = 5.0
    keep_versions: int = 5
    # What serves is original + blend x (adapted - original): weight-space ensembling (WiSE-FT, Wortsman et al.,
    # CVPR 2022). Training goes on from the adapted weights; only what serves is blended. On the shift benchmark
    # (3 runs per shift, the embedded model before its joint stage) 0.75 kept 36 of 37% recovered and cut the
    # clean accuracy lost from 2.2 to 1.6 points (blend 1.0 and 0.5 by re-scoring one run's adapted models;
    # 0.75 from adaptation_cpu.json at a18f775).
    blend: float = 0.75
    decoder_warmup_rounds: int = 5  # rounds training a fresh decoder alone (only without decoder weights)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if not 0.0 < self.max_device_share <= 1.0:
            raise ValueError(f"max_device_share must be in (0, 1], got {self.max_device_share}")
        if not 0.0 < self.blend <= 1.0:
            raise ValueError(f"blend must be in (0, 1], got {self.blend}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.align_weight > 0 and min(self.batch_size, self.probe_clips) < 2:
            raise ValueError("align_weight > 0 needs batch_size and probe_clips >= 2 (it aligns the variance of "
                             "their embeddings); set align_weight 0 for the MAE loss alone")
        if self.align_weight < 0 or not 0.0 <= self.align_momentum < 1.0:
            raise ValueError(f"align_weight must be >= 0 and align_momentum in [0, 1), got {self.align_weight}, "
                             f"{self.align_momentum}")
        if self.stage_weight < 0:
            raise ValueError(f"stage_weight must be >= 0, got {self.stage_weight}")
        if self.probe_clips > self.min_clips:
            raise ValueError(f"probe_clips ({self.probe_clips}) must be <= min_clips ({self.min_clips}): the probe "
                             "set is the first probe_clips clips of the replay when the first round starts")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = torch's default), got {self.threads}")
        for name in ("lr", "grad_clip"):  # at 0 the weights never move, yet every round would pass the guard
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("steps_per_round", "batch_size", "min_clips", "probe_clips", "keep_versions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class ReplayBuffer:
    """Recent clips (uint8 [T, S, S, 3]), bounded by memory; the oldest leave first. Thread-safe."""

    def __init__(self, max_mb: float):
        self.max_bytes = int(max_mb * 2**20)
        self._clips: collections.deque[np.ndarray] = collections.deque()
        self._bytes = 0
        self._lock = threading.Lock()
        self.added = 0
        self.evicted = 0

    def add(self, clip: np.ndarray) -> None:
        clip = np.ascontiguousarray(clip, dtype=np.uint8)
        if clip.nbytes > self.max_bytes:
            raise ValueError(f"one clip ({clip.nbytes / 2**20:.1f} MB) exceeds the replay cap {self.max_bytes / 2**20:.1f} MB")
        with self._lock:
            self._clips.append(clip)
            self._bytes += clip.nbytes
            self.added += 1
            while self._bytes > self.max_bytes:
                self._bytes -= self._clips.popleft().nbytes
                self.evicted += 1

    def __len__(self) -> int:
        return len(self._clips)

    @property
    def megabytes(self) -> float:
        return self._bytes / 2**20

    def first(self, n: int) -> list[np.ndarray]:
        with self._lock:
            return [c.copy() for c in list(self._clips)[:n]]

    def sample(self, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        with self._lock:
            idx = rng.integers(0, len(self._clips), size=n)
            return [self._clips[i] for i in idx]


@dataclass
class RoundResult:
    accepted: bool
    reason: str
    version: int
    steps: int = 0
    train_loss: float = float("nan")
    probe_loss_before: float = float("nan")  # the objective on the probe set: MAE + align_weight * alignment
    probe_loss_after: float = float("nan")
    probe_mae_before: float = float("nan")  # its MAE part
    probe_mae_after: float = float("nan")
    probe_cosine: float = float("nan")
    seconds: float = 0.0


def _trainable(mae: HieraMAE, which: str, train_decoder: bool) -> list[torch.nn.Parameter]:
    enc = mae.encoder
    last_stage_start = sum(enc.config.stages[:-1])
    params = []
    for name, p in mae.named_parameters():
        if name.startswith(("encoder.head.", "encoder.norm.")):
            continue  # unused by MAE: the labels stay valid
        if name.startswith("encoder."):
            is_norm = ".norm1." in name or ".norm2." in name
            in_last = name.startswith("encoder.blocks.") and int(name.split(".")[2]) >= last_stage_start
            if which == "all" or (which == "norms" and is_norm) or (which == "late" and (in_last or is_norm)):
                params.append(p)
        elif train_decoder:
            params.append(p)
    return params


class Adapter:
    """MAE adaptation of a copy of `model`; see the module docstring for the cycle.

    model: the serving encoder (never modified here). mae_state: a HieraMAE state dict whose decoder
    matches the encoder (our embedded checkpoint ships one); without it the decoder starts fresh and
    the first rounds train the decoder alone. busy(): True while inference has work, so steps wait.
    on_accept(encoder_state, version): called from the adapter thread after each accepted round.
    """

    def __init__(
        self,
        model: Hiera,
        config: AdaptationConfig | None = None,
        mae_state: dict[str, torch.Tensor] | None = None,
        out_dir: str | Path | None = None,
        on_accept: Callable[[dict[str, torch.Tensor], int], None] | None = None,
        busy: Callable[[], bool] = lambda: False,
        labels: list[str] | None = None,
        model_id: str | None = None,
        version: int = 0,
        reference: Hiera | None = None,
    ):
        self.config = cfg = config or AdaptationConfig()
        self.device = next(model.parameters()).device
        # the original model (before any adaptation, also across restarts), for the drift check
        self.base = copy.deepcopy(reference or model).eval().requires_grad_(False)
        shadow = copy.deepcopy(model)
        self._served = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}  # encoder weights
        self._served_blend = float(getattr(model, "blend", 1.0)) if reference is not None else 1.0
        if reference is not None:  # a served version: training goes on from the adapted weights behind it
            shadow.load_state_dict(self._unblend(model.state_dict(), self._served_blend))
        self.mae = HieraMAE(model.config, encoder=shadow).to(self.device)
        self.decoder_warmup = mae_state is None
        if mae_state is not None:
            decoder = {k: v for k, v in mae_state.items() if not k.startswith("encoder.")}
            wrong = shape_mismatches(decoder, self.mae.state_dict())
            if wrong:  # e.g. a version saved when the MAE of a 16x224 classifier pooled 3 times, not mae_q_pool
                raise ValueError(f"decoder weights do not fit {model.config.name}'s MAE: {', '.join(wrong[:3])}")
            missing, unexpected = self.mae.load_state_dict(decoder, strict=False)
            if unexpected or any(not k.startswith("encoder.") for k in missing):
                raise ValueError(f"decoder weights do not fit {model.config.name}: missing {missing[:4]}, unexpected {unexpected[:4]}")
        units, kept = model.config.num_mask_units, model.units_kept(cfg.mask_ratio)
        if not 0 < kept < units:
            raise ValueError(f"mask_ratio {cfg.mask_ratio} keeps {kept} of {model.config.name}'s {units} mask units: "
                             "MAE needs at least one visible and one masked unit")
        clip_mb = math.prod(model.config.input_size) * 3 / 2**20  # the clips it trains on: uint8 at the model's size
        if cfg.min_clips * clip_mb > cfg.replay_mb:  # the replay would never hold enough: no round would ever run
            raise ValueError(f"replay_mb {cfg.replay_mb:g} holds {int(cfg.replay_mb // clip_mb)} clips of "
                             f"{model.config.name} ({clip_mb:.2f} MB each), fewer than min_clips {cfg.min_clips}: "
                             f"raise replay_mb to {cfg.min_clips * clip_mb:.1f} or more, or lower min_clips")
        self.lineage = lineage(self.base)
        self.replay = ReplayBuffer(cfg.replay_mb)
        self.out_dir = Path(out_dir) if out_dir else None
        self.on_accept = on_accept
        self.busy = busy
        self.labels = list(labels if labels is not None else getattr(model, "labels", []))
        self.model_id = model_id or getattr(model, "model_id", model.config.name)
        # the clip timing the model was trained with travels into every version, so each file serves alone
        self.sampling = dict(getattr(reference or model, "sampling", {}))
        # so do the training clips' embedding statistics, the alignment term's target
        self.feature_stats = getattr(reference or model, "feature_stats", None)
        self._source = self._class_source = None
        if cfg.align_weight > 0 and self.feature_stats:
            self._source = tuple(torch.tensor(self.feature_stats[k], device=self.device) for k in ("mean", "var"))
            class_mean = self.feature_stats.get("class_mean")
            if class_mean and model.config.num_classes == len(class_mean):
                known = torch.tensor([m is not None for m in class_mean], device=self.device)
                dim = len(self.feature_stats["mean"])
                means = torch.tensor([m or [0.0] * dim for m in class_mean], device=self.device)
                self._class_source = (means, known)
                # The (mean, var) target holds for the training clips' class mix; the camera's is another (module
                # docstring), so `_target` rebuilds it for any mix: each class keeps its training mean, and the
                # spread within a class is what the training variance leaves once the class means' spread is out.
                clips = self.feature_stats.get("class_clips")  # the mix itself; older files: balanced
                prior = (torch.tensor(clips, dtype=torch.float32, device=self.device) if clips and len(clips) == len(
                    class_mean) else known.float())
                prior = prior / prior.sum()
                between = (prior[:, None] * (means - self._source[0]) ** 2).sum(0)
                self._within = (self._source[1] - between).clamp_min(0)
        elif cfg.align_weight > 0:
            log.info("%s carries no feature_stats (train writes them): adapting with the MAE loss alone",
                     getattr(model, "model_id", model.config.name))
        self._stage_source = None
        if cfg.stage_weight > 0 and self.feature_stats and self.feature_stats.get("stages"):
            self._stage_source = [tuple(torch.tensor(st[k], device=self.device) for k in ("mean", "var"))
                                  for st in self.feature_stats["stages"]]
        self._running_stages: list | None = None  # per stage (mean, var) of the camera's tokens
        # running statistics of the camera's embeddings, started from the probe set's (None: at the next round)
        self._running: tuple[torch.Tensor, torch.Tensor] | None = None  # mean, variance
        self._running_class: torch.Tensor | None = None  # [K, C] mean per pseudo-label
        self._probe_classes: torch.Tensor | None = None  # the probe clips' pseudo-labels then (-1: unsure)
        self._probe_mix: torch.Tensor | None = None  # [K] the probe clips' class mix by the original model
        self._running_mix: torch.Tensor | None = None  # [K] running class mix of the camera's batches
        self.version = version
        self.enabled = threading.Event()
        self.enabled.set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()  # one round / rollback at a time
        self._rng = np.random.default_rng(cfg.seed)
        self._probe: list[np.ndarray] | None = None  # uint8 clips: preprocessed when scored, 4x smaller than float
        self._probe_keep: torch.Tensor | None = None
        self._probe_ref: torch.Tensor | None = None  # the original model's probe embeddings
        # the deployed version's _probe_scores: a round's "before" (None: score it at the next round)
        self._deployed_scores: tuple[float, float, float, torch.Tensor, list[torch.Tensor]] | None = None
        self._deployed = self._mae_state()
        self._spent_s = 0.0
        self._started = time.monotonic()
        self._credit_s, self._credit_at, self._credit_spent = 0.0, self._started, 0.0  # device-share budget
        self.rounds = self.accepted = self.rejected = 0
        self.last: RoundResult | None = None
        self.kept: list[int] = []  # versions with a checkpoint on disk, oldest first
        # the versions the served one was adapted from, oldest first (None: unknown, a file from before they were
        # recorded); what a rollback walks back through
        self._parents: list[int] | None = [] if reference is None else None
        self.base_version = int(getattr(reference or model, "version", 0))  # what a rollback to the base serves as
        if self.out_dir is not None and self.out_dir.is_dir():
            number = re.compile(re.escape(self.model_id) + r"@([0-9]+)")
            self.kept = sorted(int(m.group(1)) for p in self.out_dir.glob(f"{self.model_id}@*.pt")
                               if (m := number.fullmatch(p.stem)))
            for tmp in self.out_dir.glob(".*.tmp"):  # an atomic write a crash interrupted
                log.info("removing %s, left by an interrupted write", tmp)
                tmp.unlink(missing_ok=True)
            rec = self._latest_record(self.out_dir)
            if rec and rec.get("version") == version and rec.get("base_weights_sha256") == self.lineage:
                self._parents = rec.get("parents")
        self._make_optimizer()

    # ---- helpers ----
    def checkpoint_extra(self) -> dict:
        """What every version file carries from the model it adapts: clip timing, feature statistics, and the
        lineage of the base weights."""
        return {"sampling": self.sampling, **({"feature_stats": self.feature_stats} if self.feature_stats else {}),
                "base_weights_sha256": self.lineage}

    def _mae_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.mae.state_dict().items()}

    def _make_optimizer(self) -> None:
        if self.decoder_warmup:  # first align a fresh decoder with the frozen encoder
            params = [p for n, p in self.mae.named_parameters() if not n.startswith("encoder.")]
        else:
            params = _trainable(self.mae, self.config.trainable, self.config.train_decoder)
        self.mae.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        self.opt = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)

    def _batch(self, clips: list[np.ndarray]) -> torch.Tensor:
        cfg = self.mae.config
        return torch.cat([preprocess_clip(c, cfg.input_size[1], cfg.mean, cfg.std, self.device) for c in clips])

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The served encoder's weights (what serving should run: the deployed ones blended), on CPU."""
        return {k: v.clone() for k, v in self._served.items()}

    def _blend(self, mae_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The encoder that serves for adapted weights `mae_state`: original + blend x (adapted - original), on CPU."""
        b, base = self.config.blend, self.base.state_dict()
        out = {}
        for k, v in mae_state.items():
            if k.startswith("encoder."):
                k = k[len("encoder."):]
                out[k] = (base[k] + b * (v - base[k]) if v.is_floating_point() and b != 1.0 else v).cpu().clone()
        return out

    def _unblend(self, encoder_state: dict[str, torch.Tensor], blend: float) -> dict[str, torch.Tensor]:
        """The adapted weights behind a served encoder that was blended with `blend` (inverts `_blend`)."""
        base = self.base.state_dict()
        return {k: base[k] + (v.to(base[k].device) - base[k]) / blend if v.is_floating_point() and blend != 1.0
                else v for k, v in encoder_state.items()}

    def add_clip(self, frames) -> None:
        """A served clip (frames [S, S, 3] uint8 or an array [T, S, S, 3]) joins the replay buffer."""
        self.replay.add(np.stack(frames) if isinstance(frames, (list, tuple)) else frames)

    # ---- the guard ----
    def _pseudo_labels(self, emb: torch.Tensor) -> torch.Tensor:
        """[N, C] embeddings -> the head's class per row where it is confident and the class has a source
        mean, else -1."""
        with torch.no_grad():
            conf, k = self.mae.encoder.forward_head(emb).float().softmax(-1).max(-1)
        return torch.where((conf >= CONFIDENT) & self._class_source[1][k], k, -1)

    def _class_mix(self, emb: torch.Tensor) -> torch.Tensor:
        """[N, C] embeddings -> [K] their class mix: the head's probabilities over the known classes, averaged."""
        with torch.no_grad():
            p = self.mae.encoder.forward_head(emb).float().softmax(-1) * self._class_source[1]
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
        return p.mean(0)

    def _target(self, mix: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings' (mean, var) the training clips would have in the class mix `mix` [K] (None: their own):
        the mix of the class means, and the within-class spread plus the class means' spread about it."""
        if mix is None or self._class_source is None:
            return self._source
        means = self._class_source[0]
        mean = mix @ means
        return mean, self._within + (mix[:, None] * (means - mean) ** 2).sum(0)

    @torch.no_grad()
    def _probe_scores(self, wait: bool = False) -> tuple[float, float, float, torch.Tensor, list[torch.Tensor]]:
        """The shadow's (objective, its MAE part, mean embedding cosine to the original model, embeddings [N, C],
        per-stage token moments [N, 2, C_stage] when stage alignment is on) on the probe set, with fixed masks, one
        clip at a time: with `wait`, inference can take the device between two clips. The original model never
        changes, so its probe embeddings are computed once."""
        self.mae.eval()
        losses, cos, embs, refs, moments = [], [], [], [], []
        first = self._probe_ref is None
        for i in range(len(self._probe)):
            if wait and not self._wait_for_slot():
                raise InterruptedError("adapter stopping")
            s0 = time.monotonic()
            x = self._batch([self._probe[i]])
            losses.append(self.mae.forward_keep(x, self._probe_keep[i : i + 1]).loss.item())
            emb, m = self._features(x)
            moments.append(m)
            ref = self.base.forward_features(x).float() if first else self._probe_ref[i : i + 1]
            cos.append(F.cosine_similarity(emb, ref, dim=-1).item())
            embs.append(emb[0])
            refs += [ref[0]] if first else []
            self._spent_s += time.monotonic() - s0
        self.mae.train()
        if first:
            self._probe_ref = torch.stack(refs)
            # fixed with the probe set, by the original model: every round is judged against the same target
            self._probe_mix = self._class_mix(self._probe_ref) if self._class_source is not None else None
        mae, e = float(np.mean(losses)), torch.stack(embs)
        moments = [torch.cat(m) for m in zip(*moments)]
        align = self._alignment((e.mean(0), e.var(0)), [_stage_stats(m) for m in moments], mix=self._probe_mix)
        return mae + align.item(), mae, float(np.mean(cos)), e, moments

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The shadow's embedding [B, C] of input x, and its per-stage token moments when stage alignment is on."""
        if self._stage_source is None:
            return self.mae.encoder.forward_features(x).float(), []
        emb, moments = stage_moments(self.mae.encoder, x)
        return emb.float(), moments

    def _start_running(self, e: torch.Tensor, moments: list[torch.Tensor]) -> None:
        """Running embedding statistics, when there are none yet (the first round, or after a rollback), start
        from the deployed version's probe embeddings `e` [N, C], per pseudo-label too."""
        if self._source is not None and self._running is None:
            self._running = e.mean(0), e.var(0)
            self._running_mix = self._probe_mix
        if self._stage_source is not None and self._running_stages is None:
            self._running_stages = [_stage_stats(m) for m in moments]
        if self._class_source is not None and self._running_class is None:
            # The class term trains but does not judge: on a few probe clips, each class's mean rests on one or
            # two clips and the pseudo-labels change between rounds, which made the guard reject at random.
            self._probe_classes = self._pseudo_labels(e)
            self._running_class = self._class_source[0].clone()
            for k in self._probe_classes[self._probe_classes >= 0].unique().tolist():
                self._running_class[k] = e[self._probe_classes == k].mean(0)

    def _alignment(self, emb_stats: tuple[torch.Tensor, torch.Tensor], stage_stats: list | None,
                   class_terms: Iterable[torch.Tensor] = (), mix: torch.Tensor | None = None) -> torch.Tensor:
        """The alignment terms of the objective, from statistics of the camera's clips: stage_weight x each stage's
        (mean, var) distance to the source's, and align_weight x (the embeddings' (mean, var) distance to the
        training clips' in the camera's class mix `mix` + the class terms). The guard judges it on the probe set,
        each step trains on it with running statistics."""
        loss = torch.zeros((), device=self.device)
        if self._stage_source is not None:
            for (mean, var), src in zip(stage_stats, self._stage_source):
                loss = loss + self.config.stage_weight * stage_distance(mean, var, src)
        if self._source is not None:
            align = alignment_distance(*emb_stats, self._target(mix))
            for term in class_terms:
                align = align + term
            loss = loss + self.config.align_weight * align
        return loss

    def _mix(self, emb: torch.Tensor, moments: list[torch.Tensor], classes: torch.Tensor):
        """The running statistics once a batch (embeddings [B, C], per-stage token moments [B, 2, C_stage],
        pseudo-labels [B], -1: none) enters them with weight 1 - align_momentum: the embeddings' (mean, var)
        and the stages' (each None when its term is off), {class: mean} of the batch's pseudo-labels, and the
        class mix (None without class means)."""
        b = self.config.align_momentum

        def mix(run: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            return b * run + (1 - b) * new

        running = stages = class_mix = None
        class_means = {}
        if self._stage_source is not None:
            stages = [(mix(run[0], mean), mix(run[1], var))
                      for run, (mean, var) in zip(self._running_stages, map(_stage_stats, moments))]
        if self._source is not None:
            running = mix(self._running[0], emb.mean(0)), mix(self._running[1], emb.var(0))
            if self._class_source is not None:
                class_means = {k: mix(self._running_class[k], emb[classes == k].mean(0))
                               for k in classes[classes >= 0].unique().tolist()}
                class_mix = mix(self._running_mix, self._class_mix(emb))
        return running, stages, class_means, class_mix

    def _batch_loss(self, emb: torch.Tensor, moments: list[torch.Tensor], classes: torch.Tensor) -> torch.Tensor:
        """A step's alignment loss: `_alignment` of the running statistics this batch gives (`_mix`), each
        pseudo-label's running mean against its class mean among the class terms."""
        running, stages, class_means, class_mix = self._mix(emb, moments, classes)
        return self._alignment(running, stages, (((m - self._class_source[0][k]) ** 2).sum()
                                                 for k, m in class_means.items()), class_mix)

    def _update_running(self, emb: torch.Tensor, moments: list[torch.Tensor], classes: torch.Tensor) -> None:
        """Enter a step's batch (computed without gradients) into the running statistics."""
        running, stages, class_means, class_mix = self._mix(emb, moments, classes)
        if running is not None:
            self._running, self._running_mix = running, class_mix
        if stages is not None:
            self._running_stages = stages
        if class_means:
            self._running_class = self._running_class.clone()  # a rejected round restores the old tensor
            for k, m in class_means.items():
                self._running_class[k] = m

    def _step(self, clips: list[np.ndarray], wait: bool) -> float:
        """Gradient of one step's objective on `clips`, accumulated one clip at a time (the longest stretch
        inference may have to wait for is one clip's passes, not a batch's); returns the loss.

        The MAE loss is each clip's own. The alignment terms depend on the whole batch (its embeddings' and its
        stages' statistics), so those are first computed without gradients, and clip j's backward pass runs the batch loss
        with only row j live: the sum over j of those gradients is the batch loss's gradient, exactly."""
        def slot() -> None:
            if wait and not self._wait_for_slot():
                raise InterruptedError("adapter stopping")

        batch = self._source is not None or self._stage_source is not None
        xs = []  # each clip preprocessed once, for both passes
        if batch:
            fixed, fixed_m = [], []
            for clip in clips:
                slot()
                s0 = time.monotonic()
                xs.append(self._batch([clip]))
                with torch.no_grad():
                    e, m = self._features(xs[-1])
                fixed.append(e)
                fixed_m.append(m)
                self._spent_s += time.monotonic() - s0
            fixed = torch.cat(fixed)
            fixed_m = [torch.cat(m) for m in zip(*fixed_m)]
            classes = (self._pseudo_labels(fixed) if self._class_source is not None
                       else torch.full((len(clips),), -1, device=self.device))
        mae_loss, batch_loss = 0.0, 0.0
        for j, clip in enumerate(clips):
            slot()
            s0 = time.monotonic()
            x = xs[j] if batch else self._batch([clip])
            loss = self.mae(x, self.config.mask_ratio).loss / len(clips)  # equal masked-patch counts: the mean
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite MAE loss {loss.item() * len(clips)}")
            mae_loss += loss.item()
            if batch:
                e, m = self._features(x)
                emb, moments = fixed.clone(), [t.clone() for t in fixed_m]
                emb[j] = e[0]
                for t, live in zip(moments, m):
                    t[j] = live[0]
                a = self._batch_loss(emb, moments, classes)
                if not torch.isfinite(a):
                    raise FloatingPointError(f"non-finite alignment loss {a.item()}")
                batch_loss, loss = a.item(), loss + a  # the same value for every j: the batch's
            loss.backward()
            self._spent_s += time.monotonic() - s0
        if batch:
            self._update_running(fixed, fixed_m, classes)
        return mae_loss + batch_loss

    def _finite(self) -> bool:
        return all(torch.isfinite(p).all() for p in self.mae.parameters())

    # ---- budget ----
    def _wait_for_slot(self) -> bool:
        """Block while inference is busy or the device share is used up; False when stopping."""
        while not self._stop.is_set():
            if not self.busy() and self._credit() >= 0:
                return True
            time.sleep(0.002)
        return False

    def _credit(self) -> float:
        """Device seconds the adapter may still spend: max_device_share of the wall time passes in, what it spends
        goes out, and at most the share of SHARE_WINDOW_S is saved up, so after a long idle stretch (waiting for
        clips, disabled) the share still holds instead of the adapter running flat out to catch up."""
        now, share = time.monotonic(), self.config.max_device_share
        self._credit_s = min(share * SHARE_WINDOW_S,
                             self._credit_s + share * (now - self._credit_at) - (self._spent_s - self._credit_spent))
        self._credit_at, self._credit_spent = now, self._spent_s
        return self._credit_s

    # ---- one round ----
    def run_round(self, wait: bool = True) -> RoundResult:
        """Steps on the shadow, then the guard; accept or roll the shadow back. Never raises."""
        with self._lock:
            cfg = self.config
            t0 = time.monotonic()
            if len(self.replay) < cfg.min_clips:
                self.last = RoundResult(False, f"waiting for clips ({len(self.replay)}/{cfg.min_clips})", self.version)
                return self.last
            if self._probe is None:  # fixed for the adapter's life: scores stay comparable across rounds
                self._probe = self.replay.first(cfg.probe_clips)
                g = torch.Generator().manual_seed(cfg.seed)
                self._probe_keep = self.mae.encoder.random_keep(len(self._probe), cfg.mask_ratio, generator=g).to(self.device)
            self.rounds += 1
            res = RoundResult(False, "", self.version)
            new_version = self.version
            # a rejected round's batches leave no trace
            running = self._running, self._running_class, self._running_stages, self._running_mix
            stopped = False
            try:
                if self._deployed_scores is None:
                    self._deployed_scores = self._probe_scores(wait)
                res.probe_loss_before, res.probe_mae_before, _, deployed_emb, deployed_m = self._deployed_scores
                self._start_running(deployed_emb, deployed_m)
                losses = []
                self.mae.train()
                for _ in range(cfg.steps_per_round):
                    self.opt.zero_grad(set_to_none=True)
                    step_loss = self._step(self.replay.sample(cfg.batch_size, self._rng), wait)
                    s0 = time.monotonic()
                    torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], cfg.grad_clip)
                    self.opt.step()
                    self._spent_s += time.monotonic() - s0
                    losses.append(step_loss)
                    res.steps += 1
                res.train_loss = float(np.mean(losses))
                if not self._finite():
                    raise FloatingPointError("non-finite weights after the round")
                scores = self._probe_scores(wait)
                res.probe_loss_after, res.probe_mae_after, res.probe_cosine = scores[:3]
                if not (np.isfinite(res.probe_loss_after) and np.isfinite(res.probe_cosine)):
                    raise FloatingPointError("non-finite probe scores")
                if self.decoder_warmup:
                    res.reason = "decoder warm-up (encoder untouched)"
                    self._deployed, self._deployed_scores = self._mae_state(), scores
                    if self.rounds >= cfg.decoder_warmup_rounds:
                        self.decoder_warmup = False
                        self._make_optimizer()
                elif res.probe_loss_after > res.probe_loss_before * (1 + cfg.max_loss_increase):
                    res.reason = (f"probe loss rose {res.probe_loss_before:.4f} -> {res.probe_loss_after:.4f} "
                                  f"(MAE {res.probe_mae_before:.4f} -> {res.probe_mae_after:.4f})")
                elif res.probe_cosine < cfg.min_probe_cosine:
                    res.reason = f"embedding drift: probe cosine {res.probe_cosine:.4f} < {cfg.min_probe_cosine}"
                else:
                    # Numbers are never reused (after a rollback the next one is past every kept
                    # version), and the file is written before the swap: every served version has one.
                    new_version = max([self.version, *self.kept]) + 1
                    parents = [*(self._parents or []), self.version][-MAX_PARENTS:]
                    served = self._blend(self.mae.state_dict())
                    self._save_version(new_version, served, parents)
                    res.accepted = True
            except InterruptedError as e:  # the node is shutting down: not a rejection, nothing to report on
                res.reason = str(e)
                stopped = True
            except Exception as e:  # NaN, OOM, a bug in a step, a full disk: the round fails, serving never does
                res.reason = f"{type(e).__name__}: {e}"
                log.warning("adaptation round failed: %s", res.reason)
                if "out of memory" in str(e).lower() and self.device.type == "cuda":
                    torch.cuda.empty_cache()
            if res.accepted:
                self._deployed, self._served, self._served_blend = self._mae_state(), served, cfg.blend
                self._deployed_scores = scores
                self.version, self._parents = new_version, parents
                res.version = self.version
                res.reason = "accepted"
                self.accepted += 1
                if self.on_accept is not None:
                    self.on_accept(self.encoder_state(), self.version)
            elif not res.reason.startswith("decoder warm-up"):
                self.rejected += not stopped
                self.mae.load_state_dict(self._deployed)  # the shadow returns to what serves
                self._make_optimizer()  # moments of a rejected trajectory would push back toward it
                self._running, self._running_class, self._running_stages, self._running_mix = running
            res.seconds = time.monotonic() - t0
            self.last = res
            if stopped:
                log.info("adaptation round %d: stopped after %d steps (%.1fs); v%d serves, nothing was kept",
                         self.rounds, res.steps, res.seconds, self.version)
                return res
            log.info("adaptation round %d: %s (v%d, %d steps, train loss %.4f, probe %.4f -> %.4f, cos %.4f, %.1fs)",
                     self.rounds, res.reason, self.version, res.steps, res.train_loss, res.probe_loss_before,
                     res.probe_loss_after, res.probe_cosine, res.seconds)
            return res

    # ---- versions on disk ----
    def _path(self, version: int) -> Path:
        return self.out_dir / f"{self.model_id}@{version}.pt"

    def _write(self, path: str | Path, version: int, mae_state: dict[str, torch.Tensor],
               served: dict[str, torch.Tensor], blend: float, parents: list[int] | None, extra: dict) -> Path:
        """Checkpoint `served` (the encoder that serves) with the decoder of `mae_state`, and the blend, from which
        a restart or a rollback recovers the adapted weights behind it (`_unblend`), and the versions it was
        adapted from (`parents`). Every reader of the file (the node, eval, adapt) serves exactly what the node
        served."""
        lineage = {} if parents is None else {"parents": parents}
        return save_checkpoint(path, self.mae, state={**mae_state, **{f"encoder.{k}": v for k, v in served.items()}},
                               labels=self.labels, model_id=self.model_id, version=version,
                               extra={**extra, **self.checkpoint_extra(), **lineage, "blend": blend})

    def write(self, path: str | Path, extra: dict | None = None) -> Path:
        """Checkpoint the deployed version as it serves to `path` (what `adapt` writes)."""
        with self._lock:
            return self._write(path, self.version, self._deployed, self._served, self._served_blend, self._parents,
                               extra or {})

    def _publish(self, version: int, parents: list[int] | None) -> None:
        """Point latest.json at `version`: what a restart resumes, and from where it rolls back."""
        file = self._path(version).name if version in self.kept else None  # None: the base model
        rec = {"version": version, "file": file, "parents": parents, "base_weights_sha256": self.lineage}
        atomic_write_text(self.out_dir / "latest.json", json.dumps(rec) + "\n")

    def _save_version(self, version: int, served: dict[str, torch.Tensor], parents: list[int]) -> None:
        """Checkpoint the shadow as `version` (serving `served`, adapted from the deployed version), point
        latest.json at it, then prune. Raises on failure, leaving the files as they were: latest.json never names a
        file that is not (yet, or any more) there."""
        if self.out_dir is None:
            return
        path = self._path(version)
        self._write(path, version, self.mae.state_dict(), served, self.config.blend, parents,
                    {"adaptation": {"rounds": self.rounds}})
        self.kept.append(version)
        try:
            self._publish(version, parents)
        except BaseException:
            self.kept.pop()
            path.unlink(missing_ok=True)
            raise
        chain = {version, *parents}  # what a rollback from the new version walks back through
        while len(self.kept) > self.config.keep_versions:
            # versions rolled away from go first, then the oldest ancestors: pruning an ancestor of what serves
            # while keeping abandoned versions made a rollback skip to the base
            old = next((v for v in self.kept if v not in chain), self.kept[0])
            self.kept.remove(old)
            try:
                self._path(old).unlink(missing_ok=True)
            except OSError as e:  # the new version is already published; a stale file only costs space
                log.warning("could not remove old checkpoint %s: %s", self._path(old), e)

    def save(self) -> Path | None:
        """Checkpoint the deployed version now (the `~/adaptation/save` service)."""
        with self._lock:
            if self.out_dir is None:
                return None
            self.write(self._path(self.version))
            self.kept = sorted({*self.kept, self.version})  # rollback() relies on the order
            return self._path(self.version)

    def _load_version(self, version: int):
        """(encoder that served, its blend, the HieraMAE state behind it, its parents or None) of a kept version;
        the base model's version (0 for a trained model) without a file is the base model. Raises ValueError (not kept, corrupt, of another network or
        lineage) or OSError."""
        if version == self.base_version and version not in self.kept:
            served = self.base.state_dict()
            state = {f"encoder.{k}": v for k, v in served.items()}
            state.update({k: v for k, v in self._deployed.items() if not k.startswith("encoder.")})
            return served, 1.0, state, []
        if self.out_dir is None or version not in self.kept:
            raise ValueError(f"version {version} is not kept (kept: {self.kept})")
        path = self._path(version)
        ck = load_checkpoint(path)  # CheckpointError (a ValueError) when corrupt
        if (why := mismatch(ck.extra, ck.config, self.base, self.lineage)) is not None:
            raise ValueError(f"{path.name} cannot serve: {why}")
        served = {k[len("encoder."):]: v for k, v in ck.model_state.items() if k.startswith("encoder.")}
        blend = float(ck.extra.get("blend", 1.0))
        state = {**ck.model_state, **{f"encoder.{k}": v for k, v in self._unblend(served, blend).items()}}
        parents = ck.extra.get("parents")
        return served, blend, state, None if parents is None else [int(v) for v in parents]

    def _rollback_targets(self) -> list[int]:
        """Where a rollback may go, nearest first: the versions the served one was adapted from (when the files
        record them), else the kept versions older than it; the base model last. None while serving the base."""
        if self._parents == []:
            return []
        chain = reversed(self._parents) if self._parents is not None else \
            (v for v in reversed(self.kept) if v < self.version)  # a file from before parents were recorded
        base = self.base_version
        return list(dict.fromkeys(v for v in [*chain, base] if v != self.version and (v == base or v in self.kept)))

    def rollback(self, version: int | None = None) -> int:
        """Serve an earlier version again; returns its number. Default: the version the served one was adapted
        from, or the nearest of its ancestors still kept and readable (a corrupt or foreign file is skipped, with a
        warning), the base model last. Raises ValueError when there is none (serving the base) or
        `version` cannot serve, OSError when latest.json cannot be written (nothing changes then)."""
        with self._lock:
            if version is not None:
                return self._serve(version, *self._load_version(version))
            targets = self._rollback_targets()
            if not targets:
                raise ValueError(f"already serving the base model (version {self.version}): nothing to roll back to")
            for v in targets:
                try:
                    loaded = self._load_version(v)
                except (ValueError, OSError) as e:
                    log.warning("rollback skips version %d: %s", v, e)
                    continue
                return self._serve(v, *loaded)
            raise AssertionError("the base model always loads")  # targets end with it

    def _serve(self, version: int, served: dict[str, torch.Tensor], blend: float, state: dict[str, torch.Tensor],
               parents: list[int] | None) -> int:
        """Make a loaded version the deployed one: shadow, latest.json, serving. All or nothing."""
        try:
            self.mae.load_state_dict(state)
            if self.out_dir is not None:  # a restart resumes what serves now, not what was rolled away from
                self._publish(version, parents)
        except BaseException:
            self.mae.load_state_dict(self._deployed)
            raise
        self._deployed = self._mae_state()
        self._served, self._served_blend = {k: v.detach().cpu().clone() for k, v in served.items()}, blend
        self.version, self._parents = version, parents
        self._make_optimizer()
        # they described the weights rolled away from
        self._running = self._running_class = self._running_stages = None
        self._deployed_scores = None
        if self.on_accept is not None:
            self.on_accept(self.encoder_state(), self.version)
        return version

    @staticmethod
    def _latest_record(out_dir: str | Path) -> dict | None:
        """latest.json of `out_dir` (None when there is none; a warning when it cannot be read)."""
        path = Path(out_dir) / "latest.json"
        try:
            rec = json.loads(path.read_text())
            if not isinstance(rec, dict) or not isinstance(rec.get("version"), int):
                raise ValueError("no version number in it")
            return rec
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("%s cannot be read (%s): starting from the base model", path, e)
            return None

    @staticmethod
    def latest(out_dir: str | Path) -> Path | None:
        """The last accepted checkpoint in `out_dir` (to resume after a restart), or None."""
        rec = Adapter._latest_record(out_dir)
        if rec is None or rec.get("file") is None:  # nothing yet, or rolled back to the base model
            return None
        path = Path(out_dir) / str(rec["file"])
        if not path.is_file():
            log.warning("%s names %s, which is gone: starting from the base model", Path(out_dir) / "latest.json",
                        path.name)
            return None
        return path

    @staticmethod
    def resume_chain(out_dir: str | Path) -> list[Path]:
        """The files a restart may resume, best first: the last accepted version's, then those of the versions it
        was adapted from that are still kept, newest first (for when a file cannot be read)."""
        latest = Adapter.latest(out_dir)
        if latest is None:
            return []
        parents = (Adapter._latest_record(out_dir) or {}).get("parents") or []
        prefix = latest.name[: latest.name.rfind("@")]  # <model_id>@<version>.pt
        older = (Path(out_dir) / f"{prefix}@{v}.pt" for v in reversed(parents) if isinstance(v, int))
        return [latest, *(p for p in older if p.is_file())]

    # ---- the thread ----
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="hiera-adapter", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        if self.config.threads:
            # OpenMP thread counts are per calling thread: this caps the adapter's kernels only (and
            # LiveAdaptation.share_cpu narrows serving to the rest). Off by default: on 2 cores it did not
            # lower the node's p95 latency with adaptation on (measured 155-605 ms either way).
            torch.set_num_threads(self.config.threads)
        while not self._stop.is_set():
            if self.enabled.is_set():
                try:
                    self.run_round(wait=True)
                except Exception:  # e.g. a failing on_accept: log it, keep the thread (and serving) alive
                    log.exception("adaptation round raised; the adapter keeps running")
            self._stop.wait(self.config.round_interval_s)

    def status(self) -> dict:
        last = self.last
        return {
            "enabled": self.enabled.is_set(), "version": self.version, "rounds": self.rounds,
            "accepted": self.accepted, "rejected": self.rejected, "replay_clips": len(self.replay),
            "replay_mb": round(self.replay.megabytes, 2), "last_result": last.reason if last else "",
            "device_share": round(self._spent_s / max(1e-9, time.monotonic() - self._started), 3),
            "decoder_warmup": self.decoder_warmup,
        }
