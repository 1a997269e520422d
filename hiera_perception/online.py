"""Learning while serving: what the node's worker thread does between two clips besides inference.

* `LiveAdaptation`: an `adaptation.Adapter` fed with the clips the node serves. Every version it accepts
  (and every rollback) is handed over as a *pending swap*, which the worker thread applies to the serving
  encoder between two clips (`apply_pending`), so serving never waits for training and the published
  `encoder_version` is always the version that computed the message. It also renders the
  `~/reconstruction` panels with a decoder that belongs to the served encoder.
* `TeachJob`: a label taught on the robot (the TeachLabel service): the clips served during the next few
  seconds are recorded, then the worker learns them with `Engine.teach`.

ROS-free, like every core module: the node (node.py) is a thin adapter over this. Threads: the Adapter
has its own; `on_accept` runs there (or in the caller of `rollback`); everything else documented
"worker" must run in the one thread that owns the Engine.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from hiera_perception.adapt import decoder_state_of
from hiera_perception.adaptation import AdaptationConfig, Adapter, mismatch
from hiera_perception.checkpoint import CheckpointError, load_checkpoint, load_model
from hiera_perception.labeler import default_prototypes_file, rival, safe_name, state_dir
from hiera_perception.mae import HieraMAE
from hiera_perception.model import Hiera
from hiera_perception.reconstruction import reconstruction_panel

__all__ = ["LiveAdaptation", "TeachJob", "default_adaptation_dir", "default_prototypes_file",
           "resume_serving"]

log = logging.getLogger(__name__)


def default_adaptation_dir(model_id: str, node: str = "/hiera_perception") -> Path:
    """Adapted versions of one model on one node (its fully qualified name): <state dir>/adaptation/<model_id>
    for /hiera_perception (where they always were), <state dir>/adaptation/<model_id>/<namespace>/<name> for any
    other, so that two cameras' nodes never resume or roll back each other's weights."""
    folder = state_dir() / "adaptation" / safe_name(model_id)
    if node.strip("/") == "hiera_perception":
        return folder
    return folder.joinpath(*(safe_name(part) for part in node.strip("/").split("/")))


def resume_serving(base: Hiera, out_dir: str | os.PathLike) -> tuple[Hiera, dict[str, torch.Tensor] | None, bool]:
    """(model to serve, its HieraMAE state or None, resumed?): the last accepted version in `out_dir` when it was
    adapted from `base` (the same network and weights), else `base` with the decoder of its own checkpoint. The
    model served is on `base`'s device."""
    for path in Adapter.resume_chain(out_dir):
        try:
            ck = load_checkpoint(path)
        except CheckpointError as e:  # one damaged file must not keep the node from starting
            log.warning("cannot resume %s (%s): trying the version it was adapted from", path.name, e)
            continue
        if (why := mismatch(ck.extra, ck.config, base)) is not None:
            log.warning("not resuming %s: %s; starting from the base model (the file stays)", path, why)
            break
        served = load_model(path, device=str(next(base.parameters()).device))
        served.sampling = dict(getattr(base, "sampling", {}))  # the clip timing lives in the base file only
        log.info("resuming adaptation at %s@%d (%s)", served.model_id, served.version, path)
        return served, ck.model_state, True
    return base, decoder_state_of(base), False


class LiveAdaptation:
    """An Adapter on the serving model, with versions handed to the worker as pending swaps.

    model: the serving encoder (the Engine's; never modified here, only by `apply_pending` in the worker).
    reference: the original model for the drift guard (the base model when resuming an adapted version).
    notify: called after a swap becomes pending (wakes the worker).
    """

    def __init__(self, model: Hiera, config: AdaptationConfig, out_dir: str | os.PathLike,
                 mae_state: dict[str, torch.Tensor] | None = None, reference: Hiera | None = None,
                 busy: Callable[[], bool] = lambda: False, notify: Callable[[], None] = lambda: None):
        self._lock = threading.Lock()
        self._pending: tuple[dict[str, torch.Tensor], int, dict[str, torch.Tensor]] | None = None
        self._notify = notify
        self.out_dir = Path(out_dir)
        self.adapter = Adapter(model, config, mae_state=mae_state, out_dir=self.out_dir, on_accept=self._on_accept,
                               busy=busy, version=int(getattr(model, "version", 0)), reference=reference)
        self._decoder = self._decoder_state()  # what the panel decodes with: matches the served encoder
        self._panel_mae: HieraMAE | None = None
        self.swaps = 0
        self._serving_threads = torch.get_num_threads()  # the process's count, before anyone narrows it

    def _decoder_state(self) -> dict[str, torch.Tensor]:
        # Called at construction and from on_accept: both times the shadow equals the deployed weights.
        return {k: v.detach().clone() for k, v in self.adapter.mae.state_dict().items() if not k.startswith("encoder.")}

    def _on_accept(self, encoder_state: dict[str, torch.Tensor], version: int) -> None:
        """Adapter thread (or a rollback's caller): queue the swap; a newer one replaces one not yet applied."""
        with self._lock:
            self._pending = (encoder_state, version, self._decoder_state())
        self._notify()

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def apply_pending(self, model: Hiera) -> int | None:
        """Worker, between two clips: load the pending version into the serving `model`; its number, or None."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return None
        state, version, decoder = pending
        model.load_state_dict(state)
        model.version = version
        self._decoder = decoder
        if self._panel_mae is not None:
            self._panel_mae.load_state_dict(decoder, strict=False)
        self.swaps += 1
        return version

    def share_cpu(self) -> None:
        """Worker, before inference: while the adapter runs on its own `threads` CPU threads, serve on the rest
        (OpenMP thread counts are per thread). A serving team wider than the free cores waits at every barrier
        for a core the adapter holds: on 2 cores the node's p95 latency rose from 50 to 430-500 ms."""
        threads = self.adapter.config.threads
        if not threads:  # the default: nobody narrows anything, nothing to do per clip
            return
        want = max(1, self._serving_threads - threads) if self.adapter.enabled.is_set() else self._serving_threads
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)

    def add_clips(self, clips: Sequence[Sequence[np.ndarray]]) -> None:
        """Worker: served clips (T frames [S, S, 3] uint8 each) join the replay while adaptation is enabled."""
        if not self.adapter.enabled.is_set():
            return
        for frames in clips:
            self.adapter.add_clip(np.stack(frames))

    def panel(self, model: Hiera, frames: Sequence[np.ndarray]) -> np.ndarray:
        """Worker: input | masked | reconstruction of a served clip, by the served encoder and its decoder.

        The mask is the same every time (seeded), so successive panels show the model, not the mask, changing."""
        if self._panel_mae is None:
            # wraps (shares) the serving encoder, so it is always the version that serves
            self._panel_mae = HieraMAE(model.config, encoder=model).to(next(model.parameters()).device)
            self._panel_mae.load_state_dict(self._decoder, strict=False)
        return reconstruction_panel(self._panel_mae, frames, mask_ratio=self.adapter.config.mask_ratio, seed=0)

    # ---- control (any thread) ----
    def start(self) -> None:
        self.adapter.start()

    def stop(self) -> None:
        self.adapter.stop()

    def set_enabled(self, enabled: bool) -> None:
        """Rounds run only while enabled (a round in progress finishes); clips are collected only then too."""
        (self.adapter.enabled.set if enabled else self.adapter.enabled.clear)()

    def rollback(self) -> int:
        """Back to the version the served one was adapted from (see `Adapter.rollback`). Waits for a round in
        progress. Raises ValueError when already at the base model."""
        return self.adapter.rollback()

    def save(self) -> Path | None:
        """Checkpoint the deployed version now (waits for a round in progress); its path."""
        return self.adapter.save()

    def status(self) -> dict:
        return {**self.adapter.status(), "swap_pending": self.pending, "dir": str(self.out_dir)}


@dataclass
class TeachJob:
    """One TeachLabel request: clips served until `until` (time.monotonic()) become examples of `label`."""

    label: str
    until: float
    max_clips: int = 1024
    clips: list = field(default_factory=list)
    tops: list = field(default_factory=list)  # (top name, probability) each recorded clip was served with
    done: threading.Event = field(default_factory=threading.Event)
    success: bool = False
    clips_learned: int = 0
    message: str = ""

    @classmethod
    def start(cls, label: str, seconds: float, max_seconds: float) -> "TeachJob":
        label = label.strip()
        if not label:
            raise ValueError("label must not be empty")
        if not 0.0 < seconds <= max_seconds:
            raise ValueError(f"seconds must be in (0, {max_seconds:g}], got {seconds:g}")
        return cls(label, time.monotonic() + seconds)

    def record(self, clips: Sequence[Sequence[np.ndarray]], now: float, tops: Sequence[tuple[str, float]]) -> None:
        """Worker: clips just served (their frames are never written to again: references suffice), and the top
        label each was served with."""
        if now <= self.until:
            room = self.max_clips - len(self.clips)
            self.clips.extend(list(c) for c in clips[:room])
            self.tops.extend(tops[:room])

    def due(self, now: float) -> bool:
        return now > self.until

    def finish(self, teach: Callable[[str, list], int], where: str, classes: Sequence[str] = ()) -> None:
        """Worker: learn the recorded clips with `teach` (Engine.teach) and complete the job. `classes`: every name
        the model could give before, for the note on a class the new label competes with."""
        n = len(self.clips)
        try:
            if n == 0:
                self.message = f"no clips were served while recording {self.label!r}: is the camera publishing?"
            else:
                note = rival(self.label, self.tops, classes)
                total = teach(self.label, self.clips)
                self.success, self.clips_learned = True, n
                self.message = f"taught {self.label!r} from {n} clips ({total} in all), saved to {where}"
                if note:
                    self.message += (f"; note: {note} (undo: hiera-perception teach --forget {self.label} "
                                     f"--prototypes {where})")
        except Exception as e:  # noqa: BLE001 - any failure goes back to the caller; serving goes on
            self.clips_learned = 0
            self.message = f"teaching {self.label!r} failed: {type(e).__name__}: {e}"
        finally:
            self.clips, self.tops = [], []
            self.done.set()
