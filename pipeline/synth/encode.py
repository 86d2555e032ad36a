"""Muxing rendered frames and speech into an mp4 (H.264 + AAC) with ffmpeg.

Frames are streamed to ffmpeg's stdin, never held whole; the file appears under its final
name only once ffmpeg has finished (written as ``NAME.part``, then renamed), so an
interrupted run leaves no truncated video behind. Bit-exact flags keep output identical
across runs with the same seed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np


class EncodeError(RuntimeError):
    pass


def ffmpeg_exe() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise EncodeError("ffmpeg is not installed (apt-get install ffmpeg, or run `make setup`)")
    return exe


def encode_mp4(frames: Iterable[np.ndarray], audio: np.ndarray, sample_rate: int, fps: int,
               size: tuple[int, int], out_path: str | Path, crf: int = 18, timeout_s: float = 300.0) -> Path:
    """Write RGB uint8 ``frames`` (each H x W x 3, ``size`` = (W, H)) at ``fps`` and int16 mono
    ``audio`` at ``sample_rate`` Hz to ``out_path`` as H.264 (yuv420p) + AAC."""
    out_path = Path(out_path)
    width, height = size
    part = out_path.with_name(out_path.name + ".part")
    with tempfile.NamedTemporaryFile(suffix=".s16le", dir=out_path.parent) as pcm, \
            tempfile.TemporaryFile() as log:
        pcm.write(np.ascontiguousarray(audio, dtype="<i2").tobytes())
        pcm.flush()
        cmd = [
            ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0",
            "-f", "s16le", "-ar", str(sample_rate), "-ac", "1", "-i", pcm.name,
            "-map", "0:v:0", "-map", "1:a:0",
            "-c:v", "libx264", "-preset", "veryfast", "-crf", str(crf), "-pix_fmt", "yuv420p",
            "-g", str(2 * fps), "-threads", "1",
            "-c:a", "aac", "-b:a", "64k",
            "-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact",
            "-map_metadata", "-1", "-movflags", "+faststart", "-f", "mp4", str(part),
        ]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log)
        try:
            for frame in frames:
                if frame.shape != (height, width, 3) or frame.dtype != np.uint8:
                    raise EncodeError(f"frame of shape {frame.shape} {frame.dtype}, expected ({height}, {width}, 3) uint8")
                proc.stdin.write(frame.tobytes())
            proc.stdin.close()
            rc = proc.wait(timeout=timeout_s)
        except BaseException:
            proc.kill()
            proc.wait()
            part.unlink(missing_ok=True)
            raise
        if rc != 0:
            log.seek(0)
            part.unlink(missing_ok=True)
            raise EncodeError(f"ffmpeg exited {rc} writing {out_path.name}: {log.read().decode(errors='replace')[-500:]}")
    os.replace(part, out_path)
    return out_path
