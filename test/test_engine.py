"""The inference engine: uint8 frames of any size in, embedding + top-k labels out, fp32 and bf16."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from hiera_perception.checkpoint import save_checkpoint
from hiera_perception.config import get_config
from hiera_perception.engine import Engine
from hiera_perception.labeler import prototypes_path
from hiera_perception.model import Hiera
from hiera_perception.preprocess import AreaResize, centre_square, crop_resize, preprocess_clip

TINY = "hiera_tiny_8x64"
LABELS = ["wave", "idle", "approach", "recede", "swipe"]


def model_with_head(seed: int = 0) -> Hiera:
    torch.manual_seed(seed)
    model = Hiera(get_config(TINY, num_classes=len(LABELS))).eval()
    with torch.no_grad():  # spread the logits (the default head init makes them near-equal)
        torch.nn.init.normal_(model.head.projection.weight, std=0.5)
    model.labels = list(LABELS)
    return model


def clip(rng: np.random.Generator, h: int, w: int, n: int = 8) -> list[np.ndarray]:
    return list(rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8))


def test_infer_any_frame_size_gives_embedding_and_top_k():
    rng = np.random.default_rng(0)
    model = model_with_head()
    engine = Engine(model, device="cpu", top_k=3)
    clips = [clip(rng, 64, 64), clip(rng, 48, 80), clip(rng, 120, 90), clip(rng, 240, 320)]
    results = engine.infer(clips)
    assert len(results) == 4
    x = torch.cat([preprocess_clip(c, 64) for c in clips])
    with torch.no_grad():
        out = model(x)
    for i, res in enumerate(results):
        assert res.embedding.shape == (256,) and res.embedding.dtype == np.float32
        assert np.array_equal(res.embedding, out.embedding[i].numpy())
        probs = torch.softmax(out.logits[i], dim=-1)
        top = torch.argsort(probs, descending=True)[:3]
        assert res.labels == [LABELS[j] for j in top]
        assert len(res.scores) == 3 and np.allclose(res.scores, probs[top].numpy(), rtol=0, atol=1e-7)


def test_frame_size_does_not_change_what_the_model_sees():
    # Resize short side + centre crop: a 2x pixel-repeated copy (area downscale averages equal pixels)
    # and a copy with a border added left and right (the crop removes it) are the same clip.
    rng = np.random.default_rng(1)
    base = clip(rng, 64, 64)
    doubled = [np.repeat(np.repeat(f, 2, axis=0), 2, axis=1) for f in base]
    bordered = [np.concatenate([rng.integers(0, 256, (64, 16, 3), dtype=np.uint8), f,
                                rng.integers(0, 256, (64, 16, 3), dtype=np.uint8)], axis=1) for f in base]
    engine = Engine(model_with_head(), device="cpu")
    a, b, c = engine.infer([base, doubled, bordered])
    assert np.array_equal(a.embedding, b.embedding) and np.array_equal(a.embedding, c.embedding)
    assert a.labels == b.labels == c.labels


def test_batch_results_keep_their_order():
    rng = np.random.default_rng(2)
    clips = [clip(rng, 64, 64) for _ in range(3)]
    engine = Engine(model_with_head(), device="cpu")
    together = engine.infer(clips)
    for c, res in zip(clips, together):
        alone = engine.infer([c])[0]
        assert np.allclose(alone.embedding, res.embedding, atol=1e-5) and alone.labels == res.labels


def test_bf16_runs_on_cpu_close_to_fp32():
    rng = np.random.default_rng(3)
    clips = [clip(rng, 64, 64), clip(rng, 72, 96)]
    model = model_with_head()
    fp32 = Engine(model, device="cpu").infer(clips)
    bf16 = Engine(model, device="cpu", precision="bf16").infer(clips)
    for a, b in zip(fp32, bf16):
        assert b.embedding.dtype == np.float32 and b.embedding.shape == (256,)
        assert np.isfinite(b.embedding).all() and len(b.labels) == len(b.scores) == 5
        cos = float(a.embedding @ b.embedding / (np.linalg.norm(a.embedding) * np.linalg.norm(b.embedding)))
        assert cos > 0.99
        assert not np.array_equal(a.embedding, b.embedding)  # it really ran in bf16
        assert math.isclose(sum(b.scores), 1.0, rel_tol=1e-5)


def test_bad_precision_and_frame_count():
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16'\), got 'fp16'"):
        Engine(model_with_head(), device="cpu", precision="fp16")
    engine = Engine(model_with_head(), device="cpu")
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match=f"must have 8 frames for {TINY}, got 7"):
        engine.infer([clip(rng, 64, 64), clip(rng, 64, 64, n=7)])
    with pytest.raises(ValueError, match="got 9"):
        engine.teach("x", [clip(rng, 64, 64, n=9)])
    assert engine.infer([]) == []  # an empty batch (the encoder could not reshape it: RuntimeError)
    # a model of non-square frames builds and runs, but the engine cuts frames square: every clip failed
    wide = Hiera(get_config(TINY, input_size=(8, 64, 128), num_classes=3))
    with pytest.raises(ValueError, match=r"square frames, \[T, S, S\]; hiera_tiny_8x64 takes \[8, 64, 128\]"):
        Engine(wide, device="cpu")


def test_encoder_version_and_clip_timing(tmp_path):
    bare = Hiera(get_config(TINY))  # no checkpoint attributes at all
    engine = Engine(bare, device="cpu")
    assert engine.encoder_version == f"{TINY}@0"
    assert engine.frame_stride_s == pytest.approx(4 / 30)  # official Kinetics sampling
    assert engine.infer([clip(np.random.default_rng(5), 64, 64)])[0].labels == []  # headless, nothing taught
    assert engine.prototypes.path is None

    path = save_checkpoint(tmp_path / "robot.pt", model_with_head(), labels=LABELS, model_id="robot_model",
                           version=4, extra={"sampling": {"frame_stride_s": 0.1}})
    engine = Engine(str(path), device="cpu")
    assert engine.encoder_version == "robot_model@4"
    assert engine.frame_stride_s == 0.1
    assert (engine.num_frames, engine.size) == (8, 64)
    assert engine.prototypes.path == prototypes_path(path)
    assert Engine(TINY, device="cpu").encoder_version == f"{TINY}-random@0"  # random weights say so


def test_reused_host_buffer_never_leaks_one_call_into_the_next():
    # The engine writes each batch into a host buffer kept per batch size; calls of other sizes in between
    # and a shorter batch after a longer one must give exactly what a fresh engine gives.
    rng = np.random.default_rng(5)
    a, b, c = clip(rng, 64, 64), clip(rng, 96, 128), clip(rng, 64, 64)
    engine = Engine(model_with_head(), device="cpu")
    first = engine.infer([a, b])
    engine.infer([c])
    engine.infer([c, c, c])
    again = engine.infer([a, b])
    fresh, late = Engine(model_with_head(), device="cpu").infer([c])[0], engine.infer([c])[0]
    assert late.labels == fresh.labels and np.array_equal(late.embedding, fresh.embedding)
    for x, y in zip(first, again):
        assert np.array_equal(x.embedding, y.embedding) and x.labels == y.labels


def test_gpu_options_are_ignored_on_cpu():
    engine = Engine(model_with_head(), device="cpu", cuda_graph=True, compile=True)
    assert engine.cuda_graph is False and engine._net == engine._run
    rng = np.random.default_rng(6)
    c = clip(rng, 64, 64)
    assert np.array_equal(engine.infer([c])[0].embedding, Engine(model_with_head(), device="cpu").infer([c])[0].embedding)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_replay_matches_eager_and_sees_swapped_weights(precision):
    rng = np.random.default_rng(7)
    clips = [clip(rng, 64, 64), clip(rng, 120, 160)]
    graphed = Engine(model_with_head(), device="cuda", precision=precision, cuda_graph=True)
    eager = Engine(model_with_head(), device="cuda", precision=precision, cuda_graph=False)
    tol = 1e-4 if precision == "fp32" else 5e-2
    for _ in range(2):  # the first call captures, the second replays
        for g, e in zip(graphed.infer(clips), eager.infer(clips)):
            assert np.allclose(g.embedding, e.embedding, atol=tol)
    assert graphed._graphs and 2 in graphed._graphs
    # An adaptation swap loads new weights in place: the captured graph must compute with them.
    new = model_with_head(seed=1).state_dict()
    graphed.model.load_state_dict(new)
    eager.model.load_state_dict(new)
    for g, e in zip(graphed.infer(clips), eager.infer(clips)):
        assert np.allclose(g.embedding, e.embedding, atol=tol)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("h, w, size", [(480, 640, 224), (720, 1280, 224), (128, 128, 64), (97, 130, 64)])
def test_area_resize_on_the_device_gives_the_host_pixels(device, h, w, size):
    # smooth and noisy content: rounding ties (integer factors) and fractional overlaps (2.14x) both occur
    rng = np.random.default_rng(h + w)
    noisy = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    frames = np.stack([noisy, cv2.GaussianBlur(noisy, (0, 0), 3)])
    squares = torch.from_numpy(np.stack([centre_square(f) for f in frames])).to(device)
    got = AreaResize(size, device)(squares).cpu().numpy()
    want = np.stack([crop_resize(f, size) for f in frames])
    assert got.shape == want.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want).max() <= 1 and (got == want).mean() > 0.999


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_device_resize_serves_what_the_host_resize_serves(device):
    # a clip as ClipBuffer(shrink_newest=False) hands it over: frames already small, the newest at camera size;
    # a second clip from a camera of another size, batched with it, and a third with every frame large
    rng = np.random.default_rng(8)
    small = [crop_resize(f, 64) for f in clip(rng, 120, 160)]
    clips = [small[:-1] + [clip(rng, 120, 160, 1)[0]], clip(rng, 64, 64), clip(rng, 90, 200)]
    on = Engine(model_with_head(), device=device, device_resize=True)
    off = Engine(model_with_head(), device=device)
    for _ in range(2):  # the host and staging buffers are reused on the second call
        for a, b in zip(on.infer(clips), off.infer(clips)):
            assert np.allclose(a.embedding, b.embedding, atol=1e-4) and a.labels == b.labels
    assert {side for _, side in on._staging} == {90, 120}
