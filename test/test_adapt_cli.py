"""`hiera-perception adapt` offline: a tiny synthetic data folder (and a rosbag2) through the node's Adapter into a
loadable checkpoint that keeps its decoder, clip timing, labels and taught labels, plus a reconstruction PNG."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from hiera_perception import adapt, weights
from hiera_perception.adaptation import AdaptationConfig, Adapter
from hiera_perception.checkpoint import load_checkpoint, load_model, save_checkpoint
from hiera_perception.config import CONFIGS, get_config
from hiera_perception.labeler import prototypes_path
from hiera_perception.mae import HieraMAE
from hiera_perception.model import Hiera
from hiera_perception.synth import write_dataset

TINY = "hiera_tiny_8x64"
LABELS = ["a", "b", "c"]
STRIDE = 0.1
FAST = ["--rounds", "2", "--steps-per-round", "1", "--batch-size", "2", "--min-clips", "2", "--probe-clips", "2",
        "--min-probe-cosine", "-1", "--max-loss-increase", "100", "--lr", "1e-3", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread is faster than two fighting
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    write_dataset(out, clips=3, seed=0, seconds=1.0, size=(64, 64), unlabeled=True, progress=False)
    return out


def mae_checkpoint(path, decoder: bool = True):
    torch.manual_seed(0)
    encoder = Hiera(get_config(TINY, num_classes=len(LABELS)))
    model = HieraMAE(encoder.config, encoder=encoder) if decoder else encoder
    return save_checkpoint(path, model, labels=LABELS, model_id="test", extra={"sampling": {"frame_stride_s": STRIDE}})


def run(argv: list[str], capsys) -> tuple[int, dict]:
    parser = argparse.ArgumentParser()
    adapt.add_arguments(parser)
    rc = adapt.main(parser.parse_args([*argv, "--json"]))
    return rc, json.loads(capsys.readouterr().out)


def test_adapt_data_folder_writes_a_model_that_serves_and_adapts_further(data, tmp_path, capsys):
    src = mae_checkpoint(tmp_path / "in.pt")
    prototypes_path(src).write_text('{"dim": 256, "labels": {}}\n')
    out = tmp_path / "out" / "adapted.pt"
    out.parent.mkdir()
    rc, summary = run(["--model", str(src), "--data", str(data), "--out", str(out), *FAST], capsys)
    assert rc == 0
    assert (summary["rounds"], summary["accepted"], summary["rejected"], summary["warmup"]) == (2, 2, 0, 0)
    assert summary["version"] == 2 and summary["clips"] == 2 + 2 * 2
    assert summary["probe_loss_before"] > 0 and summary["probe_loss_after"] > 0 and -1 <= summary["probe_cosine"] <= 1
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "adapted.pt", "adapted.pt.prototypes.json", "adapted.reconstruction.png"]
    assert summary["png"] == str(out.parent / "adapted.reconstruction.png")

    # our checkpoint of the HieraMAE: it serves (clip timing, labels, version), keeps its decoder and head
    ck, before = load_checkpoint(out), load_checkpoint(src)
    # a model of its own: "test@2" would name other weights than the input's own version 2
    assert ck.model_id == "adapted" and ck.version == 2 and ck.labels == LABELS
    assert ck.extra["sampling"] == {"frame_stride_s": STRIDE} and ck.extra["adaptation"]["accepted"] == 2
    assert any(k.startswith("decoder_") for k in ck.model_state)
    assert torch.equal(ck.model_state["encoder.head.projection.weight"], before.model_state["encoder.head.projection.weight"])
    assert not torch.equal(ck.model_state["encoder.blocks.0.attn.qkv.weight"],
                           before.model_state["encoder.blocks.0.attn.qkv.weight"])
    model = load_model(out, device="cpu")
    assert (model.model_id, model.version, model.labels, model.sampling) == ("adapted", 2, LABELS,
                                                                             {"frame_stride_s": STRIDE})
    assert model(torch.zeros(1, 3, 8, 64, 64)).logits.shape == (1, 3)

    png = cv2.imread(str(out.parent / "adapted.reconstruction.png"))
    assert png.shape == ((2 * 64 + 2) * 4, (3 * 64 + 2 * 2) * 4, 3)  # before over after, 4x for a 64 px model

    # the output adapts further: numbering goes on
    again = tmp_path / "again.pt"
    rc, summary = run(["--model", str(out), "--data", str(data), "--out", str(again), *FAST[:-4],
                       "--rounds", "1", "--device", "cpu", "--model-id", "robot_v2"], capsys)
    assert rc == 0 and summary["version"] == 3
    again_model = load_model(again, device="cpu")
    assert (again_model.model_id, again_model.version) == ("robot_v2", 3)


def test_model_without_decoder_warms_one_up_first(data, tmp_path, capsys):
    src = mae_checkpoint(tmp_path / "enc.pt", decoder=False)
    out = tmp_path / "adapted.pt"
    rc, summary = run(["--model", str(src), "--data", str(data), "--out", str(out), *FAST,
                       "--rounds", "1", "--decoder-warmup-rounds", "1"], capsys)
    assert rc == 0
    assert (summary["rounds"], summary["warmup"], summary["accepted"], summary["version"]) == (2, 1, 1, 1)
    assert any(k.startswith("decoder_") for k in load_checkpoint(out).model_state)


def test_an_official_mae_file_hands_adaptation_its_decoder(tmp_path, monkeypatch):
    # Like base 16x224: served, the encoder pools 3 times; the official MAE's decoder was trained behind 2
    # poolings, which is how the Adapter's MAE runs the same weights, so the decoder fits and no warm-up is due.
    cfg = get_config(TINY).replace(name="tiny_q3", q_pool=3)
    monkeypatch.setitem(CONFIGS, "tiny_q3", cfg)
    torch.manual_seed(1)
    official = {k.removeprefix("encoder."): v for k, v in HieraMAE(cfg).state_dict().items()
                if not k.startswith(("encoder.norm.", "encoder.head."))}  # the official file's layout
    torch.save({"model_state": official}, tmp_path / "mae.pth")
    model = load_model(tmp_path / "mae.pth", arch="tiny_q3", device="cpu")
    assert model.config.q_pool == 3 and model.head is None
    adapter = Adapter(model, AdaptationConfig(), mae_state=adapt.decoder_state_of(model))
    assert not adapter.decoder_warmup
    for k in ("decoder_pred.weight", "decoder_pos_embed", "mask_token", "multi_scale_fusion_heads.1.weight"):
        assert torch.equal(adapter.mae.state_dict()[k], official[k]), k
    # fetched into the cache and served by its table name, the file is found from the model's id
    entry = weights.WeightsEntry("tiny_q3", "mae_k400", "https://example.invalid/mae_tiny_q3.pth", "mae", 0)
    monkeypatch.setitem(weights.WEIGHTS, entry.name, entry)
    monkeypatch.setenv("HIERA_PERCEPTION_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    shutil.copy(tmp_path / "mae.pth", tmp_path / "cache" / entry.filename)
    fetched = load_model(entry.name, device="cpu")
    assert fetched.source_path is None and fetched.model_id == entry.name
    assert torch.equal(adapt.decoder_state_of(fetched)["decoder_pred.weight"], official["decoder_pred.weight"])
    fine_tuned = Hiera(cfg.replace(num_classes=3)).state_dict()  # an official K400-style file: a head, no decoder
    torch.save({"model_state": fine_tuned}, tmp_path / "ft.pth")
    assert adapt.decoder_state_of(load_model(tmp_path / "ft.pth", arch="tiny_q3", device="cpu")) is None


def test_strict_guard_rejects_and_writes_the_input_weights(data, tmp_path, capsys):
    src = mae_checkpoint(tmp_path / "in.pt")
    out = tmp_path / "same.pt"
    rc, summary = run(["--model", str(src), "--data", str(data), "--out", str(out), *FAST,
                       "--min-probe-cosine", "1.5"], capsys)  # last one wins: no candidate can pass
    assert rc == 0 and (summary["accepted"], summary["rejected"], summary["version"]) == (0, 2, 0)
    assert summary["reasons"] == {"drift": 2}
    a, b = load_checkpoint(src).model_state, load_checkpoint(out).model_state
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapt_from_a_bag(tmp_path, capsys):
    pytest.importorskip("rosbags")
    from test_bag import write_bag

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8) for _ in range(20)]
    write_bag(tmp_path / "bag", frames, [10.0 + i / 10 for i in range(20)])  # 2 s at 10 Hz, one image topic
    src = mae_checkpoint(tmp_path / "in.pt")
    out = tmp_path / "adapted.pt"
    rc, summary = run(["--model", str(src), "--bag", str(tmp_path / "bag"), "--out", str(out), *FAST], capsys)
    assert rc == 0 and summary["accepted"] == 2 and load_model(out, device="cpu").version == 2


def test_every_adaptation_flag_says_what_it_does():
    # --stage-weight, --blend and --threads said only their own names
    parser = argparse.ArgumentParser()
    adapt.add_arguments(parser)
    flags = [a for a in parser._actions if a.dest in {f.name for f in dataclasses.fields(adapt.AdaptationConfig)}]
    assert len(flags) >= 15 and all(not a.help.startswith(f"{a.dest} (default") for a in flags), \
        [a.dest for a in flags if a.help.startswith(f"{a.dest} (default")]


def test_bad_arguments_are_named(data, tmp_path):
    parser = argparse.ArgumentParser()
    adapt.add_arguments(parser)
    src = mae_checkpoint(tmp_path / "in.pt")
    args = parser.parse_args(["--model", str(src), "--data", str(data), "--out", str(tmp_path / "o.pt"),
                              "--trainable", "some"])
    with pytest.raises(SystemExit, match="adapt: trainable must be one of"):
        adapt.main(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["--data", str(data), "--bag", "x", "--out", "o.pt"])  # one source only
    shutil.rmtree(tmp_path / "nowhere", ignore_errors=True)
    args = parser.parse_args(["--model", str(src), "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o.pt")])
    with pytest.raises(SystemExit, match="adapt: no labels.csv"):
        adapt.main(args)
