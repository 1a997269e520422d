"""The inference engine: uint8 frames of a clip in, embedding + labels out.

Owns the model, its device and precision, and the preprocessing, so the node, the CLI and the
benchmarks run exactly the same path. Not thread-safe by design: one worker thread owns it.

On a GPU a batch travels as uint8 through pinned memory and is normalised there. Two options cut the
per-clip overhead of a small batch, where hundreds of kernel launches cost more than the arithmetic:
`cuda_graph` captures normalise + encoder + head once per batch size and replays it (the weights are
updated in place by adaptation swaps, so a captured graph stays valid), and `compile` runs that same
function through torch.compile (tens of seconds at start). On an H200 with Hiera-B 16x224 in bf16, a clip's
forward took 14 ms eagerly, 4 ms replayed and 3 ms compiled and replayed (benchmarks/results/h200/engine_cuda_*;
the H100 in benchmarks/results/ alike), so graphs are on by default and compile is opt-in; both are ignored on CPU.

`device_resize` takes full-size frames (a ClipBuffer(shrink_newest=False) leaves the one that completes a clip
so) to the device as their centre squares and shrinks them there (`preprocess.AreaResize`, the same pixels as
the host's INTER_AREA). On the H100 machine the push that completed a clip (`push`: then two host resizes of a
640x480 frame, the newest and the one before it) took 2.8-4.0 ms of a clip's 7.3-8.5 ms (p50,
benchmarks/results/engine_cuda_bf16*.json); the clip buffer now shrinks a steady camera's frames as they arrive and
completes a clip with its last frame, so that push resizes one frame, the one this option moves. Off by default
until a GPU benchmark shows it pays (benchmarks/gpu.sh runs it).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from hiera_perception.checkpoint import load_model, resolve_device
from hiera_perception.cuda_graph import CudaGraph
from hiera_perception.labeler import Labeler, Prototypes, default_prototypes_file
from hiera_perception.model import Hiera
from hiera_perception.preprocess import AreaResize, centre_square, crop_resize, normalize

__all__ = ["Engine", "ClipResult", "PRECISIONS"]

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "bf16")
MAX_GRAPH_BATCH = 16  # a graph per batch size up to this; larger batches run eagerly (launches matter less)


@dataclass
class ClipResult:
    embedding: np.ndarray  # [C] float32
    labels: list[str]
    scores: list[float]


class Engine:
    def __init__(self, model: Hiera | str | None = None, device: str = "auto", precision: str = "fp32", top_k: int = 5,
                 prototypes_file: str | None = None, cuda_graph: bool = True, compile: bool = False,
                 device_resize: bool = False):
        """prototypes_file: where taught labels persist (default: beside the model's file if that folder is
        writable, else in the state folder; none for a model without a file).
        cuda_graph / compile: replay captured CUDA graphs / use torch.compile (GPU only, see above).
        device_resize: shrink full-size frames on the device rather than the host (see above; any device)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = resolve_device(device)
        self.model = model if isinstance(model, Hiera) else load_model(model, device=str(self.device))
        self.model.to(self.device).eval()
        self.precision = precision
        cfg = self.model.config
        if len(cfg.input_size) != 3 or cfg.input_size[1] != cfg.input_size[2]:
            # frames are cut to their centre square: a [T, H, W] input with H != W would fail on every clip
            raise ValueError(f"the engine serves video models of square frames, [T, S, S]; {cfg.name} takes "
                             f"{list(cfg.input_size)}")
        self.num_frames, self.size = cfg.input_size[0], cfg.input_size[1]
        source = getattr(self.model, "source_path", None)
        # a model without a file keeps none unless told where (the node gives it one in the state folder)
        proto_path = prototypes_file or (default_prototypes_file(self.model) if source else None)
        self.prototypes = Prototypes(cfg.num_features, proto_path)
        head = self.model.head.projection if self.model.head is not None else None
        self.labeler = Labeler(getattr(self.model, "labels", []), head, top_k, self.prototypes)
        # Seconds between a clip's frames: what the model was trained with (stored in our checkpoints),
        # else the official Kinetics sampling of every 4th frame at 30 fps.
        self.frame_stride_s = float(getattr(self.model, "sampling", {}).get("frame_stride_s", 4 / 30))
        gpu = self.device.type == "cuda"
        self._mean = torch.tensor(cfg.mean, device=self.device)
        self._std = torch.tensor(cfg.std, device=self.device)
        self.cuda_graph = cuda_graph and gpu
        self._net = torch.compile(self._run, dynamic=False) if compile and gpu else self._run
        self._graphs: dict[int, CudaGraph] = {}
        self._host: dict[int, torch.Tensor] = {}
        self._resize = AreaResize(self.size, self.device) if device_resize else None
        self._staging: dict[tuple[int, int], torch.Tensor] = {}  # (frames, side) -> host buffer of squares
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graph else None  # one memory pool for all sizes

    @property
    def encoder_version(self) -> str:
        """"<model id>@<adaptation version>", the ActionFeatures.encoder_version string."""
        return f"{getattr(self.model, 'model_id', self.model.config.name)}@{getattr(self.model, 'version', 0)}"

    def _run(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 clips [B, T, S, S, 3] on the device -> (embedding, logits): the part a graph captures."""
        x = normalize(clips, self._mean, self._std)
        # No autocast weight cache: a captured graph must recast the weights that adaptation updates.
        amp = (torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False) if self.precision == "bf16"
               else contextlib.nullcontext())
        with amp:
            out = self.model(x)
        return out.embedding, out.logits

    def _host_batch(self, clips: Sequence[Sequence[np.ndarray]]) -> tuple[torch.Tensor, dict[int, list]]:
        """The clips' frames, resized, written once into a reused [B, T, S, S, 3] uint8 host buffer
        (pinned on a GPU, so the upload is one asynchronous copy). With device_resize, frames larger than S
        are left out and returned as {side: [(clip, frame, centre square)]} for the device to shrink."""
        for c in clips:
            if len(c) != self.num_frames:
                raise ValueError(f"a clip must have {self.num_frames} frames for {self.model.config.name}, got {len(c)}")
        B = len(clips)
        buf = self._host.get(B)
        if buf is None:
            shape = (B, self.num_frames, self.size, self.size, 3)
            buf = torch.empty(shape, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            if B <= MAX_GRAPH_BATCH:
                self._host[B] = buf
        view, large = buf.numpy(), {}
        for i, c in enumerate(clips):
            for j, f in enumerate(c):
                f = np.asarray(f)
                if f.dtype != np.uint8:  # the buffer would cast it silently: a [0, 1] float frame reads as black
                    raise ValueError(f"frames must be uint8 RGB, got {f.dtype}")
                if self._resize is not None and min(f.shape[:2]) > self.size:  # larger than S: shrink on the device
                    square = centre_square(f)
                    large.setdefault(len(square), []).append((i, j, square))
                else:
                    view[i, j] = crop_resize(f, self.size)
        return buf, large

    def _device_batch(self, buf: torch.Tensor, large: dict[int, list]) -> torch.Tensor:
        """The host batch on the device, with the frames left large shrunk there into their places."""
        x = buf.to(self.device, non_blocking=True)
        for side, items in large.items():
            stage = self._staging.get((len(items), side))
            if stage is None:
                stage = torch.empty((len(items), side, side, 3), dtype=torch.uint8,
                                    pin_memory=self.device.type == "cuda")
                self._staging[(len(items), side)] = stage  # one entry per camera size and clip count
            sv = stage.numpy()
            for k, (_, _, square) in enumerate(items):
                sv[k] = square
            small = self._resize(stage.to(self.device, non_blocking=True))
            for k, (i, j, _) in enumerate(items):
                x[i, j] = small[k]
        return x

    @torch.inference_mode()
    def _forward(self, clips: Sequence[Sequence[np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The buffers are rewritten by the next call: safe, since every caller waits for this call's results.
        buf, large = self._host_batch(clips)
        x = self._device_batch(buf, large) if large else buf
        if self.cuda_graph and len(clips) <= MAX_GRAPH_BATCH:
            graph = self._graphs.get(len(clips))
            if graph is None:
                try:
                    graph = self._graphs[len(clips)] = CudaGraph(self._net, x.to(self.device), self._pool)
                except RuntimeError as e:  # a model or driver that cannot be captured still runs, eagerly
                    log.warning("CUDA graph capture failed, running eagerly from now on: %s", e)
                    self.cuda_graph = False
                    return self._net(x.to(self.device, non_blocking=True))
            return graph(x)  # the batch goes straight into the graph's input
        return self._net(x.to(self.device, non_blocking=True))

    def infer(self, clips: Sequence[Sequence[np.ndarray]]) -> list[ClipResult]:
        """A batch of clips, each `num_frames` RGB uint8 frames [H, W, 3] of any size."""
        if not clips:  # the encoder cannot reshape a batch of 0 (a RuntimeError from deep inside it)
            return []
        emb, logits = self._forward(clips)
        emb = emb.float().cpu()
        logits = logits.float().cpu() if logits is not None else None
        results = []
        for i in range(len(clips)):
            labels, scores = self.labeler(emb[i], logits[i] if logits is not None else None)
            results.append(ClipResult(emb[i].numpy(), labels, scores))
        return results

    def teach(self, label: str, clips: Sequence[Sequence[np.ndarray]], batch: int = 8) -> int:
        """Learn (or reinforce) a label from example clips; persists it; returns its clip count."""
        embs = [self._forward(clips[i : i + batch])[0].float().cpu().numpy() for i in range(0, len(clips), batch)]
        return self.learn(label, np.concatenate(embs) if embs else np.zeros((0, self.model.num_features)))

    def learn(self, label: str, embeddings: np.ndarray) -> int:
        """`teach` from the clips' embeddings [N, C] (e.g. from `infer`, which already ran them); returns its count."""
        count = self.prototypes.add(label, embeddings)  # saved; nothing learnt if it cannot be
        log.info("taught %r from %d clips (%d in all)", label, len(embeddings), count)
        return count
