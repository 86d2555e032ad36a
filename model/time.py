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
        periods = torch.logspace(math.log10(cfg.min_period_s), math.log10(cfg.max_period_s), cfg.frequencies)
        self.register_buffer("angular", 2 * math.pi / periods, persistent=False)  # rad/s
        self.mlp = nn.Sequential(nn.Linear(2 * cfg.frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        phase = t.float().unsqueeze(-1) * self.angular
        return self.mlp(torch.cat([phase.sin(), phase.cos()], dim=-1))
