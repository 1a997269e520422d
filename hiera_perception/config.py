"""Hiera model configurations: one frozen dataclass and a named registry.

Every field is plain data (ints, floats, bools, tuples) so a config round-trips through YAML and
through our checkpoints, and `Hiera(config)` rebuilds the exact network. The four official 16x224
video models reproduce facebookresearch/hiera (Ryali et al., ICML 2023, arXiv:2306.00989); the
small ones are ours, sized for real time on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["HieraConfig", "CONFIGS", "get_config", "config_from_dict"]


@dataclass(frozen=True)
class HieraConfig:
    """Hyper-parameters of a Hiera video encoder (+ its MAE decoder when pre-training)."""

    name: str = "hiera_base_16x224"
    input_size: tuple[int, int, int] = (16, 224, 224)  # (T, H, W) frames of the clip
    in_chans: int = 3
    embed_dim: int = 96  # width of stage 1; doubles each stage (dim_mul)
    num_heads: int = 1  # heads of stage 1; doubles each stage (head_mul)
    num_classes: int = 400  # 0 = no classification head (pure feature encoder)
    stages: tuple[int, ...] = (2, 3, 16, 3)  # blocks per stage
    q_pool: int = 3  # number of stage transitions that pool queries (2 in the official MAE)
    q_stride: tuple[int, int, int] = (1, 2, 2)
    mask_unit_size: tuple[int, int, int] = (1, 8, 8)  # in tokens; must be divisible by q_stride**q_pool
    mask_unit_attn: tuple[bool, ...] = (True, True, False, False)  # per stage: windowed or global
    dim_mul: float = 2.0
    head_mul: float = 2.0
    patch_kernel: tuple[int, int, int] = (3, 7, 7)
    patch_stride: tuple[int, int, int] = (2, 4, 4)
    patch_padding: tuple[int, int, int] = (1, 3, 3)
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    head_dropout: float = 0.0
    head_init_scale: float = 0.001
    sep_pos_embed: bool = True  # separate spatial + temporal position embeddings (video models)
    # MAE decoder (used by mae.py only; the official video MAE uses q_pool=2 in its encoder)
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mae_q_pool: int = 2
    # Preprocessing the model was trained with (DESIGN.md: mean 0.45 / std 0.225 on RGB in [0, 1])
    mean: tuple[float, float, float] = (0.45, 0.45, 0.45)
    std: tuple[float, float, float] = (0.225, 0.225, 0.225)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived geometry (never stored, always recomputed) ----
    @property
    def tokens_spatial_shape(self) -> tuple[int, int, int]:
        """Token grid after the patch embedding, (T', H', W')."""
        return tuple(i // s for i, s in zip(self.input_size, self.patch_stride))

    @property
    def mask_spatial_shape(self) -> tuple[int, int, int]:
        """Number of mask units along (T', H', W')."""
        return tuple(t // m for t, m in zip(self.tokens_spatial_shape, self.mask_unit_size))

    @property
    def num_mask_units(self) -> int:
        return math.prod(self.mask_spatial_shape)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Width of each stage, rounded down stage by stage as the model builds it (not C * dim_mul**i:
        embed_dim 33 at dim_mul 1.5 gives 73 then 109, the closed form 74 then 111)."""
        dims = [self.embed_dim]
        for _ in self.stages[1:]:
            dims.append(int(dims[-1] * self.dim_mul))
        return tuple(dims)

    @property
    def num_features(self) -> int:
        """Width of the pooled embedding."""
        return self.stage_dims[-1]

    def replace(self, **changes) -> "HieraConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        n = len(self.input_size)
        for fname in ("q_stride", "mask_unit_size", "patch_kernel", "patch_stride", "patch_padding"):
            if len(getattr(self, fname)) != n:
                raise ValueError(f"{self.name}: {fname}={getattr(self, fname)} must have {n} entries like input_size")
        if len(self.mask_unit_attn) != len(self.stages):
            raise ValueError(f"{self.name}: mask_unit_attn has {len(self.mask_unit_attn)} entries, stages {len(self.stages)}")
        for q in (self.q_pool, self.mae_q_pool):
            if not 0 <= q < len(self.stages):
                raise ValueError(f"{self.name}: q_pool={q} must be in [0, {len(self.stages) - 1}]")
        for size, stride in zip(self.input_size, self.patch_stride):
            if size % stride:
                raise ValueError(f"{self.name}: input_size={self.input_size} not divisible by patch_stride={self.patch_stride}")
        for tok, mu, qs in zip(self.tokens_spatial_shape, self.mask_unit_size, self.q_stride):
            if tok % mu:
                raise ValueError(
                    f"{self.name}: token grid {self.tokens_spatial_shape} (input_size / patch_stride) is not "
                    f"divisible by mask_unit_size={self.mask_unit_size}; pick an input size whose /4 is a multiple of 8"
                )
            if mu != qs ** (len(self.stages) - 1):
                # every official config; it makes a mask unit exactly the tokens one unroll slab holds
                raise ValueError(f"{self.name}: mask_unit_size={self.mask_unit_size} must equal "
                                 f"q_stride**(len(stages)-1) = {tuple(q ** (len(self.stages) - 1) for q in self.q_stride)}")
        if self.num_heads < 1 or self.embed_dim % self.num_heads:
            raise ValueError(f"{self.name}: embed_dim={self.embed_dim} not divisible by num_heads={self.num_heads}")
        heads = [self.num_heads]
        for _ in self.stages[1:]:
            heads.append(int(heads[-1] * self.head_mul))  # as the model builds them
        for i, (dim, h) in enumerate(zip(self.stage_dims, heads)):
            if h < 1 or dim % h:  # each head gets dim / h channels: the forward would fail to reshape
                raise ValueError(f"{self.name}: stage {i + 1} is {dim} wide with {h} heads (dim_mul={self.dim_mul}, "
                                 f"head_mul={self.head_mul}): its width must be a multiple of its heads")


def config_from_dict(d: dict) -> HieraConfig:
    """Rebuild a config from `to_dict()` output (lists from YAML/JSON become tuples)."""
    known = {f.name for f in dataclasses.fields(HieraConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown HieraConfig fields {unknown}; valid: {sorted(known)}")
    return HieraConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


_BASE = HieraConfig()
CONFIGS: dict[str, HieraConfig] = {
    # The four official video models (Kinetics-400 heads); weights via `hiera-perception fetch-weights`.
    "hiera_base_16x224": _BASE,
    "hiera_base_plus_16x224": _BASE.replace(name="hiera_base_plus_16x224", embed_dim=112, num_heads=2),
    "hiera_large_16x224": _BASE.replace(name="hiera_large_16x224", embed_dim=144, num_heads=2, stages=(2, 6, 36, 4)),
    "hiera_huge_16x224": _BASE.replace(name="hiera_huge_16x224", embed_dim=256, num_heads=4, stages=(2, 6, 36, 4)),
    # Ours: small video models for 2 CPU cores (tests, the embedded model). 8 frames; 64 px makes a
    # 16x16 token grid, i.e. 2x2 mask units of 8x8 tokens. q_pool = mae_q_pool = 2, so the encoder that
    # serves is the very network MAE trains: on-robot adaptation reuses the pre-training decoder.
    # head_init_scale 1.0: with the official 0.001 a small Hiera trained on a small motion task sat at chance
    # for hundreds of steps (a square moving left vs right: chance after 200 steps at 0.001, 100% by step 150
    # at 1.0, same seed and optimiser).
    "hiera_tiny_8x64": _BASE.replace(
        name="hiera_tiny_8x64", q_pool=2, head_init_scale=1.0, input_size=(8, 64, 64), embed_dim=32, num_heads=1, stages=(1, 1, 1, 1),
        num_classes=0, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2,
    ),
    "hiera_small_8x96": _BASE.replace(
        name="hiera_small_8x96", q_pool=2, head_init_scale=1.0, input_size=(8, 96, 96), embed_dim=48, num_heads=1, stages=(1, 2, 3, 1),
        num_classes=0, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4,
    ),
    "hiera_small_16x128": _BASE.replace(
        name="hiera_small_16x128", q_pool=2, head_init_scale=1.0, input_size=(16, 128, 128), embed_dim=64, num_heads=1, stages=(1, 2, 4, 1),
        num_classes=0, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4,
    ),
}


def get_config(name: str, **overrides) -> HieraConfig:
    """A registered config by name, with optional field overrides (e.g. num_classes=8)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; valid: {', '.join(CONFIGS)}")
    cfg = CONFIGS[name]
    return cfg.replace(**overrides) if overrides else cfg
