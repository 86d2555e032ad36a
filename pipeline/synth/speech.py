"""Speech for the synthetic corpus: espeak-ng with per-utterance voice settings, trimmed to the
voiced samples so utterance timestamps are exact, and the speech envelope that drives the mouth.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from dataclasses import dataclass
from xml.sax.saxutils import escape

import numpy as np

SAMPLE_RATE = 22050  # espeak-ng's native rate; the pipeline resamples to 16 kHz itself


class SpeechError(RuntimeError):
    pass


@dataclass
class Voice:
    """espeak-ng settings: voice variant, rate (words/min), pitch (0-99), pitch range, amplitude (0-200)."""

    variant: str
    rate_wpm: int
    pitch: int
    pitch_range: str  # SSML prosody range: x-low | low | medium | high | x-high
    amplitude: int


def range_name(pitch_range: int) -> str:
    """Map a 0-99 pitch range onto SSML's named ranges."""
    names = ("x-low", "low", "medium", "high", "x-high")
    return names[min(4, max(0, pitch_range * 5 // 100))]


def speak(text: str, voice: Voice, timeout_s: float = 30.0) -> np.ndarray:
    """Synthesize ``text``; returns int16 mono samples at ``SAMPLE_RATE`` with silence trimmed."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SpeechError("espeak-ng is not installed (apt-get install espeak-ng, or run `make setup`)")
    ssml = f'<speak><prosody range="{voice.pitch_range}">{escape(text)}</prosody></speak>'
    cmd = [exe, "-m", "-z", "--stdout", "-v", voice.variant, "-s", str(voice.rate_wpm),
           "-p", str(voice.pitch), "-a", str(voice.amplitude), ssml]
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise SpeechError(f"espeak-ng failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[:200]}")
    samples, rate = _read_wav(proc.stdout)
    if rate != SAMPLE_RATE:
        raise SpeechError(f"espeak-ng produced {rate} Hz audio, expected {SAMPLE_RATE}")
    return trim_silence(samples)


def _read_wav(data: bytes) -> tuple[np.ndarray, int]:
    # espeak-ng writes a canonical 44-byte header whose sizes are placeholders when it streams
    # to stdout, so the `wave` module cannot be trusted with the length: read the header here.
    if len(data) < 44 or data[:4] != b"RIFF" or data[8:12] != b"WAVE" or data[36:40] != b"data":
        raise SpeechError("espeak-ng output is not a canonical WAV stream")
    channels, rate = struct.unpack_from("<HI", data, 22)
    (bits,) = struct.unpack_from("<H", data, 34)
    if bits != 16 or channels != 1:
        raise SpeechError(f"unexpected espeak-ng output: {bits}-bit, {channels} channels")
    body = data[44:]
    return np.frombuffer(body[: len(body) // 2 * 2], dtype="<i2").copy(), rate


def trim_silence(samples: np.ndarray, threshold: float = 0.02, window: int = 110) -> np.ndarray:
    """Cut leading and trailing silence: keep from the first to the last 5 ms window whose peak
    exceeds ``threshold`` of the utterance's peak."""
    if samples.size == 0:
        return samples
    peak = np.abs(samples).max()
    if peak == 0:
        return samples[:0]
    n = samples.size // window * window
    frames = np.abs(samples[:n].reshape(-1, window)).max(axis=1)
    loud = np.flatnonzero(frames > threshold * peak)
    if loud.size == 0:
        return samples[:0]
    return samples[loud[0] * window: (loud[-1] + 1) * window]


def envelope(samples: np.ndarray, fps: int, n_frames: int) -> np.ndarray:
    """Per-video-frame speech envelope in [0, 1]: RMS over each frame's interval, normalised by
    the clip's loud level and lightly smoothed (the jaw cannot move faster than that)."""
    hop = SAMPLE_RATE / fps
    x = samples.astype(np.float32)
    rms = np.zeros(n_frames, np.float32)
    for i in range(n_frames):
        seg = x[int(i * hop): int((i + 1) * hop)]
        if seg.size:
            rms[i] = np.sqrt(np.mean(seg * seg))
    loud = np.percentile(rms[rms > 0], 90) if np.any(rms > 0) else 1.0
    env = np.clip(rms / max(loud, 1e-6), 0, 1)
    kernel = np.array([0.25, 0.5, 0.25], np.float32)
    return np.convolve(env, kernel, mode="same")
