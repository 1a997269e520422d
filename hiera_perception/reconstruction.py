"""What the masked autoencoder sees: input | masked input | MAE reconstruction, side by side.

A person watching on-device adaptation (`~/reconstruction` on the node, a PNG from `hiera-perception
adapt`) should recognise the scene in the third picture. The decoder predicts *norm-pix* targets
(each patch normalised by its own mean and variance, mae.py `HieraMAE.target`), so a prediction is
turned back into pixels with the mean and standard deviation of the same patch of the input, as in
the MAE paper's figures (He et al. 2022). Patches the encoder saw are shown as they are: only the
dropped ones are the model's work, so in the reconstruction the visible patches equal the input
exactly (the test checks it).

The frame shown is the middle *target* frame: the video target is time-strided (each temporal token
predicts the first frame of its temporal patch), so only frames 0, pt, 2 pt, ... have predictions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from hiera_perception.atomic import atomic_write_bytes
from hiera_perception.mae import HieraMAE
from hiera_perception.preprocess import crop_resize, preprocess_clip

__all__ = ["reconstruction_panel", "panel_frame_index", "save_png", "MASKED_GREY", "GAP_PX"]

MASKED_GREY = 128  # dropped patches in the masked input
GAP_PX = 2  # white columns between the three pictures


def panel_frame_index(mae: HieraMAE) -> int:
    """The clip frame the panel shows: the first frame of the middle temporal token."""
    gt = mae.grid_final[0]
    return (gt // 2) * mae.config.patch_stride[0]


def _keep_for(mae: HieraMAE, keep: torch.Tensor | np.ndarray | None, mask_ratio: float, seed: int,
              device: torch.device) -> torch.Tensor:
    """keep [M] or [1, M] bool (True = visible unit) -> [1, M] on device. None draws one from `seed` that keeps
    the same share of units in every temporal slice, so the frame shown always has some of its scene visible
    (a plain random mask may drop all of one frame's units: a grey middle picture)."""
    M = mae.config.num_mask_units
    if keep is None:
        if not 0.0 <= mask_ratio < 1.0:  # NaN too
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        mt, mh, mw = mae.config.mask_spatial_shape
        n_keep = max(1, round(mh * mw * (1.0 - mask_ratio)))
        noise = torch.rand(mt, mh * mw, generator=torch.Generator().manual_seed(seed))
        ranks = noise.argsort(dim=1).argsort(dim=1)  # each unit's rank within its slice; the n_keep lowest stay
        return (ranks < n_keep).reshape(1, M).to(device)  # [mt, mh*mw] -> [1, M], raster (t, h, w) like keep
    keep = torch.as_tensor(keep)
    if keep.dtype != torch.bool or keep.numel() != M:
        raise ValueError(f"keep must be a bool mask of {M} mask units for {mae.config.name}, "
                         f"got {keep.dtype} {list(keep.shape)}")
    return keep.reshape(1, M).to(device)


@torch.no_grad()
def reconstruction_panel(
    mae: HieraMAE,
    clip: Sequence[np.ndarray] | np.ndarray,
    keep: torch.Tensor | np.ndarray | None = None,
    mask_ratio: float = 0.75,
    seed: int = 0,
) -> np.ndarray:
    """One clip -> RGB uint8 [S, 3 S + 2 GAP_PX, 3]: input | masked input | reconstruction of its middle frame.

    clip: T RGB uint8 frames [H, W, 3] (cropped and resized to the model's S x S like every input) or an
    array [T, H, W, 3]. keep: [M] (or [1, M]) bool mask units, True = visible; None draws one from `seed` that
    drops `mask_ratio` of every frame's units. `mae` is put in eval mode: it must not be training in another thread.
    """
    cfg = mae.config
    T, S = cfg.input_size[0], cfg.input_size[1]
    if len(clip) != T:
        raise ValueError(f"a clip for {cfg.name} has {T} frames, got {len(clip)}")
    frames = np.stack([crop_resize(np.asarray(f), S) for f in clip])  # [T, S, S, 3] uint8
    device = next(mae.parameters()).device
    x = preprocess_clip(frames, S, cfg.mean, cfg.std, device)  # [1, 3, T, S, S] normalised
    keep = _keep_for(mae, keep, mask_ratio, seed, device)
    mae.eval()
    pred, token_keep = mae.decode(mae.encode(x, keep), keep)  # [1, N_final, ps*ps*3], [1, N_final]

    ps, C = mae.pred_stride, cfg.in_chans
    gt, gh, gw = mae.grid_final
    t = gt // 2
    f = panel_frame_index(mae)
    # prediction per token, inner order (row, col, channel) as in HieraMAE.target:
    # [N_final, ps*ps*C] -> [gt, gh, gw, ps, ps, C] -> the middle temporal token [gh, gw, ps, ps, C]
    pred = pred[0].float().view(gt, gh, gw, ps, ps, C)[t]
    visible = token_keep[0].view(gt, gh, gw)[t].cpu().numpy()  # [gh, gw] True = seen by the encoder
    # the same frame's patches in normalised space: [C, gh*ps, gw*ps] -> [gh, gw, ps, ps, C]
    patches = x[0, :, f].float().reshape(C, gh, ps, gw, ps).permute(1, 3, 2, 4, 0)
    flat = patches.reshape(gh, gw, -1)
    mean = flat.mean(dim=-1)[..., None, None, None]  # [gh, gw, 1, 1, 1]
    std = (flat.var(dim=-1) + 1.0e-6).sqrt()[..., None, None, None]  # unbiased, the target's own
    recon = pred * std + mean  # undo norm-pix: back to the normalised input space
    m = torch.tensor(cfg.mean, device=recon.device) * 255.0
    s = torch.tensor(cfg.std, device=recon.device) * 255.0
    recon = (recon * s + m).clamp(0, 255).round().to(torch.uint8)  # undo mean/std: pixels
    # [gh, gw, ps, ps, C] -> [gh, ps, gw, ps, C] -> [S, S, C]
    recon = recon.permute(0, 2, 1, 3, 4).reshape(gh * ps, gw * ps, C).cpu().numpy()

    pixel_visible = np.repeat(np.repeat(visible, ps, axis=0), ps, axis=1)  # [gh, gw] -> [S, S]
    frame = frames[f]
    masked = np.where(pixel_visible[..., None], frame, np.uint8(MASKED_GREY))
    rebuilt = np.where(pixel_visible[..., None], frame, recon)  # what the encoder saw is shown as it was
    panel = np.full((S, 3 * S + 2 * GAP_PX, 3), 255, np.uint8)
    for i, picture in enumerate((frame, masked, rebuilt)):
        left = i * (S + GAP_PX)
        panel[:, left : left + S] = picture
    return panel


def save_png(path: str | os.PathLike, rgb: np.ndarray, scale: int = 1) -> Path:
    """Write an RGB uint8 image as PNG, atomically; `scale` > 1 enlarges it (nearest) for small models."""
    if scale > 1:
        rgb = cv2.resize(rgb, (rgb.shape[1] * scale, rgb.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))  # OpenCV writes BGR
    if not ok:
        raise OSError(f"OpenCV could not encode a PNG of shape {rgb.shape} for {path}")
    path = Path(path)
    atomic_write_bytes(path, buf.tobytes())
    return path
