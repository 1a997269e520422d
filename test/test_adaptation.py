"""On-device MAE adaptation: replay buffer, rounds, the guard, faults, versions on disk, rollback, the thread.

Every round runs real MAE steps on a tiny model (hiera_tiny_8x64 with a 3-class head). Accepting
rounds use a guard that passes (min_probe_cosine -1, a loose loss bound); rejecting ones set thresholds
no candidate can meet. Faults are injected into the shadow MAE's forward *after* one real optimizer
step, so the shadow has really moved away from the deployed weights when the round fails.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hiera_perception import adaptation
from hiera_perception.adaptation import AdaptationConfig, Adapter, ReplayBuffer, lineage
from hiera_perception.checkpoint import load_checkpoint, load_model
from hiera_perception.config import get_config
from hiera_perception.mae import HieraMAE
from hiera_perception.model import Hiera

TINY = "hiera_tiny_8x64"
LABELS = ["wave", "idle", "approach"]
CLIP = (8, 64, 64, 3)
FIXED = ("head.", "norm.")  # encoder parts MAE never trains


def serving_model(seed: int = 0) -> Hiera:
    torch.manual_seed(seed)
    model = Hiera(get_config(TINY, num_classes=len(LABELS))).eval()
    model.labels, model.model_id = list(LABELS), "robot"
    return model


def decoder_state(model: Hiera, seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return HieraMAE(model.config, encoder=copy.deepcopy(model)).state_dict()


def config(**changes) -> AdaptationConfig:
    base = dict(lr=1e-3, steps_per_round=2, batch_size=2, min_clips=4, probe_clips=2, min_probe_cosine=-1.0,
                max_loss_increase=100.0, round_interval_s=0.01, seed=0)
    return AdaptationConfig(**{**base, **changes})


class Accepted:
    """on_accept recorder: (encoder state, version) of every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, torch.Tensor], int]] = []

    def __call__(self, state: dict[str, torch.Tensor], version: int) -> None:
        self.calls.append((state, version))


def make_adapter(tmp_path: Path, model: Hiera | None = None, clips: int = 4, **changes) -> tuple[Adapter, Accepted]:
    model = model or serving_model()
    on_accept = Accepted()
    adapter = Adapter(model, config(**changes), mae_state=decoder_state(model), out_dir=tmp_path / "versions",
                      on_accept=on_accept)
    rng = np.random.default_rng(0)
    for _ in range(clips):
        adapter.add_clip(rng.integers(0, 256, size=CLIP, dtype=np.uint8))
    return adapter, on_accept


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def changed_keys(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------------
# Replay buffer and config


def test_replay_buffer_caps_memory_and_evicts_oldest():
    clip_bytes = int(np.prod(CLIP))  # 98304 B = 0.09375 MiB
    buf = ReplayBuffer(max_mb=3.5 * clip_bytes / 2**20)  # room for 3 clips
    for i in range(5):
        buf.add(np.full(CLIP, i, np.uint8))
    assert len(buf) == 3 and buf.added == 5 and buf.evicted == 2
    assert buf.megabytes == pytest.approx(3 * clip_bytes / 2**20)
    assert [int(c[0, 0, 0, 0]) for c in buf.first(10)] == [2, 3, 4]  # the two oldest left first
    assert {int(c[0, 0, 0, 0]) for c in buf.sample(20, np.random.default_rng(0))} <= {2, 3, 4}
    first = buf.first(1)[0]
    first[:] = 99  # callers get copies
    assert int(buf.first(1)[0][0, 0, 0, 0]) == 2
    with pytest.raises(ValueError, match="exceeds the replay cap"):
        ReplayBuffer(max_mb=0.01).add(np.zeros(CLIP, np.uint8))


@pytest.mark.parametrize(
    "field, value, message",
    [("trainable", "some", "trainable must be one of"), ("max_device_share", 0.0, "max_device_share must be in"),
     ("max_device_share", 1.5, "max_device_share"), ("mask_ratio", 1.0, "mask_ratio must be in"),
     ("mask_ratio", -0.1, "mask_ratio"), ("steps_per_round", 0, "steps_per_round must be >= 1"),
     ("batch_size", 0, "batch_size"), ("min_clips", 0, "min_clips"), ("probe_clips", 0, "probe_clips"),
     ("keep_versions", 0, "keep_versions must be >= 1, got 0"), ("align_weight", -1.0, "align_weight must be >= 0"),
     ("align_momentum", 1.0, "align_momentum in \\[0, 1\\)"), ("stage_weight", -0.5, "stage_weight must be >= 0"),
     ("batch_size", 1, "align_weight > 0 needs batch_size and probe_clips >= 2"),
     ("min_clips", 8, "probe_clips \\(48\\) must be <= min_clips \\(8\\)"),
     ("lr", 0.0, "lr must be > 0, got 0.0"), ("grad_clip", 0.0, "grad_clip must be > 0")],
)
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        AdaptationConfig(**{field: value})
    AdaptationConfig()  # the defaults are valid


def test_decoder_weights_of_another_geometry_are_a_clear_error():
    # e.g. a version saved when a 16x224 classifier's MAE pooled 3 times: the node reports a ValueError at start
    model = serving_model()
    other = HieraMAE(model.config.replace(mae_q_pool=1)).state_dict()  # a decoder behind 1 pooling, not 2
    with pytest.raises(ValueError, match=r"decoder weights do not fit hiera_tiny_8x64's MAE: .*decoder_pos_embed"):
        Adapter(model, AdaptationConfig(), mae_state=other)


def test_round_waits_for_enough_clips(tmp_path):
    adapter, on_accept = make_adapter(tmp_path, clips=1)
    res = adapter.run_round(wait=False)
    assert not res.accepted and res.reason == "waiting for clips (1/4)" and res.steps == 0
    assert adapter.rounds == 0 and adapter.version == 0 and on_accept.calls == []


# ---------------------------------------------------------------------------------------------------
# Accepted rounds


def test_accepted_round_checkpoints_and_hands_over_the_encoder(tmp_path):
    model = serving_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    adapter, on_accept = make_adapter(tmp_path, model)
    res = adapter.run_round(wait=False)
    assert res.accepted and res.reason == "accepted" and res.version == 1 and res.steps == 2
    assert np.isfinite([res.train_loss, res.probe_loss_before, res.probe_loss_after, res.probe_cosine]).all()
    assert adapter.version == 1 and adapter.accepted == 1 and adapter.kept == [1]

    out = tmp_path / "versions"
    assert sorted(p.name for p in out.iterdir()) == ["latest.json", "robot@1.pt"]  # no temp files left
    assert json.loads((out / "latest.json").read_text()) == {
        "version": 1, "file": "robot@1.pt", "parents": [0], "base_weights_sha256": lineage(model)}
    assert Adapter.latest(out) == out / "robot@1.pt"

    assert len(on_accept.calls) == 1
    state, version = on_accept.calls[0]
    assert version == 1 and states_equal(state, adapter.encoder_state())
    serving = Hiera(model.config)
    serving.load_state_dict(state, strict=True)  # swaps into the serving encoder as it is
    trunk = changed_keys(state, original)
    assert trunk and not any(k.startswith(FIXED) for k in trunk)  # the trunk learned, head and norm did not
    assert states_equal(model.state_dict(), original)  # the serving model itself is never touched

    ck = load_checkpoint(out / "robot@1.pt")  # sha256 verified
    assert ck.version == 1 and ck.model_id == "robot" and ck.labels == LABELS
    loaded = load_model(out / "robot@1.pt", device="cpu")  # an MAE checkpoint serves its encoder + head
    assert states_equal(loaded.state_dict(), state) and loaded.labels == LABELS and loaded.version == 1

    res = adapter.run_round(wait=False)
    assert res.accepted and res.version == 2 and on_accept.calls[-1][1] == 2
    state2 = adapter.encoder_state()
    assert changed_keys(state2, state) and not any(k.startswith(FIXED) for k in changed_keys(state2, original))
    status = adapter.status()
    assert status["version"] == 2 and status["accepted"] == 2 and status["rejected"] == 0
    assert status["rounds"] == 2 and status["replay_clips"] == 4 and status["last_result"] == "accepted"


@pytest.mark.parametrize("trainable", ["norms", "late"])
def test_trainable_subsets(tmp_path, trainable):
    model = serving_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    adapter, _ = make_adapter(tmp_path, model, trainable=trainable, steps_per_round=1)
    assert adapter.run_round(wait=False).accepted
    changed = changed_keys(adapter.encoder_state(), original)
    assert changed and not any(k.startswith(FIXED) for k in changed)
    last_stage = sum(model.config.stages[:-1])
    for k in changed:
        is_norm = ".norm1." in k or ".norm2." in k
        in_last = k.startswith("blocks.") and int(k.split(".")[1]) >= last_stage
        assert is_norm or (trainable == "late" and in_last), k


def test_fresh_decoder_warms_up_before_the_encoder_moves(tmp_path):
    model = serving_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = Adapter(model, config(decoder_warmup_rounds=1, steps_per_round=1), out_dir=tmp_path / "v")
    rng = np.random.default_rng(0)
    for _ in range(4):
        adapter.add_clip(list(rng.integers(0, 256, size=CLIP, dtype=np.uint8)))  # a list of frames works too
    decoder_before = {k: v.clone() for k, v in adapter.mae.state_dict().items() if not k.startswith("encoder.")}
    res = adapter.run_round(wait=False)
    assert not res.accepted and res.reason.startswith("decoder warm-up") and adapter.version == 0
    assert states_equal(adapter.encoder_state(), original)
    decoder_after = {k: v for k, v in adapter.mae.state_dict().items() if not k.startswith("encoder.")}
    assert changed_keys(decoder_after, decoder_before)
    assert adapter.rejected == 0 and not adapter.decoder_warmup
    assert adapter.run_round(wait=False).accepted and adapter.version == 1


# ---------------------------------------------------------------------------------------------------
# The guard


@pytest.mark.parametrize(
    "changes, reason",
    [({"min_probe_cosine": 1.01}, "embedding drift: probe cosine"),
     ({"max_loss_increase": -0.5}, "probe loss rose")],
)
def test_guard_rejects_and_the_shadow_returns(tmp_path, changes, reason):
    adapter, on_accept = make_adapter(tmp_path, **changes)
    deployed = adapter.encoder_state()
    shadow_before = {k: v.clone() for k, v in adapter.mae.state_dict().items()}
    res = adapter.run_round(wait=False)
    assert not res.accepted and res.reason.startswith(reason) and res.steps == 2
    assert adapter.version == 0 and adapter.rejected == 1 and on_accept.calls == []
    assert states_equal(adapter.mae.state_dict(), shadow_before)  # bit-exact, decoder included
    assert states_equal(adapter.encoder_state(), deployed)
    assert not (tmp_path / "versions").exists() or not any((tmp_path / "versions").iterdir())


# ---------------------------------------------------------------------------------------------------
# Faults: NaN loss, an exception, out of memory, a checkpoint that cannot be written


def _fault_after_one_step(adapter: Adapter, fault: str) -> list[int]:
    """Patch the shadow MAE's forward: the first step's calls are real (a step accumulates one clip per
    call), later ones fail as `fault` says."""
    real = adapter.mae.forward
    calls = [0]

    def forward(x, mask_ratio=0.9, generator=None):
        calls[0] += 1
        out = real(x, mask_ratio, generator)
        if calls[0] <= adapter.config.batch_size:
            return out
        if fault == "nan":
            return dataclasses.replace(out, loss=out.loss * float("nan"))
        if fault == "exception":
            raise KeyError("bug in a step")
        if fault == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 7.79 GiB total capacity)")

    adapter.mae.forward = forward  # nn.Module.__call__ looks the instance attribute up first
    return calls


@pytest.mark.parametrize(
    "fault, reason",
    [("nan", "FloatingPointError: non-finite MAE loss nan"), ("exception", "KeyError: 'bug in a step'"),
     ("oom", "OutOfMemoryError: CUDA out of memory"), ("oom_runtime", "RuntimeError: CUDA out of memory")],
)
def test_fault_in_a_round_keeps_deployed_weights_and_checkpoint(tmp_path, fault, reason):
    adapter, on_accept = make_adapter(tmp_path, steps_per_round=3)
    assert adapter.run_round(wait=False).accepted
    out = tmp_path / "versions"
    on_disk = files(out)
    deployed = adapter.encoder_state()
    shadow = {k: v.clone() for k, v in adapter.mae.state_dict().items()}

    calls = _fault_after_one_step(adapter, fault)
    res = adapter.run_round(wait=False)  # never raises
    assert calls[0] == adapter.config.batch_size + 1 and res.steps == 1  # one real step moved the shadow, then the fault
    assert not res.accepted and res.reason.startswith(reason)
    assert adapter.version == 1 and adapter.rejected == 1 and len(on_accept.calls) == 1
    assert states_equal(adapter.encoder_state(), deployed)
    assert states_equal(adapter.mae.state_dict(), shadow)
    assert files(out) == on_disk  # the last good checkpoint and latest.json, byte for byte
    assert load_checkpoint(Adapter.latest(out)).version == 1

    if fault == "exception":  # the adapter carries on: the next healthy round is accepted
        del adapter.mae.forward
        res = adapter.run_round(wait=False)
        assert res.accepted and res.version == 2 and adapter.kept == [1, 2]


def test_checkpoint_that_cannot_be_written_rejects_the_round(tmp_path, monkeypatch):
    adapter, on_accept = make_adapter(tmp_path)
    assert adapter.run_round(wait=False).accepted
    out = tmp_path / "versions"
    on_disk = files(out)
    deployed = adapter.encoder_state()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adaptation, "save_checkpoint", disk_full)
    res = adapter.run_round(wait=False)  # a round never raises, even when the disk is full
    assert not res.accepted and "No space left on device" in res.reason
    assert adapter.version == 1 and len(on_accept.calls) == 1 and adapter.kept == [1]
    assert states_equal(adapter.encoder_state(), deployed)
    assert files(out) == on_disk
    monkeypatch.undo()
    assert adapter.run_round(wait=False).version == 2


def test_latest_stays_loadable_when_its_update_fails(tmp_path, monkeypatch):
    # keep_versions=1: the old file may go only once latest.json no longer names it
    adapter, _ = make_adapter(tmp_path, keep_versions=1, steps_per_round=1)
    assert adapter.run_round(wait=False).accepted
    out = tmp_path / "versions"
    on_disk = files(out)

    def fail(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(adaptation, "atomic_write_text", fail)
    res = adapter.run_round(wait=False)
    assert not res.accepted and "Input/output error" in res.reason and adapter.version == 1
    latest = Adapter.latest(out)
    assert latest == out / "robot@1.pt" and load_checkpoint(latest).version == 1
    assert files(out) == on_disk  # the unpublished robot@2.pt went away again


# ---------------------------------------------------------------------------------------------------
# Versions on disk: rollback, pruning, latest, restart


def test_rollback_to_a_kept_version_and_to_the_base(tmp_path):
    model = serving_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    adapter, on_accept = make_adapter(tmp_path, model, steps_per_round=1)
    with pytest.raises(ValueError, match=r"already serving the base model \(version 0\)"):
        adapter.rollback()
    assert adapter.run_round(wait=False).accepted and adapter.run_round(wait=False).accepted
    v1, v2 = on_accept.calls[0][0], on_accept.calls[1][0]
    assert changed_keys(v1, v2)

    assert adapter.rollback() == 1  # default: the one before the current
    assert adapter.version == 1 and states_equal(adapter.encoder_state(), v1)
    assert on_accept.calls[-1][1] == 1 and states_equal(on_accept.calls[-1][0], v1)
    assert adapter.rollback(2) == 2 and states_equal(adapter.encoder_state(), v2)
    assert adapter.rollback(0) == 0 and states_equal(adapter.encoder_state(), original)
    assert on_accept.calls[-1][1] == 0 and states_equal(on_accept.calls[-1][0], original)
    with pytest.raises(ValueError, match=r"version 7 is not kept \(kept: \[1, 2\]\)"):
        adapter.rollback(7)

    # after a rollback, new versions get new numbers: v1 and v2 on disk stay what they were
    out = tmp_path / "versions"
    before = files(out)
    res = adapter.run_round(wait=False)
    assert res.accepted and res.version == 3 and adapter.kept == [1, 2, 3]
    assert {k: v for k, v in files(out).items() if k.endswith(("@1.pt", "@2.pt"))} == {
        k: v for k, v in before.items() if k.endswith(".pt")}
    assert Adapter.latest(out) == out / "robot@3.pt"
    assert states_equal(load_model(out / "robot@1.pt", device="cpu").state_dict(), v1)


def test_keep_versions_prunes_old_files(tmp_path):
    adapter, _ = make_adapter(tmp_path, keep_versions=2, steps_per_round=1)
    for _ in range(3):
        assert adapter.run_round(wait=False).accepted
    out = tmp_path / "versions"
    assert sorted(p.name for p in out.iterdir()) == ["latest.json", "robot@2.pt", "robot@3.pt"]
    assert adapter.kept == [2, 3]
    with pytest.raises(ValueError, match="version 1 is not kept"):
        adapter.rollback(1)
    assert adapter.rollback() == 2


def test_pruning_keeps_the_served_versions_ancestors(tmp_path):
    """Accept 1, 2, 3, roll back to 1, accept 4 (from 1): the oldest file was pruned first, so 1 went while the
    abandoned 2 and 3 stayed, and a rollback from 4 skipped to the base."""
    adapter, _ = make_adapter(tmp_path, keep_versions=3, steps_per_round=1)
    for _ in range(3):
        assert adapter.run_round(wait=False).accepted
    assert adapter.rollback() == 2 and adapter.rollback() == 1
    assert adapter.run_round(wait=False).accepted and adapter.version == 4
    assert adapter.kept == [1, 3, 4]  # 2, rolled away from, went first
    assert adapter.rollback() == 1 and adapter.rollback() == 0


def test_latest_finds_the_last_accepted(tmp_path):
    out = tmp_path / "versions"
    assert Adapter.latest(out) is None  # no folder
    out.mkdir()
    assert Adapter.latest(out) is None  # no latest.json
    (out / "latest.json").write_text("{broken")
    assert Adapter.latest(out) is None
    (out / "latest.json").write_text(json.dumps({"version": 4, "file": "robot@4.pt"}))
    assert Adapter.latest(out) is None  # names a file that is gone


def test_restart_resumes_the_last_accepted_version(tmp_path):
    model = serving_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    adapter, _ = make_adapter(tmp_path, model, steps_per_round=1)
    assert adapter.run_round(wait=False).accepted and adapter.run_round(wait=False).accepted
    out = tmp_path / "versions"
    deployed = adapter.encoder_state()

    # a new process: serve the last accepted checkpoint, adapt on from it
    ck = load_checkpoint(Adapter.latest(out))
    served = load_model(Adapter.latest(out), device="cpu")
    assert states_equal(served.state_dict(), deployed)
    resumed = Adapter(served, config(steps_per_round=1), mae_state=ck.model_state, out_dir=out, version=ck.version,
                      reference=model)
    assert resumed.kept == [1, 2] and resumed.version == 2 and resumed.model_id == "robot"
    assert not resumed.decoder_warmup
    rng = np.random.default_rng(5)
    for _ in range(4):
        resumed.add_clip(rng.integers(0, 256, size=CLIP, dtype=np.uint8))
    assert resumed.run_round(wait=False).version == 3
    assert resumed.rollback(0) == 0 and states_equal(resumed.encoder_state(), original)  # the reference model


def test_rollback_walks_back_the_versions_the_served_one_came_from(tmp_path):
    """Rolling back twice goes back two steps, not forth again: after 1, 2, 3, a rollback to 2 and a new round
    4 (adapted from 2), a rollback serves 2, not 3; then 1, then the base. A restart keeps the line."""
    model = serving_model()
    adapter, _ = make_adapter(tmp_path, model, steps_per_round=1)
    for _ in range(3):
        assert adapter.run_round(wait=False).accepted
    assert adapter.rollback() == 2
    assert adapter.run_round(wait=False).version == 4
    out = tmp_path / "versions"
    assert load_checkpoint(out / "robot@4.pt").extra["parents"] == [0, 1, 2]
    assert json.loads((out / "latest.json").read_text())["parents"] == [0, 1, 2]

    # a new process resumes version 4 and rolls back along the same line
    ck = load_checkpoint(Adapter.latest(out))
    resumed = Adapter(load_model(out / "robot@4.pt", device="cpu"), config(steps_per_round=1), mae_state=ck.model_state,
                      out_dir=out, version=ck.version, reference=model)
    assert [resumed.rollback(), resumed.rollback(), resumed.rollback()] == [2, 1, 0]
    with pytest.raises(ValueError, match="already serving the base model"):
        resumed.rollback()


def test_rollback_skips_a_corrupt_version_instead_of_jumping_to_the_base(tmp_path, caplog):
    adapter, on_accept = make_adapter(tmp_path, steps_per_round=1)
    for _ in range(3):
        assert adapter.run_round(wait=False).accepted
    v1 = on_accept.calls[0][0]
    out = tmp_path / "versions"
    data = bytearray((out / "robot@2.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "robot@2.pt").write_bytes(bytes(data))
    adaptation.log.addHandler(caplog.handler)
    try:
        assert adapter.rollback() == 1
    finally:
        adaptation.log.removeHandler(caplog.handler)
    assert states_equal(adapter.encoder_state(), v1) and on_accept.calls[-1][1] == 1
    assert "rollback skips version 2" in caplog.text
    assert json.loads((out / "latest.json").read_text())["version"] == 1


def test_a_failed_rollback_changes_nothing(tmp_path, monkeypatch):
    adapter, on_accept = make_adapter(tmp_path, steps_per_round=1)
    assert adapter.run_round(wait=False).accepted and adapter.run_round(wait=False).accepted
    served, calls, latest = adapter.encoder_state(), len(on_accept.calls), (tmp_path / "versions/latest.json").read_text()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adaptation, "atomic_write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        adapter.rollback()
    assert adapter.version == 2 and len(on_accept.calls) == calls and states_equal(adapter.encoder_state(), served)
    assert (tmp_path / "versions/latest.json").read_text() == latest
    monkeypatch.undo()
    assert adapter.rollback() == 1  # and it still works once the disk has room


def test_a_damaged_version_file_resumes_the_version_before_it(tmp_path, caplog):
    """One flipped byte in the served version's file stopped the node from starting (a fatal parameter error); a
    missing file already fell back. Now the newest readable version it was adapted from is resumed, else the base."""
    from hiera_perception import online
    from hiera_perception.online import resume_serving

    base = serving_model(0)
    adapter, _ = make_adapter(tmp_path, base, steps_per_round=1)
    assert adapter.run_round(wait=False).accepted and adapter.run_round(wait=False).accepted
    out = tmp_path / "versions"
    v1 = load_checkpoint(out / "robot@1.pt")
    raw = bytearray((out / "robot@2.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside a weight: the sha256 tells
    (out / "robot@2.pt").write_bytes(bytes(raw))
    online.log.addHandler(caplog.handler)
    try:
        served, mae_state, resumed = resume_serving(base, out)
        assert resumed and served.version == 1 and states_equal(served.state_dict(), {
            k[len("encoder."):]: v for k, v in v1.model_state.items() if k.startswith("encoder.")})
        assert "cannot resume robot@2.pt" in caplog.text
        (out / "robot@1.pt").write_bytes(b"garbage")
        served, _, resumed = resume_serving(base, out)
        assert served is base and not resumed
    finally:
        online.log.removeHandler(caplog.handler)


def test_versions_of_another_base_are_neither_resumed_nor_rolled_back_to(tmp_path, caplog):
    """The model file was rebuilt (same model id and network, other weights) or its head changed: the versions
    adapted from the old one stay on disk, but the new base serves and never rolls back onto them."""
    from hiera_perception import online
    from hiera_perception.online import resume_serving

    old, _ = make_adapter(tmp_path, serving_model(0), steps_per_round=1)
    assert old.run_round(wait=False).accepted and old.run_round(wait=False).accepted
    out = tmp_path / "versions"
    online.log.addHandler(caplog.handler)
    adaptation.log.addHandler(caplog.handler)
    try:
        rebuilt = serving_model(1)
        served, mae_state, resumed = resume_serving(rebuilt, out)
        assert served is rebuilt and not resumed
        assert "it was adapted from other weights" in caplog.text

        wider = Hiera(get_config(TINY, num_classes=5)).eval()
        wider.labels, wider.model_id = list("abcde"), "robot"
        assert resume_serving(wider, out)[0] is wider and "differs from the served hiera_tiny_8x64 in num_classes" \
            in caplog.text

        new, on_accept = make_adapter(tmp_path, rebuilt, steps_per_round=1)
        assert new.kept == [1, 2] and new.run_round(wait=False).version == 3
        with pytest.raises(ValueError, match="robot@2.pt cannot serve: it was adapted from other weights"):
            new.rollback(2)
        assert new.rollback() == 0 and states_equal(new.encoder_state(), rebuilt.state_dict())
    finally:
        online.log.removeHandler(caplog.handler)
        adaptation.log.removeHandler(caplog.handler)


def test_unreadable_latest_and_leftover_temp_files_are_reported(tmp_path, caplog):
    adapter, _ = make_adapter(tmp_path, steps_per_round=1)
    assert adapter.run_round(wait=False).accepted
    out = tmp_path / "versions"
    (out / ".robot@2.pt.x1y2.tmp").write_bytes(b"half a checkpoint")  # a kill mid-write
    adaptation.log.addHandler(caplog.handler)
    try:
        (out / "latest.json").write_text('{"version": 1, "fi')
        assert Adapter.latest(out) is None and "latest.json cannot be read" in caplog.text
        (out / "latest.json").write_text(json.dumps({"version": 9, "file": "robot@9.pt"}))
        assert Adapter.latest(out) is None and "names robot@9.pt, which is gone" in caplog.text
        make_adapter(tmp_path, steps_per_round=1)
        assert "removing" in caplog.text and not list(out.glob(".*.tmp"))
    finally:
        adaptation.log.removeHandler(caplog.handler)


def test_settings_no_round_could_ever_use_are_refused_or_reported(tmp_path, caplog):
    # hiera_tiny_8x64 has 16 mask units: 0.95 keeps none visible, 0 masks none
    for ratio in (0.0, 0.95):
        with pytest.raises(ValueError, match=f"mask_ratio {ratio} keeps .* of hiera_tiny_8x64's 16 mask units"):
            make_adapter(tmp_path, mask_ratio=ratio)
    # room for 3 clips, 4 needed before the first round: `adapt` waited for them forever, a node said so once
    with pytest.raises(ValueError, match=r"replay_mb 0\.\d+ holds 3 clips of hiera_tiny_8x64 \(0\.09 MB each\), "
                                         r"fewer than min_clips 4: raise replay_mb to 0\.4 or more"):
        make_adapter(tmp_path, clips=6, replay_mb=3.5 * np.prod(CLIP) / 2**20)
    adapter, _ = make_adapter(tmp_path, clips=3, replay_mb=4 * np.prod(CLIP) / 2**20)  # exactly enough
    assert adapter.run_round(wait=False).reason == "waiting for clips (3/4)"
    assert adapter.status()["last_result"] == "waiting for clips (3/4)"


def test_device_share_holds_after_a_long_idle_stretch(tmp_path, monkeypatch):
    """Idle time (waiting for clips, disabled) saves up no more than the share of SHARE_WINDOW_S: afterwards the
    adapter may run that long, then waits as the share says."""
    now = [1000.0]
    monkeypatch.setattr(adaptation.time, "monotonic", lambda: now[0])
    adapter, _ = make_adapter(tmp_path, max_device_share=0.1)
    now[0] += 3600.0  # an hour disabled
    assert adapter._credit() == pytest.approx(0.1 * adaptation.SHARE_WINDOW_S)
    adapter._spent_s += 0.2 + 0.05  # it spends what it saved, and a step more
    assert adapter._credit() == pytest.approx(-0.05)  # so it must wait
    now[0] += 0.5
    assert adapter._credit() == pytest.approx(0.0)  # 0.5 s at 0.1 pays back 0.05 s


# ---------------------------------------------------------------------------------------------------
# The thread


def _count_mae_calls(adapter: Adapter, busy: threading.Event) -> dict[str, int]:
    """Count every MAE pass (training steps and probe scoring) and those made while busy was set."""
    counts = {"all": 0, "while_busy": 0}
    real = adapter.mae.forward_keep

    def forward_keep(x, keep, n_keep=None):
        counts["all"] += 1
        counts["while_busy"] += busy.is_set()
        return real(x, keep, n_keep)

    adapter.mae.forward_keep = forward_keep  # training (forward -> forward_keep) and the probe both pass here
    return counts


def _wait_for(predicate, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_thread_runs_rounds_only_when_inference_is_idle(tmp_path):
    busy = threading.Event()
    busy.set()
    model = serving_model()
    adapter = Adapter(model, config(steps_per_round=2), mae_state=decoder_state(model), out_dir=tmp_path / "v",
                      busy=busy.is_set)
    rng = np.random.default_rng(0)
    for _ in range(4):
        adapter.add_clip(rng.integers(0, 256, size=CLIP, dtype=np.uint8))
    counts = _count_mae_calls(adapter, busy)
    adapter.start()
    try:
        # While inference is busy the thread may start a round but must not compute anything.
        _wait_for(lambda: adapter.rounds >= 1, 10.0)
        time.sleep(0.3)
        assert counts["all"] == 0 and adapter.accepted == 0
        busy.clear()
        assert _wait_for(lambda: adapter.accepted >= 1), adapter.status()
        assert counts["all"] >= 2 + 2  # the steps and the probe passes ran once it was idle
        assert counts["while_busy"] == 0
    finally:
        adapter.stop()
    assert adapter._thread is None
    assert Adapter.latest(tmp_path / "v") is not None and adapter.status()["enabled"]


def test_stop_while_busy_ends_the_round(tmp_path):
    busy = threading.Event()
    busy.set()
    model = serving_model()
    adapter = Adapter(model, config(), mae_state=decoder_state(model), out_dir=tmp_path / "v", busy=busy.is_set)
    rng = np.random.default_rng(0)
    for _ in range(4):
        adapter.add_clip(rng.integers(0, 256, size=CLIP, dtype=np.uint8))
    counts = _count_mae_calls(adapter, busy)
    adapter.start()
    assert _wait_for(lambda: adapter.rounds >= 1, 10.0)
    thread = adapter._thread
    adapter.stop()
    assert not thread.is_alive()
    assert counts["all"] == 0 and adapter.version == 0 and adapter.last.reason == "adapter stopping"
    assert adapter.rejected == 0, "a round cut short by the shutdown is not a rejection"
    assert not (tmp_path / "v").exists()


def test_adapter_thread_caps_its_own_cpu_threads_only(tmp_path):
    adapter, _ = make_adapter(tmp_path, threads=1)
    seen = []
    adapter.run_round = lambda wait=True: seen.append(torch.get_num_threads())  # what a round would run with
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        adapter.start()
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        adapter.stop()
        assert seen and seen[0] == 1  # the adapter's kernels: one thread
        assert torch.get_num_threads() == 2  # the serving thread keeps its own
    finally:
        torch.set_num_threads(before)


def test_serving_thread_leaves_the_adapter_its_cores(tmp_path):
    from hiera_perception.adaptation import AdaptationConfig
    from hiera_perception.online import LiveAdaptation

    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        live = LiveAdaptation(serving_model(), AdaptationConfig(threads=1, min_clips=4, probe_clips=4),
                              tmp_path / "versions")
        live.share_cpu()
        assert torch.get_num_threads() == 3  # adapting: one core is the adapter's
        live.set_enabled(False)
        live.share_cpu()
        assert torch.get_num_threads() == 4  # not adapting: every core serves
    finally:
        torch.set_num_threads(before)


# ---- the alignment term (TTT++-style feature alignment beside the MAE loss) ----


def test_feature_stats_are_the_embeddings_mean_and_variance():
    model = serving_model()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 3, 8, 64, 64, generator=g), torch.randn(2, 3, 8, 64, 64, generator=g)]
    stats = adaptation.feature_stats(model, [(x, None) for x in batches])
    with torch.no_grad():
        emb = model.forward_features(torch.cat(batches))
    assert stats["clips"] == 5 and len(stats["mean"]) == len(stats["var"]) == model.num_features
    assert "class_mean" not in stats  # no labels, no class means
    torch.testing.assert_close(torch.tensor(stats["mean"]), emb.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(stats["var"]), emb.var(0), rtol=1e-5, atol=1e-6)
    json.dumps(stats)  # it travels in a checkpoint's extra
    # each stage's per-channel mean and variance over every token of every clip
    with torch.no_grad():
        _, inter = model.forward_tokens(torch.cat(batches), return_intermediates=True)
    assert [len(s["mean"]) for s in stats["stages"]] == [t.shape[-1] for t in inter] == [32, 64, 128, 256]
    for s, t in zip(stats["stages"], inter):
        t = t.reshape(-1, t.shape[-1])
        torch.testing.assert_close(torch.tensor(s["mean"]), t.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.tensor(s["var"]), t.var(0, unbiased=False), rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="at least 2 clips"):
        adaptation.feature_stats(model, [(batches[1][:1], None)])
    # with labels (head class indices): each class's mean embedding; class 1 has no clip
    labelled = adaptation.feature_stats(model, [(batches[0], torch.tensor([0, 2, 0])), (batches[1], torch.tensor([2, 2]))])
    assert labelled["class_mean"][1] is None and len(labelled["class_mean"]) == len(LABELS)
    torch.testing.assert_close(torch.tensor(labelled["class_mean"][0]), emb[[0, 2]].mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(labelled["class_mean"][2]), emb[[1, 3, 4]].mean(0), rtol=1e-5, atol=1e-6)


def shifted_adapter(tmp_path: Path, align_weight: float, stage_weight: float = 0.0) -> tuple[Adapter, dict]:
    """The source statistics are of bright clips; the camera sends dark ones (a lighting shift). The head is
    sure of class 0 (a bias), so every clip's pseudo-label is 0 and the class term is in play."""
    model = serving_model()
    with torch.no_grad():
        model.head.projection.bias.copy_(torch.tensor([6.0, 0.0, 0.0]))
    rng = np.random.default_rng(1)
    bright = [rng.integers(128, 256, size=CLIP, dtype=np.uint8) for _ in range(8)]
    cfg = model.config
    from hiera_perception.preprocess import preprocess_clip

    x = torch.cat([preprocess_clip(c, 64, cfg.mean, cfg.std, "cpu") for c in bright])
    model.feature_stats = adaptation.feature_stats(model, [(x, torch.arange(8) % len(LABELS))])
    adapter, _ = make_adapter(tmp_path, model, clips=0, align_weight=align_weight, stage_weight=stage_weight,
                              steps_per_round=4, batch_size=4, probe_clips=4, min_clips=8)
    for _ in range(8):
        adapter.add_clip(rng.integers(0, 96, size=CLIP, dtype=np.uint8))
    return adapter, model.feature_stats


def test_alignment_pulls_the_camera_embeddings_to_the_training_statistics(tmp_path):
    adapter, stats = shifted_adapter(tmp_path, align_weight=1.0)
    results = [adapter.run_round(wait=False) for _ in range(4)]
    assert all(r.accepted for r in results)
    assert adapter._probe_classes.tolist() == [0] * 4  # the class term compares the probe clips with class 0's mean
    align = [(r.probe_loss_before - r.probe_mae_before, r.probe_loss_after - r.probe_mae_after) for r in results]
    assert align[0][0] > 0 and align[-1][1] < 0.5 * align[0][0]  # the probe set's statistics moved to the source's
    # every version file carries the source statistics, so it adapts toward the same target when it serves
    path = tmp_path / "versions" / "robot@4.pt"
    assert load_checkpoint(path).extra["feature_stats"] == stats and load_model(path, device="cpu").feature_stats == stats


def test_the_embedding_target_follows_the_cameras_class_mix(tmp_path):
    """The training clips' (mean, var) hold for their own class mix. A camera showing one action for minutes has
    other statistics and nothing to correct: aligned to the mix, one round took the embedded model from 92 to 48% on
    a clean camera that showed only idle. In the training mix the target is the training statistics; for one class,
    that class's mean and the spread within a class."""
    adapter, stats = shifted_adapter(tmp_path, align_weight=1.0)
    assert stats["class_clips"] == [3, 3, 2]  # 8 clips, labels 0, 1, 2, 0, 1, 2, 0, 1
    prior = torch.tensor([3.0, 3.0, 2.0]) / 8
    mean, var = adapter._target(prior)
    torch.testing.assert_close(mean, torch.tensor(stats["mean"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var, torch.tensor(stats["var"]), atol=1e-5, rtol=1e-4)
    mean, var = adapter._target(torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(mean, torch.tensor(stats["class_mean"][1])) and torch.equal(var, adapter._within)
    assert float(var.sum()) < float(torch.tensor(stats["var"]).sum())  # less the spread between the classes
    assert adapter._target(None) is adapter._source


def stage_part(adapter: Adapter, moments: list[torch.Tensor]) -> float:
    """The stage term of a probe objective, from the probe set's token moments."""
    return sum(adaptation.stage_distance(*adaptation._stage_stats(m), src).item()
               for m, src in zip(moments, adapter._stage_source))


def test_stage_alignment_pulls_every_stage_to_the_training_statistics(tmp_path):
    adapter, _ = shifted_adapter(tmp_path, align_weight=0.0, stage_weight=1.0)
    assert len(adapter._stage_source) == 4
    adapter.config.lr = 1e-4  # at 1e-3 the random-weight model's steps overshoot its low-variance channels
    adapter._make_optimizer()
    results = [adapter.run_round(wait=False) for _ in range(4)]
    assert all(r.accepted for r in results)
    stage = [(r.probe_loss_before - r.probe_mae_before, r.probe_loss_after - r.probe_mae_after) for r in results]
    # dark clips against bright clips' statistics: the stage term starts far off and falls
    assert stage[0][0] > 1.0 and stage[-1][1] < 0.5 * stage[0][0]
    # it is the distance of the probe set's token statistics to the source's, summed over the stages
    objective, mae, _, _, moments = adapter._probe_scores()
    assert objective == pytest.approx(results[-1].probe_loss_after, rel=1e-6)
    assert objective - mae == pytest.approx(stage_part(adapter, moments), rel=1e-5)
    assert [m.shape for m in moments] == [(4, 2, c) for c in (32, 64, 128, 256)]


def test_align_weight_zero_or_no_statistics_is_the_mae_loss_alone(tmp_path):
    adapter, _ = shifted_adapter(tmp_path / "zero", align_weight=0.0)
    r = adapter.run_round(wait=False)
    assert r.accepted and r.probe_loss_before == r.probe_mae_before and r.probe_loss_after == r.probe_mae_after
    adapter, _ = make_adapter(tmp_path / "none", align_weight=1.0)  # serving_model() has no feature_stats
    r = adapter.run_round(wait=False)
    assert r.accepted and r.probe_loss_before == r.probe_mae_before
    assert "feature_stats" not in load_checkpoint(tmp_path / "none" / "versions" / "robot@1.pt").extra
    # a model whose statistics predate the stage statistics adapts without the stage term
    model = serving_model()
    stats = adaptation.feature_stats(model, [(torch.randn(2, 3, 8, 64, 64), None)])
    model.feature_stats = {k: v for k, v in stats.items() if k != "stages"}
    adapter, _ = make_adapter(tmp_path / "old", model, stage_weight=1.0)
    assert adapter._stage_source is None and adapter._source is not None
    r = adapter.run_round(wait=False)
    assert r.accepted and adapter._running_stages is None


def test_running_statistics_live_across_rounds_and_a_rejected_round_leaves_them(tmp_path):
    adapter, _ = shifted_adapter(tmp_path, align_weight=1.0, stage_weight=1.0)
    assert adapter.run_round(wait=False).accepted
    # A marker far from any embedding statistic: a round that started over from the probe set would lose it; one
    # that carries the running statistics on keeps momentum**steps of it (0.9**4 * 1000 = 656).
    mean, var = adapter._running
    adapter._running = (mean + 1000.0, var)
    assert adapter.run_round(wait=False).accepted
    assert adapter._running[0].min().item() > 500.0
    carried = (tuple(t.clone() for t in adapter._running), adapter._running_class.clone(),
               [tuple(t.clone() for t in s) for s in adapter._running_stages])
    assert len(carried[2]) == 4
    adapter.config.max_loss_increase = -0.5  # every round is rejected: its batches must not count
    assert not adapter.run_round(wait=False).accepted
    torch.testing.assert_close(adapter._running, carried[0], rtol=0, atol=0)
    torch.testing.assert_close(adapter._running_class, carried[1], rtol=0, atol=0)
    torch.testing.assert_close(adapter._running_stages, carried[2], rtol=0, atol=0)
    # a rollback leaves weights the statistics did not describe: the next round starts them from the probe set
    adapter.config.max_loss_increase = 100.0
    adapter.rollback(0)
    assert adapter._running is None and adapter._running_class is None and adapter._running_stages is None
    assert adapter.run_round(wait=False).accepted
    assert adapter._running[0].abs().max().item() < 100.0


# ---- what serves: the adapted weights blended with the original (WiSE-FT) ----


def test_served_encoder_is_the_blend_and_training_goes_on_from_the_adapted_weights(tmp_path):
    model = serving_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    adapter, on_accept = make_adapter(tmp_path, model, blend=0.5)
    assert adapter.run_round(wait=False).accepted
    adapted = {k[len("encoder."):]: v for k, v in adapter.mae.state_dict().items() if k.startswith("encoder.")}
    served = on_accept.calls[-1][0]
    assert states_equal(served, adapter.encoder_state()) and changed_keys(served, adapted)
    for k in original:
        torch.testing.assert_close(served[k], original[k] + 0.5 * (adapted[k] - original[k]), rtol=0, atol=1e-7)
    path = tmp_path / "versions" / "robot@1.pt"
    assert load_checkpoint(path).extra["blend"] == 0.5
    loaded = load_model(path, device="cpu")  # every reader serves exactly what the node served
    assert states_equal(loaded.state_dict(), served) and loaded.blend == 0.5

    # a restart (with another blend configured): served weights and the original as reference; training goes on
    # from the adapted weights, recovered with the blend the file was written with
    resumed = Adapter(loaded, config(blend=0.9), mae_state=load_checkpoint(path).model_state,
                      out_dir=tmp_path / "versions", version=1, reference=model)
    assert states_equal(resumed.encoder_state(), served)
    for k, v in resumed.mae.encoder.state_dict().items():
        torch.testing.assert_close(v, adapted[k], rtol=0, atol=1e-6)
    assert resumed.save() == path and load_checkpoint(path).extra["blend"] == 0.5  # the blend of what it serves
    assert states_equal(load_model(path, device="cpu").state_dict(), served)

    # a rollback to a kept version serves that version's file exactly, and trains on from its adapted weights
    assert adapter.run_round(wait=False).accepted and adapter.rollback(1) == 1
    assert states_equal(adapter.encoder_state(), served) and states_equal(on_accept.calls[-1][0], served)
    for k, v in adapter.mae.encoder.state_dict().items():
        torch.testing.assert_close(v, adapted[k], rtol=0, atol=1e-6)


def test_blend_one_serves_the_adapted_weights(tmp_path):
    adapter, on_accept = make_adapter(tmp_path, blend=1.0)
    assert adapter.run_round(wait=False).accepted
    adapted = {k[len("encoder."):]: v for k, v in adapter.mae.state_dict().items() if k.startswith("encoder.")}
    assert states_equal(on_accept.calls[-1][0], adapted)
    with pytest.raises(ValueError, match=r"blend must be in \(0, 1\], got 0.0"):
        config(blend=0.0)
    with pytest.raises(ValueError, match="blend must be in"):
        config(blend=1.5)


def test_probe_scores_of_what_serves_are_reused_until_it_changes(tmp_path):
    """A round's "before" is the deployed version's probe score, kept from the round that deployed it (rejected
    rounds leave it, a rollback rescores it), and the original model's probe embeddings are computed once."""
    adapter, _ = make_adapter(tmp_path, steps_per_round=1)
    base_calls = [0]
    real = adapter.base.forward_features

    def counted(x):
        base_calls[0] += 1
        return real(x)

    adapter.base.forward_features = counted
    r1, r2 = adapter.run_round(wait=False), adapter.run_round(wait=False)
    assert r1.accepted and r2.accepted and r2.probe_loss_before == r1.probe_loss_after
    adapter.config.max_loss_increase = -0.5  # nothing passes
    r3, r4 = adapter.run_round(wait=False), adapter.run_round(wait=False)
    assert not r3.accepted and not r4.accepted
    assert r3.probe_loss_before == r4.probe_loss_before == r2.probe_loss_after
    fresh = adapter._probe_scores()  # the shadow is back on the deployed weights: scoring it anew agrees
    assert fresh[:3] == adapter._deployed_scores[:3] and torch.equal(fresh[3], adapter._deployed_scores[3])
    assert base_calls[0] == adapter.config.probe_clips
    adapter.rollback(1)
    assert adapter._deployed_scores is None
    r5 = adapter.run_round(wait=False)
    assert r5.probe_loss_before == pytest.approx(r1.probe_loss_after, rel=1e-4)  # v1 again, through its file
    assert base_calls[0] == adapter.config.probe_clips
