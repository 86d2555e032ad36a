"""Rendering talking-face frames from a still identity: pose, lighting, background, speech
mouth motion and planted facial micro-events.

Facial motion is a smooth displacement field over the head crop: every action unit (see
``emotions.ACTIONS``) is a sum of Gaussian bumps around the landmarks it moves, and a
frame's field is the weighted sum of the active units. The warped crop is then posed
(roll, sway, a horizontal squeeze that reads as yaw) onto a background and lit. Everything
a frame depends on is in the clip's truth record, so a clip can be re-rendered exactly,
with or without its micro-events (the tests do this to check event times in the files).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.synth.emotions import ACTIONS
from pipeline.synth.identities import Identity

# Talking: the jaw and lower lip drop with the speech envelope.
JAW_OPEN = {"points": {56: (0, 1.0), 57: (0, 1.0), 58: (0, 1.0), 65: (0, 0.9), 66: (0, 0.9), 67: (0, 0.9),
                       7: (0, 0.8), 8: (0, 0.8), 9: (0, 0.8), 5: (0, 0.4), 11: (0, 0.4),
                       48: (0, 0.3), 54: (0, 0.3)}}
# Bump width per region, in face widths.
SIGMA = {"eyes": 0.05, "brows": 0.07, "mouth": 0.07, "jaw": 0.09}
JAW_OPEN_MAX = 0.07  # face widths of jaw drop at full speech envelope


def event_weight(t: float, onset_s: float, duration_s: float) -> float:
    """Raised-cosine activation of an event at time ``t`` (0 outside, 1 at its peak)."""
    u = (t - onset_s) / duration_s
    if u <= 0.0 or u >= 1.0:
        return 0.0
    return math.sin(math.pi * u) ** 2


class FaceRig:
    """Per-identity precomputed unit displacement fields and the soft head mask."""

    def __init__(self, identity: Identity):
        self.identity = identity
        h, w = identity.image.shape[:2]
        self.size = (w, h)
        gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        self.grid = (gx, gy)
        self.image = identity.image.astype(np.float32)
        self.units: dict[str, np.ndarray] = {}
        for name, spec in ACTIONS.items():
            self.units[name] = self._unit_field(spec["points"], SIGMA[spec["region"]])
        self.units["jaw_open"] = self._unit_field(JAW_OPEN["points"], SIGMA["jaw"])
        mask = np.zeros((h, w), np.float32)
        cv2.ellipse(mask, (w // 2, int(h * 0.47)), (int(w * 0.44), int(h * 0.49)), 0, 0, 360, 1.0, -1)
        self.mask = cv2.GaussianBlur(mask, (0, 0), w * 0.04)

    def _unit_field(self, points: dict[int, tuple[float, float]], sigma_fw: float) -> np.ndarray:
        """(H, W, 2) displacement with peak magnitude 1 px."""
        lm = self.identity.landmarks
        sigma = sigma_fw * self.identity.face_width
        gx, gy = self.grid
        field = np.zeros(gx.shape + (2,), np.float32)
        for idx, (ux, uy) in points.items():
            px, py = lm[idx]
            g = np.exp(-((gx - px) ** 2 + (gy - py) ** 2) / (2 * sigma * sigma))
            field[..., 0] += ux * g
            field[..., 1] += uy * g
        peak = float(np.sqrt((field ** 2).sum(-1)).max())
        return field / max(peak, 1e-6)

    def region_box(self, kind: str) -> tuple[float, float, float, float]:
        """Crop-pixel box around the landmarks an action moves, with two bump widths of margin."""
        spec = ACTIONS[kind]
        pts = self.identity.landmarks[list(spec["points"])]
        margin = 2 * SIGMA[spec["region"]] * self.identity.face_width
        x0, y0 = pts.min(0) - margin
        x1, y1 = pts.max(0) + margin
        return float(x0), float(y0), float(x1), float(y1)

    def warp(self, weights: dict[str, float]) -> np.ndarray:
        """The head crop deformed by the weighted action units (weights in pixels of displacement)."""
        active = [(k, v) for k, v in weights.items() if abs(v) > 1e-3]
        if not active:
            return self.image
        field = sum(self.units[k] * v for k, v in active)
        gx, gy = self.grid
        return cv2.remap(self.image, gx - field[..., 0], gy - field[..., 1], cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REFLECT101)

    def mouth_cavity(self, crop: np.ndarray, open_px: float) -> np.ndarray:
        """Darken the inner mouth in proportion to how far the jaw is open."""
        if open_px < 0.5:
            return crop
        lm = self.identity.landmarks
        cx, cy = (lm[62] + lm[66]) / 2
        half_w = 0.33 * float(lm[54, 0] - lm[48, 0])
        layer = np.zeros(crop.shape[:2], np.float32)
        cv2.ellipse(layer, (int(cx), int(cy + open_px * 0.5)), (max(1, int(half_w)), max(1, int(open_px * 0.45))),
                    0, 0, 360, 1.0, -1)
        layer = cv2.GaussianBlur(layer, (0, 0), 1.5)[..., None] * 0.8
        return crop * (1 - layer) + np.array([70, 25, 30], np.float32) * layer


@dataclass
class Scene:
    """How one clip looks: frame size, background, head placement, motion and lighting."""

    width: int
    height: int
    background: str  # gradient | room | blotches
    bg_seed: int
    bg_colors: list  # two RGB colours
    scale: float  # crop pixels -> frame pixels
    center: list  # [x, y] of the crop centre in the frame
    roll_deg: float
    roll_amp_deg: float
    motion_hz: float
    motion_phase: float
    sway_px: float
    squeeze: float  # horizontal compression (0.8 - 1.0), reads as a turned head
    gain: float
    light_gradient: float  # relative brightness change from the left to the right edge
    tint: list  # RGB multipliers

    @classmethod
    def random(cls, rng: np.random.Generator, width: int, height: int, crop_size: tuple[int, int]) -> "Scene":
        cw, ch = crop_size
        # Head height between 60% and 95% of the frame height.
        scale = float(rng.uniform(0.6, 0.95) * height / ch)
        margin_x = max(0.0, (width - cw * scale) / 2)
        return cls(
            width=width, height=height,
            background=str(rng.choice(["gradient", "room", "blotches"])),
            bg_seed=int(rng.integers(2**31)),
            bg_colors=[[int(c) for c in rng.integers(20, 236, 3)] for _ in range(2)],
            scale=round(scale, 4),
            center=[round(float(width / 2 + rng.uniform(-0.6, 0.6) * margin_x), 2),
                    round(float(height / 2 + rng.uniform(0.0, 0.08) * height), 2)],
            roll_deg=round(float(rng.uniform(-10, 10)), 2),
            roll_amp_deg=round(float(rng.uniform(0.5, 3.0)), 2),
            motion_hz=round(float(rng.uniform(0.15, 0.5)), 3),
            motion_phase=round(float(rng.uniform(0, 2 * math.pi)), 3),
            sway_px=round(float(rng.uniform(1.0, 6.0)), 2),
            squeeze=round(float(rng.uniform(0.8, 1.0)), 3),
            gain=round(float(rng.uniform(0.65, 1.25)), 3),
            light_gradient=round(float(rng.uniform(-0.5, 0.5)), 3),
            tint=[round(float(x), 3) for x in rng.uniform(0.85, 1.15, 3)],
        )

    def pose(self, t: float, crop_size: tuple[int, int]) -> np.ndarray:
        """2x3 affine map from crop pixels to frame pixels at time ``t`` (seconds)."""
        cw, ch = crop_size
        phase = 2 * math.pi * self.motion_hz * t + self.motion_phase
        angle = math.radians(self.roll_deg + self.roll_amp_deg * math.sin(phase))
        tx = self.center[0] + self.sway_px * math.sin(0.7 * phase + 1.0)
        ty = self.center[1] + 0.5 * self.sway_px * math.sin(1.3 * phase)
        sx, sy = self.scale * self.squeeze, self.scale
        c, s = math.cos(angle), math.sin(angle)
        a = np.array([[c * sx, -s * sy], [s * sx, c * sy]])
        offset = np.array([tx, ty]) - a @ np.array([cw / 2, ch / 2])
        return np.hstack([a, offset[:, None]]).astype(np.float64)

    def render_background(self) -> np.ndarray:
        rng = np.random.default_rng(self.bg_seed)
        h, w = self.height, self.width
        c0, c1 = (np.array(c, np.float32) for c in self.bg_colors)
        ramp = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
        bg = np.broadcast_to(c0 * (1 - ramp) + c1 * ramp, (h, w, 3)).copy()
        if self.background == "room":
            for _ in range(int(rng.integers(3, 7))):
                x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
                x1, y1 = x0 + int(rng.integers(w // 8, w // 2)), y0 + int(rng.integers(h // 8, h // 2))
                cv2.rectangle(bg, (x0, y0), (x1, y1), [float(v) for v in rng.integers(20, 236, 3)], -1)
            bg = cv2.GaussianBlur(bg, (0, 0), 2.0)
        elif self.background == "blotches":
            small = rng.uniform(-60, 60, (4, 5, 3)).astype(np.float32)
            bg = bg + cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        return np.clip(bg, 0, 255)

    def light_field(self) -> np.ndarray:
        x = np.linspace(-0.5, 0.5, self.width, dtype=np.float32)[None, :, None]
        return self.gain * (1 + self.light_gradient * x) * np.array(self.tint, np.float32)


class ClipRenderer:
    """Renders the frames of one clip from its truth record (scene, events, mouth envelope)."""

    def __init__(self, rig: FaceRig, scene: Scene, fps: int):
        self.rig, self.scene, self.fps = rig, scene, fps
        self.background = scene.render_background()
        self.light = scene.light_field()

    def frame(self, index: int, events: list[dict], mouth_open: float) -> np.ndarray:
        """RGB uint8 frame ``index``; ``events`` are dicts with kind/onset_s/duration_s/amplitude_fw."""
        t = index / self.fps
        fw = self.rig.identity.face_width
        weights: dict[str, float] = {}
        for ev in events:
            w = event_weight(t, ev["onset_s"], ev["duration_s"])
            if w > 0:
                weights[ev["kind"]] = weights.get(ev["kind"], 0.0) + w * ev["amplitude_fw"] * fw
        jaw_px = JAW_OPEN_MAX * fw * float(mouth_open)
        weights["jaw_open"] = jaw_px
        crop = self.rig.mouth_cavity(self.rig.warp(weights), jaw_px)
        m = self.scene.pose(t, self.rig.size)
        size = (self.scene.width, self.scene.height)
        face = cv2.warpAffine(crop, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
        alpha = cv2.warpAffine(self.rig.mask, m, size, flags=cv2.INTER_LINEAR, borderValue=0)[..., None]
        out = (self.background * (1 - alpha) + face * alpha) * self.light
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)

    def event_box(self, kind: str, t: float) -> list[float]:
        """Frame-pixel box (x0, y0, x1, y1) of an action's region at time ``t``."""
        x0, y0, x1, y1 = self.rig.region_box(kind)
        corners = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]])
        m = self.scene.pose(t, self.rig.size)
        pts = corners @ m[:, :2].T + m[:, 2]
        lo = np.clip(pts.min(0), 0, [self.scene.width - 1, self.scene.height - 1])
        hi = np.clip(pts.max(0), 0, [self.scene.width - 1, self.scene.height - 1])
        return [round(float(v), 1) for v in (*lo, *hi)]
