"""SubRip (.srt) subtitles: utterance times and text, written and read with millisecond precision."""

from __future__ import annotations

import re
from dataclasses import dataclass


class SrtError(ValueError):
    """Malformed SRT; the message gives the cue number or line."""


@dataclass
class Cue:
    start_s: float
    end_s: float
    text: str


def _stamp(seconds: float) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def format_srt(cues: list[Cue]) -> str:
    blocks = []
    for i, cue in enumerate(cues, 1):
        blocks.append(f"{i}\n{_stamp(cue.start_s)} --> {_stamp(cue.end_s)}\n{cue.text.strip()}\n")
    return "\n".join(blocks)


_TIME = re.compile(r"^\s*(\d+):(\d{2}):(\d{2})[,.](\d{1,3})\s*-->\s*(\d+):(\d{2}):(\d{2})[,.](\d{1,3})")


def _seconds(h: str, m: str, s: str, frac: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(frac.ljust(3, "0")) / 1000


def parse_srt(text: str) -> list[Cue]:
    """Cues in file order. Raises SrtError naming the cue for a bad time line or end < start."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    cues = []
    for n, block in enumerate(re.split(r"\n\s*\n", text.strip()), 1):
        lines = [ln for ln in block.split("\n")]
        if not block.strip():
            continue
        # The index line is optional in the wild; the time line is not.
        if len(lines) > 1 and _TIME.match(lines[1]):
            time_line, body = lines[1], lines[2:]
        elif _TIME.match(lines[0]):
            time_line, body = lines[0], lines[1:]
        else:
            raise SrtError(f"cue {n}: no 'HH:MM:SS,mmm --> HH:MM:SS,mmm' line")
        g = _TIME.match(time_line).groups()
        start, end = _seconds(*g[:4]), _seconds(*g[4:])
        if end < start:
            raise SrtError(f"cue {n}: ends ({end:.3f} s) before it starts ({start:.3f} s)")
        cues.append(Cue(start, end, " ".join(x.strip() for x in body if x.strip())))
    return cues
