"""reconstruction_panel: shape and layout, visible patches shown exactly as the input, and the norm-pix undo
(a decoder that predicts the exact target gives back the input; one that predicts zeros gives each patch's mean)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hiera_perception.config import get_config
from hiera_perception.mae import HieraMAE
from hiera_perception.reconstruction import GAP_PX, MASKED_GREY, panel_frame_index, reconstruction_panel, save_png

TINY = "hiera_tiny_8x64"
S = 64


@pytest.fixture(scope="module")
def mae() -> HieraMAE:
    torch.manual_seed(0)
    return HieraMAE(get_config(TINY))


def clip(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(8, S, S, 3), dtype=np.uint8)


def pictures(panel: np.ndarray) -> list[np.ndarray]:
    return [panel[:, i * (S + GAP_PX): i * (S + GAP_PX) + S] for i in range(3)]


def visible_pixels(mae: HieraMAE, keep: torch.Tensor) -> np.ndarray:
    """[S, S] bool: the pixels of the shown frame whose final token the encoder saw."""
    gt, gh, gw = mae.grid_final
    mt, mh, mw = mae.mu_final
    # unit keep over the mask-unit grid (gt/mt, gh/mh, gw/mw), each unit covering mt x mh x mw final tokens
    units = keep.view(gt // mt, gh // mh, gw // mw).numpy()
    tokens = units.repeat(mt, 0).repeat(mh, 1).repeat(mw, 2)[gt // 2]  # [gh, gw]
    return tokens.repeat(mae.pred_stride, 0).repeat(mae.pred_stride, 1)


def test_panel_shape_layout_and_visible_patches(mae):
    frames = clip()
    keep = torch.zeros(mae.config.num_mask_units, dtype=torch.bool)
    keep[[0, 5, 10, 15]] = True
    panel = reconstruction_panel(mae, frames, keep)
    assert panel.shape == (S, 3 * S + 2 * GAP_PX, 3) and panel.dtype == np.uint8
    assert (panel[:, S: S + GAP_PX] == 255).all() and (panel[:, 2 * S + GAP_PX: 2 * S + 2 * GAP_PX] == 255).all()
    f = panel_frame_index(mae)
    assert f == 4  # 4 temporal tokens of 2 frames: the third token starts at frame 4
    shown, masked, rebuilt = pictures(panel)
    np.testing.assert_array_equal(shown, frames[f])
    vis = visible_pixels(mae, keep)
    assert 0 < vis.mean() < 1
    np.testing.assert_array_equal(masked[vis], frames[f][vis])
    assert (masked[~vis] == MASKED_GREY).all()
    np.testing.assert_array_equal(rebuilt[vis], frames[f][vis])  # exactly what the encoder saw
    assert not np.array_equal(rebuilt[~vis], frames[f][~vis])  # an untrained decoder is no oracle


def test_random_keep_is_seeded_and_frames_are_resized(mae):
    big = np.stack([np.kron(f, np.ones((2, 3, 1), np.uint8)) for f in clip(1)])  # [8, 128, 192, 3]
    a = reconstruction_panel(mae, big, seed=3)
    b = reconstruction_panel(mae, list(big), seed=3)
    assert a.shape == (S, 3 * S + 2 * GAP_PX, 3)
    np.testing.assert_array_equal(a, b)
    # the drawn mask drops 75% of *this frame's* units: one of its 2 x 2 units stays visible
    shown, masked, _ = pictures(a)
    assert (masked == shown).all(axis=-1).mean() == pytest.approx(0.25, abs=0.01)
    with pytest.raises(ValueError, match="has 8 frames, got 7"):
        reconstruction_panel(mae, big[:7])
    with pytest.raises(ValueError, match="keep must be a bool mask of 16 mask units"):
        reconstruction_panel(mae, big, keep=torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize("predict", ["target", "zeros"])
def test_norm_pix_is_undone_with_each_patch_own_statistics(mae, predict, monkeypatch):
    """An oracle decoder (predicts the exact norm-pix target) rebuilds the input within rounding; a zero
    prediction is the patch mean, i.e. each dropped patch filled with its own average colour (all channels)."""
    frames = clip(2)
    keep = torch.zeros(mae.config.num_mask_units, dtype=torch.bool)
    keep[0] = True
    real_decode = mae.decode
    captured = {}

    def decode(latent, keep_):
        pred, token_keep = real_decode(latent, keep_)
        target = mae.target(captured["x"])
        return (target if predict == "target" else torch.zeros_like(target)), token_keep

    real_encode = mae.encode

    def encode(x, keep_):
        captured["x"] = x
        return real_encode(x, keep_)

    monkeypatch.setattr(mae, "decode", decode)
    monkeypatch.setattr(mae, "encode", encode)
    _, _, rebuilt = pictures(reconstruction_panel(mae, frames, keep))
    frame = frames[panel_frame_index(mae)].astype(np.int32)
    if predict == "target":
        assert np.abs(rebuilt.astype(np.int32) - frame).max() <= 1
    else:
        ps = mae.pred_stride
        vis = visible_pixels(mae, keep)
        for r in range(0, S, ps):
            for c in range(0, S, ps):
                if vis[r, c]:
                    continue
                patch = frame[r: r + ps, c: c + ps]
                assert np.abs(rebuilt[r: r + ps, c: c + ps].astype(np.int32) - round(patch.mean())).max() <= 1


def test_a_mask_ratio_outside_0_1_is_refused(mae):
    frames = np.zeros((mae.config.input_size[0], 32, 32, 3), np.uint8)
    for ratio in (1.0, 1.5, -0.5, float("nan")):
        with pytest.raises(ValueError, match="mask_ratio must be in \\[0, 1\\)"):
            reconstruction_panel(mae, frames, mask_ratio=ratio)


def test_save_png_round_trips(tmp_path):
    import cv2

    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 200  # red
    path = save_png(tmp_path / "p.png", rgb, scale=2)
    back = cv2.imread(str(path))[..., ::-1]
    assert back.shape == (8, 12, 3) and (back == [200, 0, 0]).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]  # no temporary left behind
