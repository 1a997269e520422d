"""Our Hiera and MAE compute what the official facebookresearch/hiera computes, given the same weights.

The official modules come from `oracle.py` (PyPI `hiera-transformer`, test-only). Every test copies the
official weights into ours (strict), random but unstructured (`oracle.randomize_`), so a swapped or
ignored parameter shows, then compares fp32 eval outputs: max abs diff <= 1e-5 * max(1, max abs official).
"""

from __future__ import annotations

import math

import pytest
import torch

import oracle
from hiera_perception import checkpoint
from hiera_perception.config import get_config
from hiera_perception.mae import HieraMAE
from hiera_perception.model import Hiera

RTOL = 1e-5


def assert_close(ours: torch.Tensor, official: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    assert ours.shape == official.shape, f"{what}: shape {tuple(ours.shape)} != official {tuple(official.shape)}"
    scale = max(1.0, official.abs().max().item())
    diff = (ours.float() - official.float()).abs().max().item()
    assert diff <= rtol * scale, f"{what}: max abs diff {diff:.3e} > {rtol:g} * {scale:.3g}"


def clips(config, batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, config.in_chans, *config.input_size, generator=gen)


def twins(config, seed: int) -> tuple[torch.nn.Module, Hiera]:
    """(official Hiera, our Hiera) holding the same random weights, both in eval mode."""
    official = oracle.official_hiera(config, seed=seed)
    ours = Hiera(config)
    ours.load_state_dict(official.state_dict(), strict=True)
    return official, ours.eval()


def compare_encoder(official, ours, config, x: torch.Tensor, intermediates: bool = True) -> None:
    ref_out, ref_emb, ref_inter = oracle.official_embedding(official, x)
    with torch.no_grad():
        out = ours(x, return_intermediates=intermediates)
    assert_close(out.embedding, ref_emb, "embedding")
    if config.num_classes:
        assert_close(out.logits, ref_out, "logits")
    else:
        assert out.logits is None
    if intermediates:
        assert len(out.intermediates) == len(ref_inter)
        for stage, (a, b) in enumerate(zip(out.intermediates, ref_inter)):
            assert_close(a, b, f"intermediate {stage}")


# (config name, overrides, seeds) over the small configs: sizes, heads, windowed/global stages, q_pool.
ENCODER_CASES = [
    ("hiera_tiny_8x64", dict(num_classes=10), (0, 1, 2)),
    ("hiera_tiny_8x64", dict(num_classes=0), (0,)),
    ("hiera_tiny_8x64", dict(num_classes=10, input_size=(16, 64, 64)), (1,)),
    ("hiera_tiny_8x64", dict(num_classes=10, input_size=(8, 96, 96), num_heads=2), (2,)),
    ("hiera_tiny_8x64", dict(num_classes=10, mask_unit_attn=(False, False, False, False)), (3,)),
    ("hiera_tiny_8x64", dict(num_classes=10, mask_unit_attn=(True, True, True, True), q_pool=2), (4,)),
    ("hiera_tiny_8x64", dict(num_classes=0, mask_unit_attn=(True, False, True, False), q_pool=1), (5,)),
    ("hiera_tiny_8x64", dict(num_classes=10, q_pool=0), (6,)),
    # Temporal query pooling: q_stride 2 in time needs mask units of 2**3 = 8 token-frames.
    ("hiera_tiny_8x64", dict(num_classes=10, input_size=(16, 64, 64), q_stride=(2, 2, 2),
                             mask_unit_size=(8, 8, 8), q_pool=2), (7,)),
    ("hiera_small_8x96", dict(num_classes=10), (0, 1)),
    ("hiera_small_8x96", dict(num_classes=0, q_pool=2), (2,)),
    ("hiera_tiny_8x64", dict(num_classes=10, input_size=(8, 128, 128)), (8,)),
    ("hiera_small_16x128", dict(num_classes=10), (0,)),
    ("hiera_small_16x128", dict(num_classes=0, input_size=(8, 64, 64), num_heads=2), (1,)),
]


def _case_id(name: str, overrides: dict) -> str:
    return "-".join([name] + [f"{k}={v}" for k, v in overrides.items()]).replace(" ", "")


@pytest.mark.parametrize(
    "name,overrides,seed",
    [(n, o, s) for n, o, seeds in ENCODER_CASES for s in seeds],
    ids=[f"{_case_id(n, o)}-seed{s}" for n, o, seeds in ENCODER_CASES for s in seeds],
)
def test_encoder_matches_official(name, overrides, seed):
    config = get_config(name, **overrides)
    official, ours = twins(config, seed)
    # Batch 2 catches batch-mixing bugs; the largest token grids use 1 to keep CI quick.
    batch = 2 if math.prod(config.tokens_spatial_shape) <= 4096 else 1
    compare_encoder(official, ours, config, clips(config, batch=batch, seed=seed + 100))


def test_encoder_base_16x224_matches_official(tmp_path):
    # The real published architecture, once, through an official-format file and load_model.
    config = get_config("hiera_base_16x224")
    official = oracle.official_hiera(config, seed=3)
    path = tmp_path / "hiera_base_16x224.pth"
    torch.save({"model_state": official.state_dict()}, path)
    ours = checkpoint.load_model(str(path), arch="hiera_base_16x224", device="cpu")
    compare_encoder(official, ours, config, clips(config, batch=1, seed=3), intermediates=False)


def test_official_hiera_file_loads(tmp_path):
    config = get_config("hiera_small_8x96", num_classes=10)
    official = oracle.official_hiera(config, seed=4)
    path = tmp_path / "x.pth"
    torch.save({"model_state": official.state_dict()}, path)
    ours = checkpoint.load_official(path, config).eval()
    compare_encoder(official, ours, config, clips(config, batch=2, seed=4))
    # The same file through the public entry point, arch naming the registered config (no head).
    plain = get_config("hiera_tiny_8x64")
    official_plain = oracle.official_hiera(plain, seed=5)
    torch.save({"model_state": official_plain.state_dict()}, path)
    loaded = checkpoint.load_model(str(path), arch="hiera_tiny_8x64", device="cpu")
    compare_encoder(official_plain, loaded, plain, clips(plain, batch=1, seed=5), intermediates=False)


def test_batch_of_two_equals_two_batches_of_one():
    config = get_config("hiera_tiny_8x64", num_classes=10)
    _, ours = twins(config, seed=6)
    x = clips(config, batch=2, seed=6)
    with torch.no_grad():
        both = ours(x, return_intermediates=True)
        singles = [ours(x[i : i + 1], return_intermediates=True) for i in range(2)]
    for i, one in enumerate(singles):
        assert_close(both.embedding[i : i + 1], one.embedding, f"embedding {i}")
        assert_close(both.logits[i : i + 1], one.logits, f"logits {i}")
        for stage, (a, b) in enumerate(zip(both.intermediates, one.intermediates)):
            assert_close(a[i : i + 1], b, f"sample {i} intermediate {stage}")


def test_bf16_autocast_close_to_fp32():
    config = get_config("hiera_small_8x96", num_classes=10)
    _, ours = twins(config, seed=7)
    x = clips(config, batch=2, seed=7)
    with torch.no_grad():
        ref = ours(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = ours(x)
    for what in ("embedding", "logits"):
        a, b = getattr(low, what).float(), getattr(ref, what)
        assert torch.isfinite(a).all()
        # bf16 keeps ~3 significant digits; measured: under 1% of the scale, cosine > 0.9999.
        assert_close(a, b, f"bf16 {what}", rtol=3e-2)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
        assert (cos > 0.9995).all(), f"bf16 {what}: cosine {cos.tolist()}"


# ---- MAE ----

MAE_CASES = [  # (config name, overrides, [(seed, mask ratio)])
    ("hiera_tiny_8x64", dict(), [(0, 0.75), (1, 0.5)]),
    ("hiera_tiny_8x64", dict(input_size=(16, 96, 96), num_heads=2), [(2, 0.9)]),
    ("hiera_tiny_8x64", dict(mae_q_pool=1), [(3, 0.75)]),
    ("hiera_tiny_8x64", dict(mae_q_pool=3, mask_unit_attn=(True, False, False, False)), [(4, 0.5)]),
    ("hiera_small_8x96", dict(), [(5, 0.75), (6, 0.9)]),
    ("hiera_small_16x128", dict(), [(7, 0.9)]),
]


def mae_twins(config, seed: int) -> tuple[torch.nn.Module, HieraMAE]:
    official = oracle.official_mae(config, seed=seed)
    ours = HieraMAE(config)
    ours.load_state_dict(checkpoint.filter_official_state_dict(official.state_dict(), ours), strict=True)
    return official, ours.eval()


def random_keep(config, batch: int, ratio: float, seed: int) -> torch.Tensor:
    """A bool keep mask [B, num_mask_units], the same number of visible units in every sample."""
    units = config.num_mask_units
    kept = int(units * (1 - ratio))
    gen = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(units, generator=gen) for _ in range(batch)])
    return order < kept


def compare_mae(official, ours, x: torch.Tensor, keep: torch.Tensor) -> None:
    with torch.no_grad():
        loss, pred, label, mask = official(x, mask=keep.clone())
        out = ours.forward_keep(x, keep.clone())
    assert torch.equal(mask, keep)
    assert torch.equal(out.keep, keep)
    assert_close(out.loss, loss, "loss")
    assert_close(out.pred, pred, "pred")
    assert_close(out.label, label, "label")


@pytest.mark.parametrize(
    "name,overrides,seed,ratio",
    [(n, o, s, r) for n, o, runs in MAE_CASES for s, r in runs],
    ids=[f"{_case_id(n, o)}-seed{s}-ratio{r}" for n, o, runs in MAE_CASES for s, r in runs],
)
def test_mae_matches_official(name, overrides, seed, ratio):
    config = get_config(name, **overrides)
    official, ours = mae_twins(config, seed)
    batch = 2 if math.prod(config.tokens_spatial_shape) <= 4096 else 1
    x = clips(config, batch=batch, seed=seed + 200)
    compare_mae(official, ours, x, random_keep(config, batch, ratio, seed))


@pytest.mark.parametrize("seed,ratio", [(12, 0.75), (13, 0.5)])
def test_mae_on_a_classifier_pools_like_the_official_mae(seed, ratio):
    # A classifier pooling 3 times (as base 16x224 serves) wrapped for MAE runs its weights pooling
    # mae_q_pool = 2 times: the official MAE's numbers, its decoder's shapes, and gradients that land
    # on the classifier's own parameters, which keep pooling 3 times when they serve.
    config = get_config("hiera_tiny_8x64", q_pool=3, num_classes=10)
    official = oracle.official_mae(config, seed=seed)
    classifier = Hiera(config).eval()
    served = Hiera(config).eval()
    state = checkpoint.filter_official_state_dict(official.state_dict(), classifier)
    classifier.load_state_dict({**classifier.state_dict(), **state})
    served.load_state_dict(classifier.state_dict())
    ours = HieraMAE(config, encoder=classifier)
    ours.load_state_dict(checkpoint.filter_official_state_dict(official.state_dict(), ours), strict=True)
    assert ours.eval().trunk.training is False and ours.trunk.config.q_pool == 2
    x = clips(config, batch=2, seed=seed + 300)
    compare_mae(official, ours, x, random_keep(config, 2, ratio, seed))

    with torch.no_grad():
        assert torch.equal(classifier(x).embedding, served(x).embedding)  # still pools 3 times
    assert ours.train().trunk.training and ours.encoder.training
    ours.forward_keep(x, random_keep(config, 2, ratio, seed)).loss.backward()
    assert classifier.patch_embed.proj.weight.grad is not None
    assert classifier.blocks[-1].attn.qkv.weight.grad.abs().sum() > 0
    assert set(ours.state_dict()) == {f"encoder.{k}" for k in classifier.state_dict()} | {
        k for k in official.state_dict() if not k.startswith(("patch_embed", "pos_embed", "blocks."))}
    copy = __import__("copy").deepcopy(ours.double())  # a copy shares its own weights between its two poolings
    assert copy.trunk.blocks[0].attn.qkv.weight is copy.encoder.blocks[0].attn.qkv.weight
    assert copy.trunk.reroll_index_0.dtype == torch.int64 and copy.encoder.patch_embed.proj.weight.dtype == torch.float64


def test_mae_random_mask_keeps_exact_count():
    config = get_config("hiera_tiny_8x64")  # 16 mask units
    torch.manual_seed(8)
    mae = HieraMAE(config).eval()
    x = clips(config, batch=2, seed=8)
    outs = {}
    with torch.no_grad():
        for ratio in (0.9, 0.75, 0.75, 0.5):
            out = mae(x, mask_ratio=ratio)
            kept = int(config.num_mask_units * (1 - ratio))
            assert out.keep.dtype == torch.bool
            assert out.keep.sum(dim=1).tolist() == [kept] * 2, f"mask_ratio {ratio}"
            outs.setdefault(ratio, []).append(out)
        first, second = outs[0.75]
        # A fresh mask each call (1 in 1820**2 to repeat for both samples), and the loss under the mask
        # it reports is the loss of the fixed-mask entry point.
        assert not torch.equal(first.keep, second.keep)
        again = mae.forward_keep(x, first.keep)
    assert_close(again.loss, first.loss, "loss of the reported mask")


def test_mae_random_mask_matches_official_given_the_seed():
    # Both draw one torch.rand(B, M) and keep the int(M * (1 - ratio)) lowest: same seed, same mask,
    # so the random-mask entry point is the official forward(x, mask_ratio) end to end.
    config = get_config("hiera_tiny_8x64")
    official, ours = mae_twins(config, seed=10)
    x = clips(config, batch=2, seed=10)
    with torch.no_grad():
        torch.manual_seed(11)
        loss, pred, label, keep = official(x, mask_ratio=0.75)
        torch.manual_seed(11)
        out = ours(x, mask_ratio=0.75)
    assert torch.equal(out.keep, keep)
    assert_close(out.loss, loss, "loss")
    assert_close(out.pred, pred, "pred")
    assert_close(out.label, label, "label")


def test_official_mae_file_loads(tmp_path):
    config = get_config("hiera_tiny_8x64")
    official = oracle.official_mae(config, seed=9)
    path = tmp_path / "mae.pth"
    torch.save({"model_state": official.state_dict()}, path)
    ours = checkpoint.load_official(path, config, mae=True).eval()
    assert isinstance(ours, HieraMAE)
    x = clips(config, batch=2, seed=9)
    compare_mae(official, ours, x, random_keep(config, 2, 0.75, seed=9))
