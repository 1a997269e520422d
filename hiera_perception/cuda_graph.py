"""CUDA graph capture and replay: one launch for a whole forward pass or training step.

A small batch on a GPU waits on hundreds of kernel launches more than on arithmetic. A captured graph
replays every kernel of a fixed-shape computation with one launch; its inputs are static tensors the
caller's data is copied into, and its outputs are overwritten by the next replay.

    CudaGraph(fn, example)                     inference: fn(x) -> tensors (the engine's encoder + head)
    CudaGraphStep(loss_fn, optimizer, *ex)     training: forward + backward + optimizer step of loss_fn(*ex)

Nothing may read the GPU back to the host inside a graph: the MAE step is capturable because its mask is
gathered by indices of a known count (`Hiera.kept_units`), not selected by boolean indexing.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["CudaGraph", "CudaGraphStep"]

log = logging.getLogger(__name__)
WARMUP = 3  # eager runs on a side stream before capture (as torch.cuda.graphs requires)


class CudaGraph:
    """`fn` of one static input tensor, captured once as a CUDA graph and replayed: one launch per batch."""

    @torch.inference_mode()
    def __init__(self, fn, example: torch.Tensor, pool=None):
        self.input = example.clone()
        stream = torch.cuda.Stream(example.device)
        stream.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
            for _ in range(WARMUP):
                fn(self.input)
        torch.cuda.current_stream(example.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn(self.input)
        log.info("captured a CUDA graph for batch %d", example.shape[0])

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.input.copy_(x, non_blocking=True)
        self.graph.replay()
        # Copies: the next replay overwrites the static outputs.
        return tuple(t.clone() if t is not None else None for t in self.output)


class CudaGraphStep:
    """A training step of `loss_fn(*inputs)` (forward, backward, gradient clip, optimizer step) as a CUDA graph.

    The optimizer must be built with `capturable=True` and keeps the learning rate it was captured with.
    The first WARMUP steps run eagerly on the example inputs (real steps: they train), the next is captured
    on them without being applied, and every call then copies new inputs in, replays, and returns the loss
    (a tensor on the GPU: reading it back is the caller's choice).
    """

    def __init__(self, loss_fn, optimizer: torch.optim.Optimizer, *examples: torch.Tensor, grad_clip: float = 0.0):
        device = examples[0].device
        if device.type != "cuda":
            raise ValueError(f"a CUDA graph needs CUDA tensors, got {device}")
        if not all(g.get("capturable", False) for g in optimizer.param_groups):
            raise ValueError("the optimizer must be built with capturable=True to be captured in a CUDA graph")
        self.loss_fn, self.optimizer, self.grad_clip = loss_fn, optimizer, grad_clip
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.inputs = [e.clone() for e in examples]
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP):
                optimizer.zero_grad(set_to_none=True)  # each warm-up step is a whole step: no accumulated grads
                self._step()
        torch.cuda.current_stream(device).wait_stream(stream)
        # Gradients are None at capture, so the graph's backward writes them rather than adding to them.
        optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._step()
        log.info("captured a CUDA graph of a training step (%d parameter tensors)", len(self.params))

    def _step(self) -> torch.Tensor:
        loss = self.loss_fn(*self.inputs)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        return loss.detach()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for static, x in zip(self.inputs, inputs):
            static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.loss.clone()
