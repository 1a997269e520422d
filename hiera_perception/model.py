"""Hiera video encoder: a hierarchical ViT with mask-unit attention, as our own compact code.

Hiera: A Hierarchical Vision Transformer without the Bells-and-Whistles. Ryali, Hu, Bolya, Wei, Fan,
Huang, Aggarwal, Chowdhury, Poursaeed, Hoffman, Malik, Li, Feichtenhofer. ICML 2023, arXiv:2306.00989.

Parameter names and shapes equal facebookresearch/hiera's, so its checkpoints load with strict=True
and give the same numbers (test/test_parity.py checks this against the official module). What differs:

* The token reorder ("unroll") that makes q-pooling a max over a leading axis and puts every mask
  unit's tokens in one strided slab is a single precomputed gather (`token_order`) instead of three
  rounds of view/permute per forward; the inverse gathers give the per-stage intermediates.
* Mask-unit attention hands scaled_dot_product_attention 4-D [B * windows, heads, N, head_dim]
  tensors; the official 5-D call cannot use the fused CPU/GPU kernels.
* `forward` returns raw logits and the pooled embedding in an `EncoderOutput`; no softmax in eval
  (the labeler applies it).

Layout: after `unroll`, position p = w * M + m holds token w (in unrolled order) of mask unit m (in
raster order), where M is the number of mask units. Pooling with a flat stride s is then a max over
s equal slabs of the first axis, and windowed attention is a reshape to [..., W, M, ...].
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hiera_perception.config import HieraConfig

__all__ = ["Hiera", "EncoderOutput", "HieraBlock", "token_order", "local_order"]


@dataclass
class EncoderOutput:
    embedding: torch.Tensor  # [B, C] mean-pooled tokens after the final norm
    logits: torch.Tensor | None  # [B, K] raw scores from the head, None without a head
    intermediates: list[torch.Tensor] | None = None  # per stage [B, T', H', W', C_i], channels last


# ---------------------------------------------------------------------------------------------------
# Token layout


def local_order(mu_shape: tuple[int, ...], schedule: list[tuple[int, ...]]) -> torch.Tensor:
    """Raster offsets inside one mask unit of shape `mu_shape`, listed in unrolled order.

    Unrolling with strides s1, s2, ... splits each coordinate as o = b1 + s1 * (b2 + s2 * (b3 ...)),
    and orders tokens by (b1 over all dims) slowest, then b2, ..., i.e. the first stride level is the
    outermost axis. That is what lets level k be max-pooled as a max over its leading s_k slabs.
    """
    if schedule:
        prod = [math.prod(s[d] for s in schedule) for d in range(len(mu_shape))]
        if list(prod) != list(mu_shape):
            raise ValueError(f"stride schedule {schedule} does not tile mask unit {mu_shape}")
    n = math.prod(mu_shape)
    radices = [s for level in schedule for s in level]  # slowest first
    digits = []
    rem = torch.arange(n)
    for r in reversed(radices):  # peel off the fastest digit first
        digits.append(rem % r)
        rem = rem // r
    digits.reverse()  # digits[k * D + d] = b_{k+1} along dim d
    D = len(mu_shape)
    coords = []
    for d in range(D):
        o, scale = torch.zeros(n, dtype=torch.long), 1
        for k, level in enumerate(schedule):
            o = o + digits[k * D + d] * scale
            scale *= level[d]
        coords.append(o)
    flat = torch.zeros(n, dtype=torch.long)
    for d in range(D):
        flat = flat * mu_shape[d] + coords[d]
    return flat


def token_order(grid: tuple[int, ...], mu_shape: tuple[int, ...], schedule: list[tuple[int, ...]]) -> torch.Tensor:
    """For each unrolled position p = w * M + m, the raster index (in `grid`) of the token it holds."""
    D = len(grid)
    mu_grid = [g // u for g, u in zip(grid, mu_shape)]
    local = local_order(mu_shape, schedule)  # [W]
    # unravel local offsets and mask-unit indices into per-dim coordinates
    lc, mc = [], []
    rem_l, rem_m = local.clone(), torch.arange(math.prod(mu_grid))
    for d in reversed(range(D)):
        lc.append(rem_l % mu_shape[d])
        rem_l = rem_l // mu_shape[d]
        mc.append(rem_m % mu_grid[d])
        rem_m = rem_m // mu_grid[d]
    lc.reverse()
    mc.reverse()
    flat = torch.zeros(len(local), len(mc[0]), dtype=torch.long)  # [W, M]
    for d in range(D):
        coord = mc[d][None, :] * mu_shape[d] + lc[d][:, None]
        flat = flat * grid[d] + coord
    return flat.reshape(-1)  # [W * M]


# ---------------------------------------------------------------------------------------------------
# Layers


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample (Huang et al. 2016)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MaskUnitAttention(nn.Module):
    """Attention within mask units (windows) or over all tokens, optionally pooling the queries.

    Input tokens are unrolled (see module docstring): [B, N, C] with N = W * M, the window index m
    varying fastest. With q_stride s > 1 the queries are max-pooled over the s leading slabs, which
    is a max-pool over each 2x2 (or 1x2x2) neighbourhood.
    """

    def __init__(self, dim: int, dim_out: int, heads: int, q_stride: int, window_size: int, use_mask_unit_attn: bool):
        super().__init__()
        self.dim_out, self.heads = dim_out, heads
        self.head_dim = dim_out // heads
        self.q_stride = q_stride
        self.window_size = window_size  # tokens per mask unit *after* q pooling
        self.use_mask_unit_attn = use_mask_unit_attn
        self.qkv = nn.Linear(dim, 3 * dim_out)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        nw = N // (self.q_stride * self.window_size) if self.use_mask_unit_attn else 1  # windows
        L = N // nw  # tokens per window
        # [B, N, 3*C] -> [B, L, nw, 3, heads, hd] -> [3, B, nw, heads, L, hd] -> 3 x [B*nw, heads, L, hd]
        qkv = self.qkv(x).view(B, L, nw, 3, self.heads, self.head_dim).permute(3, 0, 2, 4, 1, 5)
        q, k, v = qkv.reshape(3, B * nw, self.heads, L, self.head_dim).unbind(0)
        if self.q_stride > 1:
            # [B*nw, heads, L, hd] -> [B*nw, heads, s, L/s, hd] -> max over s
            q = q.view(B * nw, self.heads, self.q_stride, L // self.q_stride, self.head_dim).amax(dim=2)
        # 4-D inputs reach the fused (flash / memory-efficient) kernels; 5-D ones fall back to math
        x = F.scaled_dot_product_attention(q, k, v)  # [B*nw, heads, L', hd]
        # [B*nw, heads, L', hd] -> [B, nw, heads, L', hd] -> [B, L', nw, heads, hd] -> [B, N', C]
        x = x.view(B, nw, self.heads, -1, self.head_dim).permute(0, 3, 1, 2, 4).reshape(B, -1, self.dim_out)
        return self.proj(x)


class HieraBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        dim_out: int,
        heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        q_stride: int = 1,
        window_size: int = 0,
        use_mask_unit_attn: bool = False,
    ):
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MaskUnitAttention(dim, dim_out, heads, q_stride, window_size, use_mask_unit_attn)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio))
        self.drop_path = drop_path
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_norm = self.norm1(x)
        if self.dim != self.dim_out:
            # the shortcut changes width too, and pools like the queries: [B, s*N', C] -> max over s
            s = self.attn.q_stride
            x = self.proj(x_norm)
            x = x.view(x.shape[0], s, -1, x.shape[-1]).amax(dim=1)
        x = x + drop_path(self.attn(x_norm), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class Head(nn.Module):
    """Dropout + linear classifier; raw logits (softmax belongs to the labeler)."""

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.projection = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.dropout(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: HieraConfig):
        super().__init__()
        self.proj = nn.Conv3d(
            cfg.in_chans, cfg.embed_dim, cfg.patch_kernel, stride=cfg.patch_stride, padding=cfg.patch_padding
        )

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 3, T, H, W] -> [B, T'*H'*W', C] in raster order. `keep` [B, 1, *mask grid] zeroes the
        pixels of dropped mask units first, so overlapping kernels leak nothing from them."""
        if keep is not None:
            x = x * F.interpolate(keep.to(x.dtype), size=x.shape[2:])  # nearest: each unit -> its pixels
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, C, T', H', W'] -> [B, N, C]


# ---------------------------------------------------------------------------------------------------
# The encoder


class Hiera(nn.Module):
    """Hiera video encoder. Input [B, 3, T, H, W] normalised float, T/H/W = config.input_size."""

    def __init__(self, config: HieraConfig):
        super().__init__()
        if len(config.input_size) != 3:
            raise ValueError(f"{config.name}: this encoder is the video Hiera; input_size must be (T, H, W)")
        self.config = cfg = config
        grid = cfg.tokens_spatial_shape
        n_levels = len(cfg.stages) - 1
        schedule = [cfg.q_stride] * n_levels
        mu_cfg = cfg.mask_unit_size  # == q_stride ** n_levels (HieraConfig.validate)

        self.patch_embed = PatchEmbed(cfg)
        C = cfg.embed_dim
        if cfg.sep_pos_embed:
            self.pos_embed_spatial = nn.Parameter(torch.zeros(1, grid[1] * grid[2], C))
            self.pos_embed_temporal = nn.Parameter(torch.zeros(1, grid[0], C))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(grid), C))

        # Unroll/reroll index maps (buffers, not state: checkpoints stay identical to the official ones).
        self.register_buffer("unroll_index", token_order(grid, mu_cfg, schedule), persistent=False)
        self.stage_ends = [sum(cfg.stages[: i + 1]) - 1 for i in range(len(cfg.stages))]
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.stages)).tolist()
        heads, dim, stage = cfg.num_heads, C, 0
        self.blocks = nn.ModuleList()
        for i in range(sum(cfg.stages)):
            dim_out = dim
            use_mu_attn = cfg.mask_unit_attn[stage]  # lags one block: the pooling block keeps the old kind
            if i - 1 in self.stage_ends:
                dim_out = int(dim * cfg.dim_mul)
                heads = int(heads * cfg.head_mul)
                stage += 1
            self.blocks.append(HieraBlock(dim, dim_out, heads, cfg.mlp_ratio, dpr[i], use_mask_unit_attn=use_mu_attn))
            dim = dim_out
        self._set_pooling()

        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = Head(dim, cfg.num_classes, cfg.head_dropout) if cfg.num_classes > 0 else None
        self._init_weights()

    # ---- geometry ----
    def _set_pooling(self) -> None:
        """Everything that follows from config.q_pool, none of it weights: which blocks pool their queries,
        the window sizes after pooling, and the reroll index maps (on the device of the unroll map)."""
        cfg = self.config
        schedule = [cfg.q_stride] * (len(cfg.stages) - 1)
        device = self.unroll_index.device
        for i in range(len(cfg.stages)):  # the stride levels not yet pooled away at stage i's output
            sched = schedule[min(i, cfg.q_pool):]
            grid_i, mu_i = self._stage_geometry(i)
            self.register_buffer(f"reroll_index_{i}", torch.argsort(token_order(grid_i, mu_i, sched)).to(device),
                                 persistent=False)
            self.register_buffer(f"reroll_local_{i}", torch.argsort(local_order(mu_i, sched)).to(device),
                                 persistent=False)
        flat_q_stride, flat_mu = math.prod(cfg.q_stride), math.prod(cfg.mask_unit_size)
        q_pool_blocks = {end + 1 for end in self.stage_ends[: cfg.q_pool]}
        for i, blk in enumerate(self.blocks):
            if i in q_pool_blocks:
                flat_mu //= flat_q_stride
            blk.attn.q_stride = flat_q_stride if i in q_pool_blocks else 1
            blk.attn.window_size = flat_mu

    def with_pooling(self, q_pool: int) -> "Hiera":
        """This encoder pooling its queries `q_pool` times: the very same parameter tensors, not copies
        (pooling has no weights), so training one trains the other. The official video MAE pools twice
        the weights its classifier pools three times; HieraMAE runs a classifier this way."""
        if q_pool == self.config.q_pool:
            return self
        view = copy.deepcopy(self, memo={id(p): p for p in self.parameters()})
        view.config = self.config.replace(q_pool=q_pool)
        view._set_pooling()
        return view

    def _stage_geometry(self, stage: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(token grid, mask unit shape) of the tokens leaving `stage`."""
        pooled = min(stage, self.config.q_pool)
        f = [s**pooled for s in self.config.q_stride]
        grid = tuple(a // b for a, b in zip(self.config.tokens_spatial_shape, f))
        mu = tuple(a // b for a, b in zip(self.config.mask_unit_size, f))
        return grid, mu

    def _init_weights(self) -> None:
        """The official initialisation, so training from scratch behaves like theirs."""
        for p in (self.pos_embed_spatial, self.pos_embed_temporal) if self.config.sep_pos_embed else (self.pos_embed,):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.constant_(m.bias, 0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.constant_(m.bias, 0.02)
                nn.init.constant_(m.weight, 1.0)
        if self.head is not None:
            self.head.projection.weight.data.mul_(self.config.head_init_scale)
            self.head.projection.bias.data.mul_(self.config.head_init_scale)

    @property
    def num_features(self) -> int:
        return self.config.num_features

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed_spatial", "pos_embed_temporal"} if self.config.sep_pos_embed else {"pos_embed"}

    def get_pos_embed(self) -> torch.Tensor:
        """[1, T'*H'*W', C]: spatial + temporal broadcast over the raster grid."""
        if not self.config.sep_pos_embed:
            return self.pos_embed
        t = self.config.tokens_spatial_shape[0]
        # [1, 1, H'W', C] + [1, T', 1, C] -> [1, T', H'W', C] -> [1, T'H'W', C]
        pos = self.pos_embed_spatial[:, None] + self.pos_embed_temporal[:, :, None]
        return pos.reshape(1, t * self.pos_embed_spatial.shape[1], -1)

    def random_keep(self, batch: int, mask_ratio: float, device=None, generator=None) -> torch.Tensor:
        """[B, M] bool, True = mask unit kept (visible); exactly int(M * (1 - ratio)) per sample."""
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        M = self.config.num_mask_units
        n_keep = self.units_kept(mask_ratio)
        if n_keep == 0:  # the masked trunk would run on no tokens at all
            raise ValueError(f"mask_ratio {mask_ratio} keeps 0 of {self.config.name}'s {M} mask units visible; "
                             f"at most 1 - 1/{M} = {1 - 1 / M:g} keeps one")
        noise = torch.rand(batch, M, device=device, generator=generator)
        ranks = noise.argsort(dim=1).argsort(dim=1)  # rank of each unit's noise; the n_keep lowest are kept
        return ranks < n_keep

    def units_kept(self, mask_ratio: float) -> int:
        """Mask units a sample keeps visible at `mask_ratio`."""
        return int(self.config.num_mask_units * (1 - mask_ratio))

    @staticmethod
    def kept_units(keep: torch.Tensor, n_keep: int) -> torch.Tensor:
        """keep [B, M] bool with n_keep True per row -> their indices [B, n_keep], ascending. A stable sort
        rather than boolean indexing: the shapes are known without reading the mask back to the host, so
        a masked step can run inside a CUDA graph."""
        return torch.argsort(keep.logical_not().to(torch.int8), dim=1, stable=True)[:, :n_keep]

    def reroll(self, x: torch.Tensor, stage: int, masked: bool = False) -> torch.Tensor:
        """Tokens leaving `stage` back in spatial order.

        Unmasked: [B, N, C] -> [B, T', H', W', C]. Masked (MAE): [B, W*M_kept, C] ->
        [B, M_kept, mu_t, mu_h, mu_w, C], each kept mask unit's tokens in raster order.
        """
        grid, mu = self._stage_geometry(stage)
        B, N, C = x.shape
        if masked:
            W = math.prod(mu)
            x = x.view(B, W, N // W, C)[:, getattr(self, f"reroll_local_{stage}")]  # [B, W, M_kept, C] raster in-unit
            return x.transpose(1, 2).reshape(B, N // W, *mu, C)
        return x[:, getattr(self, f"reroll_index_{stage}")].view(B, *grid, C)

    def forward_tokens(
        self, x: torch.Tensor, keep: torch.Tensor | None = None, return_intermediates: bool = False,
        n_keep: int | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the trunk. x [B, 3, T, H, W]; keep [B, M] bool (MAE) or None, with n_keep kept units per
        sample (default: counted, which reads the mask back to the host).

        Returns the final tokens [B, N_final, C_last] (unrolled order; with keep, only kept units)
        and, if asked, the per-stage intermediates (see `reroll`).
        """
        B = x.shape[0]
        expected = (self.config.in_chans, *self.config.input_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"{self.config.name} expects input [B, {', '.join(map(str, expected))}], got {list(x.shape)}")
        keep_grid = keep.view(B, 1, *self.config.mask_spatial_shape) if keep is not None else None
        x = self.patch_embed(x, keep_grid) + self.get_pos_embed()  # [B, N, C] raster
        x = x[:, self.unroll_index]  # [B, N, C] unrolled: position w * M + m
        if keep is not None:
            M, C = self.config.num_mask_units, x.shape[-1]
            n = int(keep[0].sum()) if n_keep is None else n_keep
            idx = self.kept_units(keep, n)
            # [B, W, M, C] -> keep the same units at every in-unit position -> [B, W * M_kept, C]
            W = x.shape[1] // M
            x = x.view(B, W, M, C).gather(2, idx[:, None, :, None].expand(B, W, n, C)).reshape(B, W * n, C)
        intermediates = []
        stage = 0
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i == self.stage_ends[stage]:
                if return_intermediates:
                    intermediates.append(self.reroll(x, stage, masked=keep is not None))
                stage += 1
        return x, intermediates

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final tokens [B, N, C] -> embedding [B, C]: mean over tokens, then the final norm."""
        return self.norm(tokens.mean(dim=1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] -> pooled embedding [B, C]."""
        return self.pool(self.forward_tokens(x)[0])

    def forward_head(self, embedding: torch.Tensor) -> torch.Tensor | None:
        """[B, C] -> raw logits [B, K], or None for a headless encoder."""
        return self.head(embedding) if self.head is not None else None

    def forward(self, x: torch.Tensor, return_intermediates: bool = False) -> EncoderOutput:
        tokens, inter = self.forward_tokens(x, return_intermediates=return_intermediates)
        emb = self.pool(tokens)
        return EncoderOutput(emb, self.forward_head(emb), inter if return_intermediates else None)
