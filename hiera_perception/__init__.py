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

from hiera_perception.checkpoint import load_checkpoint, load_model, save_checkpoint
from hiera_perception.config import CONFIGS, HieraConfig, get_config
from hiera_perception.model import EncoderOutput, Hiera
from hiera_perception.preprocess import preprocess_clip

__all__ = [
    "CONFIGS", "EncoderOutput", "Hiera", "HieraConfig", "get_config", "load_checkpoint", "load_model",
    "preprocess_clip", "save_checkpoint",
]
__version__ = "0.1.0"
