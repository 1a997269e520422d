# Copyright 2025 hiera_perception maintainers. Licensed under the Apache License, Version 2.0.
"""The perception node's parameters: one table (name -> default, descriptor), and the typed config read from it.

Every parameter is declared from `PARAMETERS` with a descriptor (description, range), so `ros2 param describe`
documents it; `config/perception.yaml` lists them all with their defaults. The `adaptation.*` parameters that
configure the Adapter take their defaults from `AdaptationConfig` and are validated by it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from rcl_interfaces.msg import ParameterDescriptor

from hiera_perception.adaptation import AdaptationConfig
from hiera_perception.engine import PRECISIONS
from hiera_perception.ros_params import describe as _desc

__all__ = ["ConfigError", "NodeConfig", "PARAMETERS", "INPUTS", "config_from"]

INPUTS = ("raw", "compressed")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class ConfigError(ValueError):
    """A parameter value the node cannot run with; the message names the parameter and value."""


@dataclass(frozen=True)
class NodeConfig:
    model: str
    arch: str
    device: str
    precision: str
    cuda_graph: bool
    compile: bool
    top_k: int
    frame_stride_s: float
    hop_s: float
    max_gap_s: float
    queue_size: int
    input: str
    output_topic: str
    diagnostics_period_s: float
    frame_id: str
    prototypes_file: str
    adaptation_enabled: bool
    adaptation_dir: str
    adaptation_resume: bool
    adaptation_reconstruction_period_s: float
    adaptation: AdaptationConfig = field(default_factory=AdaptationConfig)

    def validate(self) -> None:
        """Checks the descriptors cannot express; ranges and types are enforced on declaration."""
        if not _DEVICE_RE.match(self.device):
            raise ConfigError(f"parameter device: {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"parameter precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.input not in INPUTS:
            raise ConfigError(f"parameter input: {self.input!r} is not one of {', '.join(INPUTS)}")
        if not self.output_topic.strip():
            raise ConfigError("parameter output_topic: must not be empty")
        if self.device.startswith("cuda"):
            import torch

            index = int(self.device.partition(":")[2] or 0)
            if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                raise ConfigError(f"parameter device: {self.device!r} but this machine has "
                                  f"{torch.cuda.device_count()} CUDA device(s); use auto or cpu")




_ADAPT = AdaptationConfig()  # the defaults of the adaptation.* parameters that configure the Adapter

# name -> (default, descriptor). Only top_k can change at run time; the rest need a restart and are read-only
# (_RUNTIME below), so `ros2 param describe` and rqt_reconfigure show them so (adaptation on and off at run
# time: the ~/adaptation/enable service).
PARAMETERS: dict[str, tuple[Any, ParameterDescriptor]] = {
    "model": ("", _desc('Checkpoint file, a file name in models/, a fetched official name, or <config>-random '
                        '(random weights); "" = the embedded default model')),
    "arch": ("", _desc('Config name for an official .pth checkpoint (e.g. hiera_base_16x224); "" = from the file')),
    "device": ("auto", _desc("auto (cuda when available), cpu, cuda or cuda:N")),
    "precision": ("fp32", _desc(f"Inference precision: {' | '.join(PRECISIONS)}")),
    "cuda_graph": (True, _desc("On a GPU, replay the encoder from a captured CUDA graph (one launch per clip; "
                               "ignored on CPU)")),
    "compile": (False, _desc("On a GPU, torch.compile the encoder at start (tens of seconds; then a faster "
                             "forward; ignored on CPU)")),
    "top_k": (5, _desc("Labels (best first) in each message; can change at run time", 1, 1000)),
    "frame_stride_s": (0.0, _desc("Seconds between a clip's frames on the camera timeline; 0 = the model's own",
                                  0.0, 10.0)),
    "hop_s": (0.5, _desc("Seconds between the starts of consecutive clips", 0.01, 60.0)),
    "max_gap_s": (1.0, _desc("A gap between frame stamps longer than this restarts the clip", 0.01, 3600.0)),
    "queue_size": (4, _desc("Clips waiting for the model; when full the oldest is dropped (counted)", 1, 256)),
    "input": ("raw", _desc("raw: sensor_msgs/Image on `image`; compressed: sensor_msgs/CompressedImage on "
                           "`image/compressed` (the base topic `image` is what you remap)")),
    "output_topic": ("action_features", _desc("Topic of the hiera_perception_msgs/ActionFeatures output")),
    "diagnostics_period_s": (1.0, _desc("Seconds between /diagnostics reports", 0.1, 3600.0)),
    "frame_id": ("", _desc('Output header.frame_id; "" = the camera\'s frame_id')),
    "prototypes_file": ("", _desc('File of the labels taught with ~/teach; "" = <model file>.prototypes.json '
                                  'when its folder is writable, else ~/.local/state/hiera_perception/prototypes/. '
                                  'Shared by every node serving that model: a label taught to the robot is the '
                                  "robot's")),
    "adaptation.enabled": (False, _desc("On-device MAE adaptation of the encoder at start (turn it on and off "
                                        "at run time with the ~/adaptation/enable service)")),
    "adaptation.dir": ("", _desc('Folder of the adapted versions (checkpoints, latest.json); "" = '
                                 '~/.local/state/hiera_perception/adaptation/<model_id> for the node '
                                 '/hiera_perception, .../adaptation/<model_id>/<namespace>/<name> for any other '
                                 '(each node adapts to its own camera)')),
    "adaptation.resume": (True, _desc("Start from the last accepted version in adaptation.dir (false: from the "
                                      "base model; kept versions stay available to rollback)")),
    "adaptation.reconstruction_period_s": (20.0, _desc(
        "Seconds between ~/reconstruction images (input | masked | MAE reconstruction); 0 = none", 0.0, 86400.0)),
    # AdaptationConfig fields, same names (adaptation.py has the semantics)
    "adaptation.lr": (_ADAPT.lr, _desc("AdamW learning rate of the adaptation steps", 1e-12, 1.0)),
    "adaptation.mask_ratio": (_ADAPT.mask_ratio, _desc("Share of mask units dropped in each MAE step", 0.0, 0.99)),
    "adaptation.steps_per_round": (_ADAPT.steps_per_round, _desc("MAE steps between two guard checks", 1, 100000)),
    "adaptation.batch_size": (_ADAPT.batch_size, _desc("Clips per MAE step", 1, 1024)),
    "adaptation.grad_clip": (_ADAPT.grad_clip, _desc("Gradient norm clip", 1e-12, 1.0e6)),
    "adaptation.trainable": (_ADAPT.trainable, _desc("Encoder parameters that train: all | norms (LayerNorms) | "
                                                     "late (last stage + norms)")),
    "adaptation.align_weight": (_ADAPT.align_weight, _desc(
        "Weight of the distance of the camera's embedding mean/variance and per-class means to the training "
        "clips' (the model's feature_stats) beside the MAE loss; 0 = MAE alone", 0.0, 1.0e6)),
    "adaptation.stage_weight": (_ADAPT.stage_weight, _desc(
        "Weight of the distance of each encoder stage's per-channel token mean/variance to the training clips' "
        "(the model's feature_stats), in units of their spread; 0 = none", 0.0, 1.0e6)),
    "adaptation.replay_mb": (_ADAPT.replay_mb, _desc("Memory cap of the replay buffer of recent clips, MB",
                                                     1.0, 1.0e6)),
    "adaptation.min_clips": (_ADAPT.min_clips, _desc("Clips in the replay before the first round", 1, 100000)),
    "adaptation.probe_clips": (_ADAPT.probe_clips, _desc("Clips of the fixed probe set the guard scores", 1, 4096)),
    "adaptation.min_probe_cosine": (_ADAPT.min_probe_cosine, _desc(
        "Reject a round whose probe embeddings' mean cosine to the original model falls below this", -1.0, 1.0)),
    "adaptation.max_loss_increase": (_ADAPT.max_loss_increase, _desc(
        "Reject a round whose probe MAE loss + mean/variance and stage alignment exceeds the deployed one by more "
        "than this fraction", 0.0, 1.0e6)),
    "adaptation.max_device_share": (_ADAPT.max_device_share, _desc(
        "Largest share of wall time spent in adaptation (it also yields whenever inference has work)", 0.01, 1.0)),
    "adaptation.threads": (_ADAPT.threads, _desc(
        "CPU threads of the adaptation thread's kernels (inference keeps its own); 0 = torch's default", 0, 1024)),
    "adaptation.round_interval_s": (_ADAPT.round_interval_s, _desc("Pause between two rounds, s", 0.0, 86400.0)),
    "adaptation.keep_versions": (_ADAPT.keep_versions, _desc("Accepted versions kept on disk", 1, 10000)),
    "adaptation.blend": (_ADAPT.blend, _desc(
        "What serves is original + blend x (adapted - original) (weight-space ensembling, WiSE-FT); training "
        "goes on from the adapted weights; 1 = serve them as they are", 0.01, 1.0)),
    "adaptation.decoder_warmup_rounds": (_ADAPT.decoder_warmup_rounds, _desc(
        "Rounds training a fresh decoder alone, for a model whose checkpoint has no decoder weights", 0, 10000)),
}
_RUNTIME = ("top_k",)  # what the node applies at run time; every other parameter is read-only
for _name, (_, _descriptor) in PARAMETERS.items():
    _descriptor.read_only = _name not in _RUNTIME
_ADAPTATION_FIELDS = tuple(n.partition(".")[2] for n in PARAMETERS
                           if n.startswith("adaptation.") and hasattr(_ADAPT, n.partition(".")[2]))


def config_from(values: dict[str, Any]) -> NodeConfig:
    """Parameter values (by name) -> NodeConfig; the adaptation.* fields of AdaptationConfig go into one."""
    flat = {n.replace(".", "_"): v for n, v in values.items()
            if not (n.startswith("adaptation.") and n.partition(".")[2] in _ADAPTATION_FIELDS)}
    try:
        adaptation = AdaptationConfig(**{f: values[f"adaptation.{f}"] for f in _ADAPTATION_FIELDS})
    except ValueError as e:
        raise ConfigError(f"parameter adaptation.{e}") from None  # the message starts with the field's name
    return NodeConfig(**flat, adaptation=adaptation)
