"""Checkpoints: official facebookresearch/hiera files in, our own files in and out, and `load_model`.

Official files (`hiera_base_16x224.pth`, `mae_hiera_base_16x224.pth`, ...) hold the weights under
`model_state`; `filter_official_state_dict` is the one place that maps their keys to ours.

Our files (`.pt`, written atomically) hold everything needed to serve the model again:

    {"format": "hiera_perception", "format_version": 1, "config": HieraConfig.to_dict(),
     "model_state": state_dict, "labels": [...], "model_id": "hiera_tiny_synthetic",
     "version": 3, "step": ..., "weights_sha256": sha256 of the serialized weights, "extra": {...}}

`weights_sha256` is checked on load, so a flipped bit in a weight is an error, not a wrong answer.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hiera_perception.atomic import atomic_write_bytes
from hiera_perception.config import CONFIGS, HieraConfig, config_from_dict, get_config
from hiera_perception.model import Hiera

__all__ = [
    "CheckpointError", "Checkpoint", "save_checkpoint", "load_checkpoint", "weights_sha256", "filter_official_state_dict",
    "official_kwargs", "load_official", "load_model", "mae_state", "shape_mismatches", "resolve_device", "MODELS_DIR",
    "DEFAULT_MODEL",
]

log = logging.getLogger(__name__)

FORMAT = "hiera_perception"
FORMAT_VERSION = 1


def _models_dir() -> Path:
    """models/ at the repo root in a checkout; <prefix>/share/hiera_perception/models once installed
    (pip and colcon both put the package in <prefix>/lib/pythonX.Y/site-packages)."""
    here = Path(__file__).resolve().parent
    for d in (here.parent / "models", (here / "../../../../share/hiera_perception/models").resolve(),
              Path(sys.prefix) / "share" / "hiera_perception" / "models"):
        if d.is_dir():
            return d
    return here.parent / "models"


MODELS_DIR = _models_dir()
DEFAULT_MODEL = "hiera_tiny_synthetic.pt"
RANDOM_SUFFIX = "-random"  # "<config>-random": random weights of a config, said explicitly
_ENCODER_PREFIXES = ("patch_embed.", "pos_embed", "blocks.", "norm.", "head.")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


@dataclass
class Checkpoint:
    config: HieraConfig
    model_state: dict[str, torch.Tensor]
    labels: list[str] = field(default_factory=list)
    model_id: str = ""
    version: int = 0
    step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of the weights, in key order."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # reshape: 0-dim too
    return h.hexdigest()


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    *,
    labels: list[str] | None = None,
    model_id: str = "",
    version: int = 0,
    step: int | None = None,
    extra: dict[str, Any] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` (a Hiera or HieraMAE) with its config and metadata, atomically. `state`: weights to write
    instead of the model's own (the same keys), e.g. an adapted version as it serves."""
    path = Path(path)
    if state is not None and state.keys() != model.state_dict().keys():
        raise ValueError(f"state does not fit {model.config.name}: keys differ from the model's")
    state = {k: v.detach().cpu() for k, v in (model.state_dict() if state is None else state).items()}
    cfg: HieraConfig = model.config
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "kind": "mae" if any(k.startswith("decoder_") for k in state) else "encoder",
        "model_state": state,
        "labels": list(labels or []),
        "model_id": model_id or cfg.name,
        "version": int(version),
        "step": step,
        "weights_sha256": weights_sha256(state),
        "extra": extra or {},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _safe_metadata_globals() -> list:
    """What FAIR-style training files carry beside their weights (numpy scalars and arrays of numbers, the
    run's argparse.Namespace), allowed by name in a weights-only load: plain data, no code runs."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:
        from numpy.core import multiarray
    numeric = np.typecodes["AllInteger"] + np.typecodes["AllFloat"] + "?"  # no object or void dtypes
    return [argparse.Namespace, np.ndarray, np.dtype, *{type(np.dtype(c)) for c in numeric}] + [
        (f, f"{m}.{f.__name__}") for f in (multiarray.scalar, multiarray._reconstruct)
        for m in ("numpy._core.multiarray", "numpy.core.multiarray")]


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        # never weights_only=False (a file is untrusted input); the allowlist for every file, as ours and official
        # ones look alike until read
        with torch.serialization.safe_globals(_safe_metadata_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # an intact file naming a class or function outside the allowlist, or no zip at all (text, a stray download)
        if (unsupported := re.search(r"Unsupported global: GLOBAL (\S+)", str(e))) is not None:
            raise CheckpointError(f"{path}: holds unsupported objects ({unsupported.group(1)}): a weights-only load "
                                  "reads tensors, plain data, numpy numbers and argparse.Namespace only") from e
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
    except Exception as e:  # a damaged file fails anywhere in torch's reader: IndexError, TypeError, zip errors...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from e


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and validate one of our checkpoints."""
    path = Path(path)
    return _checkpoint_from_raw(_torch_load(path), path)


def _checkpoint_from_raw(raw: Any, path: Path) -> Checkpoint:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a hiera_perception checkpoint (for official files use load_official)")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {raw.get('format_version')}, this code reads {FORMAT_VERSION}")
    try:
        cfg = config_from_dict(raw["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid config: {e}") from e
    state = raw.get("model_state")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: no 'model_state' dict of tensors: the file is incomplete or not ours")
    digest = weights_sha256(state)
    if digest != raw.get("weights_sha256"):
        raise CheckpointError(f"{path}: weights sha256 {digest[:16]}... does not match the recorded "
                              f"{str(raw.get('weights_sha256'))[:16]}...: the file is corrupt")
    labels, model_id, version = raw.get("labels", []), raw.get("model_id", ""), raw.get("version", 0)
    if not (isinstance(labels, (list, tuple)) and all(isinstance(x, str) for x in labels) and isinstance(model_id, str)
            and isinstance(version, int) and isinstance(raw.get("extra", {}), dict)):
        raise CheckpointError(f"{path}: labels, model_id, version or extra of the wrong type: the file is corrupt")
    return Checkpoint(cfg, state, list(labels), model_id, version, raw.get("step"), dict(raw.get("extra", {})))


# ---------------------------------------------------------------------------------------------------
# Official checkpoints


def official_kwargs(config: HieraConfig, mae: bool = False) -> dict[str, Any]:
    """Constructor kwargs of the official `Hiera` / `MaskedAutoencoderHiera` for the same network."""
    kw = dict(
        input_size=config.input_size, in_chans=config.in_chans, embed_dim=config.embed_dim,
        num_heads=config.num_heads, num_classes=max(config.num_classes, 1), stages=config.stages,
        q_pool=config.mae_q_pool if mae else config.q_pool, q_stride=config.q_stride,
        mask_unit_size=config.mask_unit_size, mask_unit_attn=config.mask_unit_attn, dim_mul=config.dim_mul,
        head_mul=config.head_mul, patch_kernel=config.patch_kernel, patch_stride=config.patch_stride,
        patch_padding=config.patch_padding, mlp_ratio=config.mlp_ratio, drop_path_rate=config.drop_path_rate,
        head_dropout=config.head_dropout, sep_pos_embed=config.sep_pos_embed,
    )
    if mae:
        kw.update(decoder_embed_dim=config.decoder_embed_dim, decoder_depth=config.decoder_depth,
                  decoder_num_heads=config.decoder_num_heads)
    return kw


def filter_official_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Map official keys onto `model` (our Hiera or HieraMAE); the only key remapping in the package.

    * Hiera: keys are identical. A headless model drops `head.*`; MAE weights loaded as an encoder
      drop the decoder and fusion parts and get a fresh final `norm` (the official MAE has none).
    * HieraMAE: encoder keys move under `encoder.`; the encoder's `norm`/`head` (unused by MAE)
      keep their current values.
    """
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    is_mae = any(k.startswith("encoder.") for k in ours)
    for k, v in state.items():
        if is_mae:
            k = f"encoder.{k}" if k.startswith(_ENCODER_PREFIXES) else k
        elif not k.startswith(_ENCODER_PREFIXES):
            continue  # decoder / fusion weights have no place in an encoder
        if k.startswith("head.") and k not in ours:
            continue  # headless model
        out[k] = v
    for k in ours:  # parts the official file cannot provide keep their initial values
        if k not in out and (k.startswith(("encoder.norm.", "encoder.head.")) or (not is_mae and k.startswith("norm."))):
            out[k] = ours[k]
    return out


def shape_mismatches(state: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> list[str]:
    """`key: file (shape) vs model (shape)` for each tensor of `state` that `ours` holds in another shape."""
    return [f"{k}: file {tuple(v.shape)} vs model {tuple(ours[k].shape)}"
            for k, v in state.items() if k in ours and v.shape != ours[k].shape]


def mae_state(path: str | os.PathLike, config: HieraConfig) -> dict[str, torch.Tensor] | None:
    """The HieraMAE state of a file, ours or official (an official one read as `config`'s network), when it
    holds decoder weights; None for an encoder-only file. One read of the file. Raises CheckpointError."""
    from hiera_perception import weights
    from hiera_perception.mae import HieraMAE

    path = Path(path)
    weights.verify(path)
    raw = _torch_load(path)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        state = _checkpoint_from_raw(raw, path).model_state
    else:
        model = _official_from_raw(raw, path, config, mae=None)
        state = model.state_dict() if isinstance(model, HieraMAE) else {}
    return state if any(k.startswith("decoder_") for k in state) else None


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    wrong = shape_mismatches(state, ours)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path}: weights do not fit {model.config.name}: "
            + "; ".join(f"{n} {len(v)}: {v[:4]}" for n, v in
                        (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if v)
        )
    model.load_state_dict(state, strict=True)


def load_official(path: str | os.PathLike, config: HieraConfig | str, mae: bool | None = False) -> torch.nn.Module:
    """An official `.pth` (weights under `model_state`) -> our Hiera (or HieraMAE with mae=True; mae=None:
    a HieraMAE when the file holds decoder weights, else a Hiera).

    The head size follows the file: a K400 checkpoint gives 400 classes, an MAE file none."""
    from hiera_perception import weights  # verifies files fetched into the cache against their record

    path = Path(path)
    weights.verify(path)
    return _official_from_raw(_torch_load(path), path, config, mae)


def _official_from_raw(raw: Any, path: Path, config: HieraConfig | str, mae: bool | None = False) -> torch.nn.Module:
    if not isinstance(raw, dict) or "model_state" not in raw:
        raise CheckpointError(f"{path}: no 'model_state' entry: not an official Hiera checkpoint")
    state = raw["model_state"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'model_state' is a {type(state).__name__}, not a dict of tensors")
    state = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()}
    if bad := sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor)):
        raise CheckpointError(f"{path}: 'model_state' entries that are not tensors: {bad[:4]}")
    cfg = get_config(config) if isinstance(config, str) else config
    head = state.get("head.projection.weight")
    cfg = cfg.replace(num_classes=int(head.shape[0]) if head is not None else 0)
    if mae is None:
        mae = "decoder_pred.weight" in state
    if mae:
        from hiera_perception.mae import HieraMAE

        if "decoder_pred.weight" not in state:
            raise CheckpointError(f"{path}: no decoder weights: not an official MAE checkpoint")
        model = HieraMAE(cfg)
    else:
        model = Hiera(cfg)
    _load_state(model, filter_official_state_dict(state, model), path)
    return model


# ---------------------------------------------------------------------------------------------------
# The one entry point


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:  # torch's message lists every backend it knows
        raise ValueError(f"device {device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":  # fail here, not with an assert deep in torch at the first .to()
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device} requested but no CUDA GPU is available; use cpu or auto")
        if (dev.index or 0) >= count:
            raise ValueError(f"device {device} requested but only {count} CUDA GPU(s) are available "
                             f"(cuda:0..{count - 1})")
    return dev


def load_model(source: str | os.PathLike | None = None, arch: str | None = None, device: str = "auto") -> Hiera:
    """Load an encoder for inference, in eval mode on `device`.

    source: None (the embedded model), a file name in models/, a path to our checkpoint, a path to an
    official `.pth` (arch names its config, e.g. "hiera_base_16x224"), an official table name
    fetched earlier (`hiera-perception fetch-weights NAME`), or a config name (random weights, with a warning;
    their model_id is "<config>-random" and they carry no label names, so a consumer can tell); "<config>-random"
    says so explicitly.
    The model carries `.labels`, `.model_id` and `.version` for the labeler and the message.
    """
    from hiera_perception import weights

    dev = resolve_device(device)
    # No source is the shipped model, never a file of that name in the working folder.
    source = str(MODELS_DIR / DEFAULT_MODEL) if source is None else str(source)
    path = Path(source)
    if not path.is_file() and (MODELS_DIR / source).is_file():
        path = MODELS_DIR / source
    labels: list[str] = []
    sampling: dict = {}
    stats, blend, trained = None, 1.0, True
    if path.is_file():
        weights.verify(path)
        raw = _torch_load(path)
        if isinstance(raw, dict) and raw.get("format") == FORMAT:
            ck = _checkpoint_from_raw(raw, path)
            if any(k.startswith("decoder_") for k in ck.model_state):  # an MAE checkpoint: serve its encoder
                ck.model_state = {k[len("encoder."):]: v for k, v in ck.model_state.items() if k.startswith("encoder.")}
            model = Hiera(ck.config)
            _load_state(model, ck.model_state, path)
            labels, model_id, version = ck.labels, ck.model_id, ck.version
            sampling = dict(ck.extra.get("sampling", {}))
            stats = ck.extra.get("feature_stats")
            blend = float(ck.extra.get("blend", 1.0))
        else:
            entry = weights.entry_for_path(path)
            arch = arch or (entry.config if entry else None)
            if arch is None:
                raise ValueError(f"{path} is an official checkpoint: name its config with arch=, one of {', '.join(CONFIGS)}")
            model = _official_from_raw(raw, path, arch)
            model_id, version = arch, 0
    elif (cached := weights.resolve(source)) is not None:
        model = load_official(cached, weights.get_entry(source).config)  # an MAE file serves its encoder
        model_id, version = source, 0
    elif (name := source.removesuffix(RANDOM_SUFFIX)) in CONFIGS:
        if source == name and weights.find_entry(name):  # likely meant the published model: say it loudly
            log.warning("model %s: RANDOM weights, its labels mean nothing: the official weights are not fetched "
                        "here (hiera-perception fetch-weights %s --accept-license); say %s%s to mean random weights",
                        name, name, name, RANDOM_SUFFIX)
        else:
            log.warning("model %s: random weights, no checkpoint", source)
        with torch.random.fork_rng(devices=[]):  # the same weights in every process: one id, one set of weights
            torch.manual_seed(0)
            model = Hiera(get_config(name))
        model_id, version, trained = f"{name}{RANDOM_SUFFIX}", 0, False  # never the id or labels of trained weights
    else:
        raise ValueError(
            f"model source {source!r} is neither a file, a file in {MODELS_DIR}, a fetched official checkpoint "
            f"nor a config name ({', '.join(CONFIGS)})"
        )
    if arch and arch != model.config.name:  # a silently ignored arch would hide that another model serves
        raise ValueError(f"arch {arch!r} names the config of an official .pth; model {source!r} is "
                         f"{model.config.name} (leave arch empty)")
    if not labels and model.config.num_classes == 400 and trained:
        labels = weights.kinetics400_labels()  # official K400 heads publish names, not indices
    model.labels = labels
    model.model_id = model_id
    model.version = version
    model.source_path = str(path) if path.is_file() else None  # taught labels persist beside it
    model.sampling = sampling  # clip timing the model was trained with, e.g. {"frame_stride_s": 0.1}
    model.feature_stats = stats  # its training clips' embedding mean and variance (adaptation aligns with them)
    model.blend = blend  # an adapted version serves original + blend x (adapted - original); adaptation inverts it
    return model.eval().to(dev)

