"""Frames to model input: resize the short side, centre crop, normalise (mean 0.45 / std 0.225).

One path serves the node, the CLI, evaluation and training, so the model always sees what it was
trained on: `crop_resize` on the host (uint8), `to_device`, then `normalize` on the device. Cropping
the centred square *before* resizing is the same operation as "resize short side to S, centre crop
S x S" (up to sub-pixel rounding of the crop offset) and resizes fewer pixels. `crop_resize` is exposed
so the clip buffer can shrink frames as they arrive and store each one once, small.

`AreaResize` does the shrink on the device instead, with the same pixels as cv2's INTER_AREA (a separable
weighted mean: two matrix products): for the one frame per clip whose host resize would sit on the latency
path, on a GPU whose host is slow (the engine's `device_resize`).
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch

__all__ = ["crop_resize", "centre_square", "AreaResize", "area_weights", "to_device", "normalize", "preprocess_clip",
           "MEAN", "STD"]

MEAN = (0.45, 0.45, 0.45)
STD = (0.225, 0.225, 0.225)


def crop_resize(frame: np.ndarray, size: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [size, size, 3] uint8: centre square of side min(H, W), resized to `size`.

    INTER_AREA when shrinking (it averages, so no aliasing from a 640x480 camera down to 64 px),
    bilinear when growing.
    """
    if frame.shape[:2] == (size, size) and frame.ndim == 3 and frame.shape[2] == 3:
        return frame
    square = centre_square(frame)
    interp = cv2.INTER_AREA if len(square) > size else cv2.INTER_LINEAR
    return cv2.resize(square, (size, size), interpolation=interp)


def centre_square(frame: np.ndarray) -> np.ndarray:
    """[H, W, 3] -> the centred [side, side, 3] view, side = min(H, W): what crop_resize resizes."""
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] frame, got shape {frame.shape}")
    h, w = frame.shape[:2]
    side = min(h, w)
    if side < 1:
        raise ValueError(f"empty frame of shape {frame.shape}")
    top, left = (h - side) // 2, (w - side) // 2
    return frame[top : top + side, left : left + side]


def area_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of an INTER_AREA shrink along one axis (n_out < n_in): output pixel o is the mean of
    the input interval [o * s, (o + 1) * s), s = n_in / n_out, each input pixel weighted by its overlap."""
    if not 0 < n_out < n_in:
        raise ValueError(f"an area shrink needs 0 < n_out < n_in, got {n_in} -> {n_out}")
    s = n_in / n_out
    lo, i = np.arange(n_out)[:, None] * s, np.arange(n_in)[None, :]
    return (np.clip(np.minimum(lo + s, i + 1) - np.maximum(lo, i), 0.0, None) / s).astype(np.float32)


class AreaResize:
    """uint8 squares [N, side, side, 3] on a device -> [N, size, size, 3] uint8 there, for side > size: the pixels
    of cv2.resize(..., INTER_AREA) (which rounds half up), as W @ X @ W^T in float32 per channel."""

    def __init__(self, size: int, device: torch.device | str):
        self.size, self.device = size, torch.device(device)
        self._weights: dict[int, torch.Tensor] = {}  # per input side

    def __call__(self, squares: torch.Tensor) -> torch.Tensor:
        side = squares.shape[1]
        w = self._weights.get(side)
        if w is None:
            w = self._weights[side] = torch.from_numpy(area_weights(side, self.size)).to(self.device)
        y = w @ squares.permute(0, 3, 1, 2).float() @ w.T  # [N, 3, size, size]
        return (y + 0.5).floor_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def to_device(clips: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """uint8 array -> tensor on `device`; to a GPU through pinned memory, without blocking the host."""
    x = torch.from_numpy(np.ascontiguousarray(clips))
    device = torch.device(device)
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    return x


def normalize(clips: torch.Tensor, mean: Sequence[float] | torch.Tensor = MEAN,
              std: Sequence[float] | torch.Tensor = STD, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 clips [B, T, S, S, 3] -> normalised model input [B, 3, T, S, S], on the clips' device.

    Pure tensor arithmetic (no host sync), so it can run inside a captured CUDA graph.
    """
    if clips.dtype != torch.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
        raise ValueError(f"expected uint8 clips [B, T, S, S, 3], got {clips.dtype} {list(clips.shape)}")
    x = clips.permute(0, 4, 1, 2, 3).to(dtype)  # -> [B, 3, T, S, S]
    # mean/std may be given as tensors already on the device: no host-to-device copy (graph capture forbids it)
    m = torch.as_tensor(mean, device=x.device, dtype=dtype).view(1, 3, 1, 1, 1) * 255.0
    s = torch.as_tensor(std, device=x.device, dtype=dtype).view(1, 3, 1, 1, 1) * 255.0
    return (x - m) / s


def preprocess_clip(
    frames: Sequence[np.ndarray] | np.ndarray,
    size: int,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """T RGB uint8 frames [H, W, 3] -> normalised clip [1, 3, T, size, size] on `device`.

    The uint8 clip travels to the device (4x fewer bytes than float) and is normalised there.
    """
    clip = np.stack([crop_resize(np.asarray(f), size) for f in frames])  # [T, S, S, 3] uint8
    return normalize(to_device(clip[None], device), mean, std, dtype)
