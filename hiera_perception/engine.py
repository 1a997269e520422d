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
from hiera_perception.labeler import Labeler
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
    def __init__(self, model: Hiera | str | None = None, device: str = "auto", precision: str = "fp32", top_k: int = 5):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = resolve_device(device)
        self.model = model if isinstance(model, Hiera) else load_model(model, device=str(self.device))
        self.model.to(self.device).eval()
        self.precision = precision
        cfg = self.model.config
        self.num_frames, self.size = cfg.input_size[0], cfg.input_size[1]
        self.labeler = Labeler(getattr(self.model, "labels", []), cfg.num_classes, top_k)
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
    def infer(self, clips: Sequence[Sequence[np.ndarray]]) -> list[ClipResult]:
        """A batch of clips, each `num_frames` RGB uint8 frames [H, W, 3] of any size."""
        for c in clips:
            if len(c) != self.num_frames:
                raise ValueError(f"a clip must have {self.num_frames} frames for {self.model.config.name}, got {len(c)}")
        cfg = self.model.config
        x = torch.cat([preprocess_clip(c, self.size, cfg.mean, cfg.std, self.device) for c in clips])
        with self._autocast():
            out = self.model(x)
        emb = out.embedding.float().cpu().numpy()
        results = []
        for i in range(len(clips)):
            labels, scores = self.labeler(out.logits[i] if out.logits is not None else None)
            results.append(ClipResult(emb[i], labels, scores))
        return results
