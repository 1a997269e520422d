"""Child process of test_adaptation_kill.py: adapts a tiny model forever, checkpointing every accepted round.

Usage: python adaptation_kill_child.py OUT_DIR SEED

It resumes from the last accepted version in OUT_DIR, as a restarted node would, so every kill lands on
a folder that already holds good versions and the next run builds on what the kill left behind.
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import torch

from hiera_perception.adaptation import AdaptationConfig, Adapter
from hiera_perception.checkpoint import load_checkpoint, load_model
from hiera_perception.config import get_config
from hiera_perception.mae import HieraMAE
from hiera_perception.model import Hiera


def main(out_dir: str, seed: int) -> None:
    torch.set_num_threads(1)
    latest = Adapter.latest(out_dir)
    if latest is None:
        torch.manual_seed(0)
        model = Hiera(get_config("hiera_tiny_8x64", num_classes=3)).eval()
        model.labels, model.model_id, model.version = ["wave", "idle", "approach"], "robot", 0
        mae_state = HieraMAE(model.config, encoder=copy.deepcopy(model)).state_dict()
    else:
        model = load_model(latest, device="cpu")
        mae_state = load_checkpoint(latest).model_state
    # a guard every finite candidate passes: each round ends in a checkpoint write (one-clip steps: MAE alone)
    config = AdaptationConfig(lr=1e-4, steps_per_round=1, batch_size=1, min_clips=2, probe_clips=1, align_weight=0.0,
                              min_probe_cosine=-1.0, max_loss_increase=1e9, keep_versions=3, seed=seed)
    adapter = Adapter(model, config, mae_state=mae_state, out_dir=out_dir, version=model.version)
    rng = np.random.default_rng(seed)
    for _ in range(2):
        adapter.add_clip(rng.integers(0, 256, size=(8, 64, 64, 3), dtype=np.uint8))
    while True:
        adapter.run_round(wait=False)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
