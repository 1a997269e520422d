"""The inference engine: uint8 frames of a clip in, embedding + labels out.

Owns the model, its device and precision, and the preprocessing, so the node, the CLI and the
benchmarks run exactly the same path. Not thread-safe by design: one worker thread owns it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from hiera_perception.checkpoint import load_model, resolve_device
from hiera_perception.labeler import Labeler, Prototypes, prototypes_path
from hiera_perception.model import Hiera
from hiera_perception.preprocess import preprocess_clip

__all__ = ["Engine", "ClipResult", "PRECISIONS"]

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "bf16")


@dataclass
class ClipResult:
    embedding: np.ndarray  # [C] float32
    labels: list[str]
    scores: list[float]


class Engine:
    def __init__(self, model: Hiera | str | None = None, device: str = "auto", precision: str = "fp32", top_k: int = 5,
                 prototypes_file: str | None = None):
        """prototypes_file: where taught labels persist (default: beside the model's file, if any)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = resolve_device(device)
        self.model = model if isinstance(model, Hiera) else load_model(model, device=str(self.device))
        self.model.to(self.device).eval()
        self.precision = precision
        cfg = self.model.config
        self.num_frames, self.size = cfg.input_size[0], cfg.input_size[1]
        source = getattr(self.model, "source_path", None)
        proto_path = prototypes_file or (prototypes_path(source) if source else None)
        self.prototypes = Prototypes(cfg.num_features, proto_path)
        head = self.model.head.projection if self.model.head is not None else None
        self.labeler = Labeler(getattr(self.model, "labels", []), head, top_k, self.prototypes)
        # Seconds between a clip's frames: what the model was trained with (stored in our checkpoints),
        # else the official Kinetics sampling of every 4th frame at 30 fps.
        self.frame_stride_s = float(getattr(self.model, "sampling", {}).get("frame_stride_s", 4 / 30))

    @property
    def encoder_version(self) -> str:
        """"<model id>@<adaptation version>", the ActionFeatures.encoder_version string."""
        return f"{getattr(self.model, 'model_id', self.model.config.name)}@{getattr(self.model, 'version', 0)}"

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def _forward(self, clips: Sequence[Sequence[np.ndarray]]):
        for c in clips:
            if len(c) != self.num_frames:
                raise ValueError(f"a clip must have {self.num_frames} frames for {self.model.config.name}, got {len(c)}")
        cfg = self.model.config
        x = torch.cat([preprocess_clip(c, self.size, cfg.mean, cfg.std, self.device) for c in clips])
        with self._autocast():
            return self.model(x)

    def infer(self, clips: Sequence[Sequence[np.ndarray]]) -> list[ClipResult]:
        """A batch of clips, each `num_frames` RGB uint8 frames [H, W, 3] of any size."""
        out = self._forward(clips)
        emb = out.embedding.float().cpu()
        logits = out.logits.float().cpu() if out.logits is not None else None
        results = []
        for i in range(len(clips)):
            labels, scores = self.labeler(emb[i], logits[i] if logits is not None else None)
            results.append(ClipResult(emb[i].numpy(), labels, scores))
        return results

    def teach(self, label: str, clips: Sequence[Sequence[np.ndarray]], batch: int = 8) -> int:
        """Learn (or reinforce) a label from example clips; persists it; returns its clip count."""
        embs = [self._forward(clips[i : i + batch]).embedding.float().cpu().numpy() for i in range(0, len(clips), batch)]
        count = self.prototypes.add(label, np.concatenate(embs) if embs else np.zeros((0, self.model.num_features)))
        self.prototypes.save()
        log.info("taught %r from %d clips (%d in all)", label, len(clips), count)
        return count
