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
from typing import Any, Sequence

import numpy as np
import torch

from hiera_perception.atomic import atomic_write_text, locked_folder

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
    """Taught labels: name -> (sum of normalised embeddings, count). Thread-safe; JSON on disk.

    The file is the truth, shared by every process serving the model (nodes, the teach command): a change is made to
    the file as it is now, under a lock on its folder, and saved before it is served; a change someone else saved is
    picked up at the next clip."""

    def __init__(self, dim: int, path: str | os.PathLike | None = None):
        self.dim = dim
        self.path = Path(path) if path else None
        self._sums: dict[str, np.ndarray] = {}
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._matrix: torch.Tensor | None = None  # cached unit directions; rebuilt after a change only
        self._seen: tuple | None = None  # the file's identity when last read or written
        if self.path is not None and self.path.is_file():
            self._seen = self._identity()
            self._sums, self._counts = self._read()
            log.info("loaded %d taught labels from %s", len(self._sums), self.path)

    def _identity(self) -> tuple | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size  # an atomic replace makes a new inode

    def _read(self) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        sums, counts = {}, {}
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("labels"), dict):
                raise ValueError("not a JSON object with a 'labels' object")
            if data.get("dim") != self.dim:
                raise ValueError(f"embedding size {data.get('dim')}, the model's is {self.dim}")
            for name, rec in data["labels"].items():
                total, count = np.asarray(rec["sum"], dtype=np.float64), rec["count"]
                # checked here, where the file is named: later, a bad entry would fail every clip the labeler scores
                if total.shape != (self.dim,) or not np.isfinite(total).all():
                    raise ValueError(f"label {name!r}: 'sum' must be {self.dim} finite numbers")
                if not isinstance(count, int) or count < 1:
                    raise ValueError(f"label {name!r}: 'count' must be a whole number >= 1, got {count!r}")
                sums[name], counts[name] = total, count
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{self.path}: unreadable taught labels: {e}") from e
        return sums, counts

    def _change(self, change) -> Any:
        """`change(sums, counts)` applied to the labels as saved now, saved, then served; returns its result, falsy
        when it changed nothing (then nothing is written). A failed save (OSError) or an unreadable file
        (ValueError) changes nothing."""
        with self._lock:
            if self.path is None:
                sums, counts = dict(self._sums), dict(self._counts)
                result = change(sums, counts)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with locked_folder(self.path.parent):  # another process's change in between would be lost
                    self._seen = self._identity()
                    sums, counts = self._read() if self._seen is not None else ({}, {})
                    result = change(sums, counts)
                    if result:
                        data = {"dim": self.dim, "labels": {n: {"count": counts[n], "sum": sums[n].tolist()}
                                                            for n in sums}}
                        atomic_write_text(self.path, json.dumps(data) + "\n")
                        self._seen = self._identity()
            self._sums, self._counts, self._matrix = sums, counts, None
            return result

    def _refresh(self) -> None:
        """Take a change another process saved (caller holds the lock); an unreadable file keeps what is served."""
        if self.path is None:
            return
        try:
            now = self._identity()
        except OSError:  # the folder unreadable for now: keep serving what was read
            return
        if now == self._seen:
            return
        self._seen = now
        try:
            self._sums, self._counts = self._read() if now is not None else ({}, {})
        except ValueError as e:
            log.warning("keeping the taught labels served: %s", e)
            return
        self._matrix = None
        log.info("taught labels changed on disk: now %d (%s)", len(self._sums), ", ".join(self._sums) or "none")

    def add(self, label: str, embeddings: np.ndarray) -> int:
        """Teach `label` from embeddings [N, C] or one [C] (adds to what it already knew) and save; returns its clip
        count. Raises ValueError for bad embeddings, OSError when the file cannot be written (nothing learnt)."""
        if not label or not label.strip():
            raise ValueError("a taught label needs a non-empty name")
        emb = np.asarray(embeddings, dtype=np.float64)
        if emb.ndim == 1 and emb.shape == (self.dim,):
            emb = emb[None]
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"embeddings must be [N, {self.dim}], got {list(emb.shape)}")
        if len(emb) == 0:
            raise ValueError(f"no clips to teach {label!r} from")
        if not np.isfinite(emb).all():
            raise ValueError(f"embeddings to teach {label!r} from are not all finite")
        unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

        def learn(sums: dict, counts: dict) -> int:
            sums[label] = sums.get(label, np.zeros(self.dim)) + unit.sum(axis=0)
            counts[label] = counts.get(label, 0) + len(emb)
            return counts[label]

        return self._change(learn)

    def remove(self, label: str) -> bool:
        """Forget `label` and save; False if it was not taught (nothing is written, nor a folder made)."""
        if label not in self.names and (self.path is None or not self.path.is_file()):
            return False

        def forget(sums: dict, counts: dict) -> bool:
            counts.pop(label, None)
            return sums.pop(label, None) is not None

        return self._change(forget)

    @property
    def names(self) -> list[str]:
        return self.snapshot()[0]

    def count(self, label: str) -> int:
        """Clips `label` was taught from (0 if it was not)."""
        with self._lock:
            self._refresh()
            return self._counts.get(label, 0)

    def matrix(self) -> torch.Tensor:
        """[K_taught, C] unit prototype directions, in the order of `names`."""
        return self.snapshot()[1]

    def snapshot(self) -> tuple[list[str], torch.Tensor]:
        """(names, [K_taught, C] unit directions) of one moment: the labeler asks on every clip, so the directions
        are cached and the file is only stat'ed."""
        with self._lock:
            self._refresh()
            if self._matrix is None:
                if not self._sums:
                    self._matrix = torch.zeros(0, self.dim)
                else:
                    m = np.stack([self._sums[n] for n in self._sums])
                    self._matrix = torch.from_numpy(m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)).float()
            return list(self._sums), self._matrix


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
        taught, protos = self.prototypes.snapshot() if self.prototypes is not None else ([], None)
        if taught:
            e = embedding.float().cpu()
            if logits is not None:  # imprinted weights on the head's scale
                scores.append(self._w_norm * (protos @ e) + self._b_mean)
            else:  # cosine classifier
                scores.append(COSINE_TEMPERATURE * (protos @ (e / e.norm().clamp_min(1e-12))))
            names += taught
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
