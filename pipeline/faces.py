"""Face detection and 68-point landmarks.

Backends share one small interface: ``detect(image) -> list[Face]`` on an RGB uint8 image
(H, W, 3). The offline backend is dlib's HOG detector with the 68-point shape predictor
from ``face-recognition-models`` (no weights are downloaded; both ship in PyPI packages).
The production backend (insightface buffalo_l from a model directory) is added by the
preprocessing pipeline.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np


class FaceModelMissing(RuntimeError):
    """A face model's files are not installed where the backend looks for them."""


@dataclass
class Face:
    """One detected face: ``bbox`` (x0, y0, x1, y1) in pixels, ``score``, ``landmarks`` (68, 2) x, y."""

    bbox: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray | None = None

    @property
    def width(self) -> float:
        return self.bbox[2] - self.bbox[0]

    @property
    def area(self) -> float:
        return max(0.0, self.bbox[2] - self.bbox[0]) * max(0.0, self.bbox[3] - self.bbox[1])


class DlibFaceDetector:
    """dlib HOG frontal face detector + 68-point landmarks; runs on CPU with no downloads.

    ``upsample`` doubles the image that many times before detection, which finds faces
    down to about 40 px wide at 1 (and costs about 4x the time).
    """

    name = "dlib-hog-68"

    def __init__(self, upsample: int = 0, landmarks: bool = True):
        self.upsample = upsample
        self.with_landmarks = landmarks

    @cached_property
    def _dlib(self):
        try:
            import dlib
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise FaceModelMissing(
                "the offline face backend needs dlib: pip install 'microemo[embedded]' (dlib-bin)"
            ) from exc
        return dlib

    @cached_property
    def _detector(self):
        return self._dlib.get_frontal_face_detector()

    @cached_property
    def _predictor(self):
        try:
            with warnings.catch_warnings():  # it imports pkg_resources, deprecated but present
                warnings.simplefilter("ignore")
                import face_recognition_models
        except ImportError as exc:
            raise FaceModelMissing(
                "68-point landmarks need the face-recognition-models package: "
                "pip install 'microemo[embedded]'"
            ) from exc
        return self._dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in an RGB uint8 image, largest first."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
        image = np.ascontiguousarray(image)
        rects, scores, _ = self._detector.run(image, self.upsample, 0.0)
        faces = []
        for rect, score in zip(rects, scores):
            lm = None
            if self.with_landmarks:
                shape = self._predictor(image, rect)
                lm = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
            faces.append(Face((rect.left(), rect.top(), rect.right(), rect.bottom()), float(score), lm))
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces
