"""Embeddings and logits to labels: the model's head plus labels taught on the robot.

The only place a softmax is applied (the encoder returns raw logits).

Taught labels are prototypes: the mean of a few clips' normalised embeddings. They join the head as
*imprinted weights* (Qi, Brown, Lowe, "Low-Shot Learning with Imprinted Weights", CVPR 2018): a new
class k scores  w_k . e + b  with  w_k = |W| p_k / |p_k|  and  b = mean head bias, |W| the mean norm of
the head's rows, so its logits live on the head's scale and one softmax ranks head and taught labels
together. A model without a head ranks taught labels by a cosine classifier (temperature 10).
Prototypes persist as JSON beside the model, written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from hiera_perception.atomic import atomic_write_text

__all__ = ["Labeler", "Prototypes", "prototypes_path", "default_prototypes_file", "rival", "state_dir"]

log = logging.getLogger(__name__)
COSINE_TEMPERATURE = 10.0


def prototypes_path(model_path: str | os.PathLike) -> Path:
    """Where the taught labels of the model in `model_path` live: `<model>.prototypes.json`."""
    p = Path(model_path)
    return p.with_name(p.name + ".prototypes.json")


def state_dir() -> Path:
    """Where the package keeps what it learns on this machine: $XDG_STATE_HOME/hiera_perception."""
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "hiera_perception"


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-@" else "_" for c in name) or "model"


def default_prototypes_file(model) -> Path:
    """Taught labels of `model` (a loaded Hiera): beside its file (`<model>.prototypes.json`) when that folder is
    writable, else (an installed, read-only models/ folder, or a model without a file) <state dir>/prototypes/
    <model_id>.prototypes.json. The node and the command line keep them in the same place."""
    source = getattr(model, "source_path", None)
    if source and os.access(Path(source).parent, os.W_OK):
        return prototypes_path(source)
    return state_dir() / "prototypes" / f"{safe_name(getattr(model, 'model_id', model.config.name))}.prototypes.json"


class Prototypes:
    """Taught labels: name -> (sum of normalised embeddings, count). Thread-safe; JSON on disk."""

    def __init__(self, dim: int, path: str | os.PathLike | None = None):
        self.dim = dim
        self.path = Path(path) if path else None
        self._sums: dict[str, np.ndarray] = {}
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._matrix: torch.Tensor | None = None  # cached unit directions; rebuilt after add/remove only
        if self.path is not None and self.path.is_file():
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            if data.get("dim") != self.dim:
                raise ValueError(f"embedding size {data.get('dim')}, the model's is {self.dim}")
            for name, rec in data["labels"].items():
                self._sums[name] = np.asarray(rec["sum"], dtype=np.float64)
                self._counts[name] = int(rec["count"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.path}: unreadable taught labels: {e}") from e
        log.info("loaded %d taught labels from %s", len(self._sums), self.path)

    def save(self) -> None:
        if self.path is None:
            return
        with self._lock:
            data = {"dim": self.dim, "labels": {n: {"count": self._counts[n], "sum": self._sums[n].tolist()}
                                                for n in self._sums}}
        atomic_write_text(self.path, json.dumps(data) + "\n")

    def add(self, label: str, embeddings: np.ndarray) -> int:
        """Teach `label` from embeddings [N, C] (adds to what it already knew); returns its clip count."""
        if not label or not label.strip():
            raise ValueError("a taught label needs a non-empty name")
        emb = np.asarray(embeddings, dtype=np.float64).reshape(-1, self.dim)
        if len(emb) == 0:
            raise ValueError(f"no clips to teach {label!r} from")
        unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        with self._lock:
            self._sums[label] = self._sums.get(label, np.zeros(self.dim)) + unit.sum(axis=0)
            self._counts[label] = self._counts.get(label, 0) + len(emb)
            self._matrix = None
            return self._counts[label]

    def remove(self, label: str) -> bool:
        with self._lock:
            self._counts.pop(label, None)
            self._matrix = None
            return self._sums.pop(label, None) is not None

    @property
    def names(self) -> list[str]:
        return list(self._sums)

    def count(self, label: str) -> int:
        """Clips `label` was taught from (0 if it was not)."""
        return self._counts.get(label, 0)

    def matrix(self) -> torch.Tensor:
        """[K_taught, C] unit prototype directions (cached: the labeler asks for them on every clip)."""
        with self._lock:
            if self._matrix is None:
                if not self._sums:
                    self._matrix = torch.zeros(0, self.dim)
                else:
                    m = np.stack([self._sums[n] for n in self._sums])
                    self._matrix = torch.from_numpy(m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)).float()
            return self._matrix


def rival(label: str, tops: Sequence[tuple[str, float]], classes: Sequence[str]) -> str | None:
    """A note when the model, before learning `label`, confidently named most of its example clips as another class:
    the new prototype sits on that class and will take its clips too. `tops`: each example's (top name, its
    probability); `classes`: every name the model could give. None when there is nothing to say."""
    seen = Counter(name for name, p in tops if p >= 0.5)
    if not seen or len([c for c in classes if c != label]) < 3:  # p >= 0.5 is a clear call among 3+ classes only
        return None
    named, n = seen.most_common(1)[0]
    if named == label or n < len(tops) / 2:
        return None
    return (f"the model named {n} of {len(tops)} of these clips {named!r} (p >= 0.5) before: clips of {named!r} may "
            f"now be named {label!r}")


class Labeler:
    """Top-k names and probabilities over the head's classes and the taught labels."""

    def __init__(self, labels: list[str], head: torch.nn.Linear | None = None, top_k: int = 5,
                 prototypes: Prototypes | None = None):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        k = head.out_features if head is not None else 0
        if labels and len(labels) != k:
            raise ValueError(f"{len(labels)} label names for a head of {k} classes")
        self.names = list(labels) if labels else [f"class_{i}" for i in range(k)]
        self.top_k = top_k
        self.prototypes = prototypes
        if head is not None:
            w = head.weight.detach().float()
            self._w_norm = float(w.norm(dim=1).mean())
            self._b_mean = float(head.bias.detach().float().mean()) if head.bias is not None else 0.0

    @property
    def classes(self) -> list[str]:
        """Every name a clip can get: the head's classes, then taught labels the head does not have."""
        return list(dict.fromkeys(self.names + (self.prototypes.names if self.prototypes is not None else [])))

    def __call__(self, embedding: torch.Tensor, logits: torch.Tensor | None) -> tuple[list[str], list[float]]:
        """embedding [C], raw logits [K] or None -> (top-k names best first, their probabilities). A label taught
        under a head class's name adds its probability to that class's: one name, one entry."""
        names, scores = list(self.names), [] if logits is None else [logits.float().cpu()]
        if self.prototypes is not None and self.prototypes.names:
            protos = self.prototypes.matrix()
            e = embedding.float().cpu()
            if logits is not None:  # imprinted weights on the head's scale
                scores.append(self._w_norm * (protos @ e) + self._b_mean)
            else:  # cosine classifier
                scores.append(COSINE_TEMPERATURE * (protos @ (e / e.norm().clamp_min(1e-12))))
            names += self.prototypes.names
        if not scores:
            return [], []
        probs = torch.softmax(torch.cat(scores), dim=-1)
        if len(set(names)) < len(names):
            unique = list(dict.fromkeys(names))
            where = torch.tensor([unique.index(n) for n in names])
            probs, names = torch.zeros(len(unique)).index_add_(0, where, probs), unique
        top, idx = probs.topk(min(self.top_k, probs.numel()))
        return [names[i] for i in idx.tolist()], top.tolist()


# ---------------------------------------------------------------------------------------------------
# `hiera-perception teach`: taught labels from a data folder


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="model (default: the embedded one)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="data folder (labels.csv + videos) with clips of the new actions")
    src.add_argument("--bag", help="rosbag2 folder (or file) recorded while someone did one action: needs --label")
    src.add_argument("--forget", metavar="NAME", help="remove the taught label NAME (undo a teach)")
    src.add_argument("--list", action="store_true", help="list the taught labels and where they are kept")
    p.add_argument("--topic", default=None, help="image topic in --bag (default: its only image topic)")
    p.add_argument("--label", default=None, help="teach only this label of the folder (default: every label in "
                   "it); with --bag, the name every clip of the bag is taught as")
    p.add_argument("--prototypes", default=None, help="taught-labels file (default: <model>.prototypes.json)")
    p.add_argument("--clips-per-video", type=int, default=2)
    p.add_argument("--device", default="auto")


def main(args) -> int:
    from tqdm import tqdm

    from hiera_perception.dataset import ClipDataset
    from hiera_perception.engine import Engine

    if args.bag is not None and not (args.label or "").strip():
        raise SystemExit("teach --bag needs --label NAME: a bag carries no labels")
    engine = Engine(args.model, device=args.device, prototypes_file=args.prototypes)
    protos = engine.prototypes
    if protos.path is None:
        raise SystemExit("this model has no file to keep taught labels beside: pass --prototypes FILE")
    if args.list:
        print(f"{len(protos.names)} taught labels in {protos.path}")
        for name in protos.names:
            print(f"  {name}: {protos.count(name)} clips")
        return 0
    if args.forget is not None:
        if not protos.remove(args.forget):
            raise SystemExit(f"no taught label {args.forget!r} in {protos.path} (taught: "
                             f"{', '.join(protos.names) or 'none'})")
        protos.save()
        print(f"forgot {args.forget!r} -> {protos.path} ({len(protos.names)} taught labels left)")
        return 0
    if args.bag is not None:
        from hiera_perception.bag import BagClips

        data = BagClips(args.bag, args.topic, engine.num_frames, engine.frame_stride_s, engine.size)
        by_label = {args.label.strip(): [list(data[i][0].numpy()) for i in range(len(data))]}
    else:
        data = ClipDataset(args.data, engine.num_frames, engine.frame_stride_s, engine.size, args.clips_per_video)
        by_label: dict[str, list] = {}
        for i in tqdm(range(len(data)), desc="teach", unit="clip", disable=None):
            clip, idx = data[i]
            if idx >= 0 and (args.label is None or data.classes[idx] == args.label):
                by_label.setdefault(data.classes[idx], []).append(list(clip.numpy()))
        if not by_label:
            raise SystemExit(f"no labelled clips{f' of {args.label!r}' if args.label else ''} in {args.data}")
    for label, clips in by_label.items():
        # one forward pass: what the model names the clips before (for the note), and their embeddings to learn
        results = [r for b in range(0, len(clips), 8) for r in engine.infer(clips[b : b + 8])]
        note = rival(label, [(r.labels[0], r.scores[0]) for r in results if r.labels], engine.labeler.classes)
        count = engine.learn(label, np.stack([r.embedding for r in results]))
        print(f"taught {label!r}: {len(clips)} clips ({count} in all) -> {protos.path}")
        if note:
            print(f"note: {note}; check with `eval`, undo with `teach --forget {label}`", file=sys.stderr)
    return 0
