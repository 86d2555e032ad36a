"""Faces: detection, 68-point landmarks, main-speaker tracking and aligned crops.

Backends share one interface on RGB uint8 images (H, W, 3):

- ``detect(image) -> list[Face]``, largest first;
- ``landmarks(image, bbox) -> (68, 2)`` for a known box (used on the full-rate frames around
  a sampled frame, where running the detector again would cost too much).

``DlibFaceDetector`` is the offline backend: dlib's HOG detector and the 68-point shape
predictor from ``face-recognition-models`` (weights ship in PyPI packages).
``InsightFaceDetector`` is the production backend: insightface's buffalo_l (RetinaFace
detector + 68-point 3D landmarks) read from a model directory, never downloaded.

Landmarks follow the 68-point iBUG scheme in both, so regions (eyes 36-47, brows 17-26,
mouth 48-67, jaw 0-16) mean the same thing downstream.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np

REGIONS: dict[str, list[int]] = {
    "eyes": list(range(36, 48)),
    "brows": list(range(17, 27)),
    "mouth": list(range(48, 68)),
    "jaw": list(range(0, 17)),
}


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


def face_recognition_models(error: type[Exception] = FaceModelMissing):
    """The ``face_recognition_models`` package (dlib's landmark and descriptor weights); a missing
    install raises ``error`` saying how to get it."""
    try:
        with warnings.catch_warnings():  # it imports pkg_resources, deprecated but present
            warnings.simplefilter("ignore")
            import face_recognition_models as frm
    except ImportError as exc:
        raise error("the dlib face models are not installed: pip install face-recognition-models "
                    "(part of `pip install 'microemo[embedded]'`)") from exc
    return frm


def _check_image(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)


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
        return self._dlib.shape_predictor(face_recognition_models().pose_predictor_model_location())

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in an RGB uint8 image, largest first."""
        image = _check_image(image)
        rects, scores, _ = self._detector.run(image, self.upsample, 0.0)
        faces = []
        for rect, score in zip(rects, scores):
            box = (rect.left(), rect.top(), rect.right(), rect.bottom())
            lm = self.landmarks(image, box) if self.with_landmarks else None
            faces.append(Face(box, float(score), lm))
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def landmarks(self, image: np.ndarray, bbox) -> np.ndarray:
        """68 (x, y) landmarks of the face in ``bbox`` (x0, y0, x1, y1)."""
        rect = self._dlib.rectangle(*(int(round(v)) for v in bbox))
        shape = self._predictor(_check_image(image), rect)
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


class InsightFaceDetector:
    """insightface buffalo_l from ``model_dir`` (``model_dir/models/buffalo_l/*.onnx``).

    The production backend. Nothing is downloaded: a missing directory is an error that
    says where to put the model pack.
    """

    name = "insightface-buffalo_l"

    def __init__(self, model_dir: str, det_size: int = 640, providers: list[str] | None = None):
        pack = Path(model_dir).expanduser() / "models" / "buffalo_l"
        if not pack.is_dir() or not any(pack.glob("det_*.onnx")) or not any(pack.glob("1k3d68*.onnx")):
            raise FaceModelMissing(
                f"insightface buffalo_l not found: put det_10g.onnx and 1k3d68.onnx (the buffalo_l pack) "
                f"in {pack}, or use faces.backend=dlib"
            )
        self.model_dir, self.det_size = str(Path(model_dir).expanduser()), det_size
        self.providers = providers or (["CUDAExecutionProvider", "CPUExecutionProvider"])

    @cached_property
    def _app(self):
        from insightface.app import FaceAnalysis

        app = FaceAnalysis(name="buffalo_l", root=self.model_dir, providers=self.providers,
                           allowed_modules=["detection", "landmark_3d_68"])
        app.prepare(ctx_id=0, det_size=(self.det_size, self.det_size))
        return app

    def detect(self, image: np.ndarray) -> list[Face]:
        bgr = cv2.cvtColor(_check_image(image), cv2.COLOR_RGB2BGR)
        faces = [Face(tuple(float(v) for v in f.bbox), float(f.det_score),
                      np.asarray(f.landmark_3d_68[:, :2], np.float32)) for f in self._app.get(bgr)]
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def landmarks(self, image: np.ndarray, bbox) -> np.ndarray:
        from insightface.app.common import Face as IFace

        bgr = cv2.cvtColor(_check_image(image), cv2.COLOR_RGB2BGR)
        face = IFace(bbox=np.asarray(bbox, np.float32), kps=None, det_score=1.0)
        self._app.models["landmark_3d_68"].get(bgr, face)
        return np.asarray(face.landmark_3d_68[:, :2], np.float32)


def build_detector(backend: str, model_dir: str | None = None, upsample: int = 0):
    """``dlib`` (offline default) or ``insightface`` (needs ``model_dir``)."""
    if backend == "dlib":
        return DlibFaceDetector(upsample=upsample)
    if backend == "insightface":
        if not model_dir:
            raise FaceModelMissing("faces.backend=insightface needs faces.model_dir (a folder holding models/buffalo_l)")
        return InsightFaceDetector(model_dir)
    raise ValueError(f"unknown face backend {backend!r} (dlib or insightface)")


# ---------------------------------------------------------------------------- tracking

def iou(a, b) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class SpeakerTracker:
    """Follows the main speaker across sampled frames, online.

    The main speaker is the face that continues the current track (IoU >= ``min_iou`` with
    its last box); when the track is lost for more than ``patience`` frames, the most
    prominent face (area x centrality) starts a new track. Track ids count from 0.
    """

    min_iou: float = 0.3
    patience: int = 4
    track_id: int = -1
    _last: tuple | None = None
    _missed: int = 0
    _width: float = field(default=0.0, repr=False)

    def update(self, faces: list[Face], frame_size: tuple[int, int]) -> tuple[Face | None, int]:
        """Pick the main speaker's face among ``faces``; returns (face or None, track id)."""
        w, h = frame_size
        if self._last is not None:
            best = max(faces, key=lambda f: iou(f.bbox, self._last), default=None)
            if best is not None and iou(best.bbox, self._last) >= self.min_iou:
                self._last, self._missed = best.bbox, 0
                return best, self.track_id
            self._missed += 1
            if self._missed <= self.patience or not faces:
                return None, self.track_id
        if not faces:
            return None, self.track_id

        def prominence(f: Face) -> float:
            cx, cy = (f.bbox[0] + f.bbox[2]) / 2, (f.bbox[1] + f.bbox[3]) / 2
            off = ((cx - w / 2) / w) ** 2 + ((cy - h / 2) / h) ** 2
            return f.area * (1.0 - min(0.9, 2 * off))

        face = max(faces, key=prominence)
        self.track_id += 1
        self._last, self._missed = face.bbox, 0
        return face, self.track_id


# ---------------------------------------------------------------------------- alignment

# Five reference points (eye centres, nose tip, mouth corners) for a 112x112 face, the
# ArcFace convention; scaled to the crop size with ``margin`` added around the face.
_REF_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                     [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """Eye centres, nose tip and mouth corners from 68 landmarks, (5, 2)."""
    return np.stack([landmarks[36:42].mean(0), landmarks[42:48].mean(0), landmarks[30],
                     landmarks[48], landmarks[54]]).astype(np.float32)


def alignment_matrix(landmarks: np.ndarray, size: int = 150, margin: float = 0.15) -> np.ndarray:
    """2x3 similarity transform from frame pixels to a ``size`` x ``size`` aligned crop.

    ``margin`` is the fraction of the crop added around the ArcFace face box on every side.
    """
    ref = (_REF_112 / 112.0 - 0.5) / (1.0 + 2 * margin) + 0.5
    m, _ = cv2.estimateAffinePartial2D(five_points(landmarks), ref * size, method=cv2.LMEDS)
    if m is None:  # degenerate landmarks; fall back to the landmarks' box
        x0, y0 = landmarks.min(0)
        x1, y1 = landmarks.max(0)
        s = size / max(1.0, max(x1 - x0, y1 - y0) * (1 + 2 * margin))
        m = np.array([[s, 0, size / 2 - s * (x0 + x1) / 2], [0, s, size / 2 - s * (y0 + y1) / 2]])
    return m.astype(np.float64)


def align(image: np.ndarray, matrix: np.ndarray, size: int = 150) -> np.ndarray:
    """Aligned crop (size, size, 3) of ``image`` under ``matrix``."""
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]
