"""Facial dynamics around a sampled frame: what moved in the face, where, and when.

Micro-expressions last 1/25 s to 1/2 s, shorter than the sampling interval, so each sampled
frame carries the full-rate frames within ``window_s`` around it (see ``pipeline.decode``).
Every frame of that window is warped with the *sampled* frame's alignment (a window is short
enough that the head barely moves), and we measure per facial region:

- motion energy: mean absolute grey-level change between consecutive aligned frames;
- landmark motion: mean landmark speed, in crop widths per frame step;

- geometry: signed change of ``GEOMETRY`` facial measures (brow heights, brow gap, eye
  opening, mouth-corner lift, upper-lip height, lip gap, mouth width; distances in inter-ocular
  units) against the window's median: *which way* the face moved, which the unsigned energy and
  speed cannot tell (brows up for surprise and down for anger move them equally);

each resampled to ``STEPS`` time steps across the window, plus each region's peak energy, the
time of that peak relative to the sampled frame, and each measure's largest signed change.
The result is one fixed-size vector (``DIM`` values) per frame, laid out as::

    energy (4 x STEPS) | landmark speed (4 x STEPS) | peak energy (4) | peak time (4)
    | geometry change (8 x STEPS) | largest geometry change (8)

``motion_energy`` is the face's peak energy, a scalar for quick queries. Feature differences
between consecutive sampled frames are added by the processor.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.faces import REGIONS, transform_points

STEPS = 10
ENERGY_REGIONS = ("eyes", "brows", "mouth", "face")
LANDMARK_REGIONS = ("eyes", "brows", "mouth", "jaw")
GEOMETRY = ("brow_outer", "brow_inner", "brow_gap", "eye_open", "mouth_corner_lift", "upper_lip", "lip_gap",
            "mouth_width")
DIM = (len(ENERGY_REGIONS) + len(LANDMARK_REGIONS)) * STEPS + 2 * len(ENERGY_REGIONS) + len(GEOMETRY) * (STEPS + 1)
GEOMETRY_OFFSET = DIM - len(GEOMETRY) * (STEPS + 1)  # where the geometry block starts
VERSION = "microemo-dynamics-2"  # the store's encoder id: a new layout makes older stores re-process
CROP = 96  # pixels; dynamics need shape change, not identity detail


@dataclass
class Dynamics:
    vector: np.ndarray  # (DIM,) float32
    motion_energy: float  # peak whole-face energy, grey levels per frame step
    peak_offset_s: float  # when that peak happens, relative to the sampled frame


def _resample(series: np.ndarray, steps: int = STEPS) -> np.ndarray:
    """(R, K) -> (R, steps) by linear interpolation over the window's normalised time."""
    r, k = series.shape
    if k == 0:
        return np.zeros((r, steps), np.float32)
    if k == 1:
        return np.repeat(series, steps, axis=1)
    x = np.linspace(0, 1, k)
    xs = np.linspace(0, 1, steps)
    return np.stack([np.interp(xs, x, row) for row in series]).astype(np.float32)


def geometry(landmarks: np.ndarray) -> np.ndarray:
    """(K, 68, 2) landmarks (y down) -> (K, len(GEOMETRY)) measures in inter-ocular distances.

    Positive means: brows higher above the eyes, brows farther apart, eyes more open, mouth
    corners higher than the lip centre, upper lip farther below the nose, lips farther apart,
    mouth wider.
    """
    lm = np.asarray(landmarks, np.float64)
    left, right = lm[:, 36:42].mean(1), lm[:, 42:48].mean(1)
    iod = np.maximum(np.linalg.norm(right - left, axis=1), 1e-6)
    eye_y = (left[:, 1] + right[:, 1]) / 2
    y, x = lm[..., 1], lm[..., 0]
    g = np.stack([
        eye_y - y[:, [17, 18, 25, 26]].mean(1),
        eye_y - y[:, [20, 21, 22, 23]].mean(1),
        x[:, 22] - x[:, 21],
        y[:, [40, 41, 46, 47]].mean(1) - y[:, [37, 38, 43, 44]].mean(1),
        y[:, [51, 57]].mean(1) - y[:, [48, 54]].mean(1),
        y[:, 51] - y[:, 33],
        y[:, 57] - y[:, 51],
        x[:, 54] - x[:, 48],
    ], axis=1)
    return (g / iod[:, None]).astype(np.float32)


def _region_boxes(landmarks_crop: np.ndarray, size: int) -> dict[str, tuple[int, int, int, int]]:
    boxes = {}
    pad = 0.06 * size
    for name in ("eyes", "brows", "mouth"):
        pts = landmarks_crop[REGIONS[name]]
        x0, y0 = np.floor(pts.min(0) - pad).astype(int)
        x1, y1 = np.ceil(pts.max(0) + pad).astype(int)
        boxes[name] = (max(0, x0), max(0, y0), min(size, x1), min(size, y1))
    boxes["face"] = (0, 0, size, size)
    return boxes


def face_dynamics(window: np.ndarray, window_pts_s: np.ndarray, centre_pts_s: float, matrix: np.ndarray,
                  landmarks: np.ndarray, window_landmarks: np.ndarray | None = None,
                  crop_size: int = 150) -> Dynamics:
    """Dynamics of the face over a full-rate window.

    window: (K, H, W, 3) uint8 frames; window_pts_s: (K,) seconds; centre_pts_s: the sampled
    frame's time; matrix: 2x3 alignment (frame -> ``crop_size`` crop) of the sampled frame;
    landmarks: (68, 2) of the sampled frame in frame pixels; window_landmarks: (K, 68, 2) or
    None (then landmark motion is zero).
    """
    scale = CROP / crop_size
    m = matrix.copy()
    m[:, :] *= scale
    grey = np.stack([cv2.warpAffine(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), m, (CROP, CROP),
                                    flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)
                     for f in window]).astype(np.float32)
    diffs = np.abs(np.diff(grey, axis=0))  # (K-1, CROP, CROP)
    boxes = _region_boxes(transform_points(landmarks, m), CROP)
    energy = np.stack([
        diffs[:, y0:y1, x0:x1].mean(axis=(1, 2)) if diffs.size and x1 > x0 and y1 > y0
        else np.zeros(len(diffs), np.float32)
        for x0, y0, x1, y1 in (boxes[r] for r in ENERGY_REGIONS)
    ]) if len(diffs) else np.zeros((len(ENERGY_REGIONS), 0), np.float32)
    if window_landmarks is not None and len(window_landmarks) > 1:
        crop_lm = np.stack([transform_points(lm, m) for lm in window_landmarks]) / CROP
        speed = np.linalg.norm(np.diff(crop_lm, axis=0), axis=2)  # (K-1, 68)
        motion = np.stack([speed[:, REGIONS[r]].mean(axis=1) for r in LANDMARK_REGIONS])
        shape = geometry(crop_lm)
        change = (shape - np.median(shape, axis=0)).T  # (G, K)
        extreme = change[np.arange(len(GEOMETRY)), np.abs(change).argmax(axis=1)]
    else:
        motion = np.zeros((len(LANDMARK_REGIONS), max(0, len(window) - 1)), np.float32)
        change = np.zeros((len(GEOMETRY), 0), np.float32)
        extreme = np.zeros(len(GEOMETRY), np.float32)
    # each diff sits between two frames: its time is their midpoint
    mid_t = (window_pts_s[1:] + window_pts_s[:-1]) / 2 - centre_pts_s if len(window) > 1 else np.zeros(0)
    if energy.shape[1]:
        peak_idx = energy.argmax(axis=1)
        peaks = energy.max(axis=1)
        peak_t = mid_t[peak_idx]
    else:
        peaks = np.zeros(len(ENERGY_REGIONS), np.float32)
        peak_t = np.zeros(len(ENERGY_REGIONS), np.float32)
    # geometry changes are a few hundredths of an inter-ocular distance: x 10 brings them near unit scale
    vector = np.concatenate([_resample(energy).ravel(), _resample(motion * 100).ravel(), peaks, peak_t,
                             _resample(change * 10).ravel(), extreme * 10])
    face_i = ENERGY_REGIONS.index("face")
    return Dynamics(vector.astype(np.float32), float(peaks[face_i]), float(peak_t[face_i]))


def micro_events(pts_s: np.ndarray, energy: np.ndarray, z: float = 3.5, min_gap_s: float = 0.6,
                 offsets_s: np.ndarray | None = None) -> list[float]:
    """Times of likely micro-events: sampled frames whose whole-face ``motion_energy`` stands out.

    A frame is an event when its energy exceeds the clip's median by ``z`` robust standard
    deviations (1.4826 x MAD, floored at 5 % of the median so a still face is not all events);
    events closer than ``min_gap_s`` keep the strongest. ``offsets_s`` (``motion_peak_offset_s``)
    moves each event to the energy peak inside its window. Speech moves the mouth all the time,
    so this finds brief, stronger-than-usual motion, not every planted event.
    """
    pts, e = np.asarray(pts_s, np.float64), np.nan_to_num(np.asarray(energy, np.float64))
    if len(e) < 3:
        return []
    med = float(np.median(e))
    scale = max(1.4826 * float(np.median(np.abs(e - med))), 0.05 * abs(med), 1e-6)
    times = pts + (np.nan_to_num(np.asarray(offsets_s, np.float64)) if offsets_s is not None else 0.0)
    picked: list[tuple[float, float]] = []
    for i in np.argsort(-e):
        if (e[i] - med) / scale < z:
            break
        if all(abs(times[i] - t) >= min_gap_s for t, _ in picked):
            picked.append((float(times[i]), float(e[i])))
    return sorted(t for t, _ in picked)
