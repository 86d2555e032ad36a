"""Face photos that ship inside installed packages, prepared as renderable identities.

Nothing is downloaded: the photos come from scikit-image (astronaut Eileen Collins),
matplotlib (Grace Hopper) and insightface (a group photo, each face one identity).
Each identity is a head crop with its 68 landmarks, detected once with the offline dlib
backend.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.faces import DlibFaceDetector

log = logging.getLogger(__name__)

# Head crop relative to the detected face box: width and height in face widths, and where
# the face centre sits vertically in the crop (0 top, 1 bottom).
CROP_W, CROP_H, FACE_CY = 1.9, 2.3, 0.52
# Every identity is resampled so its face is this many pixels wide in the crop.
FACE_PX = 150
# espeak-ng voice variants, one per identity (kept stable so a speaker keeps a voice).
VOICES = ("en-us+f3", "en-us+m3", "en-us+f2", "en-us+m1", "en-us+m7", "en-us+f4",
          "en-us+m2", "en-us+f1", "en-us+m4", "en-us+f5")


@dataclass
class Identity:
    """A head crop (RGB uint8), its 68 landmarks in crop pixels, and its face width in pixels."""

    name: str
    source: str
    image: np.ndarray
    landmarks: np.ndarray
    face_width: float
    voice: str


class NoIdentities(RuntimeError):
    pass


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def photo_sources() -> list[tuple[str, Path]]:
    """(label, path) of every face photo found in installed packages."""
    found = []
    candidates = [
        ("skimage", "data/astronaut.png"),
        ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
        ("insightface", "data/images/t1.jpg"),
    ]
    for module, rel in candidates:
        root = _package_dir(module)
        if root is not None and (root / rel).is_file():
            found.append((f"{module}:{rel}", root / rel))
    return found


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"cannot read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _crop_identity(image: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    # The face box from the jaw line and brows is steadier than the detector's box.
    x0, y0 = landmarks.min(axis=0)
    x1, y1 = landmarks.max(axis=0)
    fw = float(x1 - x0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    scale = FACE_PX / fw
    out_w = int(round(CROP_W * FACE_PX)) // 2 * 2
    out_h = int(round(CROP_H * FACE_PX)) // 2 * 2
    # Affine map from source pixels to the crop: scale about the face centre.
    m = np.array([[scale, 0, out_w / 2 - scale * cx],
                  [0, scale, out_h * FACE_CY - scale * cy]], dtype=np.float64)
    crop = cv2.warpAffine(image, m, (out_w, out_h), flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC,
                          borderMode=cv2.BORDER_REFLECT101)
    lm = landmarks @ m[:, :2].T + m[:, 2]
    return crop, lm.astype(np.float32), FACE_PX


def load_identities(min_face_px: int = 60, min_score: float = 0.3) -> list[Identity]:
    """Detect every usable face in the packaged photos; at least one must be found.

    ``min_score`` drops weak HOG hits (the mission patch on the astronaut's suit scores 0.12).
    """
    detector = DlibFaceDetector(upsample=1)
    identities: list[Identity] = []
    for label, path in photo_sources():
        image = _read_rgb(path)
        faces = detector.detect(image)
        # Left to right, so names are stable.
        faces = sorted((f for f in faces if f.width >= min_face_px and f.score >= min_score),
                       key=lambda f: f.bbox[0])
        for k, face in enumerate(faces):
            crop, lm, fw = _crop_identity(image, face.landmarks)
            name = f"{path.stem}" if len(faces) == 1 else f"{path.stem}_{k}"
            voice = VOICES[len(identities) % len(VOICES)]
            identities.append(Identity(name, label, crop, lm, fw, voice))
    if not identities:
        raise NoIdentities(
            "no face photos found in installed packages (need scikit-image, matplotlib or "
            "insightface): pip install 'microemo[embedded]'"
        )
    log.info("loaded %d identities: %s", len(identities), ", ".join(i.name for i in identities))
    return identities
