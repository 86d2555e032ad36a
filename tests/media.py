"""Reading rendered media back in tests, with tools independent of the code under test
(ffprobe, the ffmpeg CLI, OpenCV's own decoder)."""

from __future__ import annotations

import json
import subprocess

import cv2
import numpy as np


def ffprobe(path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)],
                         capture_output=True, check=True, text=True).stdout
    return json.loads(out)


def decode_audio(path, rate: int = 16000) -> np.ndarray:
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "f32le", "-ac", "1", "-ar", str(rate), "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.float32)


def decode_frames(path) -> list[np.ndarray]:
    """Every frame, RGB uint8, in order."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames
