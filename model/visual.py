"""Global-local attention visual encoder: one sampled frame -> Nq tokens.

Per frame t at time tau_t (seconds):

- global tokens G_t: the frame encoder's Tg tokens (Dg each), projected to width dv, plus a
  learned position per token (grid cells and pooled token differ);
- local tokens L_t: three tokens from the main speaker's face: its descriptor (who / which
  expression), the descriptor's change since the previous sampled frame, and the dynamics of
  the face over the full-frame-rate window around t (region motion energy and landmark speed,
  which see micro-expressions shorter than the sampling interval). Each has a learned type
  embedding. Where no face was found the local tokens are masked everywhere;
- time binding: the seconds embedding of tau_t is added to every token of both streams;
- fusion: G attends to L (cross-attention then MLP, each with a tanh gate), and a per-frame
  Q-Former reads [G; L] into Nq tokens.

Frames are independent of each other here, so a change in one frame changes only that frame's
tokens; the video Q-Former decides which windows see it.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import Ablations, FeatureDims, TimeConfig, VisualConfig
from model.qformer import QFormer
from model.time import TimeEmbedding

LOCAL_TOKENS = 3  # face descriptor, its change, dynamics


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    # no input normalisation: motion energies carry their meaning in their magnitude
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out), nn.LayerNorm(d_out))


class LocalTokens(nn.Module):
    """Face features -> local tokens.

    face_feat, face_delta: (N, Df); dynamics: (N, Dd) -> (N, 3, width).
    """

    def __init__(self, features: FeatureDims, width: int):
        super().__init__()
        self.face = _mlp(features.face_dim, width)
        self.delta = _mlp(features.face_dim, width)
        self.dynamics = _mlp(features.dynamics_dim, width)
        self.kind = nn.Parameter(torch.randn(LOCAL_TOKENS, width) * 0.02)

    def forward(self, face_feat: torch.Tensor, face_delta: torch.Tensor, dynamics: torch.Tensor) -> torch.Tensor:
        tokens = torch.stack([self.face(face_feat), self.delta(face_delta), self.dynamics(dynamics)], dim=1)
        return tokens + self.kind


class GatedCrossAttention(nn.Module):
    """Global tokens read local tokens; gated residuals so the local stream is added gradually.

    x: (N, Tg, d) global tokens; local: (N, Tl, d); on: (N,) bool, False where there is no face
    (the frame's global tokens then pass through unchanged). Returns (N, Tg, d).
    """

    def __init__(self, width: int, heads: int, gate_init: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        # shape (1,), not a 0-dim scalar: DeepSpeed broadcasts parameters as byte views,
        # which a 0-dim tensor cannot give
        self.attn_gate = nn.Parameter(torch.full((1,), float(gate_init)))
        self.mlp_gate = nn.Parameter(torch.full((1,), float(gate_init)))

    def forward(self, x: torch.Tensor, local: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        on = on.to(x.dtype)[:, None, None]
        kv = self.norm_kv(local)
        attended, _ = self.attn(self.norm_q(x), kv, kv, need_weights=False)
        x = x + on * self.attn_gate.tanh() * attended
        return x + on * self.mlp_gate.tanh() * self.mlp(self.norm_mlp(x))


class VisualEncoder(nn.Module):
    """Frames -> per-frame tokens.

    forward(global_feat (B, F, Tg, Dg), face_feat (B, F, Df), face_delta (B, F, Df),
    dynamics (B, F, Dd), face_found (B, F) bool, frame_pts (B, F) seconds, frame_mask (B, F) bool)
    -> (B, F, Nq, dq); padded frames are zeros. Only valid frames are computed.
    """

    def __init__(self, features: FeatureDims, cfg: VisualConfig, time_cfg: TimeConfig, ablations: Ablations):
        super().__init__()
        self.features = features
        w = cfg.width
        self.global_proj = nn.Sequential(nn.Linear(features.global_dim, w), nn.LayerNorm(w))
        self.global_pos = nn.Parameter(torch.randn(features.global_tokens, w) * 0.02)
        self.time = TimeEmbedding(w, time_cfg) if ablations.time else None
        self.local = LocalTokens(features, w) if ablations.local else None
        self.fusion = GatedCrossAttention(w, cfg.fusion_heads, cfg.gate_init) if ablations.local else None
        self.frame_qformer = QFormer(cfg.frame_qformer, w)

    @property
    def out_dim(self) -> int:
        return self.frame_qformer.hidden

    @property
    def queries(self) -> int:
        return self.frame_qformer.cfg.queries

    def forward(self, global_feat, face_feat, face_delta, dynamics, face_found, frame_pts, frame_mask) -> torch.Tensor:
        b, f = frame_mask.shape
        dt = self.global_pos.dtype  # the module's own precision (fp32, or bf16 under DeepSpeed's bf16 engine)
        out = global_feat.new_zeros(b, f, self.queries, self.out_dim, dtype=dt)
        if not frame_mask.any():
            return out
        sel = frame_mask
        g = self.global_proj(global_feat[sel].to(dt)) + self.global_pos  # (N, Tg, w)
        tokens, mask = g, torch.ones(g.shape[:2], dtype=torch.bool, device=g.device)
        if self.local is not None:
            found = face_found[sel]
            local = self.local(face_feat[sel].to(dt), face_delta[sel].to(dt), dynamics[sel].to(dt))
            if self.time is not None:
                tau = self.time(frame_pts[sel])[:, None, :]
                g, local = g + tau, local + tau
            g = self.fusion(g, local, found)
            tokens = torch.cat([g, local], dim=1)
            mask = torch.cat([mask, found[:, None].expand(-1, local.shape[1])], dim=1)
        elif self.time is not None:
            tokens = g + self.time(frame_pts[sel])[:, None, :]
        out[sel] = self.frame_qformer(tokens, mask)
        return out
