"""Masked-autoencoder pre-training (and on-robot adaptation) of the Hiera video encoder.

Masked Autoencoders Are Scalable Vision Learners (He et al., CVPR 2022); Masked Autoencoders As
Spatiotemporal Learners (Feichtenhofer et al., NeurIPS 2022); the Hiera MAE of Ryali et al. 2023
(facebookresearch/hiera `hiera_mae.py`), whose numbers this reproduces (test/test_parity.py).

Masking drops whole mask units. The encoder runs on the kept units only; the features of each
pooling stage are fused to the last stage's resolution by strided convolutions, a light decoder
fills the dropped units with a learned token, and the loss is the mean squared error against
per-patch normalised pixels ("norm-pix") of the dropped units. The video target is time-strided:
each token predicts the first frame of its temporal patch, as in the official model.

One mask convention throughout: `keep` [B, M] bool, True = the unit is visible to the encoder.

`HieraMAE(config)` builds a fresh encoder (with `config.mae_q_pool`, 2 for the official models);
`HieraMAE(config, encoder=model)` wraps an existing encoder, sharing its parameters, so adapting it
changes the very module that serves (its head and norm stay untouched by the MAE loss); everything,
the decoder included, is built from `model.config`, so `config` is refused if its decoder differs.
The MAE always pools `mae_q_pool` times: a wrapped classifier that pools more (base 16x224: 3) runs
its same weights pooling twice (`Hiera.with_pooling`), so the official MAE decoder fits it and its
loss equals the official MAE's on those weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from hiera_perception.config import HieraConfig
from hiera_perception.model import Hiera, HieraBlock

__all__ = ["HieraMAE", "MAEOutput"]


@dataclass
class MAEOutput:
    loss: torch.Tensor  # scalar: mean squared error over the dropped units' target pixels
    pred: torch.Tensor  # [P_masked, ps*ps*3] predictions of the dropped patches (B folded in)
    label: torch.Tensor  # [P_masked, ps*ps*3] their norm-pix targets
    keep: torch.Tensor  # [B, M] bool, True = visible mask unit


def _decoder_fields(cfg: HieraConfig) -> dict[str, int]:
    return {f: getattr(cfg, f) for f in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")}


class HieraMAE(nn.Module):
    def __init__(self, config: HieraConfig, encoder: Hiera | None = None):
        super().__init__()
        fresh = encoder is None
        if fresh:
            encoder = Hiera(config.replace(q_pool=config.mae_q_pool, num_classes=0))
        elif (wanted := _decoder_fields(config)) != (has := _decoder_fields(encoder.config)):
            # the decoder is built from encoder.config, which a checkpoint of this MAE stores
            raise ValueError(f"HieraMAE: config {config.name} asks for decoder {wanted}, the encoder's config has "
                             f"{has}; pass encoder.config (or an encoder built with those decoder fields)")
        self.encoder = encoder
        cfg = self.config = encoder.config
        # The MAE pools mae_q_pool times whatever its encoder serves with: a classifier pooling 3 times is
        # pre-trained and adapted through the same weights pooling twice, as the official MAE and its decoder
        # are. Not a submodule (its parameters are the encoder's); train() and _apply() carry it along.
        object.__setattr__(self, "trunk", encoder.with_pooling(cfg.mae_q_pool))
        q_pool, qs = cfg.mae_q_pool, cfg.q_stride
        dims = cfg.stage_dims
        enc_dim = dims[-1]
        self.mu_final = tuple(m // s**q_pool for m, s in zip(cfg.mask_unit_size, qs))  # unit shape at the end
        self.grid_final = tuple(t // s**q_pool for t, s in zip(cfg.tokens_spatial_shape, qs))

        self.encoder_norm = nn.LayerNorm(enc_dim, eps=1e-6)
        # Stages before the last pooling are brought to the final resolution by a conv whose kernel
        # equals its stride (a learned pooling); after q_pool the resolution no longer changes.
        self.multi_scale_fusion_heads = nn.ModuleList()
        mu = cfg.mask_unit_size
        for stage in range(q_pool):
            kernel = tuple(a // b for a, b in zip(mu, self.mu_final))
            self.multi_scale_fusion_heads.append(nn.Conv3d(dims[stage], enc_dim, kernel, stride=kernel))
            mu = tuple(a // s for a, s in zip(mu, qs))
        self.multi_scale_fusion_heads.append(nn.Identity())

        D = cfg.decoder_embed_dim
        self.decoder_embed = nn.Linear(enc_dim, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.grid_final), D))
        self.decoder_blocks = nn.ModuleList(
            HieraBlock(D, D, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(D, eps=1e-6)
        self.pred_stride = cfg.patch_stride[-1] * qs[-1] ** q_pool  # pixels per predicted token side
        self.decoder_pred = nn.Linear(D, self.pred_stride**2 * cfg.in_chans)
        self._init_weights(fresh)

    def _init_weights(self, fresh: bool) -> None:
        """MAE initialisation (xavier linears, zero biases) for the decoder, and for the encoder only
        when it is new: a wrapped encoder keeps its trained weights."""
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
        modules = list(self.modules()) if fresh else [m for n, m in self.named_modules() if not n.startswith("encoder")]
        for m in modules:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.zeros_(m.bias)
                nn.init.ones_(m.weight)
        if fresh:  # the patch embedding as a linear layer over its flattened kernel
            w = self.encoder.patch_embed.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    def train(self, mode: bool = True) -> "HieraMAE":
        super().train(mode)
        self.trunk.train(mode)
        return self

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.trunk is not self.encoder:  # its index maps; the parameters, shared, have moved already
            self.trunk._apply(fn, recurse)
        return self

    # ---- pieces ----
    def encode(self, x: torch.Tensor, keep: torch.Tensor, n_keep: int | None = None) -> torch.Tensor:
        """[B, 3, T, H, W], keep [B, M] (n_keep True per row) -> fused latent [B, M_kept, *mu_final, C]."""
        _, inter = self.trunk.forward_tokens(x, keep, return_intermediates=True, n_keep=n_keep)
        inter = inter[: self.config.mae_q_pool] + inter[-1:]  # later stages share the final resolution
        latent = 0.0
        for head, feats in zip(self.multi_scale_fusion_heads, inter):
            if not isinstance(head, nn.Identity):
                B, Mk = feats.shape[:2]
                # [B, M_kept, t, h, w, C] -> [B*M_kept, C, t, h, w] -> conv -> back to channels last
                f = feats.reshape(B * Mk, *feats.shape[2:]).permute(0, 4, 1, 2, 3)
                f = head(f).permute(0, 2, 3, 4, 1)
                feats = f.reshape(B, Mk, *f.shape[1:])
            latent = latent + feats
        return self.encoder_norm(latent)

    def decode(self, latent: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent [B, M_kept, *mu_final, C] -> (pred [B, N_final, ps*ps*3], token keep [B, N_final])."""
        B, M = keep.shape
        x = self.decoder_embed(latent)  # [B, M_kept, t, h, w, D]
        D = x.shape[-1]
        idx = Hiera.kept_units(keep, x.shape[1]).view(B, -1, 1, 1, 1, 1).expand_as(x)
        full = x.new_zeros(B, M, *self.mu_final, D).scatter(1, idx, x)
        unit_keep = keep.view(B, M, 1, 1, 1, 1)
        full = torch.where(unit_keep, full, self.mask_token.view(1, 1, 1, 1, 1, D))
        # undo the windowing: [B, (gt, gh, gw), mt, mh, mw, D] -> [B, gt*mt, gh*mh, gw*mw, D]
        gt, gh, gw = (g // m for g, m in zip(self.grid_final, self.mu_final))
        mt, mh, mw = self.mu_final
        x = full.view(B, gt, gh, gw, mt, mh, mw, D).permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, -1, D)
        token_keep = (
            keep.view(B, gt, gh, gw, 1, 1, 1).expand(B, gt, gh, gw, mt, mh, mw).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, -1)
        )
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x)), token_keep

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """Norm-pix target per final token: [B, 3, T, H, W] -> [B, N_final, ps*ps*3].

        Time-strided: one frame (the first) per temporal patch. Each patch is normalised by its own
        mean and (unbiased) variance. Inner order (row, col, channel) matches the official target.
        """
        ps = self.pred_stride
        B, C = x.shape[:2]
        gt, gh, gw = self.grid_final
        x = x[:, :, :: self.config.patch_stride[0]]  # [B, C, T', H, W]
        # [B, C, T', gh*ps, gw*ps] -> [B, C, T', gh, ps, gw, ps] -> [B, T', gh, gw, ps, ps, C]
        x = x.reshape(B, C, gt, gh, ps, gw, ps).permute(0, 2, 3, 5, 4, 6, 1).reshape(B, gt * gh * gw, ps * ps * C)
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True)
        return (x - mean) / (var + 1.0e-6) ** 0.5

    # ---- entry points ----
    def forward_keep(self, x: torch.Tensor, keep: torch.Tensor, n_keep: int | None = None) -> MAEOutput:
        """MAE with a fixed mask: keep [B, M] bool, the same count per sample. Without n_keep the mask is
        checked (and counted) on the host; with it nothing is read back, so the step can be a CUDA graph."""
        if keep.dtype != torch.bool or tuple(keep.shape) != (x.shape[0], self.config.num_mask_units):
            raise ValueError(
                f"keep must be bool [B={x.shape[0]}, M={self.config.num_mask_units}], got {keep.dtype} {list(keep.shape)}"
            )
        if n_keep is None:
            counts = keep.sum(dim=1)
            if bool((counts != counts[0]).any()) or not 0 < int(counts[0]) < self.config.num_mask_units:
                raise ValueError(f"every sample must keep the same number of mask units, at least one and fewer "
                                 f"than all {self.config.num_mask_units}; got {counts.tolist()}")
            n_keep = int(counts[0])
        pred, token_keep = self.decode(self.encode(x, keep, n_keep), keep)
        # the dropped tokens, in order: [B, N_dropped] indices, N_dropped = N - kept units x their tokens
        n_dropped = token_keep.shape[1] * (self.config.num_mask_units - n_keep) // self.config.num_mask_units
        idx = Hiera.kept_units(~token_keep, n_dropped)[..., None]
        pred = pred.gather(1, idx.expand(-1, -1, pred.shape[-1])).flatten(0, 1)
        label = self.target(x)
        label = label.gather(1, idx.expand(-1, -1, label.shape[-1])).flatten(0, 1)
        return MAEOutput(((pred - label) ** 2).mean(), pred, label, keep)

    def forward(self, x: torch.Tensor, mask_ratio: float = 0.9, generator: torch.Generator | None = None) -> MAEOutput:
        """MAE with a fresh random mask dropping `mask_ratio` of the mask units."""
        n_keep, M = self.encoder.units_kept(mask_ratio), self.config.num_mask_units
        if n_keep == M:  # the loss would be the mean over no patches: NaN
            raise ValueError(f"mask_ratio {mask_ratio} masks 0 of {self.config.name}'s {M} mask units; "
                             "the MAE loss needs a ratio > 0")
        keep = self.encoder.random_keep(x.shape[0], mask_ratio, device=x.device, generator=generator)
        return self.forward_keep(x, keep, n_keep)
