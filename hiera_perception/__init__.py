"""hiera_perception: Hiera video action perception for ROS 2.

The core (this package minus the ROS node files) imports neither rclpy nor message packages:

    import hiera_perception as hp
    model = hp.load_model()                     # the embedded model, or a file / official .pth / config
    out = model(clips)                          # [B, 3, T, H, W] -> out.embedding [B, C], out.logits [B, K]
"""

import os

# OpenMP threads that sleep while they wait instead of spinning. Must be set before torch loads its OpenMP
# runtime, hence here. On 2 cores shared with a camera driver, a ROS executor and an adapter thread, spinning
# waiters made torch 10-50x slower (measured while building the embedded model). Set it yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib

# name -> module. Loaded on first use (PEP 562), so that the camera and consumer nodes and `hiera-perception
# --help`, which need no torch, do not pay its import (1.5 s and 200 MiB).
_EXPORTS = {
    "load_checkpoint": "checkpoint", "load_model": "checkpoint", "save_checkpoint": "checkpoint",
    "CONFIGS": "config", "HieraConfig": "config", "get_config": "config",
    "EncoderOutput": "model", "Hiera": "model",
    "preprocess_clip": "preprocess",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"hiera_perception.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'hiera_perception' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
