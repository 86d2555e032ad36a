"""One video in, its feature-store rows out: fetch, decode, faces, encoders, dynamics, audio,
utterances. A ``VideoProcessor`` loads its models once and is reused for many videos (one
per Ray worker). ``process`` never raises for a bad video: the video's row says what went
wrong (``status``, ``error_type``, ``error``), and none of its partial rows are kept.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.decode import DecodeConfig, DecodeError, decode_audio, iter_samples, probe
from pipeline.dynamics import DIM as DYN_DIM
from pipeline.dynamics import VERSION as DYN_VERSION
from pipeline.dynamics import face_dynamics
from pipeline.faces import SpeakerTracker, align, alignment_matrix, build_detector
from pipeline.manifest import ManifestEntry
from pipeline.store import PIPELINE_VERSION, f16
from pipeline.utterances import AsrConfig, UtteranceError, utterances_for

# Errors worth trying again on the next run with unchanged input (the rest are properties
# of the file and would fail the same way).
RETRYABLE = {"timeout", "fetch_failed", "worker_crashed", "internal"}


@dataclass
class FacesConfig:
    backend: str = "dlib"  # dlib (offline) | insightface (needs model_dir)
    model_dir: str | None = None  # insightface: folder holding models/buffalo_l
    upsample: int = 0  # dlib: image doublings before detection (1 finds ~40 px faces, 4x slower)
    crop_size: int = 150  # aligned crop side, pixels
    margin: float = 0.15  # crop margin around the face, fraction of the crop per side
    window_landmarks: bool = True  # landmarks on every full-rate window frame (landmark motion)


@dataclass
class EncodersConfig:
    """Encoder specs: null = the embedded default; see pipeline.encoders.build_encoder."""

    frame: str | None = None  # e.g. "hf:/models/clip-vit-b16" (CLIP/SigLIP vision tower)
    face: str | None = None
    audio: str | None = None  # e.g. "whisper:/models/whisper-small-ct2"
    device: str = "auto"  # auto = cuda when available
    batch_size: int = 32


@dataclass
class ProcessConfig:
    # CPU threads for each worker's libraries (torch, OpenCV, CTranslate2, ffmpeg). 0 = automatic: a Ray
    # worker uses the CPUs it reserved (cpus_per_worker, at least 1), in-process use (infer) the libraries'
    # defaults; -1 = the libraries' defaults everywhere (each may start one thread per core: workers that
    # share a machine then oversubscribe it); n > 0 = n.
    threads: int = 0
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    faces: FacesConfig = field(default_factory=FacesConfig)
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    asr: AsrConfig = field(default_factory=AsrConfig)
    fetch_retries: int = 3


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def source_fingerprint(uri: str, storage_options: dict | None = None) -> str:
    """Cheap change detector: size and mtime (local) or size and ETag (object stores)."""
    if "://" not in uri:
        st = os.stat(uri)
        return f"{st.st_size}-{st.st_mtime_ns}"
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    info = fs.info(path)
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{info.get('size')}-{str(tag).strip(chr(34))}"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def limit_threads(n: int) -> None:
    """Cap this process's compute threads at ``n`` (n <= 0: leave the libraries' defaults).

    torch's intra-op pool and OpenCV's pool are process-wide; CTranslate2 (the audio encoder) and
    ffmpeg take theirs from ``VideoProcessor`` (``DecodeConfig.threads``, ``cpu_threads``).
    """
    if n <= 0:
        return
    os.environ["OMP_NUM_THREADS"] = str(n)  # libraries that start OpenMP later
    import cv2

    cv2.setNumThreads(n)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:  # pragma: no cover - torch is a dependency; kept for a lean worker image
        pass


class VideoProcessor:
    """Holds the models; ``process(entry)`` returns every row of one video.

    ``threads`` > 0 caps every library's compute threads (``limit_threads``, ffmpeg's
    ``-threads``, CTranslate2's ``intra_threads``); 0 leaves their defaults.
    """

    def __init__(self, cfg: ProcessConfig, storage_options: dict | None = None, threads: int = 0):
        from pipeline.encoders import build_encoder

        if threads > 0:
            limit_threads(threads)
            cfg = replace(cfg, decode=replace(cfg.decode, threads=threads))
        self.cfg = cfg
        self.threads = threads
        self.storage_options = storage_options or {}
        device = resolve_device(cfg.encoders.device)
        self.detector = build_detector(cfg.faces.backend, cfg.faces.model_dir, cfg.faces.upsample)
        opts = {"storage_options": self.storage_options}
        self.frame_encoder = build_encoder("frame", cfg.encoders.frame, device, **opts)
        self.face_encoder = build_encoder("face", cfg.encoders.face, device)  # weights ship in a package
        self.audio_encoder = build_encoder("audio", cfg.encoders.audio, device, **opts,
                                           **({"cpu_threads": threads} if threads > 0 else {}))

    def encoder_info(self) -> dict:
        return {kind: {"id": e.id, "weight_hash": e.weight_hash, "tokens": e.tokens, "dim": e.dim}
                for kind, e in (("frame", self.frame_encoder), ("face", self.face_encoder),
                                ("audio", self.audio_encoder))} | {
            "faces": {"id": self.detector.name}, "dynamics": {"id": DYN_VERSION, "dim": DYN_DIM}}

    def dims(self) -> dict[str, tuple[int, int]]:
        return {"frame": (self.frame_encoder.tokens, self.frame_encoder.dim),
                "face": (self.face_encoder.tokens, self.face_encoder.dim),
                "audio": (self.audio_encoder.tokens, self.audio_encoder.dim)}

    # ------------------------------------------------------------------ one video
    def process(self, entry: ManifestEntry, shard: str, chash: str) -> dict:
        """Rows of one video: {"videos": row, "frames": [...], "utterances": [...], "audio": [...], "labels": [...]}."""
        t0 = time.perf_counter()
        row = {"video_id": entry.video_id, "uri": entry.uri, "manifest_line": entry.line, "status": "ok",
               "error_type": None, "error": None, "config_hash": chash, "shard": shard,
               "processed_at": datetime.now(timezone.utc), "pipeline_version": PIPELINE_VERSION}
        out = {"videos": row, "frames": [], "utterances": [], "audio": [], "labels": []}
        if not entry.ok:
            row.update(status="error", error_type=entry.error_type, error=f"manifest line {entry.line}: {entry.error}")
            return out
        tmpdir = None
        try:
            local, tmpdir, t_fetch = self._fetch(entry, row)
            row["t_fetch_s"] = t_fetch
            row["content_hash"] = sha256_file(local)
            frames, utts, audio, label = self._extract(entry, local, row)
            out.update(frames=frames, utterances=utts, audio=audio, labels=label)
        except DecodeError as exc:
            row.update(status="error", error_type=exc.error_type, error=str(exc))
        except UtteranceError as exc:
            row.update(status="error", error_type=exc.error_type, error=str(exc))
        except _FetchError as exc:
            row.update(status="error", error_type=exc.error_type, error=str(exc))
        except Exception as exc:  # a bug or a library failure on this input: recorded, not fatal
            row.update(status="error", error_type="internal", error=f"{type(exc).__name__}: {exc}"[:500])
        finally:
            if tmpdir:
                shutil.rmtree(tmpdir, ignore_errors=True)
        if row["status"] == "error":
            out.update(frames=[], utterances=[], audio=[], labels=[])
        row["t_total_s"] = time.perf_counter() - t0
        return out

    def _fetch(self, entry: ManifestEntry, row: dict) -> tuple[str, str | None, float]:
        t = time.perf_counter()
        uri = entry.uri
        try:
            row["source_fingerprint"] = source_fingerprint(uri, self.storage_options)
        except FileNotFoundError:
            raise _FetchError("missing_file", f"{uri}: no such file") from None
        except OSError as exc:
            raise _FetchError("fetch_failed", f"{uri}: {exc}") from None
        if "://" not in uri:
            return uri, None, time.perf_counter() - t
        import fsspec

        tmpdir = tempfile.mkdtemp(prefix="microemo-")
        local = str(Path(tmpdir) / "video")
        fs, path = fsspec.core.url_to_fs(uri, **self.storage_options)
        for attempt in range(self.cfg.fetch_retries + 1):
            try:
                fs.get(path, local)
                return local, tmpdir, time.perf_counter() - t
            except FileNotFoundError:
                shutil.rmtree(tmpdir, ignore_errors=True)
                raise _FetchError("missing_file", f"{uri}: no such object") from None
            except OSError as exc:  # throttling, resets: back off and retry
                if attempt == self.cfg.fetch_retries:
                    shutil.rmtree(tmpdir, ignore_errors=True)
                    raise _FetchError("fetch_failed", f"{uri}: {exc}") from None
                time.sleep(min(8.0, 0.5 * 2**attempt))
        raise AssertionError("unreachable")

    def _extract(self, entry: ManifestEntry, local: str, row: dict):
        cfg = self.cfg
        t = time.perf_counter()
        info = probe(local, cfg.decode)
        row.update(size_bytes=info.size_bytes, duration_s=info.duration_s, fps=info.fps, width=info.width,
                   height=info.height, has_audio=info.has_audio)
        t_decode = time.perf_counter() - t
        t_faces = t_encode = 0.0
        frames: list[dict] = []
        images: list[np.ndarray] = []
        crops: list[tuple[int, np.ndarray]] = []
        tracker = SpeakerTracker()
        fs = cfg.faces

        def flush():
            nonlocal t_encode
            te = time.perf_counter()
            if images:
                feats = self.frame_encoder.encode(np.stack(images))
                for r, feat in zip(frames[len(frames) - len(images):], feats):
                    r["global_feat"] = f16(feat)
                images.clear()
            if crops:
                feats = self.face_encoder.encode(np.stack([c for _, c in crops]))
                for (i, _), feat in zip(crops, feats):
                    frames[i]["face_feat"] = f16(feat)
                crops.clear()
            t_encode += time.perf_counter() - te

        it = iter_samples(info, cfg.decode)
        while True:
            td = time.perf_counter()
            sample = next(it, None)
            t_decode += time.perf_counter() - td
            if sample is None:
                break
            tf = time.perf_counter()
            img = sample.image
            face, track = tracker.update(self.detector.detect(img), (img.shape[1], img.shape[0]))
            r = {"video_id": entry.video_id, "frame_index": sample.index, "pts_s": sample.pts_s,
                 "face_found": face is not None, "track_id": track if face is not None else None}
            if face is not None:
                m = alignment_matrix(face.landmarks, fs.crop_size, fs.margin)
                win_lm = (np.stack([self.detector.landmarks(f, face.bbox) for f in sample.window])
                          if fs.window_landmarks else None)
                dyn = face_dynamics(sample.window, sample.window_pts_s, sample.pts_s, m, face.landmarks, win_lm,
                                    fs.crop_size)
                r.update(bbox=np.asarray(face.bbox, np.float32), face_score=face.score,
                         landmarks=face.landmarks.astype(np.float32).ravel(), dynamics=f16(dyn.vector),
                         motion_energy=dyn.motion_energy, motion_peak_offset_s=dyn.peak_offset_s)
                crops.append((len(frames), align(img, m, fs.crop_size)))
            frames.append(r)
            images.append(img)
            t_faces += time.perf_counter() - tf
            if len(images) >= cfg.encoders.batch_size:
                flush()
        flush()
        _add_face_deltas(frames)

        ta = time.perf_counter()
        audio = decode_audio(info, cfg.decode)
        t_decode += time.perf_counter() - ta
        ta = time.perf_counter()
        audio_rows = []
        if audio.size:
            starts, ends, feats = self.audio_encoder.encode(audio)
            audio_rows = [{"video_id": entry.video_id, "window_index": i, "start_s": float(s), "end_s": float(e),
                           "audio_feat": f16(f)} for i, (s, e, f) in enumerate(zip(starts, ends, feats))]
        utterances = utterances_for(entry, audio, cfg.decode.audio_rate, cfg.asr, self.storage_options) \
            if (audio.size or entry.utterances or entry.srt) else []
        utt_rows = [{"video_id": entry.video_id, "utt_index": u.index, "start_s": u.start_s, "end_s": u.end_s,
                     "text": u.text, "speaker": u.speaker, "source": u.source} for u in utterances]
        t_audio = time.perf_counter() - ta

        n_faces = sum(1 for f in frames if f["face_found"])
        row.update(n_frames=len(frames), n_faces=n_faces, n_utterances=len(utt_rows),
                   n_audio_windows=len(audio_rows), utterance_source=utterances[0].source if utterances else None,
                   t_decode_s=t_decode, t_faces_s=t_faces, t_encode_s=t_encode, t_audio_s=t_audio)
        if n_faces == 0:
            row.update(status="no_face", error_type="no_face", error="no face found in any sampled frame")
        elif not info.has_audio:
            row.update(status="no_audio", error_type="no_audio", error="the file has no audio stream")
        labels = []
        if entry.labels or entry.description or entry.utterance_labels or entry.split:
            labels = [{"video_id": entry.video_id, "split": entry.split, "labels": entry.labels,
                       "description": entry.description, "utterance_labels": entry.utterance_labels}]
        return frames, utt_rows, audio_rows, labels


def _add_face_deltas(frames: list[dict]) -> None:
    """Face-feature change from the previous sampled frame of the same track (zeros at a track start)."""
    prev = None
    for r in frames:
        feat = r.get("face_feat")
        if feat is None:
            prev = None
            continue
        if prev is not None and prev[0] == r["track_id"]:
            r["face_feat_delta"] = (feat.astype(np.float32) - prev[1].astype(np.float32)).astype(np.float16)
        else:
            r["face_feat_delta"] = np.zeros_like(feat)
        prev = (r["track_id"], feat)


class _FetchError(RuntimeError):
    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


def config_for_hash(cfg: ProcessConfig) -> dict:
    """The settings the rows depend on (timeouts and retry counts excluded)."""
    d = asdict(cfg)
    d.pop("threads", None)
    d["decode"].pop("timeout_s", None)
    d["decode"].pop("threads", None)
    d.pop("fetch_retries", None)
    d["encoders"].pop("batch_size", None)
    d["encoders"].pop("device", None)
    return d
