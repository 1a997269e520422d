"""Synthetic actions that can only be told apart over time: the data the embedded model learns from.

Eight actions (`ACTIONS`): a randomised actor (disc, square, triangle, hand-like blob or stick-figure hand,
textured, random colours and size) over a randomised background (gradient, noise, rectangles, stripes),
with random speed, phase, position and start offset, camera shake, lighting, flicker and sensor noise.
One frame never tells the class: every action draws the same scene parameters (actor, background,
lighting, a size drawn from the range approach sweeps) and differs only in how the actor moves — wave
oscillates around a point, a swipe is one slow directed pass across the view (left, right, up or down),
approach sweeps the scale up (drifting outwards with perspective), circle goes round a loop (either
sense), and idle jitters without going anywhere (every action jitters too, idle only more).

The class set is what the embedded model (a 1 M-parameter Hiera, an hour on 2 CPU cores) learns: it
did not learn the sense of a circle, nor approach against recede, in that budget, so those pairs are
one class (circle) and one direction (approach).

Swipes and approach are periodic passes (a swipe re-enters at the far edge, a looming actor fades out
and restarts). A restart inside a clip shows the opposite motion for a moment, so a scene shown for a
known `duration` (a clip) is phased to fit inside one pass, and a pass lasts longer than a clip: a clip shows
one direction only. The camera's swipe segments hold whole passes (the wrap keeps the direction) and its
approach segments one sweep; two in three of its changes of action keep the scene (`SAME_LOOK`).
Backgrounds are plain walls; the busy `background` shift (checkerboard and actor-like clutter) is what the
clean world never shows.

Everything is a pure function of time given a clip's parameters, so a clip (`render_clip`) and the endless
camera (`SyntheticCamera`) share one renderer. A clip's parameters come from the generator it is given;
`write_dataset` gives clip i of seed s `np.random.default_rng([s, i])`, so the same (seed, index) is the
same clip whatever else is rendered. Distribution shifts (`SHIFTS`) live in one place (`_shift_params`,
applied in `_Scene.render`) and draw from their own sub-generator: a shifted clip is the clean clip of
the same seed under the shift, which is what the adaptation experiments compare.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

__all__ = ["ACTIONS", "SAME_LOOK", "SEGMENT_S", "SHIFTS", "SHAPES", "render_clip", "SyntheticCamera", "write_dataset",
           "add_arguments", "main"]

log = logging.getLogger(__name__)

ACTIONS: tuple[str, ...] = (
    "wave", "swipe_left", "swipe_right", "swipe_up", "swipe_down", "approach", "circle", "idle",
)  # fmt: skip
# Seconds an action lasts on the synthetic camera: long enough that few clips span a change (which no training
# clip shows), short enough for a minute's demo to show most actions.
SEGMENT_S = (6.0, 10.0)
# Chance that the next action happens in the same scene (room, light, actor), as on a robot's camera; else a cut.
SAME_LOOK = 2 / 3
SHIFTS: tuple[str, ...] = ("none", "lighting", "blur", "noise", "color_cast", "background")
SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "hand", "stick")
_BACKGROUNDS = ("gradient", "noise", "rects", "stripes")  # seen in clean data
_SHIFT_BACKGROUND = "clutter"  # only under shift="background"
_TEXTURES = ("gradient", "noise", "stripes", "checker", "spots")
_FADE = 0.06  # share of a looming pass spent fading out (and in again) around its restart


# ---------------------------------------------------------------------------------------------- drawing


def _pattern(rng: np.random.Generator, h: int, w: int, kind: str) -> np.ndarray:
    """A procedural texture, float32 [h, w] in [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0.0, 2 * np.pi)
    u = xx * math.cos(a) + yy * math.sin(a)  # coordinate along a random direction
    if kind == "gradient":
        return (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    if kind == "stripes":
        period = rng.uniform(0.06, 0.3) * max(h, w)
        s = 0.5 + 0.5 * np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
        return (s > 0.5).astype(np.float32) if rng.random() < 0.5 else s
    if kind == "checker":
        v = -xx * math.sin(a) + yy * math.cos(a)
        cell = rng.uniform(0.06, 0.2) * max(h, w)
        return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    if kind == "noise":
        g = int(rng.integers(2, 9))
        p = cv2.resize(rng.random((g, g), dtype=np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
        p += 0.3 * rng.random((h, w), dtype=np.float32)  # fine grain over the blotches
        return (p - p.min()) / max(float(p.max() - p.min()), 1e-6)
    if kind == "spots":
        p = np.zeros((h, w), np.float32)
        for _ in range(int(rng.integers(4, 14))):
            c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.circle(p, c, int(rng.uniform(0.04, 0.15) * max(h, w)) + 1, 1.0, -1, cv2.LINE_AA)
        return p
    raise ValueError(f"unknown texture {kind!r}; valid: {_TEXTURES}")


def _background(rng: np.random.Generator, h: int, w: int, family: str) -> np.ndarray:
    """A static background, uint8 [h, w, 3]."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    if family in ("gradient", "noise", "stripes"):
        img = c0 + (c1 - c0) * _pattern(rng, h, w, family)[..., None]
    elif family == "rects":
        img = np.empty((h, w, 3), np.float32)
        img[:] = c0
        for _ in range(int(rng.integers(3, 12))):
            x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
            x1, y1 = x0 + int(rng.uniform(0.1, 0.5) * w), y0 + int(rng.uniform(0.1, 0.5) * h)
            cv2.rectangle(img, (x0, y0), (x1, y1), tuple(rng.uniform(0, 255, 3).tolist()), -1)
    elif family == "clutter":
        # A fine checkerboard under static actor-like distractors: a family the clean data never shows.
        img = c0 + (c1 - c0) * _pattern(rng, h, w, "checker")[..., None]
        side = min(h, w)
        for _ in range(int(rng.integers(8, 20))):
            color = tuple(rng.uniform(0, 255, 3).tolist())
            c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            r = int(rng.uniform(0.03, 0.12) * side) + 1
            if rng.random() < 0.5:
                axes = (r, int(r * rng.uniform(0.4, 1.0)) + 1)
                cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), 0, 360, color, -1, cv2.LINE_AA)
            else:
                ang = rng.uniform(0, 2 * np.pi) + np.arange(int(rng.integers(3, 6))) * 2 * np.pi / 5
                pts = np.stack([c[0] + r * np.cos(ang), c[1] + r * np.sin(ang)], 1).astype(np.int32)
                cv2.fillPoly(img, [pts], color, cv2.LINE_AA)
    else:
        raise ValueError(f"unknown background family {family!r}; valid: {_BACKGROUNDS + (_SHIFT_BACKGROUND,)}")
    if family != _SHIFT_BACKGROUND:  # a plain wall: a faint pattern on a colour close to grey
        mean = img.reshape(-1, 3).mean(0)
        img = 0.15 * mean + 0.85 * 115.0 + rng.uniform(0.05, 0.12) * (img - mean)
    img += 3.0 * rng.standard_normal((h, w, 1), dtype=np.float32)  # paper/wall grain
    return np.clip(img, 0, 255).astype(np.uint8)


def _contrasting_color(rng: np.random.Generator, bg_pixels: np.ndarray, min_dist: float = 90.0) -> np.ndarray:
    """A colour far from most background pixels [N, 3] (not just their mean: stripes have two colours)."""
    best, best_score = None, -1.0
    for _ in range(30):
        c = rng.uniform(0, 255, 3)
        score = float(np.percentile(np.linalg.norm(bg_pixels - c, axis=1), 10))
        if score >= min_dist:
            return c
        if score > best_score:
            best, best_score = c, score
    return best


def _sprite(rng: np.random.Generator, shape: str, px: int, bg_pixels: np.ndarray) -> np.ndarray:
    """The actor on a px x px canvas: premultiplied RGB + alpha, float32 [px, px, 4]; it fills ~90% of the box."""
    mask = np.zeros((px, px), np.uint8)
    c, r = px / 2.0, 0.45 * px

    def pt(x: float, y: float) -> tuple[int, int]:
        return int(round(x)), int(round(y))

    if shape == "disc":
        cv2.circle(mask, pt(c, c), int(round(r)), 255, -1, cv2.LINE_AA)
    elif shape in ("square", "triangle"):
        k = 4 if shape == "square" else 3
        ang = -np.pi / 2 + np.arange(k) * 2 * np.pi / k + (np.pi / 4 if k == 4 else 0)
        pts = np.stack([c + r * np.cos(ang), c + r * np.sin(ang)], 1).round().astype(np.int32)
        cv2.fillPoly(mask, [pts], 255, cv2.LINE_AA)
    elif shape == "hand":
        palm = (c, c + 0.14 * px)
        cv2.ellipse(mask, pt(*palm), pt(0.2 * px, 0.19 * px), 0, 0, 360, 255, -1, cv2.LINE_AA)
        thick = max(2, int(0.09 * px))
        for k, off in enumerate((-0.13, -0.045, 0.045, 0.13)):  # four fingers fanning upwards
            ang = math.radians(-90 + (k - 1.5) * rng.uniform(4, 12))
            length = rng.uniform(0.24, 0.31) * px
            base = (palm[0] + off * px, palm[1] - 0.12 * px)
            tip = (base[0] + length * math.cos(ang), base[1] + length * math.sin(ang))
            cv2.line(mask, pt(*base), pt(*tip), 255, thick, cv2.LINE_AA)
        side = 1 if rng.random() < 0.5 else -1  # left or right hand
        base = (palm[0] + side * 0.15 * px, palm[1])
        cv2.line(mask, pt(*base), pt(base[0] + side * 0.2 * px, base[1] - 0.15 * px), 255, thick, cv2.LINE_AA)
    elif shape == "stick":
        thick = max(2, int(0.06 * px))
        wrist = (c, c + 0.08 * px)
        cv2.line(mask, pt(c, c + 0.44 * px), pt(*wrist), 255, thick, cv2.LINE_AA)
        for k in range(5):
            ang = math.radians(-90 + (k - 2) * rng.uniform(22, 32))
            length = rng.uniform(0.3, 0.4) * px
            cv2.line(mask, pt(*wrist), pt(wrist[0] + length * math.cos(ang), wrist[1] + length * math.sin(ang)),
                     255, thick, cv2.LINE_AA)  # fmt: skip
        cv2.circle(mask, pt(*wrist), int(0.08 * px), 255, -1, cv2.LINE_AA)
    else:
        raise ValueError(f"unknown actor shape {shape!r}; valid: {SHAPES}")

    c0 = _contrasting_color(rng, bg_pixels)
    c1 = np.clip(c0 + rng.uniform(-60, 60, 3), 0, 255)
    rgb = c0 + (c1 - c0) * _pattern(rng, px, px, str(rng.choice(_TEXTURES)))[..., None]
    alpha = mask.astype(np.float32) / 255.0
    if rng.random() < 0.6:  # a darker outline, as drawn or shaded objects have
        width = max(1, px // 24)
        inner = cv2.erode(mask, np.ones((2 * width + 1, 2 * width + 1), np.uint8)).astype(np.float32) / 255.0
        edge = (alpha - inner)[..., None]
        rgb = rgb * (1 - edge) + c0 * rng.uniform(0.2, 0.5) * edge
    return np.dstack([rgb * alpha[..., None], alpha]).astype(np.float32)


def _blend_sprite(
    frame: np.ndarray, sprite: np.ndarray, x: float, y: float, diam: float, angle: float, opacity: float = 1.0
) -> None:
    """Draw the sprite centred at (x, y), `diam` px across, rotated `angle` degrees, into frame in place."""
    px = sprite.shape[0]
    k = diam / (0.9 * px)
    n = int(math.ceil(px * k)) + 2
    x0, y0 = int(math.floor(x - n / 2)), int(math.floor(y - n / 2))
    m = cv2.getRotationMatrix2D(((px - 1) / 2, (px - 1) / 2), angle, k)
    m[0, 2] += x - x0 - (px - 1) / 2  # the fractional part gives sub-pixel motion
    m[1, 2] += y - y0 - (px - 1) / 2
    h, w = frame.shape[:2]
    fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x0 + n, w), min(y0 + n, h)
    if fx1 <= fx0 or fy1 <= fy0:
        return
    warped = cv2.warpAffine(sprite, m, (n, n), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    sub = warped[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]  # [h', w', 4] premultiplied
    if opacity < 1.0:
        sub = sub * opacity
    roi = frame[fy0:fy1, fx0:fx1]
    roi[...] = (roi * (1.0 - sub[..., 3:]) + sub[..., :3] + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- shifts


def _shift_params(shift: str, rng: np.random.Generator, side: int) -> dict:
    """The one place a distribution shift is defined: photometric changes applied by `_Scene.render`.

    shift="background" swaps the background family instead (in `_Scene.__init__`). Strengths are chosen
    to hurt a model trained on clean clips while the moving actor stays visible.
    """
    p = {"gamma": 1.0, "gain": 1.0, "gradient": 0.0, "channel_gain": np.ones(3), "tint": np.zeros(3),
         "sigma": 0.0, "salt": 0.0, "kernel": None}  # fmt: skip
    if shift == "lighting":
        if rng.random() < 0.5:  # dusk: dark and crushed shadows
            p.update(gamma=rng.uniform(1.6, 2.2), gain=rng.uniform(0.3, 0.5))
        else:  # glare: bright, washed out, clipped
            p.update(gamma=rng.uniform(0.4, 0.6), gain=rng.uniform(1.3, 1.7))
        p["gradient"] = rng.uniform(0.3, 0.5)
    elif shift == "blur":
        if rng.random() < 0.5:
            sigma = rng.uniform(0.04, 0.06) * side
            g = cv2.getGaussianKernel(2 * int(math.ceil(2.5 * sigma)) + 1, sigma).astype(np.float32)
            p["kernel"] = (g, g)  # separable: two 1-D passes
        else:  # motion blur: a line kernel at a random angle
            length = max(3, int(rng.uniform(0.12, 0.18) * side))
            size = length | 1
            ker = np.zeros((size, size), np.float32)
            a = rng.uniform(0, np.pi)
            d = (length - 1) / 2 * np.array([math.cos(a), math.sin(a)])
            c = (size - 1) / 2
            cv2.line(ker, (int(round(c - d[0])), int(round(c - d[1]))), (int(round(c + d[0])), int(round(c + d[1]))),
                     1.0, 1, cv2.LINE_AA)  # fmt: skip
            p["kernel"] = ker / ker.sum()
    elif shift == "noise":
        p.update(sigma=rng.uniform(22, 35), salt=rng.uniform(0.005, 0.02))
    elif shift == "color_cast":
        v = rng.standard_normal(3)
        v -= v.mean()  # a hue direction, not a brightness change
        v *= rng.uniform(0.45, 0.75) / max(float(np.linalg.norm(v)), 1e-6)
        p.update(channel_gain=np.exp(v), tint=v / np.linalg.norm(v) * rng.uniform(15, 35))
    elif shift not in ("none", "background"):
        raise ValueError(f"unknown shift {shift!r}; valid: {SHIFTS}")
    return p


# ---------------------------------------------------------------------------------------------- scene


class _Scene:
    """One actor doing one action in one scene; `render(times)` gives its frames at those times (seconds)."""

    def __init__(self, action: str, rng: np.random.Generator, size: tuple[int, int], shift: str = "none",
                 duration: float | None = None):
        """`duration`: seconds the scene is shown from t = 0; passes are phased so none restarts inside it
        (where a pass is long enough). None: a random point of the endless motion."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; valid: {ACTIONS}")
        if shift not in SHIFTS:
            raise ValueError(f"unknown shift {shift!r}; valid: {SHIFTS}")
        h, w = int(size[0]), int(size[1])
        if h < 8 or w < 8:
            raise ValueError(f"size must be at least 8x8 (H, W), got {size}")
        self.action, self.h, self.w = action, h, w
        side = min(h, w)
        # Independent sub-generators, so a shift never changes the rest of the clip.
        seeds = rng.integers(0, 2**63 - 1, size=4)
        r, bg_rng, self._noise_rng, shift_rng = (np.random.default_rng(int(s)) for s in seeds)

        self.margin = max(1, round(0.025 * side))  # room for camera shake
        bh, bw = h + 2 * self.margin, w + 2 * self.margin
        clean_bg = _background(bg_rng, bh, bw, str(r.choice(_BACKGROUNDS)))
        self.bg = _background(shift_rng, bh, bw, _SHIFT_BACKGROUND) if shift == "background" else clean_bg

        # Motion: the same draws for every action, so the action changes only how the actor moves.
        ox, oy = (w - side) / 2, (h - side) / 2  # the centred square that crop_resize keeps
        self.log_range = r.uniform(math.log(3.0), math.log(4.0))  # approach's scale sweep
        self.diam = side * math.exp(r.uniform(math.log(0.3), math.log(0.4)))  # x exp(+-log_range / 2)
        self.static_log_scale = r.uniform(-self.log_range / 2, self.log_range / 2)
        self.cx, self.cy = ox + r.uniform(0.3, 0.7) * side, oy + r.uniform(0.3, 0.7) * side
        self.phase = r.uniform(0, 1)
        self.angle0 = r.uniform(0, 360)
        # wave: amplitude px, Hz, tilt, hand wobble degrees | swipe: seconds per pass, tilt
        # circle: radius px, revolutions/s, aspect, rotation of the ellipse
        self.wave = (r.uniform(0.1, 0.2) * side, r.uniform(1.0, 2.2), np.radians(r.uniform(-15, 15)), r.uniform(0, 20))
        self.swipe = (r.uniform(2.2, 3.2), math.radians(r.uniform(-10, 10)))  # longer than a 2 s clip
        # either sense: one class (the tiny model did not learn the sense of rotation in an hour's training)
        self.circle = (r.uniform(0.15, 0.25) * side, r.uniform(0.6, 1.0), r.uniform(0.7, 1.0), r.uniform(0, np.pi),
                       float(r.choice((-1.0, 1.0))))
        # a 3x to 4x sweep in 2.4 to 3 s: room for a 2 s clip between two fades
        self.loom_period = r.uniform(2.4, 3.0)
        # Jitter in pixels of a 128 px frame (idle more); positions scale with the frame, angle and scale do not:
        # the actor moves alike at every resolution.
        jitter, idle_jitter = r.uniform(0.5, 2.0), r.uniform(2.0, 4.5)
        self.jitter_level = idle_jitter if action == "idle" else jitter
        self.jitter_px = self.jitter_level * side / 128
        self.jitter = (r.uniform(0.3, 2.5, (4, 3)), r.uniform(0, 2 * np.pi, (4, 3)))  # x, y, angle, scale
        self.shake = (r.uniform(0, self.margin), r.uniform(2, 8, (2, 2)), r.uniform(0, 2 * np.pi, (2, 2)))
        self.t0 = r.uniform(0, 20)  # start offset into the motion
        self._pass_offset = r.uniform(0, 1)  # where in a pass a scene of known duration starts
        if duration is not None:
            self.fit(duration)
        shape = str(r.choice(SHAPES))
        max_diam = self.diam * math.exp(self.log_range / 2 + 0.05)
        px = int(np.clip(math.ceil(max_diam / 0.9), 16, 192))
        self.sprite = _sprite(r, shape, px, clean_bg[::4, ::4].reshape(-1, 3).astype(np.float32))

        # Lighting: gamma, gain, a light gradient across the frame, white balance, flicker, sensor noise.
        sp = _shift_params(shift, shift_rng, side)
        self.gamma = r.uniform(0.8, 1.25) * sp["gamma"]
        self.gain = r.uniform(0.8, 1.2) * sp["gain"]
        strength = r.uniform(0.0, 0.25) + sp["gradient"]
        a = r.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        u = ((xx - w / 2) * math.cos(a) + (yy - h / 2) * math.sin(a)) / (side / 2)  # about [-1, 1]
        white = r.uniform(0.88, 1.12, 3) * sp["channel_gain"]
        self.field = (np.clip(1 + strength * u, 0.2, 2.0)[..., None] * white).astype(np.float32)  # [H, W, 3]
        self.tint = sp["tint"].astype(np.float32)
        self.flicker = (r.uniform(0, 0.04), r.uniform(0.5, 4), r.uniform(0, 2 * np.pi))
        sigma = r.uniform(1.0, 6.0) + sp["sigma"]
        self._noise = self._noise_rng.standard_normal((2 * h, 2 * w, 3), dtype=np.float32) * np.float32(sigma)
        self.salt = sp["salt"]
        self.kernel = sp["kernel"]

    @property
    def one_pass_s(self) -> float:
        """Seconds of motion without a wrap or restart: a swipe's pass, a looming sweep between its fades."""
        if self.action.startswith("swipe"):
            return self.swipe[0]
        if self.action == "approach":
            return self.loom_period * (1.0 - 2 * _FADE)
        return math.inf

    # What a scene looks like, as opposed to how its actor moves: `keep_look` carries these over.
    _LOOK = ("margin", "bg", "sprite", "diam", "log_range", "static_log_scale", "angle0", "shake", "gamma", "gain",
             "field", "tint", "flicker", "_noise", "salt", "kernel")

    def keep_look(self, before: "_Scene", at_s: float) -> None:
        """Look like `before` (room, lighting, camera, actor), with the new motion centred where its actor was at
        `at_s`: the same person changing what they do, not a cut to another scene. The new motion starts at its
        own phase around that centre (a circle one radius off it, an approach at its smallest), so the actor can
        move by up to about a third of the frame between the two frames either side of the change."""
        for name in self._LOOK:
            setattr(self, name, getattr(before, name))
        x, y, _, _, _ = before.pose(np.array([at_s]))
        side = min(self.h, self.w)
        ox, oy = (self.w - side) / 2, (self.h - side) / 2
        # only a point inside the kept square (a swipe ends outside it): the new motion centres there
        if ox + 0.2 * side <= x[0] <= ox + 0.8 * side and oy + 0.2 * side <= y[0] <= oy + 0.8 * side:
            self.cx, self.cy = float(x[0]), float(y[0])

    def fit(self, duration: float) -> None:
        """Show the scene from t = 0 for `duration` s, phased so no pass restarts inside it (if one is long enough)."""
        self.t0 = 0.0
        if self.action.startswith("swipe"):  # any start that leaves the pass before the wrap
            self.phase = self._pass_offset * max(0.0, 1.0 - duration / self.swipe[0])
        elif self.action == "approach":  # the same, clear of the fades at both ends
            self.phase = _FADE + self._pass_offset * max(0.0, 1.0 - 2 * _FADE - duration / self.loom_period)

    def pose(self, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Actor centre x, y (px), log scale, angle (degrees) and opacity at times ts [n]."""
        t = np.asarray(ts, np.float64) + self.t0
        f, ph = self.jitter
        j = (np.sin(2 * np.pi * f[..., None] * t + ph[..., None]).sum(1) / 3)  # [4, n] in [-1, 1]
        x = self.cx + self.jitter_px * j[0]
        y = self.cy + self.jitter_px * j[1]
        ang = self.angle0 + 3.0 * j[2] * self.jitter_level
        ls = self.static_log_scale + 0.015 * j[3] * self.jitter_level + np.zeros_like(t)
        opacity = np.ones_like(t)
        a = self.action
        if a == "wave":
            amp, freq, tilt, wobble = self.wave
            s = np.sin(2 * np.pi * (freq * t + self.phase))
            x, y, ang = x + amp * s * math.cos(tilt), y + amp * s * math.sin(tilt), ang + wobble * s
        elif a.startswith("swipe"):
            pass_s, tilt = self.swipe
            d = self.diam * math.exp(self.static_log_scale)
            side = min(self.w, self.h)
            span = side + d  # across the centred square a centre crop keeps, wrapping just outside it
            travel = np.mod(t / pass_s + self.phase, 1.0) * span
            if a in ("swipe_left", "swipe_right"):
                ox = (self.w - side) / 2
                xs = ox - d / 2 + travel if a == "swipe_right" else ox + side + d / 2 - travel
                x = x - self.cx + xs
                y = y + (xs - self.w / 2) * math.tan(tilt)
            else:  # image y points down
                oy = (self.h - side) / 2
                ys = oy - d / 2 + travel if a == "swipe_down" else oy + side + d / 2 - travel
                y = y - self.cy + ys
                x = x + (ys - self.h / 2) * math.tan(tilt)
        elif a == "circle":
            radius, rev_s, aspect, rot, sense = self.circle
            th = 2 * np.pi * (self.phase + sense * rev_s * t)
            ux, uy = radius * np.cos(th), radius * aspect * np.sin(th)
            x = x + ux * math.cos(rot) - uy * math.sin(rot)
            y = y + ux * math.sin(rot) + uy * math.cos(rot)
        elif a == "approach":
            # A sawtooth in log scale. The actor fades out before the jump back and in after it: a visible jump
            # would put one big step against the many small ones, and over a whole period they cancel out.
            u = np.mod(t / self.loom_period + self.phase, 1.0)
            sweep = self.log_range * (u - 0.5)
            opacity = np.clip(np.minimum(u, 1.0 - u) / _FADE, 0.0, 1.0)
            ls = ls - self.static_log_scale + sweep
            # Perspective, softened to stay in frame: an off-centre object drifts outwards as it comes closer.
            spread = np.exp(0.6 * sweep)
            x = self.w / 2 + (x - self.w / 2) * spread
            y = self.h / 2 + (y - self.h / 2) * spread
        return x, y, ls, ang, opacity

    def render(self, ts: np.ndarray) -> np.ndarray:
        """Frames at times ts [n] (seconds) -> uint8 RGB [n, H, W, 3]; noise continues the scene's noise stream."""
        return np.concatenate(list(self.frames(ts)))

    def frames(self, ts: np.ndarray, chunk: int = 32) -> Iterator[np.ndarray]:
        """`render(ts)` in pieces of up to `chunk` frames (uint8 [<= chunk, H, W, 3]), the same pixels: memory stays
        that of one piece however many times are asked for."""
        ts = np.atleast_1d(np.asarray(ts, np.float64))
        n, h, w, m = len(ts), self.h, self.w, self.margin
        x, y, ls, ang, opacity = self.pose(ts)
        amp, sf, sph = self.shake
        shake = np.rint(amp * np.sin(2 * np.pi * sf[..., None] * (ts + self.t0) + sph[..., None]).mean(1)).astype(int)
        lut = np.clip(np.rint((np.arange(256) / 255.0) ** self.gamma * 255), 0, 255).astype(np.uint8)
        fa, ff, fph = self.flicker
        gain = (self.gain * (1 + fa * np.sin(2 * np.pi * ff * ts + fph))).astype(np.float32)
        # Sensor noise: each frame adds a window at a random offset into a Gaussian field twice the frame's
        # size; as good as fresh noise to any model, at a fraction of the cost of drawing every pixel. All offsets
        # are drawn before any salt, piece by piece after: the noise stream is the same for any `chunk`.
        off = self._noise_rng.integers(0, (h, w), size=(n, 2))
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            frames = np.empty((b - a, h, w, 3), np.uint8)
            for k, i in enumerate(range(a, b)):
                sx, sy = int(shake[0, i]), int(shake[1, i])
                frames[k] = self.bg[m + sy : m + sy + h, m + sx : m + sx + w]
                diam = self.diam * math.exp(ls[i])
                _blend_sprite(frames[k], self.sprite, x[i] - sx, y[i] - sy, diam, ang[i], float(opacity[i]))
                if isinstance(self.kernel, tuple):  # optics / motion blur happen before the sensor
                    cv2.sepFilter2D(frames[k], -1, *self.kernel, dst=frames[k], borderType=cv2.BORDER_REFLECT)
                elif self.kernel is not None:
                    cv2.filter2D(frames[k], -1, self.kernel, dst=frames[k], borderType=cv2.BORDER_REFLECT)
            frames = cv2.LUT(frames.reshape((b - a) * h, w, 3), lut).reshape(b - a, h, w, 3)
            out = frames.astype(np.float32)
            out *= self.field
            out *= gain[a:b, None, None, None]
            out += self.tint
            for k, i in enumerate(range(a, b)):
                out[k] += self._noise[off[i, 0] : off[i, 0] + h, off[i, 1] : off[i, 1] + w]
            if self.salt > 0:
                u = self._noise_rng.random(out.shape[:3], dtype=np.float32)
                out[u < self.salt / 2] = 0.0
                out[u > 1 - self.salt / 2] = 255.0
            np.clip(out, 0, 255, out=out)
            out += 0.5
            yield out.astype(np.uint8)


# ---------------------------------------------------------------------------------------------- public API


def render_clip(
    action: str,
    rng: np.random.Generator,
    num_frames: int,
    size: tuple[int, int] = (128, 128),
    fps: float = 30.0,
    shift: str = "none",
) -> np.ndarray:
    """One clip of `action`: uint8 RGB [num_frames, H, W, 3], frames 1/fps apart, parameters drawn from `rng`.

    With the same generator state, every action and every shift draws the same scene, so clips
    differ only in the motion (across actions) or in the shift (across shifts).
    """
    return np.concatenate(list(clip_pieces(action, rng, num_frames, size, fps, shift)))


def clip_pieces(action: str, rng: np.random.Generator, num_frames: int, size: tuple[int, int] = (128, 128),
                fps: float = 30.0, shift: str = "none") -> Iterator[np.ndarray]:
    """`render_clip`'s frames, the same pixels, in pieces of a few dozen: a clip of any length in bounded memory."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    scene = _Scene(action, rng, size, shift, duration=num_frames / fps)
    return scene.frames(np.arange(num_frames) / fps)


class SyntheticCamera:
    """An endless synthetic camera: a new random action (and scene) every `segment_s` seconds of stream time,
    except that a swipe lasts whole passes (at least one, the nearest count to the drawn time) and an approach
    exactly one sweep, so those segments can be shorter or longer than `segment_s`.

    `next_frame()` returns (true action, uint8 RGB [H, W, 3]); the stream is a pure function of the seed.
    Consecutive segments never repeat the action, so each switch is a real change for the demo to show.
    """

    def __init__(
        self,
        seed: int = 0,
        size: tuple[int, int] = (120, 160),
        fps: float = 30.0,
        segment_s: tuple[float, float] = SEGMENT_S,
        shift: str = "none",
        actions: Sequence[str] = ACTIONS,
    ):
        unknown = [a for a in actions if a not in ACTIONS]
        if unknown or not actions:
            raise ValueError(f"actions must be a non-empty subset of {ACTIONS}, got {list(actions)}")
        if not (math.isfinite(fps) and fps > 0 and 0 < segment_s[0] <= segment_s[1] < math.inf):
            raise ValueError(f"need a finite fps > 0 and 0 < segment_s[0] <= segment_s[1] < inf; got fps={fps}, "
                             f"segment_s={segment_s}")
        if shift not in SHIFTS:
            raise ValueError(f"unknown shift {shift!r}; valid: {SHIFTS}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed, self.size, self.fps, self.segment_s, self.shift = seed, size, fps, segment_s, shift
        self.actions = tuple(actions)
        self.frame_index = 0
        self.action: str | None = None
        self._segment = -1
        self._segment_start = 0
        self._segment_end = 0
        self._scene: _Scene | None = None

    def _next_segment(self) -> None:
        self._segment += 1
        rng = np.random.default_rng([self.seed, self._segment])
        choices = [a for a in self.actions if a != self.action] or list(self.actions)
        self.action = str(rng.choice(choices))
        seconds = rng.uniform(*self.segment_s)
        before = self._scene
        self._scene = _Scene(self.action, rng, self.size, self.shift)
        if before is not None and rng.random() < SAME_LOOK:
            self._scene.keep_look(before, (self._segment_end - self._segment_start) / self.fps)
        # A swipe segment ends on a whole pass (as many as its drawn length holds): the wrap between two passes
        # keeps the direction. A looming actor shows one sweep, since its restart would show it shrinking.
        # A segment that ended mid-pass would leave clips with no right label.
        one = self._scene.one_pass_s
        if self.action == "approach":
            seconds = one
        elif one < math.inf:
            seconds = max(1, round(seconds / one)) * one
        frames = max(1, round(seconds * self.fps))
        self._scene.fit(frames / self.fps)
        self._segment_start, self._segment_end = self._segment_end, self._segment_end + frames

    def next_frame(self) -> tuple[str, np.ndarray]:
        """(true action, uint8 RGB [H, W, 3]) of frame `frame_index`, then frame_index + 1.

        Segments are laid out on the frame index, so moving `frame_index` on (frames a busy publisher
        skipped) lands on the same action and pose as rendering every frame would have.
        """
        while self.frame_index >= self._segment_end:
            self._next_segment()
        t = (self.frame_index - self._segment_start) / self.fps
        frame = self._scene.render(np.array([t]))[0]
        self.frame_index += 1
        return self.action, frame


def write_dataset(
    out_dir: str | os.PathLike,
    clips: int,
    seed: int,
    shift: str = "none",
    seconds: float = 2.0,
    fps: float = 30.0,
    size: tuple[int, int] = (128, 128),
    unlabeled: bool = False,
    progress: bool = True,
) -> Path:
    """Write a data folder: `clips` videos (classes balanced, clip i is ACTIONS[i % 8]) and labels.csv.

    Clip i is rendered from `np.random.default_rng([seed, i])`. labels.csv is written last and
    atomically, so a reader never sees it name a missing video. A data set already in the folder (labels.csv,
    clip_* videos) is replaced: removed first, so none of its clips outlives it. Returns the path of labels.csv.
    """
    from tqdm import tqdm

    from hiera_perception.dataset import video_format, write_labels_csv, write_video  # brings torch: only here

    if clips < 1 or seed < 0:
        raise ValueError(f"need clips >= 1 and seed >= 0, got clips={clips}, seed={seed}")
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; valid: {SHIFTS}")
    if not all(math.isfinite(v) and v > 0 for v in (seconds, fps)):
        raise ValueError(f"seconds and fps must be finite numbers > 0, got seconds={seconds}, fps={fps}")
    if size[0] % 2 or size[1] % 2:  # video writers silently drop an odd size's last row and column
        raise ValueError(f"size (H, W) must be even to be written as video, got {tuple(size)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = [p for p in out.glob("clip_[0-9][0-9][0-9][0-9][0-9][0-9].*") if p.is_file()]
    if (out / "labels.csv").exists() or old:
        # the old labels.csv must not outlive its videos, nor old videos a smaller new set
        log.warning("replacing the data set in %s (%d clips)", out, len(old))
        for p in [out / "labels.csv", *old]:
            p.unlink(missing_ok=True)
    ext, fourcc = video_format()
    num_frames = max(1, round(seconds * fps))
    rows: list[tuple[str, str | None]] = []
    for i in tqdm(range(clips), desc=f"synth {out.name}", unit="clip", disable=not progress):
        action = ACTIONS[i % len(ACTIONS)]
        pieces = clip_pieces(action, np.random.default_rng([seed, i]), num_frames, size, fps, shift)
        name = f"clip_{i:06d}{ext}"  # the name never tells the label (unlabeled sets stay unlabeled)
        write_video(out / name, (f for piece in pieces for f in piece), fps, fourcc)  # one piece in memory
        rows.append((name, None if unlabeled else action))
    labels = write_labels_csv(out, rows)
    log.info("wrote %d clips (%s, shift=%s, seed=%d) and %s", clips, fourcc, shift, seed, labels)
    return labels


# ---------------------------------------------------------------------------------------------- CLI


def _parse_size(text: str) -> tuple[int, int]:
    """'128' -> (128, 128); '160x120' (W x H, as video sizes are written) -> (120, 160) as (H, W)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 8:
        raise argparse.ArgumentTypeError(f"size must be N or WxH with sides >= 8, e.g. 128 or 160x120; got {text!r}")
    return parts[1], parts[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="data folder to write (videos + labels.csv)")
    parser.add_argument("--clips", type=int, required=True, help="number of clips, balanced over the actions")
    parser.add_argument("--seed", type=int, default=0, help="clip i is the same for the same seed (default 0)")
    parser.add_argument("--shift", choices=SHIFTS, default="none", help="distribution shift (default none)")
    parser.add_argument("--seconds", type=float, default=2.0, help="clip length (default 2.0)")
    parser.add_argument("--fps", type=float, default=30.0, help="frame rate (default 30)")
    parser.add_argument("--size", type=_parse_size, default=(128, 128), help="N or WxH, e.g. 160x120 (default 128)")
    parser.add_argument("--unlabeled", action="store_true", help="leave the label column empty")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    write_dataset(
        args.out, args.clips, args.seed, shift=args.shift, seconds=args.seconds, fps=args.fps, size=args.size,
        unlabeled=args.unlabeled, progress=not args.no_progress,
    )  # fmt: skip
    return 0
