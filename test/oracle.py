"""The official Hiera (facebookresearch/hiera, PyPI `hiera-transformer`) as a test oracle.

Test-only: nothing in `hiera_perception` imports this. `../shared/ORACLE.md` has the facts behind it:
the official package imports timm only for `DropPath` and `Mlp`, but importing timm's package runs its
model zoo, which needs torchvision, and the only torchvision served next to CPU `torch==2.13.0` is a CUDA
build that breaks `import hiera`. So when a plain `import hiera` fails we register empty `timm` and
`timm.models` package modules (their `__init__` files never run) whose search paths point at the real
timm folders, plus a minimal `torchvision` holding the one name timm's layers import at load time
(`torchvision.ops.misc.FrozenBatchNorm2d`, never used by Hiera). `hiera.hiera.Mlp` is then timm's real Mlp.

The official constructor kwargs are derived here from a `HieraConfig` on our own, independently of
`hiera_perception.checkpoint.official_kwargs`, so a wrong mapping there cannot make the oracle agree with
it by construction; `test_model_shapes.py` checks that the two mappings agree.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import sys
import types
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from hiera_perception.config import HieraConfig

__all__ = [
    "hiera",
    "official_kwargs",
    "official_hiera",
    "official_mae",
    "official_embedding",
    "randomize_",
    "build_on_meta",
]


def _stub_package(name: str, path: str) -> types.ModuleType:
    """An empty package module named `name` whose submodules are searched for in folder `path`."""
    module = types.ModuleType(name)
    module.__path__ = [path]
    module.__spec__ = importlib.util.spec_from_loader(name, loader=None, is_package=True)
    module.__spec__.submodule_search_locations = [path]
    return module


def _install_stubs() -> None:
    """Register stub `timm`, `timm.models` and `torchvision` so `import hiera` needs no torchvision."""
    # A failed import leaves half-initialised modules behind: drop them so they are imported afresh.
    for name in list(sys.modules):
        if name.split(".")[0] in ("timm", "torchvision", "hiera"):
            del sys.modules[name]
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the official hiera oracle needs timm installed (pip install --no-deps timm==1.0.31)")
    timm_dir = list(spec.submodule_search_locations)[0]
    sys.modules["timm"] = _stub_package("timm", timm_dir)
    sys.modules["timm.models"] = _stub_package("timm.models", os.path.join(timm_dir, "models"))

    class FrozenBatchNorm2d(nn.Module):  # only imported by timm's layers, never instantiated by Hiera
        def __init__(self, *args, **kwargs) -> None:
            raise RuntimeError("torchvision stub: FrozenBatchNorm2d is unavailable in the test oracle")

    vision = types.ModuleType("torchvision", "stub registered by test/oracle.py: only ops.misc.FrozenBatchNorm2d")
    ops = types.ModuleType("torchvision.ops")
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = FrozenBatchNorm2d
    ops.misc = misc
    vision.ops = ops
    sys.modules.update({"torchvision": vision, "torchvision.ops": ops, "torchvision.ops.misc": misc})


def _import_hiera() -> types.ModuleType:
    with warnings.catch_warnings():
        # timm.models.layers is a deprecated alias of timm.layers and says so on import.
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return importlib.import_module("hiera")
        except (ImportError, RuntimeError):
            # ImportError: no torchvision. RuntimeError: a CUDA torchvision beside CPU torch
            # ("operator torchvision::nms does not exist").
            _install_stubs()
            return importlib.import_module("hiera")


hiera = _import_hiera()


def official_kwargs(config: HieraConfig, mae: bool = False) -> dict:
    """Keyword arguments of `hiera.Hiera` / `hiera.MaskedAutoencoderHiera` with `config`'s architecture."""
    kwargs = dict(
        input_size=tuple(config.input_size),
        in_chans=config.in_chans,
        embed_dim=config.embed_dim,
        num_heads=config.num_heads,
        num_classes=config.num_classes,
        stages=tuple(config.stages),
        q_pool=config.mae_q_pool if mae else config.q_pool,
        q_stride=tuple(config.q_stride),
        mask_unit_size=tuple(config.mask_unit_size),
        mask_unit_attn=tuple(config.mask_unit_attn),
        dim_mul=config.dim_mul,
        head_mul=config.head_mul,
        patch_kernel=tuple(config.patch_kernel),
        patch_stride=tuple(config.patch_stride),
        patch_padding=tuple(config.patch_padding),
        mlp_ratio=config.mlp_ratio,
        drop_path_rate=config.drop_path_rate,
        head_dropout=config.head_dropout,
        head_init_scale=config.head_init_scale,
        sep_pos_embed=config.sep_pos_embed,
    )
    if mae:
        kwargs.update(
            decoder_embed_dim=config.decoder_embed_dim,
            decoder_depth=config.decoder_depth,
            decoder_num_heads=config.decoder_num_heads,
        )
    return kwargs


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _build(factory, seed: int | None) -> nn.Module:
    """factory() with the official init, or, given a seed, on meta then filled by `randomize_` (no init cost)."""
    with warnings.catch_warnings():
        # The official constructors initialise a zero-size head when num_classes == 0 (the MAE then deletes it).
        warnings.simplefilter("ignore", UserWarning)
        if seed is None:
            return factory()
        with build_on_meta():
            model = factory()
    model.to_empty(device="cpu")
    if any(True for _ in model.buffers()):
        raise RuntimeError("official model has buffers that randomize_ would leave uninitialised")
    return randomize_(model, seed)


def official_hiera(config: HieraConfig, seed: int | None = None) -> nn.Module:
    """The official `hiera.Hiera` with `config`'s architecture, in eval mode, head emitting raw logits.

    seed=None keeps the official initialisation; a seed gives `randomize_` weights instead.
    With `num_classes == 0` our model has no head; the official one would hold an empty
    `Linear(C, 0)`, so it is replaced by `nn.Identity` and the official output is then the pooled,
    normed embedding (and its state_dict has no `head.*` keys, like ours).
    """
    model = _build(lambda: hiera.Hiera(**official_kwargs(config)), seed)
    if config.num_classes == 0:
        model.head = nn.Identity()
    else:
        model.head.act_func = _identity  # the official eval head applies softmax; compare raw logits
    return model.eval()


def official_mae(config: HieraConfig, seed: int | None = None) -> nn.Module:
    """The official `hiera.MaskedAutoencoderHiera` with `config`'s architecture (encoder q_pool = mae_q_pool).

    seed=None keeps the official initialisation; a seed gives `randomize_` weights instead."""
    return _build(lambda: hiera.MaskedAutoencoderHiera(**official_kwargs(config, mae=True)), seed).eval()


@torch.no_grad()
def official_embedding(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(output, pooled embedding, intermediates) of an official Hiera on clips `x` [B, 3, T, H, W].

    The embedding is the input of `model.head` (mean over tokens, then the final norm), captured by a
    forward pre-hook, so it is exactly what the official head sees.
    """
    seen: list[torch.Tensor] = []
    handle = model.head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        out, intermediates = model(x, return_intermediates=True)
    finally:
        handle.remove()
    return out, seen[0], intermediates


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Set every parameter to seeded random values, none left at a structured init.

    The official init leaves LayerNorm weights at 1, biases at a constant, and scales the head by 1e-3
    (logits ~1e-3); a parity test on such weights would miss swapped or ignored parameters. Here norms
    get weight 1 + 0.1 n and bias 0.05 n, other biases and position embeddings 0.05 n, other weights
    0.02 n (like the official trunc-normal init), and the head n / sqrt(fan_in), so logits are of order 1.
    """
    gen = torch.Generator().manual_seed(seed)

    def noise(p: torch.Tensor) -> torch.Tensor:
        return torch.randn(p.shape, generator=gen, dtype=p.dtype)

    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.LayerNorm):
                p.copy_(1 + 0.1 * noise(p) if name == "weight" else 0.05 * noise(p))
            elif module_name == "head.projection" and name == "weight":
                p.copy_(noise(p) / math.sqrt(max(p.shape[-1], 1)))
            elif name == "weight" and p.ndim >= 2:
                p.copy_(0.02 * noise(p))
            else:
                p.copy_(0.05 * noise(p))
    return model


@contextlib.contextmanager
def build_on_meta() -> Iterator[None]:
    """Build modules on the meta device (no memory, no init cost), the official ones included.

    The official constructor computes its drop-path schedule with `torch.linspace(...)` then `.item()`,
    which fails on meta tensors; inside this context a linspace without an explicit device stays on CPU.
    """
    real_linspace = torch.linspace

    def cpu_linspace(*args, **kwargs):
        if kwargs.get("device") is None:
            kwargs["device"] = "cpu"
        return real_linspace(*args, **kwargs)

    torch.linspace = cpu_linspace
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.linspace = real_linspace
