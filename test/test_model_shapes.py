"""Every registered config: our modules have the official state_dict layout, and real forwards give exact shapes.

Architectures are built on the meta device (no memory, no init), so even Hiera-H is checked in
milliseconds; the official modules come from `oracle.py` (facebookresearch/hiera, test-only).
"""

from __future__ import annotations

import math

import pytest
import torch

import oracle
from hiera_perception import checkpoint
from hiera_perception.config import CONFIGS, get_config
from hiera_perception.mae import HieraMAE
from hiera_perception.model import Hiera


def _layout(state_dict: dict) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in state_dict.items()]


def _num_params(state_dict: dict) -> int:
    return sum(v.numel() for v in state_dict.values())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_encoder_state_dict_equals_official(name):
    config = CONFIGS[name]
    with oracle.build_on_meta():
        ours = Hiera(config)
        official = oracle.official_hiera(config)
    # Same keys, same order, same shapes: an official .pth loads with strict=True.
    assert _layout(ours.state_dict()) == _layout(official.state_dict())
    assert _num_params(ours.state_dict()) == _num_params(official.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in official.parameters())
    has_head = any(k.startswith("head.") for k in ours.state_dict())
    assert has_head == (config.num_classes > 0)


def test_base_16x224_matches_published_numbers():
    config = get_config("hiera_base_16x224")
    with oracle.build_on_meta():
        ours = Hiera(config)
        mae = HieraMAE(config)
    sd = ours.state_dict()
    assert len(sd) == 302
    assert sum(p.numel() for p in ours.parameters()) == 51_092_560
    assert tuple(sd["pos_embed_spatial"].shape) == (1, 3136, 96)
    assert tuple(sd["pos_embed_temporal"].shape) == (1, 8, 96)
    assert tuple(sd["patch_embed.proj.weight"].shape) == (96, 3, 3, 7, 7)
    assert tuple(sd["head.projection.weight"].shape) == (400, 768)
    # The official MAE-B; our MAE's encoder also keeps its final `norm` (2 x 768), which the official
    # MAE deletes, so the encoder can serve after adaptation.
    mae_params = sum(p.numel() for n, p in mae.named_parameters() if not n.startswith("encoder.norm."))
    assert mae_params == 79_367_104


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mae_state_dict_maps_to_official(name):
    config = CONFIGS[name]
    with oracle.build_on_meta():
        ours = HieraMAE(config)
        official = oracle.official_mae(config)
    official_sd = official.state_dict()
    mapped = checkpoint.filter_official_state_dict(official_sd, ours)
    ours_sd = ours.state_dict()
    assert sorted(mapped) == sorted(ours_sd)
    for key, value in mapped.items():
        assert tuple(value.shape) == tuple(ours_sd[key].shape), key
    # Every official tensor lands somewhere; ours adds only the encoder's final norm (unused by the MAE).
    extra = {k: v for k, v in ours_sd.items() if k.startswith("encoder.norm.")}
    assert sorted(extra) == ["encoder.norm.bias", "encoder.norm.weight"]
    assert _num_params(ours_sd) - _num_params(extra) == _num_params(official_sd)
    assert ours.encoder.config.q_pool == config.mae_q_pool


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("mae", [False, True])
def test_official_kwargs_agree_with_oracle(name, mae):
    # The oracle derives the official kwargs on its own; both mappings must describe one architecture
    # (the package's may leave out init-only arguments such as head_init_scale).
    config = CONFIGS[name].replace(num_classes=7)
    theirs = checkpoint.official_kwargs(config, mae=mae)
    mine = oracle.official_kwargs(config, mae=mae)
    assert {k: mine.get(k) for k in theirs} == theirs
    assert set(mine) - set(theirs) <= {"head_init_scale"}


def _expected_intermediates(config, batch: int) -> list[tuple[int, ...]]:
    t, h, w = config.tokens_spatial_shape
    shapes = []
    for stage, dim in enumerate(config.stage_dims):
        pools = min(stage, config.q_pool)
        qt, qh, qw = (s**pools for s in config.q_stride)
        shapes.append((batch, t // qt, h // qh, w // qw, dim))
    return shapes


@pytest.mark.parametrize(
    "name,num_classes", [("hiera_tiny_8x64", 0), ("hiera_tiny_8x64", 5), ("hiera_small_8x96", 0),
                         ("hiera_small_8x96", 5), ("hiera_small_16x128", 5)]
)
def test_small_forward_shapes(name, num_classes):
    config = get_config(name, num_classes=num_classes)
    model = Hiera(config).eval()
    batch = 2 if math.prod(config.tokens_spatial_shape) <= 4096 else 1  # the 16x128 grid is costly
    x = torch.randn(batch, config.in_chans, *config.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, return_intermediates=True)
        plain = model(x)
    assert tuple(out.embedding.shape) == (batch, config.num_features)
    assert out.embedding.dtype == torch.float32
    if num_classes:
        assert tuple(out.logits.shape) == (batch, num_classes)
    else:
        assert out.logits is None
    assert [tuple(t.shape) for t in out.intermediates] == _expected_intermediates(config, batch)
    assert plain.intermediates is None
    assert torch.isfinite(out.embedding).all()


@pytest.mark.parametrize("name", ["hiera_tiny_8x64", "hiera_small_8x96"])  # 16x128: test_parity's MAE case
def test_small_mae_forward_shapes(name):
    config = get_config(name)
    mae = HieraMAE(config).eval()
    batch, ratio = 2, 0.75
    x = torch.randn(batch, config.in_chans, *config.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = mae(x, mask_ratio=ratio)
    units = config.num_mask_units
    kept = int(units * (1 - ratio))
    assert tuple(out.keep.shape) == (batch, units)
    assert out.keep.dtype == torch.bool
    assert out.keep.sum(dim=1).tolist() == [kept] * batch
    # One prediction per masked token of the final (pooled) grid; each token predicts a
    # (pred_stride x pred_stride) patch of the first frame of its temporal slab, RGB.
    pooled = [s // q**config.mae_q_pool for s, q in zip(config.tokens_spatial_shape, config.q_stride)]
    tokens_per_unit = math.prod(pooled) // units
    pred_stride = config.patch_stride[-1] * config.q_stride[-1] ** config.mae_q_pool
    rows = batch * (units - kept) * tokens_per_unit
    assert tuple(out.pred.shape) == (rows, pred_stride**2 * config.in_chans)
    assert tuple(out.label.shape) == tuple(out.pred.shape)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_stage_widths_round_down_stage_by_stage():
    # 33 x 1.5 = 49.5 -> 49, 49 x 1.5 = 73.5 -> 73 (the closed form 33 x 1.5**2 = 74.25 says 74), as the model builds
    config = get_config("hiera_tiny_8x64", embed_dim=33, dim_mul=1.5, head_mul=1.0)
    model = Hiera(config)
    assert config.stage_dims == (33, 49, 73, 109) == tuple(model.blocks[e].dim_out for e in model.stage_ends)
    assert config.num_features == model.norm.normalized_shape[0]
    x = torch.randn(1, 3, *config.input_size, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(HieraMAE(config)(x, mask_ratio=0.75).loss)  # its fusion heads follow stage_dims


def test_a_stage_whose_width_its_heads_do_not_divide_is_refused():
    """48 wide at dim_mul 1.5 gives 48, 72, 108, 162 with heads 2, 4, 8, 16: 108 / 8 built, then failed to reshape
    in the forward (the official model fails the same way)."""
    with pytest.raises(ValueError, match="stage 3 is 108 wide with 8 heads .* must be a multiple of its heads"):
        get_config("hiera_small_8x96", dim_mul=1.5, embed_dim=48, num_heads=2)


@pytest.mark.parametrize("ratio", [0.95, 0.0])  # of 16 mask units 0.95 keeps none, 0 masks none
def test_mask_ratio_that_keeps_or_masks_no_unit_is_named(ratio):
    config = get_config("hiera_tiny_8x64")
    mae = HieraMAE(config)
    x = torch.randn(1, 3, *config.input_size)
    what = "keeps 0" if ratio > 0.5 else "masks 0"
    with pytest.raises(ValueError, match=f"mask_ratio {ratio} {what} of hiera_tiny_8x64's 16 mask units"):
        mae(x, mask_ratio=ratio)
    if ratio > 0.5:
        with pytest.raises(ValueError, match=f"mask_ratio {ratio} keeps 0 of hiera_tiny_8x64's 16 mask units"):
            mae.encoder.random_keep(1, ratio)
    else:
        assert mae.encoder.random_keep(1, ratio).all()  # the encoder alone may keep everything
        with pytest.raises(ValueError, match="fewer than all 16"):
            mae.forward_keep(x, mae.encoder.random_keep(1, ratio))


def test_wrapped_encoder_with_other_decoder_fields_is_refused():
    enc = Hiera(get_config("hiera_tiny_8x64"))
    assert HieraMAE(enc.config, encoder=enc).decoder_embed.out_features == enc.config.decoder_embed_dim
    with pytest.raises(ValueError, match="asks for decoder .*'decoder_depth': 3.* the encoder's config has"):
        HieraMAE(enc.config.replace(decoder_depth=3), encoder=enc)
