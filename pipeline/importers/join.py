"""Joining clips into one video with exact segment boundaries (MELD dialogue mode).

Each clip is first normalised on its own to a constant frame rate, one frame size (the
first clip's, others letterboxed) and 16 kHz mono AAC padded or cut to the video's length;
the normalised clips are then concatenated without re-encoding. A segment therefore starts
exactly on a frame: at (frames of all earlier clips) / fps seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from pipeline.decode import DEMUXERS, PROTOCOLS


class JoinError(RuntimeError):
    pass


def _probe(path: str) -> dict:
    cmd = ["ffprobe", "-v", "error", "-protocol_whitelist", PROTOCOLS, "-format_whitelist", DEMUXERS,
           "-show_streams", "-of", "json", "file:" + path]
    proc = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise JoinError(f"{Path(path).name}: not a readable video ({proc.stderr.decode(errors='replace').strip()[-200:]})")
    return json.loads(proc.stdout)


def _normalise(src: str, dst: str, fps: int, size: tuple[int, int], timeout_s: float) -> int:
    """Re-encode ``src`` to ``dst``; returns its frame count."""
    streams = _probe(src)["streams"]
    if not any(s.get("codec_type") == "video" for s in streams):
        raise JoinError(f"{Path(src).name}: has no video stream")
    has_audio = any(s.get("codec_type") == "audio" for s in streams)
    w, h = size
    vf = (f"fps={fps},scale={w}:{h}:force_original_aspect_ratio=decrease,"
          f"pad={w}:{h}:(ow-iw)/2:(oh-ih)/2,setsar=1")
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-protocol_whitelist", PROTOCOLS,
           "-format_whitelist", DEMUXERS, "-i", "file:" + src]
    if has_audio:
        audio = ["-map", "0:a:0", "-af", "aresample=16000,apad"]
    else:  # silence, so every segment has an audio track to concatenate
        cmd += ["-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono"]
        audio = ["-map", "1:a:0"]
    cmd += ["-map", "0:v:0", *audio, "-vf", vf, "-c:v", "libx264", "-preset", "veryfast", "-crf", "18",
            "-pix_fmt", "yuv420p", "-c:a", "aac", "-ar", "16000", "-ac", "1", "-shortest", "-f", "mp4", dst]
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise JoinError(f"{Path(src).name}: {proc.stderr.decode(errors='replace').strip()[-200:]}")
    info = _probe(dst)
    video = next(s for s in info["streams"] if s.get("codec_type") == "video")
    return int(video["nb_frames"])


def join_clips(paths: list[str], out_path: str | Path, fps: int = 25, timeout_s: float = 600.0
               ) -> list[tuple[float, float]]:
    """Concatenate ``paths`` into ``out_path``; returns each clip's (start_s, end_s) in the result."""
    if not paths:
        raise JoinError("nothing to join")
    first = next((s for s in _probe(paths[0])["streams"] if s.get("codec_type") == "video"), None)
    if first is None:
        raise JoinError(f"{Path(paths[0]).name}: has no video stream")
    size = (int(first["width"]) // 2 * 2, int(first["height"]) // 2 * 2)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix="microemo-join-", dir=out_path.parent)
    try:
        spans, cursor, parts = [], 0, []
        for i, src in enumerate(paths):
            dst = os.path.join(work, f"{i:05d}.mp4")
            frames = _normalise(src, dst, fps, size, timeout_s)
            spans.append((round(cursor / fps, 3), round((cursor + frames) / fps, 3)))
            cursor += frames
            parts.append(dst)
        listing = os.path.join(work, "list.txt")
        Path(listing).write_text("".join(f"file '{p}'\n" for p in parts))
        part = out_path.with_name(out_path.name + ".part")
        cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "concat", "-safe", "0", "-i", listing,
               "-c", "copy", "-movflags", "+faststart", "-f", "mp4", str(part)]
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
        if proc.returncode != 0:
            raise JoinError(f"joining into {out_path.name}: {proc.stderr.decode(errors='replace').strip()[-200:]}")
        os.replace(part, out_path)
        return spans
    finally:
        shutil.rmtree(work, ignore_errors=True)
