"""Training: pretrain and finetune lower their losses, checkpoints serve, --resume is exact, DDP on gloo."""

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hiera_perception.checkpoint import load_checkpoint, load_model
from hiera_perception.config import CONFIGS, get_config
from hiera_perception.mae import HieraMAE
from hiera_perception.preprocess import preprocess_clip
from hiera_perception.synth import ACTIONS, write_dataset
from hiera_perception.train import _check, _classifier, _load_init, add_arguments, clips_to_input, train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 clips (2 per action), 1 s at 30 fps, 64 x 64: room for a random start of 0.3 s at stride 0.1."""
    out = tmp_path_factory.mktemp("train_data")
    write_dataset(out, 16, seed=3, seconds=1.0, size=(64, 64), progress=False)
    return out


def make_args(command: str, *argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p, command)
    args = p.parse_args([*argv, "--no-progress"])
    _check(args)
    return args


def avg(xs):
    return sum(xs) / len(xs)


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "mae.pt"
    args = make_args("pretrain", "--data", str(data), "--config", "hiera_tiny_8x64", "--out", str(out),
                     "--steps", "16", "--batch", "4", "--lr", "2e-3", "--mask-ratio", "0.75", "--seed", "1")
    return out, train(args)


def test_pretrain_lowers_the_mae_loss(pretrained):
    out, result = pretrained
    assert result.complete and result.step == 16 and len(result.losses) == 16
    assert avg(result.losses[-4:]) < 0.9 * avg(result.losses[:4])
    ck = load_checkpoint(out)
    assert any(k.startswith("decoder_") for k in ck.model_state)  # an MAE checkpoint
    assert ck.step == 16 and "train_state" not in ck.extra  # a finished run keeps no optimizer state
    assert ck.extra["sampling"] == {"frame_stride_s": 0.1}
    assert ck.extra["train"]["command"] == "pretrain" and ck.extra["train"]["mask_ratio"] == 0.75
    # what adaptation aligns with: the finished encoder's embedding statistics over its 16 training clips
    stats = ck.extra["feature_stats"]
    assert stats["clips"] == 16 and len(stats["mean"]) == len(stats["var"]) == 256 and min(stats["var"]) > 0
    assert "class_mean" not in stats  # an MAE encoder without a head has no classes


def test_finetune_lowers_the_loss_and_serves_its_labels(pretrained, data, tmp_path):
    out = tmp_path / "ft.pt"
    args = make_args("finetune", "--data", str(data), "--init", str(pretrained[0]), "--out", str(out),
                     "--steps", "16", "--batch", "4", "--lr", "2e-3", "--label-smoothing", "0", "--model-id", "toy")
    result = train(args)
    assert result.complete and len(result.losses) == 16
    # a fresh head starts near uniform (the small configs' head has the full init scale: logits of std ~0.3);
    # one batch of 4 clips: 2.07-2.31 over data seeds 3-7 (log 8 = 2.08)
    assert result.losses[0] == pytest.approx(np.log(8), abs=0.3)
    assert avg(result.losses[-4:]) < 0.9 * avg(result.losses[:4])
    model = load_model(out, device="cpu")
    assert model.labels == sorted(ACTIONS)  # ClipDataset's class order, saved in index order
    assert model.model_id == "toy" and model.sampling == {"frame_stride_s": 0.1}
    assert model.feature_stats["clips"] == 16 and model.feature_stats != load_model(pretrained[0]).feature_stats
    # each of the 8 classes (2 clips each) has its mean embedding, in the head's order
    assert [len(m) for m in model.feature_stats["class_mean"]] == [256] * 8
    assert model.config.num_classes == 8 and "train_state" not in load_checkpoint(out).extra
    out_logits = model(torch.zeros(2, 3, *model.config.input_size)).logits
    assert out_logits.shape == (2, 8)


def test_only_classes_trains_a_curriculum_stage_that_the_next_stage_continues(pretrained, data, tmp_path):
    # Stage 1 sees only the swipes' clips but keeps the 8-way head; stage 2 (--init stage 1) keeps that head.
    stage1, stage2 = tmp_path / "s1.pt", tmp_path / "s2.pt"
    common = ("--data", str(data), "--batch", "2", "--lr", "1e-3", "--label-smoothing", "0", "--seed", "4")
    r1 = train(make_args("finetune", *common, "--init", str(pretrained[0]), "--out", str(stage1), "--epochs", "2",
                         "--only-classes", "swipe_left,swipe_right"))
    summary = load_checkpoint(stage1).extra["train"]
    assert (summary["clips"], summary["steps"], summary["only_classes"]) == (4, 4, ["swipe_left", "swipe_right"])
    assert r1.complete and load_model(stage1, device="cpu").labels == sorted(ACTIONS)
    # stage 2 at lr 1e-30 (lr 0 is refused): one step too small to move a float32 weight, so its checkpoint
    # shows what --init handed it
    r2 = train(make_args("finetune", *common[:4], "--lr", "1e-30", *common[6:], "--init", str(stage1), "--out",
                         str(stage2), "--steps", "1"))
    assert r2.complete and load_checkpoint(stage2).extra["train"]["clips"] == 16
    head1, head2 = (load_checkpoint(p).model_state["head.projection.weight"] for p in (stage1, stage2))
    assert torch.equal(head1, head2), "the head came along (same labels), not a fresh one"
    # a new run is a new model: named after its file, not after --init (whose encoder_version it published)
    assert (load_checkpoint(stage1).model_id, load_checkpoint(stage2).model_id) == ("s1", "s2")
    with pytest.raises(ValueError, match=r"--only-classes \['jump'\] not in"):
        train(make_args("finetune", *common, "--init", str(pretrained[0]), "--out", str(tmp_path / "x.pt"),
                        "--only-classes", "swipe_left,jump"))


def test_finetune_init_takes_the_mae_encoder(pretrained):
    mae, meta = _load_init(str(pretrained[0]), None)
    assert isinstance(mae, HieraMAE) and meta["kind"] == "mae"
    clf = _classifier(mae.encoder, 8, keep_head=False)
    enc_state = mae.encoder.state_dict()
    for k, v in clf.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, enc_state[k]), k


def official_q3_mae(tmp_path, monkeypatch) -> tuple[Path, dict[str, torch.Tensor]]:
    """An official-format MAE file of "tiny_q3", a config whose classifier pools queries 3 times and whose
    MAE encoder pools twice, like the 16x224 models: (path, its state)."""
    cfg = get_config("hiera_tiny_8x64").replace(name="tiny_q3", q_pool=3)
    monkeypatch.setitem(CONFIGS, "tiny_q3", cfg)
    torch.manual_seed(0)
    mae = HieraMAE(cfg)
    # the official MAE layout (test_checkpoint.py): encoder keys at the top level, no final norm, no head
    state = {k.removeprefix("encoder."): v for k, v in mae.state_dict().items()
             if not k.startswith(("encoder.norm.", "encoder.head."))}
    path = tmp_path / "official_mae.pth"
    torch.save({"model_state": state}, path)
    return path, state


def test_pretrain_init_from_an_official_mae_keeps_its_decoder(data, tmp_path, monkeypatch):
    path, state = official_q3_mae(tmp_path, monkeypatch)
    model, meta = _load_init(str(path), "tiny_q3")
    assert isinstance(model, HieraMAE) and meta["kind"] == "mae" and model.config.q_pool == 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items() if "decoder" in k)
    out = tmp_path / "pre.pt"
    train(make_args("pretrain", "--data", str(data), "--init", str(path), "--arch", "tiny_q3", "--out", str(out),
                    "--steps", "1", "--batch", "4", "--lr", "1e-30"))  # a step that moves no weight
    ck = load_checkpoint(out)
    assert ck.config.q_pool == 2 and torch.equal(ck.model_state["decoder_pred.weight"], state["decoder_pred.weight"])


def test_joint_finetune_from_an_official_mae_keeps_its_decoder(data, tmp_path, monkeypatch):
    # The classifier pools 3 times and serves so; its MAE loss runs the same weights pooling twice, so the
    # official decoder fits (it used to be built for 3 poolings: a shape error) and a resume rebuilds it.
    path, state = official_q3_mae(tmp_path, monkeypatch)
    out = tmp_path / "joint.pt"
    common = ["--data", str(data), "--init", str(path), "--arch", "tiny_q3", "--out", str(out), "--batch", "4",
              "--lr", "1e-30", "--mae-weight", "1", "--mask-ratio", "0.75"]
    first = train(make_args("finetune", *common, "--steps", "2", "--stop-at", "1"))
    ck = load_checkpoint(out)
    assert ck.config.q_pool == 3 and ck.config.num_classes == len(ACTIONS)
    for k in ("decoder_pred.weight", "decoder_pos_embed", "multi_scale_fusion_heads.1.weight"):
        assert torch.equal(ck.model_state[k], state[k]), k
    again = train(make_args("finetune", *common, "--steps", "2", "--resume"))
    assert again.complete and again.step == 2 and first.losses[0] > 0
    assert load_model(out, device="cpu").config.q_pool == 3


def test_clips_to_input_matches_preprocess_clip():
    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, (3, 8, 16, 16, 3), dtype=np.uint8)
    cfg = get_config("hiera_tiny_8x64")
    got = clips_to_input(torch.from_numpy(clips), cfg.mean, cfg.std)
    want = torch.cat([preprocess_clip(list(c), 16, cfg.mean, cfg.std) for c in clips])
    assert got.shape == (3, 3, 8, 16, 16) and torch.equal(got, want)


def test_joint_finetune_adds_the_weighted_mae_loss_and_trains_the_decoder(pretrained, data, tmp_path):
    common = ["--data", str(data), "--init", str(pretrained[0]), "--batch", "4", "--seed", "2", "--mask-ratio", "0.75"]
    # At lr 1e-30 nothing moves (lr 0 is refused), so every run sees the same weights, clips and masks: the MAE
    # term is exactly linear in its weight, and a plain finetune run is the same run at weight 0.
    frozen = [train(make_args("finetune", *common, "--lr", "1e-30", "--steps", "3", "--out", str(tmp_path / f"w{w}.pt"),
                              *(["--mae-weight", str(w)] if w else []))).losses for w in (0, 1, 3)]
    mae_1 = np.subtract(frozen[1], frozen[0])
    np.testing.assert_allclose(np.subtract(frozen[2], frozen[0]), 3 * mae_1, rtol=1e-4)
    assert all(0.05 < m < 3 for m in mae_1)  # a masked-patch MSE on normalised pixels, not zero
    out = tmp_path / "joint.pt"
    result = train(make_args("finetune", *common, "--lr", "2e-3", "--steps", "16", "--mae-weight", "1",
                             "--label-smoothing", "0", "--out", str(out)))
    assert result.complete and avg(result.losses[-4:]) < 0.9 * avg(result.losses[:4])
    ck, init = load_checkpoint(out), load_checkpoint(pretrained[0])
    assert ck.extra["train"]["mae_weight"] == 1.0 and ck.extra["train"]["mask_ratio"] == 0.75
    decoder = [k for k in init.model_state if not k.startswith("encoder.")]
    assert decoder and set(decoder) < set(ck.model_state)  # an MAE checkpoint: the --init's decoder, trained on
    assert not torch.equal(ck.model_state["decoder_pred.weight"], init.model_state["decoder_pred.weight"])
    model = load_model(out, device="cpu")  # serves the classifier
    assert model.labels == sorted(ACTIONS) and model(torch.zeros(1, 3, *model.config.input_size)).logits.shape == (1, 8)
    mae, meta = _load_init(str(out), None)  # and hands adaptation (or the next stage) its decoder
    assert isinstance(mae, HieraMAE) and meta["kind"] == "mae" and mae.encoder.config.num_classes == 8


@pytest.mark.parametrize("command", ["pretrain", "finetune", "joint"])
def test_resume_continues_exactly(command, pretrained, data, tmp_path):
    """Stop at step 3 of 6, resume: the next losses and the final weights equal the uninterrupted run's.
    finetune also unfreezes the encoder after epoch 0 (4 steps of 16 clips / 4), i.e. after the resume."""
    common = ["--data", str(data), "--steps", "6", "--batch", "4", "--seed", "7"]
    if command == "pretrain":
        common += ["--config", "hiera_tiny_8x64", "--mask-ratio", "0.75"]
    elif command == "finetune":
        common += ["--init", str(pretrained[0]), "--unfreeze-after", "1"]
    else:  # finetune --mae-weight: the model on disk between the two parts is an MAE checkpoint
        command = "finetune"
        common += ["--init", str(pretrained[0]), "--mae-weight", "0.5", "--mask-ratio", "0.75"]
    full = train(make_args(command, *common, "--out", str(tmp_path / "full.pt")))
    part = tmp_path / "part.pt"
    first = train(make_args(command, *common, "--out", str(part), "--stop-at", "3"))
    assert first.step == 3 and not first.complete
    assert load_checkpoint(part).extra["train_state"]["step"] == 3
    rest = train(make_args(command, *common, "--out", str(part), "--resume"))
    assert rest.complete and rest.step == 6
    assert first.losses + rest.losses == full.losses  # bit-identical on CPU
    a, b = load_checkpoint(tmp_path / "full.pt").model_state, load_checkpoint(part).model_state
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = train(make_args(command, *common, "--out", str(part), "--resume"))  # a finished run: nothing to do
    assert again.complete and again.losses == []


def test_ctrl_c_keeps_a_resumable_checkpoint(pretrained, data, tmp_path, monkeypatch):
    # Ctrl-C used to lose every step since the last --ckpt-every checkpoint, and say nothing
    from hiera_perception import train as train_module

    real, calls = train_module.clips_to_input, []

    def interrupted_at_the_fourth_step(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    out = tmp_path / "ft.pt"
    common = ["--data", str(data), "--init", str(pretrained[0]), "--steps", "6", "--batch", "4", "--seed", "2"]
    monkeypatch.setattr(train_module, "clips_to_input", interrupted_at_the_fourth_step)
    with pytest.raises(KeyboardInterrupt):
        train(make_args("finetune", *common, "--out", str(out)))
    assert load_checkpoint(out).extra["train_state"]["step"] == 3
    monkeypatch.setattr(train_module, "clips_to_input", real)
    rest = train(make_args("finetune", *common, "--out", str(out), "--resume"))
    assert rest.complete and rest.step == 6 and len(rest.losses) == 3


def test_ctrl_c_during_the_update_saves_the_step_it_finishes(pretrained, data, tmp_path, monkeypatch):
    """A real SIGINT just after the 4th optimizer update: it used to be raised before the step was counted, so the
    checkpoint held step 4's weights and Adam moments as step 3 and the resume trained step 4 twice. The update and
    its count are one now: the checkpoint is step 4 and the resume ends where the uninterrupted run does."""
    import signal

    common = ["--data", str(data), "--init", str(pretrained[0]), "--steps", "6", "--batch", "4", "--seed", "5"]
    full = train(make_args("finetune", *common, "--out", str(tmp_path / "full.pt")))
    real, calls = torch.optim.AdamW.step, []

    def step_then_ctrl_c(self, *a, **k):
        out = real(self, *a, **k)
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)  # delivered here, inside the update
        return out

    out = tmp_path / "ft.pt"
    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train(make_args("finetune", *common, "--out", str(out)))
    monkeypatch.setattr(torch.optim.AdamW, "step", real)
    assert load_checkpoint(out).extra["train_state"]["step"] == 4
    rest = train(make_args("finetune", *common, "--out", str(out), "--resume"))
    assert rest.complete and rest.losses == full.losses[4:]
    a, b = load_checkpoint(tmp_path / "full.pt").model_state, load_checkpoint(out).model_state
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_cache_frames_trains_the_same_weights(pretrained, data, tmp_path):
    """8 steps of 4 over 16 clips: the second epoch's clips come from the cache, and every loss and weight
    equals those of the run that decodes each clip from its video."""
    common = ["--data", str(data), "--init", str(pretrained[0]), "--steps", "8", "--batch", "4", "--seed", "3"]
    plain = train(make_args("finetune", *common, "--out", str(tmp_path / "plain.pt")))
    cached = train(make_args("finetune", *common, "--cache-frames", "--out", str(tmp_path / "cached.pt")))
    assert cached.complete and cached.losses == plain.losses
    a, b = load_checkpoint(tmp_path / "plain.pt"), load_checkpoint(tmp_path / "cached.pt")
    assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)
    assert a.extra["feature_stats"] == b.extra["feature_stats"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_on_gloo_equal_one_process(data, tmp_path):
    """torchrun, 2 CPU processes x 2 clips per step = 1 process x 4 clips per step: the same clips
    (each rank takes every 2nd of the epoch's order), the averaged gradient, so the same weights."""
    common = ["--data", str(data), "--config", "hiera_tiny_8x64", "--steps", "3", "--lr", "2e-3", "--seed", "5",
              "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "hiera_perception.train", "finetune", *common, "--batch", "2", "--out", str(tmp_path / "ddp.pt")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = load_checkpoint(tmp_path / "ddp.pt")
    assert ddp.step == 3 and ddp.extra["train"]["world_size"] == 2 and ddp.labels == sorted(ACTIONS)
    single = train(make_args("finetune", *common[:-1], "--batch", "4", "--out", str(tmp_path / "one.pt")))
    one = load_checkpoint(tmp_path / "one.pt")
    assert ddp.extra["train"]["final_loss"] == pytest.approx(single.losses[-1], rel=1e-4)
    # Adam divides by sqrt(v): where a gradient is ~0, float-rounding differences in the all-reduce can move a
    # weight by up to lr per step, so the bound is 1e-3 (lr 2e-3, warm-up) there and 1e-5 almost everywhere.
    for k, v in one.model_state.items():
        diff = (ddp.model_state[k] - v).abs()
        assert diff.max() < 1e-3 and (diff > 1e-5).float().mean() < 0.01, (k, diff.max())


def test_bad_options_are_named(data, tmp_path):
    with pytest.raises(ValueError, match="--batch 64 x 1 process"):
        train(make_args("finetune", "--data", str(data), "--out", str(tmp_path / "x.pt"), "--batch", "64"))
    with pytest.raises(ValueError, match="not both"):
        make_args("pretrain", "--data", str(data), "--out", "x", "--config", "hiera_tiny_8x64", "--init", "y")
    with pytest.raises(ValueError, match="mask-ratio"):
        make_args("pretrain", "--data", str(data), "--out", "x", "--config", "hiera_tiny_8x64", "--mask-ratio", "1")
    base = ("--data", str(data), "--out", "x")
    for option, error in [("--lr=-3e-3", "--lr must be > 0, got -0.003"), ("--lr=0", "--lr must be > 0, got 0.0"),
                          ("--weight-decay=-0.05", "--weight-decay must be >= 0, got -0.05"),
                          ("--clip-grad=-1", "--clip-grad must be >= 0, got -1.0"),
                          ("--layer-decay=-0.75", r"--layer-decay must be in \(0, 1\], got -0.75"),
                          ("--layer-decay=1.5", r"--layer-decay must be in \(0, 1\], got 1.5"),
                          ("--frame-stride=0", "--frame-stride must be > 0, got 0.0"),
                          ("--stop-at=0", "--stop-at must be > 0, got 0")]:  # "=": "-3e-3" alone reads as an option
        with pytest.raises(ValueError, match=error):
            make_args("finetune", *base, option)
    make_args("finetune", *base, "--clip-grad", "0", "--weight-decay", "0")  # 0: no clipping, no decay
    with pytest.raises(ValueError, match="--mae-weight must be >= 0"):
        make_args("finetune", "--data", str(data), "--out", "x", "--mae-weight", "-1")
    with pytest.raises(ValueError, match="cannot go with --freeze-encoder"):
        make_args("finetune", "--data", str(data), "--out", "x", "--mae-weight", "1", "--freeze-encoder")
    with pytest.raises(ValueError, match="--cache-frames .* --workers 0"):
        make_args("finetune", "--data", str(data), "--out", "x", "--cache-frames", "--workers", "1")
    with pytest.raises(ValueError, match="--cache-frames .* needs --data"):
        make_args("pretrain", "--bag", "b", "--topic", "/t", "--out", "x", "--config", "hiera_tiny_8x64",
                  "--cache-frames")


def test_an_existing_out_is_named_before_it_is_replaced(data, tmp_path, caplog, request):
    # re-running a finished run's command (or forgetting --resume) trains over the model on disk: said at the start
    from hiera_perception import train as train_module

    train_module.log.addHandler(caplog.handler)  # launch_testing's logger class does not propagate to caplog's root
    request.addfinalizer(lambda: train_module.log.removeHandler(caplog.handler))
    done = tmp_path / "done.pt"
    make_args("finetune", "--data", str(data), "--out", str(done))
    assert "exists" not in caplog.text
    done.write_bytes(b"a model")
    make_args("finetune", "--data", str(data), "--out", str(done), "--resume")
    assert "exists" not in caplog.text
    make_args("finetune", "--data", str(data), "--out", str(done))
    assert f"--out {done} exists and is replaced at this run's first checkpoint (--resume continues it" in caplog.text
