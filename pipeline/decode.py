"""Decoding videos with ffmpeg: probing, sampled frames with full-rate windows, 16 kHz audio.

Untrusted input rules: ffmpeg and ffprobe run without a shell, read local files only
(``-protocol_whitelist file,pipe``; remote objects are fetched to local disk first), use
only the container demuxers in ``DEMUXERS`` (so a playlist or concat script disguised as
``.mp4`` cannot make ffmpeg open other files or URLs), and are killed after a timeout.
Duration, resolution and file size are checked against limits before decoding.

Frames: the video is resampled to a constant rate at its native fps (so frame ``n`` is at
exactly ``n / fps`` seconds from the first frame) and streamed; ``sample_fps`` frames per
second are emitted, each with the full-rate frames within ``window_s`` around it (the face
dynamics of a micro-expression live between samples). Only ``window + 1`` frames are ever
held in memory.
"""

from __future__ import annotations

import json
import math
import subprocess
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

DEMUXERS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,flv,mpeg,wav,mp3,aac,ogg,flac"
PROTOCOLS = "file,pipe"


@dataclass
class DecodeConfig:
    """Frame sampling, resizing, audio rate and the limits for untrusted input."""

    sample_fps: float = 2.0  # sampled frames per second of video
    window_s: float = 0.4  # span of full-rate frames around each sampled frame, seconds
    max_side: int = 640  # decoded frames are scaled so the longer side is at most this
    audio_rate: int = 16000  # Hz, mono
    timeout_s: float = 600.0  # per ffmpeg invocation
    max_duration_s: float = 3 * 3600.0
    max_pixels: int = 3840 * 2160
    max_bytes: int = 8 * 1024**3
    threads: int = 0  # ffmpeg decoding and filter threads; 0 = ffmpeg's default (about one per core)

    def __post_init__(self):
        if not 0 < self.sample_fps <= 60:
            raise ValueError(f"sample_fps must be in (0, 60], got {self.sample_fps}")
        if not 0 <= self.window_s <= 2.0:
            raise ValueError(f"window_s must be in [0, 2], got {self.window_s}")
        if self.max_side < 32:
            raise ValueError(f"max_side must be at least 32, got {self.max_side}")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")


class DecodeError(RuntimeError):
    """A video cannot be decoded; ``error_type`` is a stable short code for the videos table."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


@dataclass
class VideoInfo:
    path: str
    size_bytes: int
    duration_s: float
    has_video: bool
    has_audio: bool
    width: int = 0
    height: int = 0
    fps: float = 0.0
    video_codec: str = ""
    audio_codec: str = ""
    container: str = ""

    def scaled_size(self, max_side: int) -> tuple[int, int]:
        """Decoded frame size: aspect kept, longer side <= max_side, both even."""
        scale = min(1.0, max_side / max(self.width, self.height))
        w = max(2, int(round(self.width * scale / 2)) * 2)
        h = max(2, int(round(self.height * scale / 2)) * 2)
        return w, h


@dataclass
class SampledFrame:
    """A sampled frame and the full-rate frames around it (RGB uint8, timestamps in seconds)."""

    index: int
    pts_s: float
    image: np.ndarray  # (H, W, 3)
    window: np.ndarray  # (K, H, W, 3), includes the sampled frame
    window_pts_s: np.ndarray  # (K,)


def _run(cmd: list[str], timeout_s: float, what: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise DecodeError("timeout", f"{what} took longer than {timeout_s:.0f} s") from None
    except FileNotFoundError:
        raise DecodeError("ffmpeg_missing", f"{cmd[0]} is not installed (apt-get install ffmpeg)") from None


def _stderr_line(raw: bytes) -> str:
    lines = [ln.strip() for ln in raw.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no message"


def probe(path: str | Path, cfg: DecodeConfig = DecodeConfig()) -> VideoInfo:
    """Container and stream facts, checked against the limits; raises DecodeError."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DecodeError("missing_file", f"{path}: no such file") from None
    except OSError as exc:
        raise DecodeError("unreadable", f"{path}: {exc.strerror}") from None
    if not path.is_file():
        raise DecodeError("unreadable", f"{path}: not a regular file")
    if size == 0:
        raise DecodeError("empty_file", f"{path}: file is empty")
    if size > cfg.max_bytes:
        raise DecodeError("too_large", f"{path}: {size} bytes, over the limit of {cfg.max_bytes}")
    cmd = ["ffprobe", "-v", "error", "-protocol_whitelist", PROTOCOLS, "-format_whitelist", DEMUXERS,
           "-show_format", "-show_streams", "-of", "json", "file:" + str(path)]
    proc = _run(cmd, min(cfg.timeout_s, 60.0), "ffprobe")
    if proc.returncode != 0:
        raise DecodeError("corrupt", f"{path.name}: not a readable media file ({_stderr_line(proc.stderr)})")
    meta = json.loads(proc.stdout or b"{}")
    streams = meta.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video"
                  and not s.get("disposition", {}).get("attached_pic")), None)
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    fmt = meta.get("format", {})
    duration = _float(fmt.get("duration")) or _float((video or {}).get("duration")) or _float((audio or {}).get("duration"))
    info = VideoInfo(str(path), size, duration or 0.0, video is not None, audio is not None,
                     container=fmt.get("format_name", ""), audio_codec=(audio or {}).get("codec_name", ""))
    if video is not None:
        info.width, info.height = int(video.get("width") or 0), int(video.get("height") or 0)
        info.fps = _rate(video.get("avg_frame_rate")) or _rate(video.get("r_frame_rate"))
        info.video_codec = video.get("codec_name", "")
        if not info.duration_s:
            info.duration_s = _float(video.get("duration")) or 0.0
    if info.duration_s > cfg.max_duration_s:
        raise DecodeError("too_long", f"{path.name}: {info.duration_s:.0f} s, over the limit of {cfg.max_duration_s:.0f} s")
    if info.has_video and info.width * info.height > cfg.max_pixels:
        raise DecodeError("too_large", f"{path.name}: {info.width}x{info.height}, over the limit of {cfg.max_pixels} pixels")
    return info


def _float(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and x > 0 else None


def _rate(v) -> float:
    if not v or "/" not in str(v):
        return _float(v) or 0.0
    num, den = str(v).split("/", 1)
    try:
        return float(num) / float(den) if float(den) else 0.0
    except ValueError:
        return 0.0


class _Watchdog:
    """Kills a process that outlives its timeout; ``fired`` tells the reader why the stream ended."""

    def __init__(self, proc: subprocess.Popen, timeout_s: float):
        self.fired = False
        self._proc = proc
        self._timer = threading.Timer(timeout_s, self._kill)
        self._timer.daemon = True
        self._timer.start()

    def _kill(self):
        self.fired = True
        self._proc.kill()

    def cancel(self):
        self._timer.cancel()


def _threads(cfg: DecodeConfig) -> list[str]:
    """ffmpeg options for ``cfg.threads`` (global filter threads, then the input's decoder threads)."""
    return ["-filter_threads", str(cfg.threads), "-threads", str(cfg.threads)] if cfg.threads > 0 else []


def iter_samples(info: VideoInfo, cfg: DecodeConfig = DecodeConfig()) -> Iterator[SampledFrame]:
    """Stream sampled frames (with their full-rate windows) of a probed video."""
    if not info.has_video:
        raise DecodeError("no_video_stream", f"{Path(info.path).name}: has no video stream")
    fps = info.fps if 1.0 <= info.fps <= 240.0 else 25.0
    w, h = info.scaled_size(cfg.max_side)
    half = int(round(cfg.window_s / 2 * fps))
    frame_bytes = w * h * 3
    cmd = ["ffmpeg", "-nostdin", "-v", "error", *_threads(cfg), "-protocol_whitelist", PROTOCOLS,
           "-format_whitelist", DEMUXERS, "-i", "file:" + info.path, "-map", "0:v:0", "-an", "-sn", "-dn",
           "-vf", f"fps={fps:.6f},scale={w}:{h}:flags=area", "-pix_fmt", "rgb24", "-f", "rawvideo", "pipe:1"]
    # stderr to a file, not a pipe: a damaged file can make ffmpeg log more than a pipe
    # buffer holds, and it would then block while we block reading frames.
    errlog = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errlog)
    dog = _Watchdog(proc, cfg.timeout_s)
    # Sample k sits on full-rate frame round(k * fps / sample_fps).
    next_k, buf = 0, deque(maxlen=2 * half + 1)

    def target(k: int) -> int:
        return int(math.floor(k * fps / cfg.sample_fps + 0.5))

    def emit(k: int) -> SampledFrame:
        n = target(k)
        frames = [(i, f) for i, f in buf if n - half <= i <= n + half]
        idx = np.array([i for i, _ in frames])
        stack = np.stack([f for _, f in frames])
        centre = int(np.flatnonzero(idx == n)[0]) if n in idx else len(frames) - 1
        return SampledFrame(k, n / fps, stack[centre], stack, idx / fps)

    n = -1
    try:
        stream = proc.stdout
        while True:
            raw = stream.read(frame_bytes)
            if len(raw) < frame_bytes:
                break
            n += 1
            buf.append((n, np.frombuffer(raw, np.uint8).reshape(h, w, 3)))
            while n >= target(next_k) + half:
                yield emit(next_k)
                next_k += 1
        proc.wait()
        name = Path(info.path).name
        errlog.seek(0)
        err = errlog.read()
        if dog.fired:
            raise DecodeError("timeout", f"{name}: decoding took longer than {cfg.timeout_s:.0f} s")
        if proc.returncode != 0:
            raise DecodeError("corrupt", f"{name}: {_stderr_line(err)}")
        if n < 0:
            raise DecodeError("no_frames", f"{name}: no decodable video frames")
        # ffmpeg exits 0 on a cut-off file; the frame count tells.
        expected = info.duration_s * fps
        if n + 1 < 0.9 * expected - 2:
            raise DecodeError("truncated", f"{name}: {n + 1} of about {expected:.0f} frames decodable "
                                           f"({_stderr_line(err)})")
        while target(next_k) <= n:  # the tail: windows cut by the end of the video
            yield emit(next_k)
            next_k += 1
    finally:
        dog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        errlog.close()


def decode_audio(info: VideoInfo, cfg: DecodeConfig = DecodeConfig()) -> np.ndarray:
    """The first audio stream as float32 mono at ``cfg.audio_rate`` Hz (empty without audio)."""
    if not info.has_audio:
        return np.zeros(0, np.float32)
    cmd = ["ffmpeg", "-nostdin", "-v", "error", *_threads(cfg), "-protocol_whitelist", PROTOCOLS,
           "-format_whitelist", DEMUXERS, "-i", "file:" + info.path, "-map", "0:a:0", "-vn", "-sn", "-dn",
           "-ac", "1", "-ar", str(cfg.audio_rate), "-f", "f32le", "pipe:1"]
    proc = _run(cmd, cfg.timeout_s, "audio decoding")
    if proc.returncode != 0 and not proc.stdout:
        raise DecodeError("corrupt_audio", f"{Path(info.path).name}: {_stderr_line(proc.stderr)}")
    return np.frombuffer(proc.stdout[: len(proc.stdout) // 4 * 4], np.float32).copy()
