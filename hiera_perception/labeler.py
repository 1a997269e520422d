"""Scores to labels: top-k names and probabilities for one clip.

The only place a softmax is applied (the encoder returns raw logits). A model without a head, or
with an unnamed one, still gets labels: its class indices as strings ("class_17").
"""

from __future__ import annotations

import torch

__all__ = ["Labeler"]


class Labeler:
    def __init__(self, labels: list[str], num_classes: int, top_k: int = 5):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if labels and len(labels) != num_classes:
            raise ValueError(f"{len(labels)} label names for a head of {num_classes} classes")
        self.names = list(labels) if labels else [f"class_{i}" for i in range(num_classes)]
        self.top_k = top_k

    def __call__(self, logits: torch.Tensor | None) -> tuple[list[str], list[float]]:
        """logits [K] (raw) -> (top-k names best first, their probabilities)."""
        if logits is None or not self.names:
            return [], []
        probs = torch.softmax(logits.float(), dim=-1)
        scores, idx = probs.topk(min(self.top_k, probs.numel()))
        return [self.names[i] for i in idx.tolist()], scores.tolist()
