"""Audio Q-Former: the store's audio windows (one vector per window) -> Na tokens per clip.

Each window's feature is projected to ``width``, given a learned window-position embedding
(its order) and, with time binding on, the seconds embedding of the window's midpoint, so
audio and frames share one clock. A clip without audio still yields tokens (the Q-Former's
null memory), but the collator gives it no audio placeholders, so they never reach the LLM.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import AudioConfig, FeatureDims, TimeConfig
from model.qformer import QFormer
from model.time import TimeEmbedding


class AudioEncoder(nn.Module):
    """forward(audio_feat (B, W, Da), audio_span (B, W, 2) seconds, audio_mask (B, W) bool) -> (B, Na, h)."""

    def __init__(self, features: FeatureDims, cfg: AudioConfig, time_cfg: TimeConfig, time: bool = True):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(features.audio_dim, cfg.width), nn.LayerNorm(cfg.width))
        self.position = nn.Parameter(torch.randn(cfg.max_windows, cfg.width) * 0.02)
        self.time = TimeEmbedding(cfg.width, time_cfg) if time else None
        self.qformer = QFormer(cfg.qformer, cfg.width)

    @property
    def queries(self) -> int:
        return self.qformer.cfg.queries

    @property
    def out_dim(self) -> int:
        return self.qformer.hidden

    def forward(self, audio_feat: torch.Tensor, audio_span: torch.Tensor, audio_mask: torch.Tensor) -> torch.Tensor:
        w = audio_feat.shape[1]
        x = self.proj(audio_feat.to(self.position.dtype)) + self.position[:w]
        if self.time is not None:
            x = x + self.time(audio_span.float().mean(-1))
        return self.qformer(x, audio_mask)
