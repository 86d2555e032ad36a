"""Utterance-aware video Q-Former: frame tokens -> clip tokens + per-utterance tokens.

Windows are chosen by *time*: a frame belongs to an utterance's window when its timestamp
(seconds) lies in [start_s - margin_s, end_s + margin_s], whatever the sampling rate or frame
index. Planning is plain Python run by the collator (``plan_segments``, ``window_frames``); the
module receives frame indices and gathers.

- Utterances with no frame in their window (e.g. outside the clip) get no video tokens.
- More than ``max_segments`` utterances: the two neighbours with the smallest gap between
  them are merged, repeatedly, so long dialogues keep a bounded token budget and every
  stretch of speech stays covered.
- A segment longer than ``window_s`` is read as sub-windows of ``window_s`` every ``stride_s``
  (the last one ends at the segment's end); the sub-windows' outputs are averaged, so every
  segment contributes the same Nv tokens.
- Frames in a window get a learned frame-position embedding (their order within the window);
  when more than the window's frame budget fall in it, frames nearest to evenly spaced times
  are kept.
- The clip window (all frames) goes through its own Q-Former. Outputs are combined as
  [clip; segment 1; ...; segment S], each with a learned segment embedding (slot 0 = the
  whole clip, slot k = the k-th segment).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from model.config import QFormerConfig, VideoConfig
from model.qformer import QFormer


@dataclass
class Segment:
    """A stretch of speech that gets its own video tokens: utterances ``first``..``last`` (1-based,
    transcript order) spanning ``start_s``..``end_s`` seconds."""

    start_s: float
    end_s: float
    first: int
    last: int


def _in_window(pts: np.ndarray, start: float, end: float, margin: float) -> np.ndarray:
    return np.nonzero((pts >= start - margin) & (pts <= end + margin))[0]


def plan_segments(spans: list[tuple[float, float]], frame_pts: np.ndarray, cfg: VideoConfig) -> list[Segment]:
    """Segments for utterance ``spans`` (seconds, in transcript order) over frames at ``frame_pts``.

    Utterances whose window holds no frame are left out; then neighbours are merged until at
    most ``cfg.max_segments`` remain (smallest gap first; a tie merges the earlier pair).
    """
    pts = np.asarray(frame_pts, np.float64)
    segs = [Segment(float(s), float(max(s, e)), i + 1, i + 1) for i, (s, e) in enumerate(spans)
            if len(_in_window(pts, s, max(s, e), cfg.margin_s))]
    segs.sort(key=lambda g: (g.start_s, g.first))
    while len(segs) > cfg.max_segments:
        gaps = [segs[i + 1].start_s - segs[i].end_s for i in range(len(segs) - 1)]
        i = int(np.argmin(gaps))
        a, b = segs[i], segs[i + 1]
        segs[i:i + 2] = [Segment(min(a.start_s, b.start_s), max(a.end_s, b.end_s), min(a.first, b.first),
                                 max(a.last, b.last))]
    return segs


def select_by_time(idx: np.ndarray, pts: np.ndarray, start: float, end: float, budget: int) -> list[int]:
    """At most ``budget`` of the frames ``idx``: those nearest to evenly spaced times in [start, end]."""
    idx = list(idx)
    if len(idx) <= budget:
        return idx
    chosen: list[int] = []
    for t in np.linspace(start, end, budget):
        free = [i for i in idx if i not in chosen]
        chosen.append(min(free, key=lambda i: abs(pts[i] - t)))
    return sorted(chosen)


def window_frames(frame_pts: np.ndarray, seg: Segment, cfg: VideoConfig) -> list[list[int]]:
    """Frame indices of each sub-window of ``seg``; sub-windows without frames are dropped.

    The sub-windows cover the segment, so a planned segment (one with a frame) has at least one.
    """
    pts = np.asarray(frame_pts, np.float64)
    length = seg.end_s - seg.start_s
    if length <= cfg.window_s:
        starts = [seg.start_s]
    else:
        n = math.ceil((length - cfg.window_s) / cfg.stride_s) + 1
        starts = [min(seg.start_s + i * cfg.stride_s, seg.end_s - cfg.window_s) for i in range(n)]
    out = []
    for s in starts:
        e = min(s + cfg.window_s, seg.end_s)
        idx = _in_window(pts, s, e, cfg.margin_s)
        if len(idx):
            out.append(select_by_time(idx, pts, s - cfg.margin_s, e + cfg.margin_s, cfg.max_window_frames))
    return out


def clip_frames(frame_pts: np.ndarray, cfg: VideoConfig) -> list[int]:
    """Frame indices read by the whole-clip Q-Former (all, or ``max_clip_frames`` evenly in time)."""
    pts = np.asarray(frame_pts, np.float64)
    if len(pts) == 0:
        return []
    return select_by_time(np.arange(len(pts)), pts, float(pts.min()), float(pts.max()), cfg.max_clip_frames)


def window_dynamics(dynamics: torch.Tensor, face_found: torch.Tensor, clip_frames: torch.Tensor,
                    seg_frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per video window, the max and min of each dynamics value over the window's frames with a face,
    asinh-compressed (signed, magnitudes kept in order): (B, 1 + S, 2 * Dd), slot 0 the clip, as
    ``UtteranceVideo`` orders its windows; and (B, 1 + S) bool, whether the window has a face frame
    (a window without one gets zeros).

    dynamics (B, F, Dd); face_found (B, F) bool; clip_frames (B, Mc) and seg_frames (B, S, W, M)
    frame indices, -1 = pad (a segment's sub-windows are pooled together).
    """
    b, _, d = dynamics.shape
    windows = [clip_frames[:, None, :]]
    if seg_frames.shape[1]:
        windows.append(seg_frames.flatten(2))
    k = max(w.shape[-1] for w in windows)
    index = torch.cat([nn.functional.pad(w, (0, k - w.shape[-1]), value=-1) for w in windows], dim=1)  # (B, N, K)
    safe = index.clamp(min=0)
    rows = torch.arange(b, device=index.device)[:, None, None]
    values = dynamics[rows, safe].float()  # (B, N, K, Dd)
    on = (face_found[rows, safe] & (index >= 0))[..., None]
    high = values.masked_fill(~on, float("-inf")).amax(2)
    low = values.masked_fill(~on, float("inf")).amin(2)
    summary = torch.cat([high, low], dim=-1)
    has_face = on.any(2)
    return torch.where(has_face, summary, torch.zeros_like(summary)).asinh(), has_face[..., 0]


class DynamicsSummary(nn.Module):
    """Window dynamics summaries -> scores of the summary words: (B, 1 + S, K), and the (B, 1 + S)
    face mask of ``window_dynamics``.

    Each summary value is standardised by running statistics before the linear scores (the values
    span orders of magnitude: a linear layer on the raw summaries learns far slower). The statistics
    are buffers, updated from the windows with a face of each training batch: a running mean over
    the first rows, then an exponential average (``floor``); per rank, like BatchNorm without sync.
    The scores start at zero.
    """

    def __init__(self, dynamics_dim: int, n_words: int, floor: float = 0.01):
        super().__init__()
        d = 2 * dynamics_dim
        self.floor = floor
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("var", torch.ones(d))
        self.register_buffer("rows", torch.zeros(1))  # windows seen (sets the running average's weight)
        self.score = nn.Linear(d, n_words)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, dynamics, face_found, clip_frames, seg_frames) -> tuple[torch.Tensor, torch.Tensor]:
        x, on = window_dynamics(dynamics, face_found, clip_frames, seg_frames)
        if self.training and on.any():
            with torch.no_grad():
                rows = x[on]
                w = max(len(rows) / (float(self.rows) + len(rows)), self.floor)
                self.mean.lerp_(rows.mean(0).to(self.mean.dtype), w)
                self.var.lerp_(((rows - self.mean.float()) ** 2).mean(0).to(self.var.dtype), w)
                self.rows += len(rows)
        z = ((x - self.mean.float()) / (self.var.float() + 1e-2).sqrt()).clamp(-6.0, 6.0)
        return self.score(z.to(self.score.weight.dtype)), on


class WindowQFormer(nn.Module):
    """Frames of windows -> Nv tokens per window.

    frame_tokens: (N, M, Nq, d); frame_mask: (N, M) bool -> (N, Nv, hidden).
    """

    def __init__(self, cfg: QFormerConfig, frame_dim: int, max_frames: int):
        super().__init__()
        self.position = nn.Parameter(torch.randn(max_frames, frame_dim) * 0.02)
        self.qformer = QFormer(cfg, frame_dim)

    def forward(self, frame_tokens: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        n, m, q, d = frame_tokens.shape
        memory = (frame_tokens + self.position[:m, None, :]).reshape(n, m * q, d)
        mask = frame_mask[:, :, None].expand(n, m, q).reshape(n, m * q)
        return self.qformer(memory, mask)


def _gather(frame_tokens: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """frame_tokens (B, F, Nq, d), index (B, ..., M) with -1 padding -> (B, ..., M, Nq, d), mask (B, ..., M)."""
    b = frame_tokens.shape[0]
    mask = index >= 0
    flat = index.clamp(min=0).reshape(b, -1)
    batch = torch.arange(b, device=index.device)[:, None].expand_as(flat)
    gathered = frame_tokens[batch, flat]
    return gathered.reshape(*index.shape, *frame_tokens.shape[2:]), mask


class UtteranceVideo(nn.Module):
    """forward(frame_tokens (B, F, Nq, d), clip_frames (B, Mc), seg_frames (B, S, W, M), seg_mask (B, S))
    -> tokens (B, 1 + S, Nv, h), mask (B, 1 + S) bool. Slot 0 is the clip; with the utterance
    branch off, S must be 0."""

    def __init__(self, cfg: VideoConfig, frame_dim: int, utterance: bool = True):
        super().__init__()
        self.cfg = cfg
        self.clip = WindowQFormer(cfg.clip_qformer, frame_dim, cfg.max_clip_frames)
        self.utterance = WindowQFormer(cfg.utterance_qformer, frame_dim, cfg.max_window_frames) if utterance else None
        slots = 1 + (cfg.max_segments if utterance else 0)
        self.segment = nn.Parameter(torch.randn(slots, cfg.clip_qformer.hidden) * 0.02)

    @property
    def queries(self) -> int:
        return self.cfg.clip_qformer.queries

    @property
    def out_dim(self) -> int:
        return self.cfg.clip_qformer.hidden

    def forward(self, frame_tokens, clip_frames, seg_frames, seg_mask):
        tokens, mask = _gather(frame_tokens, clip_frames)
        clip = self.clip(tokens, mask)[:, None]  # (B, 1, Nv, h)
        b, s = seg_mask.shape
        if s == 0:
            return clip + self.segment[0], torch.ones(b, 1, dtype=torch.bool, device=clip.device)
        if self.utterance is None:
            raise ValueError("utterance branch is off but the batch has utterance segments")
        w = seg_frames.shape[2]
        tokens, mask = _gather(frame_tokens, seg_frames)  # (B, S, W, M, Nq, d)
        window_on = mask.any(-1)  # (B, S, W)
        out = clip.new_zeros(b, s, w, self.queries, self.out_dim)
        if window_on.any():
            out[window_on] = self.utterance(tokens[window_on], mask[window_on])
        weight = window_on.to(out.dtype)[..., None, None]
        segs = (out * weight).sum(2) / weight.sum(2).clamp(min=1.0)  # mean over sub-windows
        segs = segs * seg_mask[..., None, None]
        combined = torch.cat([clip, segs], dim=1) + self.segment[: 1 + s, None, :]
        ones = torch.ones(b, 1, dtype=torch.bool, device=seg_mask.device)
        return combined, torch.cat([ones, seg_mask], dim=1)
