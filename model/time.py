"""Time binding: a continuous embedding of timestamps in seconds.

Frames and audio windows carry their time (seconds from the start of the clip), and utterances
are given in seconds too; embedding the *continuous* time rather than a frame index keeps the
three aligned whatever the sampling rate, and lets two identical frames at different times be
told apart (the same expression means something else in a different utterance).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.config import TimeConfig


class TimeEmbedding(nn.Module):
    """Seconds -> vectors: sin/cos at geometrically spaced periods, then a 2-layer MLP.

    forward(t): t (...,) float seconds -> (..., dim).
    """

    def __init__(self, dim: int, cfg: TimeConfig):
        super().__init__()
        n, lo, hi = cfg.frequencies, cfg.min_period_s, cfg.max_period_s
        periods = [lo * (hi / lo) ** (i / max(1, n - 1)) for i in range(n)]  # geometric, lo..hi
        # rad/s, kept as Python floats, not a buffer: casting the module to bf16 (DeepSpeed's bf16 engine
        # does) would round a buffer to 3 significant digits, a phase error of ~1 rad at 10 s for the
        # 0.2-s period; and plain floats also exist when the module is built on the meta device
        # (parameter counts). Phases are always computed in fp32.
        self.angular = [2 * math.pi / p for p in periods]
        self.mlp = nn.Sequential(nn.Linear(2 * cfg.frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angular = torch.tensor(self.angular, dtype=torch.float32, device=t.device)
        phase = t.float().unsqueeze(-1) * angular
        return self.mlp(torch.cat([phase.sin(), phase.cos()], dim=-1).to(self.mlp[0].weight.dtype))
