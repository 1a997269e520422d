"""Our checkpoints (save/load round trip, atomic writes, corruption, mismatches) and `load_model` sources.

Parity of official-format files with the official module is test_parity.py's job; here official files
only check which source `load_model` recognises and what it attaches (labels, id, version).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hiera_perception import atomic, checkpoint, weights
from hiera_perception.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from hiera_perception.config import CONFIGS, get_config
from hiera_perception.mae import HieraMAE
from hiera_perception.model import Hiera

TINY = "hiera_tiny_8x64"
LABELS = ["wave", "idle", "approach"]


def tiny(num_classes: int = 3, seed: int = 0) -> Hiera:
    torch.manual_seed(seed)
    model = Hiera(get_config(TINY, num_classes=num_classes)).eval()
    with torch.no_grad():  # the default head init (x0.001) makes logits near-equal; spread them out
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def clip_batch(seed: int = 0, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *get_config(TINY).input_size, generator=gen)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------
# Round trip


def test_round_trip_keeps_everything(tmp_path):
    model = tiny()
    path = save_checkpoint(tmp_path / "m.pt", model, labels=LABELS, model_id="robot_model", version=3, step=120,
                           extra={"sampling": {"frame_stride_s": 0.1}, "note": "x"})
    assert path == tmp_path / "m.pt"
    ck = load_checkpoint(path)
    assert ck.config == model.config
    assert ck.labels == LABELS and ck.model_id == "robot_model" and ck.version == 3 and ck.step == 120
    assert ck.extra == {"sampling": {"frame_stride_s": 0.1}, "note": "x"}
    assert same_state(ck.model_state, model.state_dict())

    loaded = load_model(path, device="cpu")
    assert isinstance(loaded, Hiera) and not loaded.training
    assert loaded.labels == LABELS and loaded.model_id == "robot_model" and loaded.version == 3
    assert loaded.sampling == {"frame_stride_s": 0.1}
    assert loaded.source_path == str(path)
    assert same_state(loaded.state_dict(), model.state_dict())
    x = clip_batch()
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.embedding, b.embedding) and torch.equal(a.logits, b.logits)


def test_defaults_model_id_is_config_name(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", tiny(num_classes=0))
    ck = load_checkpoint(path)
    assert ck.model_id == TINY and ck.version == 0 and ck.labels == [] and ck.step is None and ck.extra == {}
    loaded = load_model(path, device="cpu")
    assert loaded.head is None and loaded.labels == [] and loaded.sampling == {}


# ---------------------------------------------------------------------------------------------------
# Atomic writes


def test_save_writes_given_weights_of_the_same_keys(tmp_path):
    model = Hiera(get_config("hiera_tiny_8x64", num_classes=3))
    state = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "m.pt", model, state=state)
    assert all(torch.equal(load_checkpoint(tmp_path / "m.pt").model_state[k], v) for k, v in state.items())
    assert not torch.equal(model.state_dict()["head.projection.weight"], state["head.projection.weight"])  # untouched
    with pytest.raises(ValueError, match="keys differ"):
        save_checkpoint(tmp_path / "bad.pt", model, state={k: v for k, v in state.items() if not k.startswith("head.")})
    assert not (tmp_path / "bad.pt").exists()


def test_save_leaves_no_temp_files(tmp_path):
    model = tiny()
    for version in range(3):
        save_checkpoint(tmp_path / "m.pt", model, version=version)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    assert load_checkpoint(tmp_path / "m.pt").version == 2


@pytest.mark.parametrize("fail_in", ["fsync", "replace"])
def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch, fail_in):
    path = save_checkpoint(tmp_path / "m.pt", tiny(seed=0), labels=LABELS, version=1)
    before = sha256(path)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # fsync: the new bytes are written to the temp file but never made durable; replace: the rename fails.
    monkeypatch.setattr(atomic.os, fail_in, boom)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, tiny(seed=1), labels=LABELS, version=2)
    monkeypatch.undo()
    assert sha256(path) == before
    assert load_checkpoint(path).version == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # the temp file went too


# ---------------------------------------------------------------------------------------------------
# Corrupt, foreign and mismatched files


def test_truncated_file(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", tiny())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)
    with pytest.raises(CheckpointError, match=str(path)):
        load_model(path, device="cpu")


def test_any_damage_to_the_file_is_a_checkpoint_error(tmp_path):
    """Single flipped bits in the zip's header or directory made torch's reader fail with IndexError or TypeError
    (a quarter of the first 2 kB, where the pickle lies: IndexError, TypeError, AttributeError, AssertionError), a traceback instead of a CheckpointError."""
    good = save_checkpoint(tmp_path / "m.pt", tiny()).read_bytes()
    offsets = [*range(0, 2048, 17), *range(len(good) - 3072, len(good), 61)]  # the pickle, the zip directory
    other = 0
    for i in offsets:
        raw = bytearray(good)
        raw[i] ^= 1 << (i % 8)
        path = tmp_path / "flipped.pt"
        path.write_bytes(bytes(raw))
        try:
            load_checkpoint(path)
        except CheckpointError:
            continue
        except Exception as e:  # noqa: BLE001 - the point: nothing else may come out
            pytest.fail(f"byte {i}: {type(e).__name__}: {e}")
        other += 1  # a bit no reader looks at (zip comments, padding): the file still loads, verified
    assert other < len(offsets) / 2


def test_fields_of_the_wrong_type_are_a_checkpoint_error(tmp_path):
    for field, value in (("labels", "wave"), ("labels", [1, 2]), ("version", "3"), ("model_id", 7), ("extra", [])):
        path = save_checkpoint(tmp_path / "m.pt", tiny())
        _rewrite(path, **{field: value})
        with pytest.raises(CheckpointError, match="of the wrong type: the file is corrupt"):
            load_checkpoint(path)


def _largest_storage_offset(path: Path) -> tuple[int, int]:
    """(file offset, size) of the largest tensor storage inside the zip (stored, not compressed)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        assert info.compress_type == zipfile.ZIP_STORED
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def test_flipped_bytes_in_a_weight_fail_the_sha256(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", tiny())
    start, size = _largest_storage_offset(path)
    raw = bytearray(path.read_bytes())
    for i in range(start + size // 2, start + size // 2 + 4):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    torch.load(path, map_location="cpu", weights_only=True)  # the zip still opens: only the hash can tell
    with pytest.raises(CheckpointError, match="sha256") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and "corrupt" in str(e.value)
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(path, device="cpu")


def test_weights_sha256_covers_every_tensor_shape():
    a = {"scale": torch.tensor(1.0), "w": torch.ones(2, 3), "empty": torch.zeros(0)}
    assert checkpoint.weights_sha256(a) == checkpoint.weights_sha256({k: v.clone() for k, v in a.items()})
    assert checkpoint.weights_sha256(a) != checkpoint.weights_sha256({**a, "scale": torch.tensor(2.0)})  # 0-dim
    assert checkpoint.weights_sha256(a) != checkpoint.weights_sha256({**a, "w": torch.ones(3, 2)})  # shape


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "absent.pt")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.pt.*not a readable PyTorch checkpoint"):
        load_checkpoint(text)
    official = tmp_path / "official.pt"
    torch.save({"model_state": tiny().state_dict()}, official)
    with pytest.raises(CheckpointError, match="official.pt.*not a hiera_perception checkpoint"):
        load_checkpoint(official)


def _rewrite(path: Path, **changes) -> None:
    raw = torch.load(path, map_location="cpu", weights_only=True)
    raw.update(changes)
    torch.save(raw, path)


def test_wrong_format_version_and_config(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", tiny())
    _rewrite(path, format_version=99)
    with pytest.raises(CheckpointError, match="m.pt: format_version 99"):
        load_checkpoint(path)
    path = save_checkpoint(tmp_path / "c.pt", tiny())
    raw = torch.load(path, map_location="cpu", weights_only=True)
    _rewrite(path, config={**raw["config"], "wings": 2})
    with pytest.raises(CheckpointError, match="c.pt: invalid config.*wings"):
        load_checkpoint(path)
    path = save_checkpoint(tmp_path / "w.pt", tiny())
    _rewrite(path, model_state=None)
    with pytest.raises(CheckpointError, match="w.pt: no 'model_state'"):
        load_checkpoint(path)
    path = save_checkpoint(tmp_path / "d.pt", tiny())
    _rewrite(path, config={**raw["config"], "embed_dim": 33})  # a valid config these 32-wide weights do not fit
    with pytest.raises(CheckpointError, match=r"d\.pt: weights do not fit .*shape mismatch"):
        load_model(path, device="cpu")


@pytest.mark.parametrize(
    "weights_classes, config_classes, problem",
    [(3, 0, "unexpected 2"), (0, 3, "missing 2"), (3, 5, "shape mismatch 2")],
)
def test_config_that_does_not_fit_the_weights(tmp_path, weights_classes, config_classes, problem):
    model = tiny(num_classes=weights_classes)
    model.config = model.config.replace(num_classes=config_classes)  # a file whose config lies
    path = save_checkpoint(tmp_path / "lie.pt", model)
    load_checkpoint(path)  # the file itself is intact (sha256 over what it holds)
    with pytest.raises(CheckpointError) as e:
        load_model(path, device="cpu")
    msg = str(e.value)
    assert str(path) in msg and "do not fit" in msg and problem in msg and "head.projection" in msg


# ---------------------------------------------------------------------------------------------------
# load_model sources


def test_file_name_in_models_dir_and_default(tmp_path, monkeypatch):
    models = tmp_path / "models"
    model = tiny()
    save_checkpoint(models / "shipped_model_for_test.pt", model, labels=LABELS, model_id="shipped", version=2)
    monkeypatch.setattr(checkpoint, "MODELS_DIR", models)
    monkeypatch.chdir(tmp_path)  # the bare name must not resolve against the working directory
    loaded = load_model("shipped_model_for_test.pt", device="cpu")
    assert loaded.model_id == "shipped" and loaded.version == 2 and loaded.labels == LABELS
    assert loaded.source_path == str(models / "shipped_model_for_test.pt")
    assert same_state(loaded.state_dict(), model.state_dict())
    monkeypatch.setattr(checkpoint, "DEFAULT_MODEL", "shipped_model_for_test.pt")
    assert load_model(None, device="cpu").model_id == "shipped"


def test_official_file_with_arch(tmp_path):
    model = tiny(num_classes=5)
    path = tmp_path / "downloaded.pth"
    torch.save({"model_state": model.state_dict()}, path)
    with pytest.raises(ValueError, match="arch=.*hiera_tiny_8x64"):
        load_model(path, device="cpu")
    loaded = load_model(path, arch=TINY, device="cpu")
    assert loaded.config.num_classes == 5  # the head size follows the file
    assert loaded.model_id == TINY and loaded.version == 0 and loaded.labels == [] and loaded.sampling == {}
    assert same_state(loaded.state_dict(), model.state_dict())
    x = clip_batch(1)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize("state, problem", [(None, "'model_state' is a NoneType, not a dict of tensors"),
                                              ([1, 2], "'model_state' is a list"),
                                              ({"head.projection.weight": 3}, "entries that are not tensors")])
def test_official_file_with_a_malformed_model_state(tmp_path, state, problem):
    path = tmp_path / "downloaded.pth"
    torch.save({"model_state": state}, path)
    with pytest.raises(CheckpointError, match=re.escape(problem)):
        load_model(path, arch=TINY, device="cpu")


class _Custom:  # any class outside the weights-only allowlist; its unpickling could run code
    pass


def test_official_file_with_training_metadata(tmp_path):
    # FAIR training files keep numpy numbers and the run's argparse.Namespace beside the weights.
    model = tiny(num_classes=5)
    meta = {"epoch": np.int64(30), "best_acc": np.float32(0.8), "curve": np.arange(3.0),
            "args": argparse.Namespace(lr=1.6e-3, model="hiera_tiny", flags=[np.bool_(True)])}
    path = tmp_path / "trained.pth"
    torch.save({"model_state": model.state_dict(), **meta}, path)
    assert same_state(load_model(path, arch=TINY, device="cpu").state_dict(), model.state_dict())
    # the same, written under numpy 1 (as the official files were): numpy.core, not numpy._core
    torch.save({"model_state": model.state_dict(), **meta}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()  # a legacy (non-zip) file: its pickles end at STOP, so a name may change length
    assert b"numpy._core.multiarray" in data
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert same_state(load_model(path, arch=TINY, device="cpu").state_dict(), model.state_dict())
    torch.save({"model_state": model.state_dict(), "hook": _Custom()}, path)
    with pytest.raises(CheckpointError, match=r"trained\.pth: holds unsupported objects \(.*_Custom\)") as e:
        load_model(path, arch=TINY, device="cpu")
    assert "corrupt" not in str(e.value)


def test_official_file_recognised_by_its_name(tmp_path):
    entry = weights.find_entry("hiera_base_16x224")
    path = tmp_path / entry.filename  # hiera_base_16x224.pth, holding tiny weights
    torch.save({"model_state": tiny().state_dict()}, path)
    # No arch given: the file name picks hiera_base_16x224, whose shapes these weights do not have.
    with pytest.raises(CheckpointError, match=r"hiera_base_16x224\.pth: weights do not fit hiera_base_16x224"):
        load_model(path, device="cpu")
    assert weights.entry_for_path(tmp_path / "renamed.pth") is None


def test_official_mae_file_serves_its_encoder(tmp_path):
    torch.manual_seed(2)
    mae = HieraMAE(get_config(TINY))
    # the official MAE layout: encoder keys at the top level, no final norm, no head
    state = {k[len("encoder."):] if k.startswith("encoder.") else k: v for k, v in mae.state_dict().items()
             if not k.startswith(("encoder.norm.", "encoder.head."))}
    path = tmp_path / "mae.pth"
    torch.save({"model_state": state}, path)
    loaded = load_model(path, arch=TINY, device="cpu")
    assert loaded.head is None
    for k, v in loaded.state_dict().items():
        if not k.startswith("norm."):
            assert torch.equal(v, mae.encoder.state_dict()[k]), k


def test_our_mae_checkpoint_serves_the_encoder_with_its_head(tmp_path):
    model = tiny(num_classes=3)
    mae = HieraMAE(model.config, encoder=model)
    path = save_checkpoint(tmp_path / "mae.pt", mae, labels=LABELS, model_id="adapted", version=4)
    assert any(k.startswith("decoder_") for k in load_checkpoint(path).model_state)
    loaded = load_model(path, device="cpu")
    assert isinstance(loaded, Hiera) and loaded.head is not None
    assert loaded.labels == LABELS and loaded.model_id == "adapted" and loaded.version == 4
    assert same_state(loaded.state_dict(), model.state_dict())


def test_config_name_gives_random_weights_with_a_warning(caplog):
    # The handler goes on the module's logger: the launch_testing pytest plugin turns propagation off.
    logger = logging.getLogger(checkpoint.__name__)
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger=checkpoint.__name__):
            model = load_model(TINY, device="cpu")
    finally:
        logger.removeHandler(caplog.handler)
    assert any("random weights" in r.getMessage() and TINY in r.getMessage() for r in caplog.records)
    assert isinstance(model, Hiera) and model.config == CONFIGS[TINY]
    assert model.model_id == f"{TINY}-random" and model.version == 0 and model.labels == []  # not a trained model's
    assert model.source_path is None
    # the same weights in every process, whatever the global RNG did before (one id must mean one set of weights:
    # taught labels and published embeddings of "<config>-random@0" were another model's in the next run)
    torch.manual_seed(123)
    again = load_model(f"{TINY}-random", device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert torch.initial_seed() == 123  # the caller's RNG is left alone


def test_random_weights_of_an_official_config_do_not_pass_for_the_model(tmp_path, monkeypatch, caplog, request):
    # Not fetched: random weights (the Python API's contract for a config name), whose id and labels must not look
    # like the Kinetics-400 model's, and a warning that says how to fetch the real ones; <config>-random says it.
    checkpoint.log.addHandler(caplog.handler)  # launch_testing's logger class does not propagate to caplog's root
    request.addfinalizer(lambda: checkpoint.log.removeHandler(caplog.handler))
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path))
    model = load_model("hiera_base_16x224", device="cpu")
    assert model.config.num_classes == 400 and model.model_id == "hiera_base_16x224-random" and model.labels == []
    assert "RANDOM weights" in caplog.text and "fetch-weights hiera_base_16x224 --accept-license" in caplog.text
    explicit = load_model("hiera_base_16x224-random", device="cpu")
    assert explicit.model_id == "hiera_base_16x224-random" and explicit.config == model.config
    assert load_model(f"{TINY}-random", device="cpu").model_id == f"{TINY}-random"


def test_unknown_source_lists_the_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as e:
        load_model("no_such_model", device="cpu")
    msg = str(e.value)
    assert "'no_such_model'" in msg and "neither a file" in msg
    assert all(name in msg for name in CONFIGS)


def test_k400_head_gets_kinetics_names(tmp_path):
    model = tiny(num_classes=400)
    path = tmp_path / "k400.pth"
    torch.save({"model_state": model.state_dict()}, path)
    loaded = load_model(path, arch=TINY, device="cpu")
    assert loaded.labels == weights.kinetics400_labels()
    # our own checkpoint of a 400-class head without names gets them too; with names it keeps its own
    ours = save_checkpoint(tmp_path / "k400.pt", model)
    assert load_model(ours, device="cpu").labels[0] == "abseiling"
    named = [f"c{i}" for i in range(400)]
    ours = save_checkpoint(tmp_path / "named.pt", model, labels=named)
    assert load_model(ours, device="cpu").labels == named


def test_resolve_device(monkeypatch):
    assert checkpoint.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert checkpoint.resolve_device("auto").type == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=f"device {device} requested but no CUDA GPU is available"):
            checkpoint.resolve_device(device)
    with pytest.raises(ValueError, match="no CUDA GPU"):  # before building anything
        load_model(TINY, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert checkpoint.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"device cuda:1 requested but only 1 CUDA GPU\(s\)"):
        checkpoint.resolve_device("cuda:1")
    with pytest.raises(ValueError, match="device 'foo' is not a device: use auto, cpu, cuda or cuda:N"):
        checkpoint.resolve_device("foo")  # torch raises a RuntimeError the CLI would print as a traceback


def test_no_source_is_the_shipped_model_whatever_the_working_folder_holds(tmp_path, monkeypatch):
    # a file named like the embedded model in the working folder was served (and taught beside) in its place
    if not (checkpoint.MODELS_DIR / checkpoint.DEFAULT_MODEL).is_file():
        pytest.skip("the embedded model is not built yet")
    save_checkpoint(tmp_path / checkpoint.DEFAULT_MODEL, Hiera(get_config(TINY)), model_id="impostor")
    monkeypatch.chdir(tmp_path)
    model = load_model(device="cpu")
    assert model.model_id != "impostor" and Path(model.source_path).parent == checkpoint.MODELS_DIR
    assert load_model(checkpoint.DEFAULT_MODEL, device="cpu").model_id == "impostor"  # named: the file here


def test_an_arch_that_does_not_apply_is_an_error(tmp_path):
    # arch names an official .pth's config; given with any other model it was silently ignored.
    path = save_checkpoint(tmp_path / "ours.pt", Hiera(get_config(TINY)))
    assert load_model(path, arch=TINY, device="cpu").config.name == TINY  # the file's own config: fine
    with pytest.raises(ValueError, match=f"arch 'hiera_base_16x224' names .*; model .* is {TINY}"):
        load_model(path, arch="hiera_base_16x224", device="cpu")
    with pytest.raises(ValueError, match=f"is {TINY} \\(leave arch empty\\)"):
        load_model(TINY, arch="hiera_small_8x96", device="cpu")
